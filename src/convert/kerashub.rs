//! KerasHub's Stable Diffusion 3: a preset folder (`config.json` + `model.weights.h5`), a whole
//! `StableDiffusion3Backbone` `.weights.h5`, or the MMDiT alone (`backbone.diffuser.save_weights`,
//! what the keras.io SD3 DreamBooth example writes), each part matched against its KerasHub
//! table under its own root in the file.

use super::plan::Plan;
use crate::diffusers::sd3::{self, Clip, Variant};
use crate::keras::{KerasFile, KerasFormat};
use crate::mapping::{table_for, Symbols};
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Where the parts of a backbone sit in its Keras 3 file.
pub const MMDIT_ROOT: &str = "layers/mm_di_t/layers/";
pub const CLIP_L_ROOT: &str = "layers/clip_text_encoder/layers/";
pub const CLIP_G_ROOT: &str = "layers/clip_text_encoder_1/layers/";
pub const CLIP_L_PROJECTION_ROOT: &str = "layers/clip_projection/";
pub const CLIP_G_PROJECTION_ROOT: &str = "layers/clip_projection_1/";
pub const VAE_ENCODER_ROOT: &str = "layers/vae_encoder/";
pub const VAE_DECODER_ROOT: &str = "layers/vae_decoder/";

/// What a KerasHub SD3 input holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// A preset folder: backbone weights plus `config.json` and tokenizer assets.
    Preset,
    /// A whole backbone's `.weights.h5`.
    Backbone,
    /// The MMDiT alone.
    Mmdit,
}

impl Form {
    pub fn describe(self) -> &'static str {
        match self {
            Form::Preset => "KerasHub preset",
            Form::Backbone => "KerasHub backbone weights",
            Form::Mmdit => "KerasHub MMDiT-only weights",
        }
    }
}

/// One CLIP encoder of the backbone: its encoder and its projection.
pub struct ClipParts {
    pub encoder: Plan,
    pub projection: Plan,
    /// The activation the preset's config names (`quick_gelu`, `gelu`), if there is a config.
    pub activation: Option<String>,
}

/// A KerasHub SD3 input, every part matched.
pub struct Sd3Keras {
    /// The preset folder or weights file as given.
    pub path: PathBuf,
    pub form: Form,
    pub file: KerasFile,
    /// The preset's `config.json`, if any.
    pub config: Option<Value>,
    pub mmdit: Plan,
    pub variant: Variant,
    /// MMDiT attention heads (config, q/k norm width, or width / 64).
    pub heads: usize,
    pub clip_l: Option<ClipParts>,
    pub clip_g: Option<ClipParts>,
    /// VAE encoder and decoder.
    pub vae: Option<(Plan, Plan)>,
}

/// True when `path` looks like a KerasHub SD3 input (checked cheaply: a preset folder's
/// `config.json`, or an HDF5 file with an MMDiT in it).
pub fn is_sd3(path: &Path) -> bool {
    if path.is_dir() {
        return std::fs::read_to_string(path.join("config.json")).is_ok_and(|t| t.contains("StableDiffusion3Backbone"));
    }
    KerasFile::open(path).is_ok_and(|f| f.format == KerasFormat::Keras3 && (f.has_dataset("layers/mm_di_t") || f.has_dataset("layers/mm_di_t_block")))
}

/// The backbone config of a preset folder, checked to be SD3's.
fn read_preset_config(folder: &Path) -> Result<Value> {
    let path = folder.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read (a KerasHub preset folder has one)", path.display()))?;
    let config: Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let class = config.get("registered_name").or_else(|| config.get("class_name")).and_then(Value::as_str).unwrap_or("?");
    ensure!(class.ends_with("StableDiffusion3Backbone"), "{}: a preset of `{class}`, not of StableDiffusion3Backbone", path.display());
    Ok(config)
}

/// The weights file of a preset folder: `model.weights.h5`, or for weights above `save_to_preset`'s
/// 10 GB shard size, the shard map `model.weights.json` (its shards `model_00000.weights.h5`, …
/// beside it).
fn preset_weights(folder: &Path) -> Result<PathBuf> {
    let single = folder.join("model.weights.h5");
    if single.is_file() {
        return Ok(single);
    }
    let sharded = folder.join("model.weights.json");
    if sharded.is_file() {
        return Ok(sharded);
    }
    bail!("{}: no model.weights.h5 (nor a sharded model.weights.json)", folder.display())
}

