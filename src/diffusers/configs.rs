//! The `config.json` files of a pipeline folder: each table's fixed values plus the values bound
//! from the weights (widths, vocabulary, depth).

use crate::convert::plan::Plan;
use anyhow::{ensure, Context, Result};
use serde_json::{json, Map, Value};

/// The diffusers release the folder layout was verified against (parity suite).
pub const DIFFUSERS_VERSION: &str = "0.42.1";

fn sym(plan: &Plan, name: &str) -> Result<usize> {
    plan.symbols.get(name).copied().with_context(|| format!("{}: symbol `{name}` was not bound", plan.table.kind))
}

fn base(plan: &Plan) -> Map<String, Value> {
    let mut m = plan.table.config.clone();
    if m.contains_key("_class_name") {
        m.insert("_diffusers_version".into(), json!(DIFFUSERS_VERSION));
    }
    m
}

/// KerasCV builds every GroupNormalization with 32 groups; the count is not in the weights, so a
/// model whose widths are not all multiples of 32 (reduced test models) gets the largest count
/// that divides them.
fn norm_groups(widths: &[usize]) -> usize {
    (1..=32).rev().find(|g| widths.iter().all(|w| w % g == 0)).unwrap_or(1)
}

pub fn unet_config(plan: &Plan) -> Result<Value> {
    let mut m = base(plan);
    let widths: Vec<usize> = ["c0", "c1", "c2", "c3"].iter().map(|s| sym(plan, s)).collect::<Result<_>>()?;
    let heads = plan.table.heads.for_widths(&widths);
    let lat = sym(plan, "lat")?;
    m.insert("in_channels".into(), json!(lat));
    m.insert("out_channels".into(), json!(lat));
    m.insert("block_out_channels".into(), json!(widths));
    m.insert("norm_num_groups".into(), json!(norm_groups(&widths)));
    m.insert("cross_attention_dim".into(), json!(sym(plan, "ctx")?));
    // diffusers' `attention_head_dim` is (historically) the number of heads.
    let heads = if heads.iter().all(|h| *h == heads[0]) && matches!(plan.table.heads, crate::mapping::Heads::PerBlock(_)) {
        json!(heads[0])
    } else {
        json!(heads)
    };
    m.insert("attention_head_dim".into(), heads);
    Ok(Value::Object(m))
}

pub fn text_encoder_config(plan: &Plan) -> Result<Value> {
    let mut m = base(plan);
    let d = sym(plan, "d")?;
    m.insert("vocab_size".into(), json!(sym(plan, "vocab")?));
    m.insert("hidden_size".into(), json!(d));
    m.insert("intermediate_size".into(), json!(sym(plan, "ff")?));
    m.insert("num_hidden_layers".into(), json!(sym(plan, "n")?));
    m.insert("num_attention_heads".into(), json!(plan.table.heads.for_widths(&[d])[0]));
    m.insert("max_position_embeddings".into(), json!(sym(plan, "positions")?));
    Ok(Value::Object(m))
}

/// The VAE config from the encoder and/or decoder plans (their shared widths must agree).
pub fn vae_config(plans: &[&Plan]) -> Result<Value> {
    let first = plans.first().context("no VAE part")?;
    for other in &plans[1..] {
        for s in ["c0", "c1", "c2", "c3", "z", "img"] {
            ensure!(
                sym(first, s)? == sym(other, s)?,
                "the VAE encoder and decoder disagree on `{s}` ({} vs {})",
                sym(first, s)?,
                sym(other, s)?
            );
        }
    }
    let mut m = base(first);
    let widths: Vec<usize> = ["c0", "c1", "c2", "c3"].iter().map(|s| sym(first, s)).collect::<Result<_>>()?;
    m.insert("in_channels".into(), json!(sym(first, "img")?));
    m.insert("out_channels".into(), json!(sym(first, "img")?));
    m.insert("latent_channels".into(), json!(sym(first, "z")?));
    m.insert("norm_num_groups".into(), json!(norm_groups(&widths)));
    m.insert("block_out_channels".into(), json!(widths));
    Ok(Value::Object(m))
}

#[cfg(test)]
mod tests {
    use super::norm_groups;

    #[test]
    fn group_count_is_kerascv_s_32_whenever_the_widths_allow() {
        assert_eq!(norm_groups(&[320, 640, 1280, 1280]), 32);
        assert_eq!(norm_groups(&[128, 256, 512, 512]), 32);
        assert_eq!(norm_groups(&[8, 16, 24, 24]), 8);
        assert_eq!(norm_groups(&[12, 18]), 6);
    }
}

/// DDIM with SD's scaled-linear schedule: the sampler KerasCV's `generate_image` implements.
pub fn scheduler_config() -> Value {
    json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": null
    })
}

/// `model_index.json` of a `StableDiffusionPipeline` without safety checker.
pub fn model_index(scheduler_class: &str) -> Value {
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    })
}
