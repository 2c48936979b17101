//! A diffusers `StableDiffusion3Pipeline` folder: its parts, and the `config.json` of each, from
//! the symbols and features a mapping table bound on the weights.

use crate::convert::plan::Plan;
use crate::diffusers::configs::DIFFUSERS_VERSION;
use anyhow::{ensure, Context, Result};
use serde_json::{json, Map, Value};

/// The parts of an SD3 pipeline folder that hold weights: folder and weight-file stem.
pub const TRANSFORMER: (&str, &str) = ("transformer", "diffusion_pytorch_model");
pub const TEXT_ENCODER: (&str, &str) = ("text_encoder", "model");
pub const TEXT_ENCODER_2: (&str, &str) = ("text_encoder_2", "model");
pub const TEXT_ENCODER_3: (&str, &str) = ("text_encoder_3", "model");
pub const VAE: (&str, &str) = ("vae", "diffusion_pytorch_model");

/// The weight file name of a part; `half` gives diffusers' `fp16` variant name.
pub fn weights_name(part: (&str, &str), half: bool) -> String {
    if half {
        format!("{}/{}.fp16.safetensors", part.0, part.1)
    } else {
        format!("{}/{}.safetensors", part.0, part.1)
    }
}

/// Every preset's VAE latent scale and shift (KerasHub `VAEBackbone` defaults, diffusers' SD3 VAE).
pub const VAE_SCALE: f64 = 1.5305;
pub const VAE_SHIFT: f64 = 0.0609;
/// The flow-matching shift of SD3 and SD3.5 (KerasHub `shift=3.0`, diffusers' scheduler config).
pub const SCHEDULER_SHIFT: f64 = 3.0;
/// Every preset's attention head width.
pub const HEAD_DIM: usize = 64;

fn sym(plan: &Plan, name: &str) -> Result<usize> {
    plan.symbols.get(name).copied().with_context(|| format!("{}: symbol `{name}` was not bound", plan.table.kind))
}

fn with_version(plan: &Plan) -> Map<String, Value> {
    let mut m = plan.table.config.clone();
    if m.contains_key("_class_name") {
        m.insert("_diffusers_version".into(), json!(DIFFUSERS_VERSION));
    }
    m
}

/// Which SD3 model a matched MMDiT is, by the features of its blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// SD3 medium: no q/k norms.
    Sd3Medium,
    /// SD3.5 medium: q/k RMSNorms and a second attention in the first blocks.
    Sd35Medium,
    /// SD3.5 large (and large turbo): q/k RMSNorms, one attention per block.
    Sd35Large,
}

impl Variant {
    pub fn of(mmdit: &Plan) -> Variant {
        match (mmdit.features.contains_key("qk_norm"), mmdit.features.contains_key("dual")) {
            (_, true) => Variant::Sd35Medium,
            (true, false) => Variant::Sd35Large,
            (false, false) => Variant::Sd3Medium,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Variant::Sd3Medium => "SD3 medium",
            Variant::Sd35Medium => "SD3.5 medium",
            Variant::Sd35Large => "SD3.5 large",
        }
    }
}

/// The blocks with a second attention (diffusers' `dual_attention_layers`).
pub fn dual_attention_layers(mmdit: &Plan) -> Vec<usize> {
    let block = |key: &str| key.strip_prefix("transformer_blocks.").and_then(|r| r.split('.').next()).and_then(|i| i.parse().ok());
    mmdit.features.get("dual").map(|keys| keys.iter().filter_map(|k| block(k)).collect()).unwrap_or_default()
}

/// The MMDiT's attention heads: from its q/k norms (head width) when it has them, else `heads`
/// (a KerasHub config, a base folder's), else width / 64 as in every preset.
pub fn mmdit_heads(mmdit: &Plan, heads: Option<usize>) -> Result<usize> {
    let h = sym(mmdit, "h")?;
    let heads = match (mmdit.symbols.get("hd"), heads) {
        (Some(hd), Some(given)) => {
            ensure!(given * hd == h, "the config's {given} attention heads do not fit the weights' head width {hd} (width {h})");
            given
        }
        (Some(hd), None) => h / hd,
        (None, Some(given)) => given,
        (None, None) => h / HEAD_DIM,
    };
    ensure!(heads > 0 && h % heads == 0, "width {h} is not a multiple of {heads} attention heads");
    Ok(heads)
}

