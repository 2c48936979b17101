//! The single-file conversions: from a diffusers folder or KerasCV files to one checkpoint, and
//! from one checkpoint to a diffusers folder or KerasCV files. Every direction goes through
//! diffusers' names (the hub of the tables), never through a folder on disk.

use super::detect::{Prediction, PredictionType};
use super::export::{write_single_file, ExportComponent, ExportTensor};
use super::{ReadOptions, SingleFile, LAYOUT};
use crate::convert::plan::Plan;
use crate::convert::stream::{total_bytes, write_outputs, Origin, Output, Part};
use crate::convert::to_diffusers::{open_keras, recode_weights, write_json, KerasInputs, Matched};
use crate::convert::to_keras::{keras_file_name, plan_diffusers_folder, write_h5, ToKerasResult};
use crate::diffusers::configs::{model_index, scheduler_config, text_encoder_config, unet_config, vae_config};
use crate::diffusers::layout::Component;
use crate::diffusers::st_write::{PendingTensor, StWriter};
use crate::diffusers::tokenizer;
use crate::mapping::rename::rename_table;
use crate::output::{atomic_file, copy_tree, Staging};
use crate::progress::Progress;
use crate::tensor::{DType, TensorInfo, TensorSource};
use anyhow::{ensure, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where a single file goes and how.
#[derive(Clone, Debug, Default)]
pub struct ExportOptions {
    pub out: PathBuf,
    /// fp16 tensors.
    pub half: bool,
    /// Replace an existing file.
    pub force: bool,
}

#[derive(Debug)]
pub struct Exported {
    pub out: PathBuf,
    pub tensors: usize,
    pub sd_version: u8,
    pub prediction: PredictionType,
    /// The `<name>.yaml` written beside a v-prediction model (A1111 reads it as the config).
    pub sidecar: Option<PathBuf>,
}

/// The tensors of one component in diffusers' names, from a plan over any source.
fn planned_tensors<'a>(source: &'a dyn TensorSource, plans: &'a [Plan]) -> Vec<ExportTensor<'a>> {
    plans
        .iter()
        .flat_map(|plan| plan.tensors.iter())
        .map(move |t| ExportTensor::plain(Origin::Tensors(source), &t.spec.key, TensorInfo { dtype: t.dtype, shape: t.diffusers_shape.clone() }, &t.source))
        .collect()
}

/// The tensors of a KerasCV file in diffusers' names and layout.
fn keras_tensors(m: &Matched) -> Vec<ExportTensor<'_>> {
    m.plan
        .tensors
        .iter()
        .map(move |t| ExportTensor {
            key: t.spec.key.clone(),
            info: TensorInfo { dtype: t.dtype, shape: t.diffusers_shape.clone() },
            origin: Origin::Keras(&m.file),
            source_key: t.source.clone(),
            op: Some(t.spec.op),
            view: None,
            rows: None,
        })
        .collect()
}

fn component_table(component: &str, sd_version: u8) -> Result<crate::mapping::rename::RenameTable> {
    rename_table(LAYOUT, component, Some(sd_version))
}

