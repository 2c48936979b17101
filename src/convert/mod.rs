//! Conversions between KerasCV weight files and diffusers pipeline folders.

pub mod phases;
pub mod pieces;
pub mod plan;
pub mod stream;
pub mod textual_inversion;
pub mod to_diffusers;
pub mod to_keras;
