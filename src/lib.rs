//! dreambridge: KerasCV Stable Diffusion checkpoints ⇄ diffusers, verified numerically.

pub mod mapping;
pub mod keras;
pub mod tensor;
pub mod convert;
pub mod diffusers;
pub mod output;
pub mod progress;
pub mod inspect;
pub mod sample;
pub mod hub;
pub mod lora;
pub mod single_file;
pub mod models;
pub mod pipeline;
pub mod rng;
pub mod train;
pub mod generate;
pub mod device;
pub mod eval;
pub mod alloc;
pub mod bench;
pub mod failure;
pub mod scale;
pub mod switches;
