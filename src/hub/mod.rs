//! Publishing to a Hugging Face Hub (the real one or any server speaking its protocol).

pub mod auth;
pub mod client;
pub mod download;
pub mod folder_check;
pub mod local_files;
pub mod model_card;
pub mod push;
