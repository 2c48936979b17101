//! KerasCV `.h5` files -> a diffusers `StableDiffusionPipeline` folder.

use super::plan::{detect, Plan, PlannedTensor};
use crate::mapping::Rows;
use super::stream::{total_bytes, write_outputs, Origin, Output, Part};
use crate::diffusers::configs::{model_index, scheduler_config, text_encoder_config, unet_config, vae_config};
use crate::diffusers::layout::{find_weights, Component};
use crate::diffusers::st_read::StFile;
use crate::diffusers::st_write::{PendingTensor, StWriter};
use crate::diffusers::tokenizer;
use crate::keras::KerasFile;
use crate::output::{copy_file, copy_tree, Staging};
use crate::progress::Progress;
use crate::tensor::DType;
use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The KerasCV files to convert (any subset).
#[derive(Clone, Debug, Default)]
pub struct KerasInputs {
    pub unet: Option<PathBuf>,
    pub text_encoder: Option<PathBuf>,
    pub vae_encoder: Option<PathBuf>,
    pub vae_decoder: Option<PathBuf>,
}

#[derive(Clone, Debug, Default)]
pub struct ToDiffusersOptions {
    /// A diffusers folder supplying the parts not given.
    pub base: Option<PathBuf>,
    pub out: PathBuf,
    /// Write fp16 weights under diffusers' `fp16` variant names.
    pub half: bool,
    pub force: bool,
    /// Force the SD version instead of detecting it.
    pub sd_version: Option<u8>,
    /// Textual inversion: the tokens of the text encoder's rows beyond CLIP's vocabulary, in order.
    pub placeholder_tokens: Vec<String>,
    /// Also write those rows as diffusers learned-embeds files (`{token: [dim]}`).
    pub learned_embeds: Option<PathBuf>,
}

/// A KerasCV file matched against its table.
pub struct Matched {
    pub file: KerasFile,
    pub plan: Plan,
}

/// Opens `path` and detects its model kind; `role` is the kind prefix it must have.
pub fn open_keras(path: &Path, role: &str, sd_version: Option<u8>) -> Result<Matched> {
    let run = || -> Result<Matched> {
        let file = KerasFile::open(path)?;
        let plan = match detect(|t| Plan::for_keras(&file, t), sd_version, None) {
            Ok(plan) => plan,
            // Not any known model: explain against the role the user named.
            Err(_) => detect(|t| Plan::for_keras(&file, t), sd_version, Some(role))?,
        };
        if !plan.table.kind.starts_with(role) {
            bail!("this is a KerasCV {} ({}), not a {role}", plan.table.keras_class, plan.table.kind);
        }
        Ok(Matched { file, plan })
    };
    run().with_context(|| path.display().to_string())
}

/// What a conversion produced, for the closing message.
#[derive(Debug)]
pub struct Converted {
    pub out: PathBuf,
    pub kinds: Vec<String>,
    pub complete_pipeline: bool,
    /// Learned-embeds files written (textual inversion).
    pub learned_embeds: Vec<PathBuf>,
}

