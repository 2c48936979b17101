//! `dreambridge bench`: SD 1.5-size training steps and text-to-image timed on the chosen device
//! (random weights: no real ones can be had), and a check that the GPU computes what the CPU does.
//! `bench/vs_diffusers.sh` runs the same work in PyTorch diffusers and prints the ratios.

pub mod cli;
pub mod generate;
pub mod gpu_check;
pub mod memory;
pub mod profile;
pub mod sd15;
pub mod stats;
pub mod train_step;
