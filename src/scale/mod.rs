//! Beyond one process: many subjects through job arrays (a manifest, one row per job, chosen by
//! the scheduler's index variable) and the launcher variables that say which row or rank a
//! process is.

pub mod collective;
pub mod launch;
pub mod manifest;
