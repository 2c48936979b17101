//! DreamBooth training: the loop, optimiser, loss, checkpoints and the `train` command, over
//! the models `pipeline` loads.

pub mod adamw8bit;
pub mod checkpoint;
pub mod cli;
pub mod command;
pub mod data;
pub mod inplace;
pub mod interrupt;
pub mod loss;
pub mod loss_scale;
pub mod metrics_log;
pub mod optim;
pub mod preflight;
pub mod tensorboard;
pub mod trainer;