pub fn keras_to_diffusers(inputs: &KerasInputs, opts: &ToDiffusersOptions) -> Result<Converted> {
    let unet = inputs.unet.as_deref().map(|p| open_keras(p, "unet", opts.sd_version)).transpose()?;
    // The text encoder follows the UNet's SD version: their tensors alone cannot always tell.
    let version = opts.sd_version.or(unet.as_ref().and_then(|m| m.plan.table.sd_version()));
    let text = inputs.text_encoder.as_deref().map(|p| open_keras(p, "text-encoder", version)).transpose()?;
    let encoder = inputs.vae_encoder.as_deref().map(|p| open_keras(p, "vae-encoder", None)).transpose()?;
    let decoder = inputs.vae_decoder.as_deref().map(|p| open_keras(p, "vae-decoder", None)).transpose()?;
    if let (Some(u), Some(t)) = (&unet, &text) {
        ensure!(
            u.plan.symbols.get("ctx") == t.plan.symbols.get("d"),
            "the UNet's cross-attention width ({}) differs from the text encoder's width ({})",
            u.plan.symbols["ctx"],
            t.plan.symbols["d"]
        );
    }
    let first_new_id = match &text {
        Some(t) => Some(super::textual_inversion::check_tokens(t.plan.symbols["vocab"], &opts.placeholder_tokens).with_context(|| t.file.path.display().to_string())?),
        None => {
            ensure!(opts.placeholder_tokens.is_empty(), "--placeholder-token needs --text-encoder");
            None
        }
    };
    ensure!(opts.learned_embeds.is_none() || !opts.placeholder_tokens.is_empty(), "--learned-embeds needs --placeholder-token (and a textual-inversion text encoder)");
    let base = opts.base.as_deref();
    if let Some(b) = base {
        crate::single_file::sdxl::refuse_for_keras(b, "--base")?;
        ensure!(b.join("model_index.json").is_file(), "{}: not a diffusers pipeline folder (no model_index.json)", b.display());
    }
    let inputs_list: Vec<&Path> = [&inputs.unet, &inputs.text_encoder, &inputs.vae_encoder, &inputs.vae_decoder, &opts.base]
        .into_iter()
        .filter_map(|p| p.as_deref())
        .collect();
    let staging = Staging::new(&opts.out, opts.force, &inputs_list)?;
    let fill = || -> Result<(Vec<String>, bool)> {
        let dtype = opts.half.then_some(DType::F16);
        let mut written: BTreeSet<&str> = BTreeSet::new();
        let mut kinds = Vec::new();

        if let Some(m) = &unet {
            write_json(&staging, "unet/config.json", &unet_config(&m.plan)?)?;
            write_weights(&staging, Component::Unet, opts.half, &[m], None, dtype)?;
            written.insert("unet");
            kinds.push(m.plan.table.kind.clone());
        }
        if let Some(m) = &text {
            let mut config = text_encoder_config(&m.plan)?;
            if opts.half {
                config["torch_dtype"] = "float16".into();
            }
            write_json(&staging, "text_encoder/config.json", &config)?;
            write_weights(&staging, Component::TextEncoder, opts.half, &[m], None, dtype)?;
            written.insert("text_encoder");
            kinds.push(m.plan.table.kind.clone());
        }
        let vae_parts: Vec<&Matched> = [&encoder, &decoder].into_iter().flatten().collect();
        if !vae_parts.is_empty() {
            let overlay = if vae_parts.len() == 1 {
                let missing = if encoder.is_none() { "encoder" } else { "decoder" };
                let b = base.with_context(|| format!("only half of the VAE was given: the {missing} must come from --base"))?;
                let path = find_weights(b, Component::Vae)?;
                copy_file(&b.join("vae/config.json"), &staging.path("vae/config.json")?)?;
                Some(StFile::open(&path).with_context(|| path.display().to_string())?)
            } else {
                let plans: Vec<&Plan> = vae_parts.iter().map(|m| &m.plan).collect();
                write_json(&staging, "vae/config.json", &vae_config(&plans)?)?;
                None
            };
            write_weights(&staging, Component::Vae, opts.half, &vae_parts, overlay.as_ref(), dtype)?;
            written.insert("vae");
            kinds.extend(vae_parts.iter().map(|m| m.plan.table.kind.clone()));
        }
        ensure!(!kinds.is_empty() || base.is_some(), "nothing to convert: give at least one .h5 file (or --sample)");

        if let Some(b) = base {
            copy_rest_of_base(b, &staging, &written, dtype)?;
        } else {
            if written.contains("text_encoder") {
                for (name, contents) in tokenizer::files() {
                    staging.write(&format!("tokenizer/{name}"), contents.as_bytes())?;
                }
            }
            write_json(&staging, "scheduler/scheduler_config.json", &scheduler_config())?;
        }
        if let Some(first) = first_new_id {
            super::textual_inversion::add_tokens(&staging.path("tokenizer")?, &opts.placeholder_tokens, first)?;
        }
        let complete = ["unet", "text_encoder", "vae"].iter().all(|c| written.contains(c)) || base.is_some();
        if complete && base.is_none() {
            write_json(&staging, "model_index.json", &model_index("DDIMScheduler"))?;
        }
        Ok((kinds, complete))
    };
    let filled = fill();
    let ((kinds, complete), out) = staging.finish(filled)?;
    let mut learned_embeds = Vec::new();
    if let (Some(path), Some(t), Some(first)) = (&opts.learned_embeds, &text, first_new_id) {
        let row = t.plan.tensors.iter().find(|p| p.spec.key.ends_with("token_embedding.weight")).context("no token embedding")?;
        let raw = t.file.read(&row.source)?;
        learned_embeds = super::textual_inversion::write_learned_embeds(path, &opts.placeholder_tokens, first, &raw)?;
    }
    Ok(Converted { out, kinds, complete_pipeline: complete, learned_embeds })
}

/// A pretty-printed JSON file in the staging folder.
pub(crate) fn write_json(staging: &Staging, relative: &str, value: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    staging.write(relative, text.as_bytes())
}



