//! Where things live in a diffusers pipeline folder.

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Unet,
    TextEncoder,
    Vae,
}

impl Component {
    pub const ALL: [Component; 3] = [Component::Unet, Component::TextEncoder, Component::Vae];

    /// Sub-folder name, as in `model_index.json`.
    pub fn dir(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::Vae => "vae",
        }
    }

    /// Weight file name; `half` gives diffusers' `fp16` variant name.
    pub fn weights_name(self, half: bool) -> String {
        let stem = if self == Component::TextEncoder { "model" } else { "diffusion_pytorch_model" };
        if half {
            format!("{stem}.fp16.safetensors")
        } else {
            format!("{stem}.safetensors")
        }
    }

    pub fn from_name(name: &str) -> Option<Component> {
        Component::ALL.into_iter().find(|c| c.dir() == name)
    }
}

/// A component's single-file safetensors weights in `folder` (plain name first, then `fp16`).
/// The weights of variant `variant` (`<stem>.<variant>.safetensors`), as diffusers' `variant=`
/// loads them; a missing variant file is an error naming it.
pub fn find_variant_weights(folder: &Path, c: Component, variant: &str) -> Result<PathBuf> {
    let plain = c.weights_name(false);
    let stem = plain.trim_end_matches(".safetensors");
    let p = folder.join(c.dir()).join(format!("{stem}.{variant}.safetensors"));
    anyhow::ensure!(p.is_file(), "{}: missing (--variant {variant} reads each part's `{stem}.{variant}.safetensors`)", p.display());
    Ok(p)
}

pub fn find_weights(folder: &Path, c: Component) -> Result<PathBuf> {
    let dir = folder.join(c.dir());
    for half in [false, true] {
        let p = dir.join(c.weights_name(half));
        if p.is_file() {
            return Ok(p);
        }
    }
    let index = dir.join(format!("{}.index.json", c.weights_name(false)));
    if index.is_file() {
        bail!("{}: sharded weights are not supported yet", index.display());
    }
    bail!("{}: no {} (safetensors weights are needed; .bin files are not read)", dir.display(), c.weights_name(false))
}
