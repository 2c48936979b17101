//! DreamBooth training pieces: noise schedule, optimiser, loss.

pub mod checkpoint;
pub mod command;
pub mod data;
pub mod inplace;
pub mod interrupt;
pub mod loss;
pub mod loss_scale;
pub mod optim;
pub mod prompt;
pub mod rng;
pub mod schedule;
pub mod trainer;
