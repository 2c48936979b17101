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
    find_weights_of(folder, c.dir(), &c.weights_name(false))
}

/// [`find_weights`] for any sub-folder `part` whose weights are `file` (`model.safetensors`, ...),
/// such as SDXL's `text_encoder_2`; its `fp16` variant is taken when the plain file is missing.
pub fn find_weights_of(folder: &Path, part: &str, file: &str) -> Result<PathBuf> {
    let dir = folder.join(part);
    let stem = file.trim_end_matches(".safetensors");
    for name in [file.to_string(), format!("{stem}.fp16.safetensors")] {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    let index = dir.join(format!("{file}.index.json"));
    if index.is_file() {
        bail!("{}: sharded weights are not supported yet", index.display());
    }
    bail!("{}: no {file} (safetensors weights are needed; .bin files are not read)", dir.display())
}
