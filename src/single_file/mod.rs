//! Single-file Stable Diffusion checkpoints in the original (CompVis LDM) layout that
//! AUTOMATIC1111, ComfyUI and civitai use: the UNet under `model.diffusion_model.`, the VAE under
//! `first_stage_model.`, the text encoder under `cond_stage_model.transformer.` (SD1) or
//! `cond_stage_model.model.` (SD2). Names come from the `mappings/ldm_*.toml` tables against
//! diffusers'; a component seen through its table ([`view::ComponentView`]) is matched by the
//! same KerasCV/diffusers tables as any diffusers file, which checks every tensor and binds the
//! model's widths for its config.

pub mod base;
pub mod ckpt;
pub mod convert;
pub mod detect;
pub mod export;
pub mod sd3;
pub mod sdxl;
pub mod view;

use crate::convert::plan::{detect as detect_table, Plan};
use crate::mapping::rename::rename_table;
use crate::tensor::TensorSource;
use anyhow::{bail, Context, Result};
use detect::Prediction;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use view::ComponentView;

/// The layout name used in messages and tables.
pub const LAYOUT: &str = "ldm";

/// True when `head` (the first 9 bytes) starts a safetensors file: a little-endian header length,
/// then the JSON header's `{`. Checked first: the length's low byte can be anything, 0x80 (a
/// pickle's first byte) included.
pub fn looks_like_safetensors(head: &[u8]) -> bool {
    head.len() == 9 && head[8] == b'{' && u64::from_le_bytes(head[..8].try_into().unwrap()) < (1 << 32)
}

/// Opens a `.safetensors` file or a torch zip checkpoint, by content (not by extension).
pub fn open_tensors(path: &Path) -> Result<Arc<dyn TensorSource>> {
    let mut head = [0u8; 9];
    let mut file = std::fs::File::open(path).context("cannot open")?;
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..]).context("cannot read")? {
            0 => break,
            k => n += k,
        }
    }
    let head = &head[..n];
    if looks_like_safetensors(head) {
        return Ok(Arc::new(crate::diffusers::st_read::StFile::open(path)?));
    }
    if ckpt::looks_like_torch_zip(head) {
        return Ok(Arc::new(ckpt::Checkpoint::open(path)?));
    }
    if ckpt::looks_like_legacy_pickle(head) {
        bail!("a bare pickle (torch's format before 1.6) is not read; re-save it with a current torch.save or as safetensors");
    }
    bail!("neither a safetensors file nor a torch checkpoint archive")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_headers_of_any_length_are_not_taken_for_pickles() {
        // A header length of 0x1eb80 starts the file with 0x80, a pickle's protocol byte.
        let mut head = 0x1eb80u64.to_le_bytes().to_vec();
        head.push(b'{');
        assert!(looks_like_safetensors(&head) && ckpt::looks_like_legacy_pickle(&head));
        assert!(!looks_like_safetensors(b"PK\x03\x04\x14\x00\x00\x00\x00"));
        assert!(!looks_like_safetensors(b"{\"a\": 1}"));
    }
}

/// How to read a single file.
#[derive(Clone, Debug, Default)]
pub struct ReadOptions {
    /// Take the UNet from the file's EMA copy (`model_ema.*`).
    pub ema: bool,
    pub sd_version: Option<u8>,
    pub prediction: Option<detect::PredictionType>,
}

/// One component matched: its view and the tables' plans (two for the VAE: encoder, decoder).
pub struct Part {
    pub view: Arc<ComponentView>,
    pub plans: Vec<Plan>,
}

/// A single-file checkpoint, read and checked.
pub struct SingleFile {
    pub path: PathBuf,
    pub source: Arc<dyn TensorSource>,
    pub sd_version: u8,
    pub prediction: Prediction,
    pub unet: Part,
    pub text_encoder: Option<Part>,
    pub vae: Option<Part>,
    /// Tensors outside the three components (schedule buffers, EMA copies, ...).
    pub other_keys: usize,
    /// EMA copies of weights (`model_ema.*` beside its `decay` and `num_updates`).
    pub ema_keys: usize,
}

