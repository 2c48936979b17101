//! Conversions between KerasCV weight files and diffusers pipeline folders.

pub mod kerashub;
pub mod phases;
pub mod pieces;
pub mod plan;
pub mod sd3_to_diffusers;
pub mod sd3_to_keras;
pub mod stream;
pub mod textual_inversion;
pub mod to_diffusers;
pub mod to_keras;
