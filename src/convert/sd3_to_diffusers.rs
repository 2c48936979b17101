//! A KerasHub Stable Diffusion 3 input -> a diffusers `StableDiffusion3Pipeline` folder.

use super::kerashub::{clip_config, Form, Sd3Keras};
use super::plan::Plan;
use super::stream::{total_bytes, write_outputs, Output};
use super::to_diffusers::{keras_output, write_json, Converted, ToDiffusersOptions};
use crate::diffusers::sd3::{self, Clip};
use crate::diffusers::st_write::StWriter;
use crate::diffusers::tokenizer;
use crate::output::{copy_tree, Staging};
use crate::progress::Progress;
use crate::tensor::DType;
use anyhow::{ensure, Context, Result};
use serde_json::Value;
use std::path::Path;

/// Writes the diffusers folder of `input`; an MMDiT alone takes the rest from `opts.base` (an SD3
/// diffusers folder) or writes `transformer/` only.
pub fn sd3_to_diffusers(input: &Sd3Keras, opts: &ToDiffusersOptions) -> Result<Converted> {
    let base = opts.base.as_deref();
    let base_heads = match base {
        Some(b) => Some(check_base(b, input.mmdit.symbols.get("pooled").copied())?),
        None => None,
    };
    // The MMDiT's heads: a base folder's config when the weights cannot tell (no q/k norms).
    let heads = match (input.form, base_heads.flatten()) {
        (Form::Mmdit, Some(h)) if !input.mmdit.symbols.contains_key("hd") => h,
        _ => input.heads,
    };
    let mut inputs: Vec<&Path> = vec![&input.path];
    inputs.extend(base);
    let staging = Staging::new(&opts.out, opts.force, &inputs)?;
    let dtype = opts.half.then_some(DType::F16);
    let fill = || -> Result<(Vec<String>, bool)> {
        let mut written = vec!["transformer"];
        let mut kinds = vec![format!("{} transformer", input.variant.name())];
        let mut config = sd3::transformer_config(&input.mmdit, Some(heads), input.latent_size())?;
        set_dtype(&mut config, opts.half, "torch_dtype");
        write_json(&staging, "transformer/config.json", &config)?;
        write_part(&staging, &input.file, &sd3::weights_name(sd3::TRANSFORMER, opts.half), &[&input.mmdit], dtype)?;
        for (parts, which, dir, tokenizer_dir) in [(&input.clip_l, Clip::L, sd3::TEXT_ENCODER, "tokenizer"), (&input.clip_g, Clip::G, sd3::TEXT_ENCODER_2, "tokenizer_2")] {
            let Some(parts) = parts else { continue };
            let mut config = clip_config(parts, which)?;
            set_dtype(&mut config, opts.half, "torch_dtype");
            write_json(&staging, &format!("{}/config.json", dir.0), &config)?;
            write_part(&staging, &input.file, &sd3::weights_name(dir, opts.half), &[&parts.encoder, &parts.projection], dtype)?;
            write_tokenizer(&staging, input, which, tokenizer_dir)?;
            written.extend([dir.0, tokenizer_dir]);
            kinds.push(format!("CLIP-{}", if which == Clip::L { "L" } else { "G" }));
        }
        if let Some((encoder, decoder)) = &input.vae {
            let (scale, shift) = input.vae_scale_shift();
            write_json(&staging, "vae/config.json", &sd3::vae_config(encoder, decoder, scale, shift)?)?;
            write_part(&staging, &input.file, &sd3::weights_name(sd3::VAE, opts.half), &[encoder, decoder], dtype)?;
            written.push("vae");
            kinds.push("VAE".into());
        }
        let complete = match base {
            Some(b) => {
                copy_rest_of_sd3_base(b, &staging, &written)?;
                true
            }
            None if input.form == Form::Mmdit => false,
            None => {
                write_json(&staging, "scheduler/scheduler_config.json", &sd3::scheduler_config(input.scheduler_shift()))?;
                write_json(&staging, "model_index.json", &sd3::model_index(false))?;
                true
            }
        };
        Ok((kinds, complete))
    };
    let filled = fill();
    let ((kinds, complete), out) = staging.finish(filled)?;
    Ok(Converted { out, kinds, complete_pipeline: complete, learned_embeds: Vec::new() })
}

fn set_dtype(config: &mut Value, half: bool, key: &str) {
    if half {
        config[key] = "float16".into();
    }
}

