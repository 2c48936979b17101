//! DreamBooth training pieces: noise schedule, optimiser, loss.

pub mod loss;
pub mod optim;
pub mod schedule;
