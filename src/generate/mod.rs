//! Text-to-image with a loaded pipeline: the samplers (one file per diffusers scheduler) and the
//! guided sampling loop, shared by `dreambridge generate`, class-image generation and validation
//! images.

pub mod ddim;
pub mod text_to_image;