impl SingleFile {
    /// Reads and checks `path`; errors name the file and the first missing or misshapen key.
    pub fn open(path: &Path, opts: &ReadOptions) -> Result<SingleFile> {
        Self::open_inner(path, opts).with_context(|| path.display().to_string())
    }

    fn open_inner(path: &Path, opts: &ReadOptions) -> Result<SingleFile> {
        let source = open_tensors(path)?;
        let keys = source.keys();
        if sd3::is_sd3_source(&*source) {
            bail!("a Stable Diffusion 3 single file: read here by `convert single-file-to-diffusers` only");
        }
        sdxl::refuse_in_sd_reader(&source)?;
        let unet_prefix = rename_table(LAYOUT, "unet", Some(1))?.prefix;
        if !keys.iter().any(|k| k.starts_with(&unet_prefix)) {
            let sample: Vec<&str> = keys.iter().take(3).map(String::as_str).collect();
            bail!(
                "not a Stable Diffusion single-file checkpoint: no `{unet_prefix}*` tensors ({} tensors, such as {})",
                keys.len(),
                sample.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
            );
        }
        let sd_version = match opts.sd_version {
            Some(v) => v,
            None => detect::sd_version(&*source)?,
        };
        let part = |component: &str, kinds: &[&str]| -> Result<Option<Part>> {
            let table = rename_table(LAYOUT, component, Some(sd_version))?;
            let view = ComponentView::new(source.clone(), table, opts.ema && component == "unet")?;
            if !view.is_present() {
                return Ok(None);
            }
            let plans = kinds
                .iter()
                .map(|kind| {
                    detect_table(
                        |t| {
                            if t.kind != *kind {
                                bail!("not a {kind}");
                            }
                            Plan::for_diffusers(&view, t)
                        },
                        Some(sd_version),
                        Some(kind),
                    )
                    .with_context(|| format!("{component} (`{}*`)", view.table.prefix))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Some(Part { view: Arc::new(view), plans }))
        };
        let v = sd_version;
        let unet = part("unet", &[&format!("unet-sd{v}")])?.context("no UNet tensors")?;
        let text_encoder = part("text_encoder", &[&format!("text-encoder-sd{v}")])?;
        let vae = part("vae", &["vae-encoder", "vae-decoder"])?;
        let prediction = detect::prediction(path, &*source, sd_version, opts.prediction)?;
        let in_parts: usize = [Some(&unet), text_encoder.as_ref(), vae.as_ref()]
            .into_iter()
            .flatten()
            .map(|p| p.view.keys().len() + p.view.ignored.len() + p.view.unknown.len())
            .sum();
        let ema_keys = keys.iter().filter(|k| k.starts_with("model_ema.") && !matches!(k.as_str(), "model_ema.decay" | "model_ema.num_updates")).count();
        Ok(SingleFile {
            path: path.to_owned(),
            other_keys: keys.len().saturating_sub(in_parts),
            source,
            sd_version,
            prediction,
            unet,
            text_encoder,
            vae,
            ema_keys,
        })
    }

    /// The components present, by diffusers folder name.
    pub fn parts(&self) -> Vec<(&'static str, &Part)> {
        let mut out = vec![("unet", &self.unet)];
        if let Some(p) = &self.text_encoder {
            out.push(("text_encoder", p));
        }
        if let Some(p) = &self.vae {
            out.push(("vae", p));
        }
        out
    }
}

/// True when `path` looks like a single-file checkpoint by name (`.safetensors`, `.ckpt`, `.pt`,
/// `.pth`) and is a file: how `train`/`generate` tell one from a diffusers folder.
pub fn is_single_file(path: &Path) -> bool {
    path.is_file() && matches!(path.extension().and_then(|e| e.to_str()), Some("safetensors" | "ckpt" | "pt" | "pth" | "bin"))
}
