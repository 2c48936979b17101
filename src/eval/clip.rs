//! CLIP (transformers `CLIPModel` weights and `config.json`) through candle-transformers' model:
//! projected image features (`visual_projection(post_layernorm(CLS))`) and projected text features
//! (`text_projection(final_layer_norm(h)[EOS])`).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::{text_model::Activation, text_model::ClipTextConfig, vision_model::ClipVisionConfig, ClipConfig, ClipModel};
use serde_json::Value;
use std::path::Path;

pub struct Clip {
    model: ClipModel,
    tokenizer: crate::pipeline::prompt::PromptTokenizer,
    pub max_positions: usize,
    device: Device,
}

fn field(v: &Value, key: &str) -> Result<usize> {
    v.get(key).and_then(Value::as_u64).map(|n| n as usize).with_context(|| format!("config.json: `{key}` missing"))
}

fn activation(v: &Value) -> Result<Activation> {
    match v.get("hidden_act").and_then(Value::as_str).unwrap_or("quick_gelu") {
        "quick_gelu" => Ok(Activation::QuickGelu),
        other => bail!("config.json: hidden_act `{other}` (candle's CLIP has quick_gelu only)"),
    }
}

/// candle's CLIP configs from transformers' `config.json`.
pub fn config(json: &Value) -> Result<ClipConfig> {
    let (t, v) = (json.get("text_config").context("config.json: no text_config")?, json.get("vision_config").context("config.json: no vision_config")?);
    let projection = json.get("projection_dim").and_then(Value::as_u64).unwrap_or(512) as usize;
    let text_config = ClipTextConfig {
        vocab_size: field(t, "vocab_size")?,
        embed_dim: field(t, "hidden_size")?,
        activation: activation(t)?,
        intermediate_size: field(t, "intermediate_size")?,
        max_position_embeddings: field(t, "max_position_embeddings")?,
        pad_with: None,
        num_hidden_layers: field(t, "num_hidden_layers")?,
        num_attention_heads: field(t, "num_attention_heads")?,
        projection_dim: projection,
    };
    let vision_config = ClipVisionConfig {
        embed_dim: field(v, "hidden_size")?,
        activation: activation(v)?,
        intermediate_size: field(v, "intermediate_size")?,
        num_hidden_layers: field(v, "num_hidden_layers")?,
        num_attention_heads: field(v, "num_attention_heads")?,
        projection_dim: projection,
        num_channels: v.get("num_channels").and_then(Value::as_u64).unwrap_or(3) as usize,
        image_size: field(v, "image_size")?,
        patch_size: field(v, "patch_size")?,
    };
    let image_size = vision_config.image_size;
    let logit_scale_init_value = json.get("logit_scale_init_value").and_then(Value::as_f64).unwrap_or(2.6592) as f32;
    Ok(ClipConfig { text_config, vision_config, logit_scale_init_value, image_size })
}

impl Clip {
    /// Loads `dir/config.json` and `dir/model.safetensors`.
    pub fn load(dir: &Path, device: &Device) -> Result<Clip> {
        let run = || -> Result<Clip> {
            let json: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).context("config.json")?)?;
            let cfg = config(&json)?;
            anyhow::ensure!(cfg.image_size == 224, "image_size {} (the CLIP transform crops 224)", cfg.image_size);
            let weights = dir.join("model.safetensors");
            // SAFETY: read-only map of a file not modified while dreambridge runs.
            let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }.context("model.safetensors")?;
            let model = ClipModel::new(vb, &cfg)?;
            Ok(Clip { model, tokenizer: Default::default(), max_positions: cfg.text_config.max_position_embeddings, device: device.clone() })
        };
        run().with_context(|| format!("{}: CLIP model", dir.display()))
    }

    /// Projected image features `(n, d)` of normalised `(n, 3, 224, 224)` pixels.
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.model.get_image_features(pixels)?)
    }

    /// Projected text features `(1, d)` of a prompt (BOS, BPE, EOS, padded with EOS to 77).
    pub fn text_features(&self, prompt: &str) -> Result<Tensor> {
        let ids = self.tokenizer.ids(prompt);
        anyhow::ensure!(ids.len() == self.max_positions, "the tokenizer pads to {}, the model has {} positions", ids.len(), self.max_positions);
        let ids = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
        Ok(self.model.get_text_features(&ids)?)
    }
}
