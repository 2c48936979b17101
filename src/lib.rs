//! dreambridge: KerasCV Stable Diffusion checkpoints ⇄ diffusers, verified numerically.

pub mod mapping;
