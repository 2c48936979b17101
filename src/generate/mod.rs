//! Text-to-image with a diffusers folder: DDIM sampling with classifier-free guidance, shared by
//! `dreambridge generate`, class-image generation and validation images.

pub mod ddim;
pub mod pipeline;