/// The header metadata: Stability's model-spec keys (A1111, ComfyUI and the Hub read them).
fn metadata(out: &Path, sd_version: u8, prediction: PredictionType, source: &str) -> BTreeMap<String, String> {
    let v = prediction == PredictionType::V;
    let (arch, implementation, resolution) = match (sd_version, v) {
        (1, _) => ("stable-diffusion-v1", "https://github.com/CompVis/stable-diffusion", "512x512"),
        (_, true) => ("stable-diffusion-v2-768-v", "https://github.com/Stability-AI/stablediffusion", "768x768"),
        _ => ("stable-diffusion-v2-512", "https://github.com/Stability-AI/stablediffusion", "512x512"),
    };
    let title = out.file_stem().unwrap_or_default().to_string_lossy().to_string();
    [
        ("modelspec.sai_model_spec", "1.0.0"),
        ("modelspec.architecture", arch),
        ("modelspec.implementation", implementation),
        ("modelspec.title", &title),
        ("modelspec.resolution", resolution),
        ("modelspec.prediction_type", if v { "v" } else { "epsilon" }),
        ("dreambridge.source", source),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The original repo's inference config for 768-v models, filled with this model's widths.
fn v_sidecar(unet: &Plan, vae: Option<&Plan>) -> Result<String> {
    let sym = |p: &Plan, s: &str| p.symbols.get(s).copied().with_context(|| format!("symbol `{s}` unbound"));
    let c0 = sym(unet, "c0")?;
    let mult = ["c0", "c1", "c2", "c3"].iter().map(|s| Ok((sym(unet, s)? / c0).to_string())).collect::<Result<Vec<_>>>()?.join(", ");
    let (ch, vae_mult) = match vae {
        Some(v) => {
            let v0 = sym(v, "c0")?;
            (v0, ["c0", "c1", "c2", "c3"].iter().map(|s| Ok((sym(v, s)? / v0).to_string())).collect::<Result<Vec<_>>>()?.join(", "))
        }
        None => (128, "1, 2, 4, 4".to_string()),
    };
    Ok(include_str!("v2-inference-v.yaml")
        .replace("{model_channels}", &c0.to_string())
        .replace("{channel_mult}", &mult)
        .replace("{context_dim}", &sym(unet, "ctx")?.to_string())
        .replace("{ch}", &ch.to_string())
        .replace("{ch_mult}", &vae_mult))
}

/// Checks the destination before any work: not an existing file without `force`, not an input.
pub(crate) fn check_destination(out: &Path, force: bool, inputs: &[&Path]) -> Result<()> {
    ensure!(!out.is_dir(), "{}: is a folder; give the single file's path", out.display());
    ensure!(force || !out.exists(), "{}: already exists (use --force to replace it)", out.display());
    for input in inputs {
        if let (Ok(a), Ok(b)) = (std::fs::canonicalize(input), std::fs::canonicalize(out)) {
            ensure!(a != b, "{}: the output would overwrite the input", out.display());
        }
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
    }
    Ok(())
}

/// Writes the file and, for v-prediction, its sidecar; a failed sidecar takes the file back.
fn write_with_sidecar(
    opts: &ExportOptions,
    components: &[ExportComponent],
    sd_version: u8,
    prediction: PredictionType,
    sidecar: Option<String>,
    source: &str,
) -> Result<Exported> {
    let dtype = opts.half.then_some(DType::F16);
    let meta = metadata(&opts.out, sd_version, prediction, source);
    let yaml_path = opts.out.with_extension("yaml");
    if sidecar.is_some() {
        ensure!(opts.force || !yaml_path.exists(), "{}: already exists (use --force to replace it)", yaml_path.display());
    }
    let tensors = write_single_file(&opts.out, components, dtype, &meta)?;
    let sidecar = match sidecar {
        Some(text) => {
            if let Err(e) = atomic_file(&yaml_path, |temp| std::fs::write(temp, &text).with_context(|| format!("{}: cannot write", temp.display()))) {
                let _ = std::fs::remove_file(&opts.out);
                return Err(e);
            }
            Some(yaml_path)
        }
        None => None,
    };
    Ok(Exported { out: opts.out.clone(), tensors, sd_version, prediction, sidecar })
}

/// The `prediction_type` of a diffusers folder's scheduler (epsilon when it does not say).
pub fn folder_prediction(model: &Path) -> PredictionType {
    let path = model.join("scheduler/scheduler_config.json");
    let value: Option<Value> = std::fs::read_to_string(path).ok().and_then(|t| serde_json::from_str(&t).ok());
    match value.as_ref().and_then(|v| v.get("prediction_type")).and_then(Value::as_str) {
        Some("v_prediction") => PredictionType::V,
        _ => PredictionType::Epsilon,
    }
}

/// diffusers folder -> one single-file checkpoint.
pub fn diffusers_to_single_file(model: &Path, opts: &ExportOptions) -> Result<Exported> {
    check_destination(&opts.out, opts.force, &[model])?;
    let parts = plan_diffusers_folder(model, None)?;
    for needed in Component::ALL {
        ensure!(
            parts.iter().any(|p| p.component == needed),
            "{}: no {}/ folder (a single file holds the whole pipeline: UNet, text encoder and VAE)",
            model.display(),
            needed.dir()
        );
    }
    let version = parts.iter().flat_map(|p| &p.plans).find_map(|p| p.table.sd_version()).context("no versioned part")?;
    let prediction = folder_prediction(model);
    let components = parts
        .iter()
        .map(|p| Ok(ExportComponent { table: component_table(p.component.dir(), version)?, tensors: planned_tensors(&*p.file, &p.plans) }))
        .collect::<Result<Vec<_>>>()?;
    let unet = &parts.iter().find(|p| p.component == Component::Unet).unwrap().plans[0];
    let vae = parts.iter().find(|p| p.component == Component::Vae).map(|p| &p.plans[0]);
    let sidecar = (prediction == PredictionType::V).then(|| v_sidecar(unet, vae)).transpose()?;
    write_with_sidecar(opts, &components, version, prediction, sidecar, &format!("diffusers folder {}", model.display()))
}

/// A base for the parts not given: a diffusers folder or another single file.
enum Base {
    Folder(Vec<crate::convert::to_keras::FolderPart>, PathBuf),
    File(Box<SingleFile>),
}

impl Base {
    fn open(path: &Path, sd_version: Option<u8>) -> Result<Base> {
        if path.is_dir() {
            Ok(Base::Folder(plan_diffusers_folder(path, sd_version)?, path.to_owned()))
        } else {
            Ok(Base::File(Box::new(SingleFile::open(path, &ReadOptions { sd_version, ..Default::default() })?)))
        }
    }

    /// The component's source and plans, if the base has it.
    fn part(&self, component: &str) -> Option<(&dyn TensorSource, &[Plan])> {
        match self {
            Base::Folder(parts, _) => parts.iter().find(|p| p.component.dir() == component).map(|p| (&*p.file as &dyn TensorSource, &p.plans[..])),
            Base::File(f) => f.parts().into_iter().find(|(c, _)| *c == component).map(|(_, p)| (&*p.view as &dyn TensorSource, &p.plans[..])),
        }
    }

    fn prediction(&self) -> PredictionType {
        match self {
            Base::Folder(_, path) => folder_prediction(path),
            Base::File(f) => f.prediction.kind,
        }
    }
}

/// KerasCV files (+ a base for the parts not given) -> one single-file checkpoint, directly.
pub fn keras_to_single_file(
    inputs: &KerasInputs,
    base: Option<&Path>,
    sd_version: Option<u8>,
    prediction: Option<PredictionType>,
    opts: &ExportOptions,
) -> Result<Exported> {
    let mut given: Vec<&Path> =
        [&inputs.unet, &inputs.text_encoder, &inputs.vae_encoder, &inputs.vae_decoder].into_iter().filter_map(|p| p.as_deref()).collect();
    if let Some(b) = base {
        super::sdxl::refuse_for_keras(b, "--base")?;
    }
    given.extend(base);
    check_destination(&opts.out, opts.force, &given)?;
    let unet = inputs.unet.as_deref().map(|p| open_keras(p, "unet", sd_version)).transpose()?;
    let mut version = sd_version.or(unet.as_ref().and_then(|m| m.plan.table.sd_version()));
    let base = base.map(|b| Base::open(b, version)).transpose()?;
    if version.is_none() {
        version = match &base {
            Some(Base::File(f)) => Some(f.sd_version),
            Some(Base::Folder(parts, _)) => parts.iter().flat_map(|p| &p.plans).find_map(|p| p.table.sd_version()),
            None => None,
        };
    }
    let text = inputs.text_encoder.as_deref().map(|p| open_keras(p, "text-encoder", version)).transpose()?;
    let version = version.or(text.as_ref().and_then(|m| m.plan.table.sd_version())).context("cannot tell the SD version; give --sd-version")?;
    let encoder = inputs.vae_encoder.as_deref().map(|p| open_keras(p, "vae-encoder", None)).transpose()?;
    let decoder = inputs.vae_decoder.as_deref().map(|p| open_keras(p, "vae-decoder", None)).transpose()?;
    let missing = |what: &str, flag: &str| {
        anyhow::anyhow!("a single file holds the whole pipeline: give {flag} or --base (a diffusers folder or single file with a {what})")
    };
    let from_base = |component: &str, kinds: &[&str]| -> Option<Vec<ExportTensor<'_>>> {
        let (source, plans) = base.as_ref()?.part(component)?;
        let picked: Vec<&Plan> = plans.iter().filter(|p| kinds.iter().any(|k| p.table.kind.starts_with(k))).collect();
        Some(picked.into_iter().flat_map(|p| planned_tensors(source, std::slice::from_ref(p))).collect())
    };
    let mut components = Vec::new();
    let unet_tensors = match &unet {
        Some(m) => keras_tensors(m),
        None => from_base("unet", &["unet"]).ok_or_else(|| missing("UNet", "--unet"))?,
    };
    components.push(ExportComponent { table: component_table("unet", version)?, tensors: unet_tensors });
    let text_tensors = match &text {
        Some(m) => keras_tensors(m),
        None => from_base("text_encoder", &["text-encoder"]).ok_or_else(|| missing("text encoder", "--text-encoder"))?,
    };
    components.push(ExportComponent { table: component_table("text_encoder", version)?, tensors: text_tensors });
    let mut vae_tensors = Vec::new();
    for (given, kind, flag) in [(&encoder, "vae-encoder", "--vae-encoder"), (&decoder, "vae-decoder", "--vae-decoder")] {
        match given {
            Some(m) => vae_tensors.extend(keras_tensors(m)),
            None => vae_tensors.extend(from_base("vae", &[kind]).ok_or_else(|| missing("VAE", flag))?),
        }
    }
    components.push(ExportComponent { table: component_table("vae", version)?, tensors: vae_tensors });
    if let (Some(u), Some(t)) = (&unet, &text) {
        ensure!(
            u.plan.symbols.get("ctx") == t.plan.symbols.get("d"),
            "the UNet's cross-attention width ({:?}) differs from the text encoder's width ({:?})",
            u.plan.symbols.get("ctx"),
            t.plan.symbols.get("d")
        );
    }
    let prediction = prediction.or(base.as_ref().map(Base::prediction)).unwrap_or(PredictionType::Epsilon);
    let sidecar = if prediction == PredictionType::V {
        let unet_plan = match (&unet, &base) {
            (Some(m), _) => m.plan.clone(),
            (None, Some(b)) => b.part("unet").context("base without UNet")?.1[0].clone(),
            _ => unreachable!("the UNet came from somewhere"),
        };
        let vae_plan = encoder.as_ref().or(decoder.as_ref()).map(|m| m.plan.clone());
        Some(v_sidecar(&unet_plan, vae_plan.as_ref())?)
    } else {
        None
    };
    let source = given.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    write_with_sidecar(opts, &components, version, prediction, sidecar, &format!("KerasCV {source}"))
}

/// How to write a diffusers folder from a single file.
#[derive(Clone, Debug, Default)]
pub struct ToFolderOptions {
    pub read: ReadOptions,
    /// A diffusers folder supplying configs, tokenizer, scheduler and any part the file lacks.
    pub base: Option<PathBuf>,
    pub out: PathBuf,
    pub half: bool,
    pub force: bool,
}

#[derive(Debug)]
pub struct FolderWritten {
    pub out: PathBuf,
    pub sd_version: u8,
    pub prediction: Prediction,
    pub from_file: Vec<&'static str>,
    pub from_base: Vec<String>,
}

/// The config of a part as the file's tensors determine it over the embedded SD1/SD2 defaults
/// (SD2: the 2.1 config, as diffusers assumes for an SD2 file).
fn derived_config(component: &str, plans: &[Plan]) -> Result<Value> {
    Ok(match component {
        "unet" => unet_config(&plans[0])?,
        "text_encoder" => text_encoder_config(&plans[0])?,
        _ => vae_config(&plans.iter().collect::<Vec<_>>())?,
    })
}

/// A JSON file, or an error naming it.
pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))
}

