//! Conversions between KerasCV weight files and diffusers pipeline folders.

pub mod plan;