/// `transformer/config.json` (SD3Transformer2DModel).
pub fn transformer_config(mmdit: &Plan, heads: Option<usize>, sample_size: Option<usize>) -> Result<Value> {
    let mut m = with_version(mmdit);
    let (h, lat, p, pp) = (sym(mmdit, "h")?, sym(mmdit, "lat")?, sym(mmdit, "p")?, sym(mmdit, "pp")?);
    let heads = mmdit_heads(mmdit, heads)?;
    let grid = (pp as f64).sqrt().round() as usize;
    ensure!(grid * grid == pp, "the position embedding's {pp} rows are not a square grid");
    ensure!(sym(mmdit, "po")? == p * p * lat, "proj_out's width {} is not patch² x latent channels ({p}² x {lat})", sym(mmdit, "po")?);
    // The preset's latent size, else diffusers' 128 where the position grid covers it (a smaller
    // model's whole grid otherwise).
    m.insert("sample_size".into(), json!(sample_size.unwrap_or((grid * p).min(128))));
    m.insert("patch_size".into(), json!(p));
    m.insert("in_channels".into(), json!(lat));
    m.insert("out_channels".into(), json!(lat));
    m.insert("num_layers".into(), json!(sym(mmdit, "n")? + 1));
    m.insert("attention_head_dim".into(), json!(h / heads));
    m.insert("num_attention_heads".into(), json!(heads));
    m.insert("joint_attention_dim".into(), json!(sym(mmdit, "ctx")?));
    m.insert("caption_projection_dim".into(), json!(h));
    m.insert("pooled_projection_dim".into(), json!(sym(mmdit, "pooled")?));
    m.insert("pos_embed_max_size".into(), json!(grid));
    m.insert("dual_attention_layers".into(), json!(dual_attention_layers(mmdit)));
    m.insert("qk_norm".into(), if mmdit.features.contains_key("qk_norm") { json!("rms_norm") } else { Value::Null });
    Ok(Value::Object(m))
}

/// Which of SD3's CLIP encoders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clip {
    /// CLIP-L (`text_encoder`): quick GELU.
    L,
    /// OpenCLIP-G (`text_encoder_2`): GELU.
    G,
}

impl Clip {
    pub fn default_activation(self) -> &'static str {
        match self {
            Clip::L => "quick_gelu",
            Clip::G => "gelu",
        }
    }
}

/// `text_encoder*/config.json` (CLIPTextModelWithProjection) from the encoder's plan; `heads`
/// where the weights do not show them.
pub fn clip_config(encoder: &Plan, which: Clip, activation: Option<&str>, heads: Option<usize>) -> Result<Value> {
    let mut m = with_version(encoder);
    let d = sym(encoder, "d")?;
    let heads = encoder.symbols.get("heads").copied().or(heads).unwrap_or(d / HEAD_DIM).max(1);
    m.insert("vocab_size".into(), json!(sym(encoder, "vocab")?));
    m.insert("hidden_size".into(), json!(d));
    m.insert("projection_dim".into(), json!(d));
    m.insert("intermediate_size".into(), json!(sym(encoder, "ff")?));
    m.insert("num_hidden_layers".into(), json!(sym(encoder, "n")?));
    m.insert("num_attention_heads".into(), json!(heads));
    m.insert("max_position_embeddings".into(), json!(sym(encoder, "pos")?));
    m.insert("hidden_act".into(), json!(activation.unwrap_or(which.default_activation())));
    Ok(Value::Object(m))
}

/// `vae/config.json` (AutoencoderKL with 16 latent channels and no quant convs).
pub fn vae_config(encoder: &Plan, decoder: &Plan, scale: f64, shift: f64) -> Result<Value> {
    let widths: Vec<usize> = ["c0", "c1", "c2", "c3"].iter().map(|s| sym(encoder, s)).collect::<Result<_>>()?;
    let decoding: Vec<usize> = ["d3", "d2", "d1", "d0"].iter().map(|s| sym(decoder, s)).collect::<Result<_>>()?;
    ensure!(widths == decoding, "the VAE encoder's widths {widths:?} are not the decoder's reversed ({decoding:?})");
    ensure!(sym(encoder, "lat")? == sym(decoder, "lat")?, "the VAE encoder and decoder disagree on the latent channels");
    let groups = (1..=32).rev().find(|g| widths.iter().all(|w| w % g == 0)).unwrap_or(1);
    Ok(json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": widths,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "in_channels": sym(encoder, "img")?,
        "out_channels": sym(decoder, "img")?,
        "latent_channels": sym(encoder, "lat")?,
        "layers_per_block": 2,
        "norm_num_groups": groups,
        "sample_size": 1024,
        "scaling_factor": scale,
        "shift_factor": shift,
        "force_upcast": true,
        "use_quant_conv": false,
        "use_post_quant_conv": false,
        "mid_block_add_attention": true,
    }))
}

/// `scheduler/scheduler_config.json`: SD3's flow-matching Euler scheduler.
pub fn scheduler_config(shift: f64) -> Value {
    json!({
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": 1000,
        "shift": shift,
    })
}

/// `model_index.json`; `t5` when `text_encoder_3` / `tokenizer_3` are present.
pub fn model_index(t5: bool) -> Value {
    let t5_model = if t5 { json!(["transformers", "T5EncoderModel"]) } else { json!([null, null]) };
    let t5_tokenizer = if t5 { json!(["transformers", "T5TokenizerFast"]) } else { json!([null, null]) };
    json!({
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": t5_model,
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": t5_tokenizer,
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
}