/// The base's config of `component` when it agrees with `derived` on the `fields` the weights
/// fix (else an error naming the file, the field and `what`, the single file's part); None
/// where the base has no such config.
pub(crate) fn check_base_config(base: Option<&Path>, component: &str, what: &str, derived: &Value, fields: &[&str]) -> Result<Option<Value>> {
    let path = match base {
        Some(b) if b.join(component).join("config.json").is_file() => b.join(component).join("config.json"),
        _ => return Ok(None),
    };
    let given = read_json(&path)?;
    for f in fields {
        if let (Some(a), Some(b)) = (given.get(*f), derived.get(*f)) {
            ensure!(a == b, "{}: `{f}` is {a} but the single file's {what} has {b}", path.display());
        }
    }
    Ok(Some(given))
}

/// `derived` with the base's config of `component` over it, once they agree on `fields` (see
/// [`check_base_config`]).
pub(crate) fn merged_base_config(base: Option<&Path>, component: &str, what: &str, mut derived: Value, fields: &[&str]) -> Result<Value> {
    if let Some(given) = check_base_config(base, component, what, &derived, fields)? {
        if let (Some(d), Some(g)) = (derived.as_object_mut(), given.as_object()) {
            d.extend(g.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    }
    Ok(derived)
}

/// What a single file lacks, from the base folder: each of `parts` not `present`, and the
/// scheduler (written as `scheduler` where the base has none). Returns what came from the base.
pub(crate) fn rest_from_base(staging: &Staging, base: Option<&Path>, present: &dyn Fn(&str) -> bool, parts: &[&str], scheduler: &Value) -> Result<Vec<String>> {
    let mut from_base = Vec::new();
    for part in parts.iter().copied().filter(|p| !present(p)) {
        let b = base.with_context(|| format!("the single file has no {part} and no --base gives one"))?;
        copy_tree(&b.join(part), &staging.path(part)?, &|_| false)?;
        from_base.push(part.to_string());
    }
    match base.filter(|b| b.join("scheduler").is_dir()) {
        Some(b) => {
            copy_tree(&b.join("scheduler"), &staging.path("scheduler")?, &|_| false)?;
            from_base.push("scheduler".into());
        }
        None => write_json(staging, "scheduler/scheduler_config.json", scheduler)?,
    }
    Ok(from_base)
}

/// One single-file checkpoint -> a diffusers pipeline folder.
pub fn single_file_to_diffusers(checkpoint: &Path, opts: &ToFolderOptions) -> Result<FolderWritten> {
    let file = SingleFile::open(checkpoint, &opts.read)?;
    let base = opts.base.as_deref();
    if let Some(b) = base {
        ensure!(b.join("model_index.json").is_file(), "{}: not a diffusers pipeline folder (no model_index.json)", b.display());
    }
    let present = file.parts();
    for (component, what, prefix) in [("text_encoder", "text encoder", "cond_stage_model.*"), ("vae", "VAE", "first_stage_model.*")] {
        if !present.iter().any(|(c, _)| *c == component) {
            ensure!(
                base.is_some_and(|b| b.join(component).is_dir()),
                "{}: has no {what} (`{prefix}`); give --base with a diffusers folder that has one",
                checkpoint.display()
            );
        }
    }
    let mut inputs: Vec<&Path> = vec![checkpoint];
    inputs.extend(base);
    let staging = Staging::new(&opts.out, opts.force, &inputs)?;
    let prediction = file.prediction.kind;
    let fill = || -> Result<Vec<String>> {
        let mut from_base = Vec::new();
        for (component, part) in &present {
            let derived = derived_config(component, &part.plans)?;
            match base {
                Some(b) if b.join(component).join("config.json").is_file() => {
                    let fields: &[&str] = match *component {
                        "unet" => &["block_out_channels", "cross_attention_dim", "in_channels"],
                        "text_encoder" => &["hidden_size", "num_hidden_layers", "vocab_size"],
                        _ => &["block_out_channels", "latent_channels"],
                    };
                    check_base_config(base, component, component, &derived, fields)?;
                    crate::output::copy_file(&b.join(component).join("config.json"), &staging.path(&format!("{component}/config.json"))?)?;
                }
                _ => {
                    let mut c = derived;
                    if opts.half && *component == "text_encoder" {
                        c["torch_dtype"] = "float16".into();
                    }
                    write_json(&staging, &format!("{component}/config.json"), &c)?;
                }
            }
            let c = Component::from_name(component).expect("a component folder");
            write_part(&staging, c, &*part.view, &part.plans, opts.half)?;
        }
        match base {
            Some(b) => {
                for entry in std::fs::read_dir(b).with_context(|| format!("{}: cannot read", b.display()))? {
                    let entry = entry?;
                    let name = entry.file_name().to_string_lossy().to_string();
                    if name.starts_with('.') || present.iter().any(|(c, _)| *c == name) {
                        continue;
                    }
                    if let (Some(c), true) = (Component::from_name(&name), opts.half) {
                        copy_part_recoded(b, &staging, c)?;
                    } else {
                        copy_tree(&entry.path(), &staging.path(&name)?, &|_| false)?;
                    }
                    from_base.push(name);
                }
                if let Some(p) = opts.read.prediction {
                    set_prediction(&staging, p)?;
                }
            }
            None => {
                for (name, contents) in tokenizer::files() {
                    staging.write(&format!("tokenizer/{name}"), contents.as_bytes())?;
                }
                let mut scheduler = scheduler_config();
                scheduler["prediction_type"] = prediction.diffusers_name().into();
                write_json(&staging, "scheduler/scheduler_config.json", &scheduler)?;
                write_json(&staging, "model_index.json", &model_index("DDIMScheduler"))?;
            }
        }
        Ok(from_base)
    };
    let filled = fill();
    let (from_base, out) = staging.finish(filled)?;
    Ok(FolderWritten {
        out,
        sd_version: file.sd_version,
        prediction: file.prediction.clone(),
        from_file: present.iter().map(|(c, _)| *c).collect(),
        from_base,
    })
}

/// Overrides the copied scheduler's prediction type when the user named one.
fn set_prediction(staging: &Staging, p: PredictionType) -> Result<()> {
    let path = staging.path("scheduler/scheduler_config.json")?;
    let mut value: Value = match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?,
        Err(_) => scheduler_config(),
    };
    value["prediction_type"] = p.diffusers_name().into();
    write_json(staging, "scheduler/scheduler_config.json", &value)
}

/// Streams one component's weights from a view into the staging folder.
fn write_part(staging: &Staging, component: Component, source: &dyn TensorSource, plans: &[Plan], half: bool) -> Result<()> {
    let relative = format!("{}/{}", component.dir(), component.weights_name(half));
    write_weights(staging, &relative, source, plans, half)
}

/// Streams the tensors of `plans` from `source` (under their diffusers names) into `relative`
/// in the staging folder.
pub(crate) fn write_weights(staging: &Staging, relative: &str, source: &dyn TensorSource, plans: &[Plan], half: bool) -> Result<()> {
    let outputs: Vec<Output> = plans
        .iter()
        .flat_map(|p| &p.tensors)
        .map(|t| {
            let tensor = PendingTensor { key: t.spec.key.clone(), dtype: if half { DType::F16 } else { t.dtype }, shape: t.diffusers_shape.clone() };
            let elements = tensor.shape.iter().product();
            Output { tensor, parts: vec![Part::whole(Origin::Tensors(source), t.source.clone(), None, elements)] }
        })
        .collect();
    let progress = Progress::new(relative.split('/').next().unwrap_or(relative), total_bytes(&outputs));
    let pending = outputs.iter().map(|o| o.tensor.clone()).collect();
    write_outputs(StWriter::create(&staging.path(relative)?, pending)?, &outputs, &progress)?;
    progress.finish(&format!("{} tensors -> {relative}", outputs.len()));
    Ok(())
}

/// A base component copied with its weights re-encoded as fp16 under the variant name.
fn copy_part_recoded(base: &Path, staging: &Staging, c: Component) -> Result<()> {
    let from = crate::diffusers::layout::find_weights(base, c)?;
    for entry in std::fs::read_dir(base.join(c.dir()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.ends_with(".safetensors") && !name.ends_with(".bin") {
            crate::output::copy_file(&entry.path(), &staging.path(&format!("{}/{name}", c.dir()))?)?;
        }
    }
    recode_weights(&from, &staging.path(&format!("{}/{}", c.dir(), c.weights_name(true)))?, DType::F16)
}

/// One single-file checkpoint -> KerasCV legacy `.h5` files (one per KerasCV sub-model).
pub fn single_file_to_keras(checkpoint: &Path, read: &ReadOptions, out: &Path, force: bool) -> Result<ToKerasResult> {
    super::sdxl::refuse_for_keras(checkpoint, "")?;
    let file = SingleFile::open(checkpoint, read)?;
    let staging = Staging::new(out, force, &[checkpoint])?;
    let fill = || -> Result<Vec<(String, String)>> {
        let mut files = Vec::new();
        for (_, part) in file.parts() {
            for plan in &part.plans {
                let name = keras_file_name(&plan.table.kind);
                let path = staging.path(name)?;
                write_h5(&path, &*part.view, plan).with_context(|| format!("{}: writing from {}", path.display(), checkpoint.display()))?;
                files.push((plan.table.kind.clone(), name.to_string()));
            }
        }
        Ok(files)
    };
    let filled = fill();
    let (files, out) = staging.finish(filled)?;
    Ok(ToKerasResult { out, files })
}

/// The prediction type and the rule that decided it, for messages.
pub fn describe_prediction(p: &Prediction) -> String {
    format!("{} ({})", p.kind.diffusers_name(), p.reason)
}
