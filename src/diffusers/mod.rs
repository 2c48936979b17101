//! The diffusers side: safetensors I/O, configs and the pipeline folder layout.

pub mod configs;
pub mod layout;
pub mod sd3;
pub mod sdxl;
pub mod st_read;
pub mod tokenizer;
pub mod st_write;
