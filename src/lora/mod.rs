//! LoRA files: diffusers' (`pytorch_lora_weights.safetensors`, old `lora.down` and PEFT
//! `lora_A`/`lora_B` naming) and kohya sd-scripts' (`lora_unet_*`/`lora_te_*`, the format
//! AUTOMATIC1111 and ComfyUI load), for SD 1.x/2.x and SDXL (`text_encoder_2.`, `lora_te1_`/
//! `lora_te2_`, kohya's LDM-numbered `lora_unet_input_blocks_*`), read into one in-memory form
//! keyed by the diffusers module path; written in either format; folded into base weights.

pub mod cli;
pub mod describe;
pub mod kerashub;
pub mod merge;
pub mod names;
pub mod read;
pub mod write;

use crate::tensor::RawTensor;
use std::collections::BTreeMap;

/// The file name diffusers' `load_lora_weights` looks for first in a folder.
pub const DIFFUSERS_FILE_NAME: &str = "pytorch_lora_weights.safetensors";

/// The model a LoRA module adapts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    Unet,
    /// CLIP text encoder; module paths start with `text_model.`.
    TextEncoder,
    /// SDXL's second text encoder (OpenCLIP-G, diffusers' `text_encoder_2`,
    /// `CLIPTextModelWithProjection`); module paths start with `text_model.` or are
    /// `text_projection`.
    TextEncoder2,
}

impl Part {
    /// For messages.
    pub fn name(self) -> &'static str {
        match self {
            Part::Unet => "UNet",
            Part::TextEncoder => "text encoder",
            Part::TextEncoder2 => "text encoder 2",
        }
    }

    /// The pipeline sub-folder holding the adapted weights, which is also the key prefix of
    /// diffusers' LoRA files (`unet.`, `text_encoder.`, `text_encoder_2.`).
    pub fn dir(self) -> &'static str {
        match self {
            Part::Unet => "unet",
            Part::TextEncoder => "text_encoder",
            Part::TextEncoder2 => "text_encoder_2",
        }
    }

    /// The weights file name in [`Part::dir`].
    pub fn weights_name(self) -> &'static str {
        match self {
            Part::Unet => "diffusion_pytorch_model.safetensors",
            Part::TextEncoder | Part::TextEncoder2 => "model.safetensors",
        }
    }

    /// `module` as this part's path: text-encoder paths get `text_model.` when they lack it
    /// (except the projection of `CLIPTextModelWithProjection`, which sits beside `text_model`).
    pub fn normalize(self, module: &str) -> String {
        match self {
            Part::TextEncoder2 if module == "text_projection" => module.to_owned(),
            Part::TextEncoder | Part::TextEncoder2 if !module.starts_with("text_model.") => format!("text_model.{module}"),
            _ => module.to_owned(),
        }
    }
}

/// The model family a LoRA file adapts: it decides the kohya names written (`lora_te_` or
/// `lora_te1_`/`lora_te2_`, diffusers or LDM numbering of the UNet), diffusers' key style and the
/// metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// Stable Diffusion 1.x / 2.x (one text encoder, four UNet levels).
    Sd,
    /// Stable Diffusion XL (two text encoders, three UNet levels).
    Sdxl,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd => "SD 1.x/2.x",
            Family::Sdxl => "SDXL",
        }
    }
}

/// The format a file was read as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `unet.<module>.lora.down.weight`, `text_encoder.<module>.lora_linear_layer.down.weight`
    /// (what diffusers' DreamBooth LoRA script writes), or the older attention-processor keys.
    Diffusers,
    /// `unet.<module>.lora_A.weight` / `lora_B.weight` (PEFT names).
    Peft,
    /// `lora_unet_<module_with_underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`.
    Kohya,
}

/// One adapted layer: `W' = W + (alpha / rank) · up · down`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraModule {
    /// `(r, in)` for a Linear, `(r, in, k, k)` for a conv; f32.
    pub down: RawTensor,
    /// `(out, r)` for a Linear, `(out, r, 1, 1)` for a conv; f32.
    pub up: RawTensor,
    /// As stored (kohya `.alpha`), or the rank when the file has none.
    pub alpha: f64,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.down.shape[0]
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank() as f64
    }

    /// Input width: `in` of `down`.
    pub fn in_dim(&self) -> usize {
        self.down.shape[1]
    }

    /// Output width: `out` of `up`.
    pub fn out_dim(&self) -> usize {
        self.up.shape[0]
    }

    /// A k×k conv with k > 1 (kohya's LoCon); Linear and 1×1 layers are not.
    pub fn is_conv(&self) -> bool {
        self.down.shape.len() == 4 && self.down.shape[2..].iter().any(|k| *k > 1)
    }
}

/// A LoRA file's modules by (part, diffusers module path), and its safetensors metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSet {
    pub modules: BTreeMap<(Part, String), LoraModule>,
    pub format: Format,
    pub metadata: BTreeMap<String, String>,
}

impl LoraSet {
    /// Number of modules of `part`.
    pub fn count(&self, part: Part) -> usize {
        self.modules.keys().filter(|(p, _)| *p == part).count()
    }
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Diffusers => "diffusers",
            Format::Peft => "PEFT",
            Format::Kohya => "kohya",
        }
    }
}
