//! DreamBooth's metrics (the DreamBooth paper, §4.1): DINO (subject fidelity, ViT-S/16 CLS
//! features), CLIP-I (subject fidelity, CLIP image features) and CLIP-T (prompt fidelity, CLIP
//! image against text features), as the mean cosine similarity over every generated × real pair
//! (CLIP-T: over generated images), raw cosine as the paper reports it.

pub mod clip;
pub mod dino;
pub mod dreambench;
pub mod pil_resize;
pub mod preprocess;
pub mod score;