/// Opens and matches a KerasHub SD3 input (see the module docs).
pub fn open(path: &Path) -> Result<Sd3Keras> {
    let (form, config, weights) = if path.is_dir() {
        let config = read_preset_config(path)?;
        (Form::Preset, Some(config), preset_weights(path)?)
    } else {
        (Form::Backbone, None, path.to_owned())
    };
    let file = KerasFile::open(&weights).with_context(|| weights.display().to_string())?;
    ensure!(file.format == KerasFormat::Keras3, "{}: a {:?} Keras file; KerasHub writes Keras 3 `.weights.h5` files", weights.display(), file.format);
    let in_file = |what: &str| format!("{}: {what}", weights.display());
    let backbone = file.has_dataset("layers/mm_di_t");
    let form = match (form, backbone) {
        (Form::Preset, true) => Form::Preset,
        (Form::Preset, false) => bail!("{}", in_file("a preset without the backbone's MMDiT (`layers/mm_di_t`)")),
        (_, true) => Form::Backbone,
        (_, false) if file.has_dataset("layers/mm_di_t_block") => Form::Mmdit,
        _ => bail!("{}", in_file("not a KerasHub Stable Diffusion 3 file (no `layers/mm_di_t` nor `layers/mm_di_t_block` group)")),
    };
    let backbone_config = config.as_ref().map(|c| c.get("config").unwrap_or(c));
    let config_usize = |key: &str| backbone_config.and_then(|c| c.get(key)).and_then(Value::as_u64).map(|v| v as usize);
    let mmdit_root = if form == Form::Mmdit { "layers/" } else { MMDIT_ROOT };
    let mmdit = Plan::for_keras3_at(&file, &table_for("mmdit-sd3")?, mmdit_root, Symbols::new()).with_context(|| in_file("the MMDiT"))?;
    let heads = sd3::mmdit_heads(&mmdit, config_usize("mmdit_num_heads")).with_context(|| in_file("the MMDiT"))?;
    let variant = Variant::of(&mmdit);
    let (mut clip_l, mut clip_g, mut vae) = (None, None, None);
    if form != Form::Mmdit {
        let sub_config = |name: &str| backbone_config.and_then(|c| c.get(name)).map(|c| c.get("config").unwrap_or(c).clone());
        let clip = |root: &str, projection_root: &str, name: &str| -> Result<ClipParts> {
            let what = format!("{} ({root})", if name == "clip_l" { "CLIP-L" } else { "CLIP-G" });
            let encoder = Plan::for_keras3_at(&file, &table_for("clip-text-kerashub")?, root, Symbols::new()).with_context(|| in_file(&what))?;
            let mut known = Symbols::new();
            known.insert("d".into(), encoder.symbols["d"]);
            let projection = Plan::for_keras3_at(&file, &table_for("clip-projection-kerashub")?, projection_root, known).with_context(|| in_file(&format!("{what}'s projection")))?;
            let activation = sub_config(name).and_then(|c| c.get("intermediate_activation").and_then(Value::as_str).map(str::to_string));
            Ok(ClipParts { encoder, projection, activation })
        };
        clip_l = Some(clip(CLIP_L_ROOT, CLIP_L_PROJECTION_ROOT, "clip_l")?);
        clip_g = Some(clip(CLIP_G_ROOT, CLIP_G_PROJECTION_ROOT, "clip_g")?);
        let encoder = Plan::for_keras3_at(&file, &table_for("vae-encoder-kerashub")?, VAE_ENCODER_ROOT, Symbols::new()).with_context(|| in_file("the VAE encoder"))?;
        let decoder = Plan::for_keras3_at(&file, &table_for("vae-decoder-kerashub")?, VAE_DECODER_ROOT, Symbols::new()).with_context(|| in_file("the VAE decoder"))?;
        vae = Some((encoder, decoder));
    }
    if let (Some(l), Some(g)) = (&clip_l, &clip_g) {
        let (dl, dg, pooled) = (l.encoder.symbols["d"], g.encoder.symbols["d"], mmdit.symbols["pooled"]);
        ensure!(dl + dg == pooled, "{}", in_file(&format!("the MMDiT's pooled input ({pooled}) is not CLIP-L's width plus CLIP-G's ({dl} + {dg})")));
    }
    let parsed = Sd3Keras { path: path.to_owned(), form, file, config, mmdit, variant, heads, clip_l, clip_g, vae };
    parsed.check_everything_matched().with_context(|| weights.display().to_string())?;
    Ok(parsed)
}