/// A base for an MMDiT alone must be an SD3 diffusers folder whose two CLIPs feed the MMDiT's
/// `pooled` input; returns its transformer's heads.
fn check_base(base: &Path, pooled: Option<usize>) -> Result<Option<usize>> {
    let index = base.join("model_index.json");
    let text = std::fs::read_to_string(&index).with_context(|| format!("{}: not a diffusers pipeline folder (no model_index.json)", base.display()))?;
    let value: Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", index.display()))?;
    let class = value.get("_class_name").and_then(Value::as_str).unwrap_or("?");
    ensure!(class.starts_with("StableDiffusion3"), "{}: a `{class}` folder, not a Stable Diffusion 3 one", base.display());
    // A T5 the pipeline asks for must be there: diffusers would fail on the folder otherwise.
    for (part, what) in [("text_encoder_3", "T5 weights"), ("tokenizer_3", "T5 tokenizer")] {
        let named = value.get(part).and_then(Value::as_array).is_some_and(|v| v.first().is_some_and(|l| !l.is_null()));
        let dir = base.join(part);
        let present = std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some());
        ensure!(!named || present, "{}: model_index.json names `{part}` but {} is missing or empty (no {what}); give a base with it, or set `{part}` to [null, null]", index.display(), dir.display());
    }
    let width = |dir: &str| -> Option<usize> {
        let text = std::fs::read_to_string(base.join(dir).join("config.json")).ok()?;
        serde_json::from_str::<Value>(&text).ok()?.get("hidden_size")?.as_u64().map(|v| v as usize)
    };
    if let (Some(pooled), Some(l), Some(g)) = (pooled, width("text_encoder"), width("text_encoder_2")) {
        ensure!(l + g == pooled, "{}: its CLIP widths ({l} + {g}) do not fit the MMDiT's pooled input ({pooled})", base.display());
    }
    let config = base.join("transformer/config.json");
    let heads = std::fs::read_to_string(&config).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok()).and_then(|v| v.get("num_attention_heads")?.as_u64()).map(|h| h as usize);
    Ok(heads)
}

/// Everything of the base folder the conversion did not write (T5, tokenizers, scheduler, the
/// model index), as it is.
fn copy_rest_of_sd3_base(base: &Path, staging: &Staging, written: &[&str]) -> Result<()> {
    for entry in std::fs::read_dir(base).with_context(|| format!("{}: cannot read", base.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if written.contains(&name.as_str()) || name.starts_with('.') || name == "README.md" {
            continue;
        }
        copy_tree(&entry.path(), &staging.path(&name)?, &|_| false)?;
    }
    Ok(())
}

/// One weights file from the plans' Keras tensors.
fn write_part(staging: &Staging, file: &crate::keras::KerasFile, relative: &str, plans: &[&Plan], dtype: Option<DType>) -> Result<()> {
    let outputs: Vec<Output> = plans.iter().flat_map(|p| p.tensors.iter().map(|t| keras_output(file, t, dtype))).collect();
    let label = relative.split('/').next().unwrap_or(relative);
    let progress = Progress::new(label, total_bytes(&outputs));
    let pending = outputs.iter().map(|o| o.tensor.clone()).collect();
    write_outputs(StWriter::create(&staging.path(relative)?, pending)?, &outputs, &progress)?;
    progress.finish(&format!("{} tensors -> {relative}", outputs.len()));
    Ok(())
}

/// `tokenizer/` or `tokenizer_2/`: the preset's BPE assets when it has them, else CLIP's
/// vocabulary (the same for both SD3 encoders). CLIP-G pads with `!` (id 0) in SD3.
fn write_tokenizer(staging: &Staging, input: &Sd3Keras, which: Clip, dir: &str) -> Result<()> {
    let (vocab, merges) = match input.tokenizer_assets(which) {
        Some(assets) => (
            std::fs::read_to_string(assets.join("vocabulary.json")).with_context(|| format!("{}: cannot read", assets.join("vocabulary.json").display()))?,
            std::fs::read_to_string(assets.join("merges.txt")).with_context(|| format!("{}: cannot read", assets.join("merges.txt").display()))?,
        ),
        None => (tokenizer::VOCAB_JSON.to_string(), tokenizer::MERGES_TXT.to_string()),
    };
    write_clip_tokenizer(staging, dir, which, &vocab, &merges)
}

/// A CLIP tokenizer folder of an SD3 pipeline from its BPE files. CLIP-G pads with `!` (id 0) in
/// SD3, CLIP-L with its end token.
pub fn write_clip_tokenizer(staging: &Staging, dir: &str, which: Clip, vocab: &str, merges: &str) -> Result<()> {
    let pad = if which == Clip::G { "!" } else { "<|endoftext|>" };
    let mut config = tokenizer::tokenizer_config();
    config["pad_token"] = pad.into();
    let mut special = tokenizer::special_tokens_map();
    special["pad_token"] = pad.into();
    staging.write(&format!("{dir}/vocab.json"), vocab.as_bytes())?;
    staging.write(&format!("{dir}/merges.txt"), merges.as_bytes())?;
    write_json(staging, &format!("{dir}/tokenizer_config.json"), &config)?;
    write_json(staging, &format!("{dir}/special_tokens_map.json"), &special)
}
