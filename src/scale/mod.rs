//! Beyond one process: many subjects through job arrays (a manifest, one row per job, chosen by
//! the scheduler's index variable), the launcher variables that say which row or rank a process
//! is, and the collectives that join the ranks of one data-parallel run.

pub mod collective;
pub mod dist;
pub mod launch;
pub mod manifest;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod tcp;
