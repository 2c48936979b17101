//! Differentiable Stable Diffusion models for training (Candle), loading diffusers weights.

pub mod attention;
pub mod builder;
pub mod checkpoint;
pub mod clip;
pub mod conv;
pub mod forward;
pub mod frozen;
pub mod layers;
pub mod lora;
pub mod normalize;
pub mod precomputed;
pub mod resnet;
pub mod unet;
pub mod vae;
pub mod weights;

#[cfg(test)]
pub mod testing;
