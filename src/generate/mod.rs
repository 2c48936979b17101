//! Text-to-image with a loaded pipeline: the samplers (one file per diffusers scheduler) and the
//! guided sampling loop, shared by `dreambridge generate`, class-image generation and validation
//! images.

pub mod ddim;
pub mod ddpm;
pub mod dpm_solver_multistep;
pub mod euler_ancestral_discrete;
pub mod scheduler;
pub mod trajectory;
pub mod text_to_image;
