//! The diffusers configs of an SDXL base pipeline (`StableDiffusionXLPipeline`): the fixed values
//! of Stability's SDXL base 1.0, the widths and depths read from the weights (under diffusers'
//! names).

use super::configs::DIFFUSERS_VERSION;
use crate::tensor::TensorSource;
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

/// The VAE latent scale of SDXL (diffusers' `scaling_factor`).
pub const VAE_SCALE: f64 = 0.13025;
/// Width of each of the six size/crop time embeddings in the UNet's added conditioning.
pub const ADDITION_TIME_EMBED_DIM: usize = 256;
/// Attention head width of SDXL's UNet and text encoders.
pub const HEAD_DIM: usize = 64;

fn dim(source: &dyn TensorSource, key: &str, axis: usize) -> Result<usize> {
    let info = source.info(key).with_context(|| format!("tensor {}", source.describe(key)))?;
    info.shape.get(axis).copied().with_context(|| format!("tensor {}: shape {:?} has no axis {axis}", source.describe(key), info.shape))
}

/// How many `prefix{n}.` groups the source's keys hold (n = 0, 1, ... without gaps).
fn count(source: &dyn TensorSource, prefix: &str) -> usize {
    let keys = source.keys();
    (0..).take_while(|n| keys.iter().any(|k| k.starts_with(&format!("{prefix}{n}.")))).count()
}

fn heads(width: usize) -> usize {
    (width / HEAD_DIM).max(1)
}

/// `unet/config.json` from the UNet's tensors; `pooled` is the width of the pooled text
/// embedding (the projection of `text_encoder_2`), when known.
pub fn unet_config(unet: &dyn TensorSource, pooled: Option<usize>) -> Result<Value> {
    let levels = count(unet, "down_blocks.");
    ensure!(levels > 0, "no `down_blocks.0.*` tensors");
    let widths: Vec<usize> = (0..levels).map(|i| dim(unet, &format!("down_blocks.{i}.resnets.0.conv1.weight"), 0)).collect::<Result<_>>()?;
    let depth = |block: &str| count(unet, &format!("{block}.attentions.0.transformer_blocks."));
    let down_depths: Vec<usize> = (0..levels).map(|i| depth(&format!("down_blocks.{i}"))).collect();
    let up_depths: Vec<usize> = (0..levels).map(|i| depth(&format!("up_blocks.{i}"))).collect();
    let down_types: Vec<&str> = down_depths.iter().map(|d| if *d > 0 { "CrossAttnDownBlock2D" } else { "DownBlock2D" }).collect();
    let up_types: Vec<&str> = up_depths.iter().map(|d| if *d > 0 { "CrossAttnUpBlock2D" } else { "UpBlock2D" }).collect();
    let mid = depth("mid_block");
    ensure!(mid == *down_depths.last().unwrap(), "the mid block's transformer depth ({mid}) differs from the last level's ({})", down_depths.last().unwrap());
    let attn = (0..levels).find(|i| down_depths[*i] > 0).context("no cross-attention block")?;
    let ctx = dim(unet, &format!("down_blocks.{attn}.attentions.0.transformer_blocks.0.attn2.to_k.weight"), 1)?;
    let linear = unet.info(&format!("down_blocks.{attn}.attentions.0.proj_in.weight"))?.shape.len() == 2;
    let added = dim(unet, "add_embedding.linear_1.weight", 1)?;
    let time_dim = match pooled {
        Some(p) => {
            ensure!(added > p && (added - p) % 6 == 0, "the added conditioning's input ({added}) is not the pooled width ({p}) plus six time embeddings");
            (added - p) / 6
        }
        None => ADDITION_TIME_EMBED_DIM,
    };
    let reversed: Vec<usize> = down_depths.iter().rev().copied().collect();
    let mut c = json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": time_dim,
        "attention_head_dim": widths.iter().map(|w| heads(*w)).collect::<Vec<_>>(),
        "block_out_channels": widths,
        "center_input_sample": false,
        "class_embed_type": null,
        "class_embeddings_concat": false,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_dim": ctx,
        "cross_attention_norm": null,
        "down_block_types": down_types,
        "downsample_padding": 1,
        "dual_cross_attention": false,
        "encoder_hid_dim": null,
        "encoder_hid_dim_type": null,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
    });
    let rest = json!({
        "in_channels": dim(unet, "conv_in.weight", 1)?,
        "layers_per_block": count(unet, "down_blocks.0.resnets."),
        "mid_block_only_cross_attention": null,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_attention_heads": null,
        "num_class_embeds": null,
        "only_cross_attention": false,
        "out_channels": dim(unet, "conv_out.weight", 0)?,
        "projection_class_embeddings_input_dim": added,
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": false,
        "resnet_time_scale_shift": "default",
        "reverse_transformer_layers_per_block": null,
        "sample_size": 128,
        "time_cond_proj_dim": null,
        "time_embedding_act_fn": null,
        "time_embedding_dim": null,
        "time_embedding_type": "positional",
        "timestep_post_act": null,
        // A level without attention has no transformers; diffusers' SDXL configs say 1 there.
        "transformer_layers_per_block": down_depths.iter().map(|d| (*d).max(1)).collect::<Vec<_>>(),
        "up_block_types": up_types,
        "upcast_attention": null,
        "use_linear_projection": linear,
    });
    if let (Some(c), Value::Object(rest)) = (c.as_object_mut(), rest) {
        c.extend(rest);
    }
    if up_depths != reversed {
        c["reverse_transformer_layers_per_block"] = json!(up_depths.iter().map(|d| vec![*d; count(unet, "up_blocks.0.resnets.")]).collect::<Vec<_>>());
    }
    Ok(c)
}

