//! DreamBooth training pieces: noise schedule, optimiser, loss.

pub mod data;
pub mod loss;
pub mod optim;
pub mod prompt;
pub mod schedule;