/// Streams one component's safetensors file from the matched Keras files, optionally on top of a
/// base file whose other tensors are kept (half a VAE).
fn write_weights(
    staging: &Staging,
    component: Component,
    half: bool,
    parts: &[&Matched],
    overlay: Option<&StFile>,
    dtype: Option<DType>,
) -> Result<()> {
    let relative = format!("{}/{}", component.dir(), component.weights_name(half));
    let output = |origin, key: &str, op, tensor: PendingTensor| {
        let elements = tensor.shape.iter().product();
        Output { tensor, parts: vec![Part::whole(origin, key, op, elements)] }
    };
    // The KerasCV tensors re-laid-out by their tables, then the base's others as they are.
    let mut outputs: Vec<Output> = parts.iter().flat_map(|m| m.plan.tensors.iter().map(|t| keras_output(&m.file, t, dtype))).collect();
    if let Some(base) = overlay {
        let ours: BTreeSet<String> = outputs.iter().map(|o| o.tensor.key.clone()).collect();
        for o in &outputs {
            let t = &o.tensor;
            let info = base.info(&t.key).with_context(|| format!("{}: the base VAE lacks `{}`", base.path.display(), t.key))?;
            ensure!(
                info.shape == t.shape,
                "{}: tensor `{}` has shape {:?} in the base but {:?} in the converted half",
                base.path.display(),
                t.key,
                info.shape,
                t.shape
            );
        }
        for key in base.keys().into_iter().filter(|k| !ours.contains(k)) {
            let info = base.info(&key)?;
            let tensor = PendingTensor { key: key.clone(), dtype: dtype.unwrap_or(info.dtype), shape: info.shape };
            outputs.push(output(Origin::Tensors(base), &key, None, tensor));
        }
    }
    let progress = Progress::new(component.dir(), total_bytes(&outputs));
    let pending = outputs.iter().map(|o| o.tensor.clone()).collect();
    write_outputs(StWriter::create(&staging.path(&relative)?, pending)?, &outputs, &progress)?;
    progress.finish(&format!("{} tensors -> {relative}", outputs.len()));
    Ok(())
}

/// The output tensor of a planned Keras tensor: the Keras tensor re-laid-out, or the rows of it
/// that the diffusers tensor holds.
pub(crate) fn keras_output<'a>(file: &'a KerasFile, t: &PlannedTensor, dtype: Option<DType>) -> Output<'a> {
    let full = t.full_diffusers_shape();
    let mut part = Part::whole(Origin::Keras(file), &t.source, Some(t.spec.op), full.iter().product());
    part.view = Some(t.op_keras_shape());
    if t.spec.rows != Rows::All {
        part.rows = Some((t.spec.rows.runs(full[0]), full[1..].iter().product()));
    }
    Output { tensor: PendingTensor { key: t.spec.key.clone(), dtype: dtype.unwrap_or(t.dtype), shape: t.diffusers_shape.clone() }, parts: vec![part] }
}

/// Copies what the base folder has and the conversion did not write; with `dtype` set, copied
/// weights are re-encoded under the variant name so the whole folder shares one variant.
fn copy_rest_of_base(base: &Path, staging: &Staging, written: &BTreeSet<&str>, dtype: Option<DType>) -> Result<()> {
    for entry in std::fs::read_dir(base).with_context(|| format!("{}: cannot read", base.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        // The base's model card describes the base, not this conversion.
        if written.contains(name.as_str()) || name.starts_with('.') || name == "README.md" {
            continue;
        }
        match (Component::from_name(&name), dtype) {
            (Some(c), Some(dt)) => {
                let from = find_weights(base, c)?;
                copy_file(&base.join(&name).join("config.json"), &staging.path(&format!("{name}/config.json"))?)?;
                recode_weights(&from, &staging.path(&format!("{name}/{}", c.weights_name(true)))?, dt)?;
            }
            _ => copy_tree(&entry.path(), &staging.path(&name)?, &|_| false)?,
        }
    }
    Ok(())
}

/// A safetensors file re-encoded in `dtype`.
pub(crate) fn recode_weights(from: &Path, to: &Path, dtype: DType) -> Result<()> {
    let src = StFile::open(from).with_context(|| from.display().to_string())?;
    let outputs = src
        .keys()
        .into_iter()
        .map(|key| {
            let shape = src.info(&key)?.shape;
            let elements = shape.iter().product();
            let tensor = PendingTensor { key: key.clone(), dtype, shape };
            Ok(Output { tensor, parts: vec![Part::whole(Origin::Tensors(&src), key, None, elements)] })
        })
        .collect::<Result<Vec<_>>>()?;
    let label = to.parent().and_then(Path::file_name).unwrap_or_default().to_string_lossy().to_string();
    let progress = Progress::new(&label, total_bytes(&outputs));
    let pending = outputs.iter().map(|o| o.tensor.clone()).collect();
    write_outputs(StWriter::create(to, pending)?, &outputs, &progress)?;
    progress.finish(&format!("{} tensors re-encoded as {dtype}", outputs.len()));
    Ok(())
}