/// A CLIP text tower's config (CLIP-L: `CLIPTextModel`, quick GELU; OpenCLIP-G:
/// `CLIPTextModelWithProjection`, GELU, pads with `!`).
pub fn clip_config(text: &dyn TensorSource, with_projection: bool) -> Result<Value> {
    let d = dim(text, "text_model.embeddings.token_embedding.weight", 1)?;
    let projection = if with_projection { dim(text, "text_projection.weight", 0)? } else { d };
    Ok(json!({
        "architectures": [if with_projection { "CLIPTextModelWithProjection" } else { "CLIPTextModel" }],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": if with_projection { "gelu" } else { "quick_gelu" },
        "hidden_size": d,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": dim(text, "text_model.encoder.layers.0.mlp.fc1.weight", 0)?,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": dim(text, "text_model.embeddings.position_embedding.weight", 0)?,
        "model_type": "clip_text_model",
        "num_attention_heads": heads(d),
        "num_hidden_layers": count(text, "text_model.encoder.layers."),
        "pad_token_id": 1,
        "projection_dim": projection,
        "torch_dtype": "float32",
        "vocab_size": dim(text, "text_model.embeddings.token_embedding.weight", 0)?,
    }))
}

/// `scheduler/scheduler_config.json`: SDXL base's Euler scheduler.
pub fn scheduler_config() -> Value {
    json!({
        "_class_name": "EulerDiscreteScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": null,
        "use_karras_sigmas": false
    })
}

/// `model_index.json` of a `StableDiffusionXLPipeline`.
pub fn model_index() -> Value {
    json!({
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [null, null],
        "force_zeros_for_empty_prompt": true,
        "image_encoder": [null, null],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    })
}

/// The tensor names of an SDXL-style UNet with `config`'s structure (as [`unet_config`] derives
/// it): every resnet, transformer block, sampler and embedding, in diffusers' names. Shapes are
/// not checked here (the config came from them).
pub fn unet_keys(config: &Value) -> Result<Vec<String>> {
    let list = |k: &str| -> Result<Vec<usize>> {
        config[k].as_array().with_context(|| format!("config `{k}`"))?.iter().map(|v| v.as_u64().map(|v| v as usize).with_context(|| format!("config `{k}`"))).collect()
    };
    let types = |k: &str| -> Result<Vec<String>> {
        config[k].as_array().with_context(|| format!("config `{k}`"))?.iter().map(|v| v.as_str().map(str::to_string).with_context(|| format!("config `{k}`"))).collect()
    };
    let (widths, depths, down, up) = (list("block_out_channels")?, list("transformer_layers_per_block")?, types("down_block_types")?, types("up_block_types")?);
    let per_level = config["layers_per_block"].as_u64().context("config `layers_per_block`")? as usize;
    let up_depths: Vec<usize> = match config["reverse_transformer_layers_per_block"].as_array() {
        Some(rows) => rows.iter().map(|r| r.get(0).and_then(Value::as_u64).unwrap_or(0) as usize).collect(),
        None => depths.iter().rev().copied().collect(),
    };
    let mut keys = Vec::new();
    let mut wb = |p: &str, names: &[&str], bias: bool| {
        for n in names {
            keys.push(format!("{p}{n}.weight"));
            if bias {
                keys.push(format!("{p}{n}.bias"));
            }
        }
    };
    let mut blocks: Vec<(String, bool)> = Vec::new(); // resnet prefix, has shortcut
    let mut attn: Vec<(String, usize)> = Vec::new();
    let mut cin = widths[0];
    for (i, &c) in widths.iter().enumerate() {
        for j in 0..per_level {
            blocks.push((format!("down_blocks.{i}.resnets.{j}."), j == 0 && cin != c));
            if down[i].starts_with("CrossAttn") {
                attn.push((format!("down_blocks.{i}.attentions.{j}."), depths[i]));
            }
        }
        if i + 1 < widths.len() {
            wb(&format!("down_blocks.{i}.downsamplers.0."), &["conv"], true);
        }
        cin = c;
    }
    blocks.push(("mid_block.resnets.0.".into(), false));
    blocks.push(("mid_block.resnets.1.".into(), false));
    attn.push(("mid_block.attentions.0.".into(), *depths.last().context("no levels")?));
    for (u, _) in widths.iter().enumerate() {
        for j in 0..=per_level {
            // Every up resnet takes a skip connection: its input width differs from its output.
            blocks.push((format!("up_blocks.{u}.resnets.{j}."), true));
            if up[u].starts_with("CrossAttn") {
                attn.push((format!("up_blocks.{u}.attentions.{j}."), up_depths[u]));
            }
        }
        if u + 1 < widths.len() {
            wb(&format!("up_blocks.{u}.upsamplers.0."), &["conv"], true);
        }
    }
    wb("", &["conv_in", "time_embedding.linear_1", "time_embedding.linear_2", "add_embedding.linear_1", "add_embedding.linear_2", "conv_norm_out", "conv_out"], true);
    for (p, shortcut) in &blocks {
        wb(p, &["norm1", "conv1", "time_emb_proj", "norm2", "conv2"], true);
        if *shortcut {
            wb(p, &["conv_shortcut"], true);
        }
    }
    for (p, depth) in &attn {
        wb(p, &["norm", "proj_in", "proj_out"], true);
        for b in 0..*depth {
            let q = format!("{p}transformer_blocks.{b}.");
            wb(&q, &["norm1", "norm2", "norm3", "attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"], true);
            wb(&q, &["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v"], false);
        }
    }
    keys.sort();
    Ok(keys)
}
