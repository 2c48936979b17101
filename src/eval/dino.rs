//! DINO ViT (transformers `ViTModel` weights and `config.json`, e.g. `facebook/dino-vits16`),
//! assembled from candle-transformers' ViT embeddings and encoder: the final-normed CLS token.

use anyhow::{Context, Result};
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{layer_norm, LayerNorm, VarBuilder};
use candle_transformers::models::vit::{Config, Embeddings, Encoder};
use std::path::Path;

pub struct Dino {
    embeddings: Embeddings,
    encoder: Encoder,
    layernorm: LayerNorm,
    pub layer_norm_eps: f64,
}

impl Dino {
    /// Loads `dir/config.json` and `dir/model.safetensors` (keys with or without `vit.`).
    pub fn load(dir: &Path, device: &Device) -> Result<Dino> {
        let run = || -> Result<Dino> {
            let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).context("config.json")?)?;
            // transformers' default; the Hub config of dino-vits16 leaves it out.
            json.as_object_mut().context("config.json is not an object")?.entry("qkv_bias").or_insert(true.into());
            let cfg: Config = serde_json::from_value(json).context("config.json")?;
            anyhow::ensure!(cfg.image_size == 224, "image_size {} (the DINO transform crops 224)", cfg.image_size);
            let weights = dir.join("model.safetensors");
            // SAFETY: read-only map of a file not modified while dreambridge runs.
            let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }.context("model.safetensors")?;
            let vb = if vb.contains_tensor("vit.embeddings.cls_token") { vb.pp("vit") } else { vb };
            Ok(Dino {
                embeddings: Embeddings::new(&cfg, false, vb.pp("embeddings"))?,
                encoder: Encoder::new(&cfg, vb.pp("encoder"))?,
                layernorm: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("layernorm"))?,
                layer_norm_eps: cfg.layer_norm_eps,
            })
        };
        run().with_context(|| format!("{}: DINO ViT model", dir.display()))
    }

    /// CLS features `(n, d)` of normalised `(n, 3, 224, 224)` pixels.
    pub fn features(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = self.embeddings.forward(pixels, None, false)?;
        let x = self.encoder.forward(&x)?;
        Ok(self.layernorm.forward(&x)?.i((.., 0, ..))?.contiguous()?)
    }
}