impl Sd3Keras {
    /// Every plan, in the order their tensors are counted.
    pub fn plans(&self) -> Vec<&Plan> {
        let mut plans = vec![&self.mmdit];
        for c in [&self.clip_l, &self.clip_g].into_iter().flatten() {
            plans.push(&c.encoder);
            plans.push(&c.projection);
        }
        if let Some((e, d)) = &self.vae {
            plans.push(e);
            plans.push(d);
        }
        plans
    }

    /// Every tensor of the file belongs to a part: a tensor no table knows (a T5 encoder, another
    /// model's layer) is named, not dropped.
    fn check_everything_matched(&self) -> Result<()> {
        let known: std::collections::BTreeSet<&str> = self.plans().iter().flat_map(|p| p.tensors.iter().map(|t| t.source.as_str())).collect();
        let all = self.file.keras3_datasets()?;
        if let Some((path, _)) = all.iter().find(|(p, _)| !known.contains(p.as_str())) {
            if path.starts_with("layers/t5") {
                bail!("tensor `{path}`: the backbone holds a T5 encoder, which dreambridge does not convert from Keras yet (give T5 through --base)");
            }
            bail!("tensor `{path}`: not part of a KerasHub SD3 MMDiT, CLIP or VAE");
        }
        Ok(())
    }

    /// The scheduler shift (`shift` of the backbone config, 3.0 in every preset).
    pub fn scheduler_shift(&self) -> f64 {
        self.backbone_config().and_then(|c| c.get("shift")).and_then(Value::as_f64).unwrap_or(sd3::SCHEDULER_SHIFT)
    }

    /// The VAE latent scale and shift (the preset's VAE config, else every preset's values).
    pub fn vae_scale_shift(&self) -> (f64, f64) {
        let vae = self.backbone_config().and_then(|c| c.get("vae")).map(|v| v.get("config").unwrap_or(v));
        let get = |k: &str, d: f64| vae.and_then(|v| v.get(k)).and_then(Value::as_f64).unwrap_or(d);
        (get("scale", sd3::VAE_SCALE), get("shift", sd3::VAE_SHIFT))
    }

    /// The image size the preset was built for (`image_shape`), in latent pixels.
    pub fn latent_size(&self) -> Option<usize> {
        let shape = self.backbone_config()?.get("image_shape")?.as_array()?;
        shape.first()?.as_u64().map(|h| h as usize / 8)
    }

    fn backbone_config(&self) -> Option<&Value> {
        self.config.as_ref().map(|c| c.get("config").unwrap_or(c))
    }

    /// The folder of a preset's tokenizer assets (`assets/clip_l_tokenizer/`), if present.
    pub fn tokenizer_assets(&self, which: Clip) -> Option<PathBuf> {
        let name = match which {
            Clip::L => "clip_l_tokenizer",
            Clip::G => "clip_g_tokenizer",
        };
        let dir = self.path.join("assets").join(name);
        (self.form == Form::Preset && dir.join("vocabulary.json").is_file() && dir.join("merges.txt").is_file()).then_some(dir)
    }

    /// One line naming the input: form, variant, depth and width.
    pub fn describe(&self) -> String {
        let h = self.mmdit.symbols.get("h").copied().unwrap_or(0);
        let blocks = self.mmdit.symbols.get("n").map_or(0, |n| n + 1);
        format!("{} ({}-style MMDiT: {blocks} blocks, width {h}, {} heads)", self.form.describe(), self.variant.name(), self.heads)
    }
}

/// `config.json` of CLIP `which` from its parts.
pub fn clip_config(parts: &ClipParts, which: Clip) -> Result<Value> {
    sd3::clip_config(&parts.encoder, which, parts.activation.as_deref(), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_weights_single_or_sharded() {
        let dir = tempfile::tempdir().unwrap();
        let e = preset_weights(dir.path()).unwrap_err().to_string();
        assert!(e.ends_with("no model.weights.h5 (nor a sharded model.weights.json)"), "{e}");
        std::fs::write(dir.path().join("model.weights.json"), "{}").unwrap();
        assert_eq!(preset_weights(dir.path()).unwrap(), dir.path().join("model.weights.json"));
        std::fs::write(dir.path().join("model.weights.h5"), "").unwrap();
        assert_eq!(preset_weights(dir.path()).unwrap(), dir.path().join("model.weights.h5"));
    }
}
