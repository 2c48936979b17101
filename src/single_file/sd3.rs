//! Stability AI's Stable Diffusion 3 single file (`sd3_medium_incl_clips.safetensors`,
//! `sd3.5_medium.safetensors`, `sd3.5_large.safetensors`; what ComfyUI and diffusers'
//! `from_single_file` load): the MMDiT under `model.diffusion_model.`, the CLIPs under
//! `text_encoders.clip_l.transformer.` / `text_encoders.clip_g.transformer.`, T5-XXL (optional)
//! under `text_encoders.t5xxl.transformer.`, the VAE under `first_stage_model.` (the LDM layout,
//! 16 latent channels, no quant convs). Names come from the `mappings/sai_*_sd3.toml` tables and
//! the LDM VAE table; each component seen through its table is matched by the same KerasHub SD3
//! tables as a diffusers folder, which checks every tensor and binds the widths for the configs.
//! Every direction streams through diffusers' names: diffusers folder, KerasHub input (its table
//! composed with Stability's) or single file in, single file or diffusers folder out.

use super::convert::{check_base_config, check_destination, merged_base_config, read_json, rest_from_base, write_weights, ExportOptions};
use super::export::{write_single_file, ExportComponent, ExportTensor};
use super::open_tensors;
use super::view::ComponentView;
use crate::convert::kerashub::{Form, Sd3Keras};
use crate::convert::plan::Plan;
use crate::convert::sd3_to_diffusers::write_clip_tokenizer;
use crate::convert::stream::{total_bytes, write_outputs, Origin, Output, Part};
use crate::convert::to_diffusers::write_json;
use crate::diffusers::sd3::{self, Clip, Variant};
use crate::diffusers::st_read::StFile;
use crate::diffusers::st_write::{PendingTensor, StWriter};
use crate::diffusers::tokenizer;
use crate::mapping::rename::{rename_table, RenameTable};
use crate::mapping::table::Rows;
use crate::mapping::table_for;
use crate::output::{copy_tree, Staging};
use crate::progress::Progress;
use crate::tensor::{BytesFn, DType, RawTensor, TensorInfo, TensorSource};
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// The layout name of Stability's SD3 tables.
pub const LAYOUT: &str = "sai-sd3";
/// Every SD3 single file has MMDiT blocks under this prefix.
const MMDIT_PROBE: &str = "model.diffusion_model.joint_blocks.";

/// The pipeline parts, by diffusers folder, in file order.
const TRANSFORMER: &str = "transformer";
const CLIP_L: &str = "text_encoder";
const CLIP_G: &str = "text_encoder_2";
const T5: &str = "text_encoder_3";
const VAE: &str = "vae";

/// True when `source` holds an SD3 MMDiT in Stability's names.
pub fn is_sd3_source(source: &dyn TensorSource) -> bool {
    source.keys().iter().any(|k| k.starts_with(MMDIT_PROBE))
}

/// True when `path` is a checkpoint file holding an SD3 MMDiT in Stability's names.
pub fn is_sd3_file(path: &Path) -> bool {
    path.is_file() && open_tensors(path).is_ok_and(|s| is_sd3_source(&*s))
}

/// The table of one part: Stability's own, the LDM VAE's for the VAE.
fn part_table(part: &str) -> Result<RenameTable> {
    if part == VAE {
        rename_table(super::LAYOUT, "vae", None)
    } else {
        rename_table(LAYOUT, part, None)
    }
}

/// One part of an SD3 model under diffusers' names: its tensors' source and the plans matched
/// on it (none for T5, whose tensors are taken as they are).
pub struct Piece {
    pub source: Rc<dyn TensorSource>,
    pub plans: Vec<Plan>,
}

/// T5's token embedding and the encoder's tied copy of it (see `mappings/sai_t5xxl_sd3.toml`).
const T5_TIED: (&str, &str) = ("shared.weight", "encoder.embed_tokens.weight");

impl Piece {
    /// The diffusers tensors of the piece: its plans' tensors, or every tensor (T5, with its tied
    /// embedding under both names).
    fn tensors(&self) -> Result<Vec<ExportTensor<'_>>> {
        let origin = Origin::Tensors(&*self.source);
        if self.plans.is_empty() {
            let info = |k: &str| self.source.info(k).with_context(|| format!("tensor {}", self.source.describe(k)));
            let mut out: Vec<ExportTensor> = self.source.keys().into_iter().map(|k| Ok(ExportTensor::plain(origin, &k, info(&k)?, &k))).collect::<Result<_>>()?;
            let (shared, tied) = T5_TIED;
            if self.source.contains(shared) && !self.source.contains(tied) {
                out.push(ExportTensor::plain(origin, tied, info(shared)?, shared));
            }
            return Ok(out);
        }
        Ok(self
            .plans
            .iter()
            .flat_map(|p| &p.tensors)
            .map(|t| ExportTensor::plain(origin, &t.spec.key, TensorInfo { dtype: t.dtype, shape: t.diffusers_shape.clone() }, &t.source))
            .collect())
    }
}

/// An SD3 model from a diffusers folder or a single file: the parts it has.
pub struct Sd3Model {
    pub path: PathBuf,
    pub parts: BTreeMap<&'static str, Piece>,
    pub variant: Variant,
    /// Attention heads the weights show (q/k norm width), else width / 64.
    pub heads: usize,
}

/// Every part, in file order.
const ALL_PARTS: [&str; 5] = [TRANSFORMER, CLIP_L, CLIP_G, T5, VAE];

impl Sd3Model {
    /// The parts present, in file order.
    fn present(&self) -> Vec<&'static str> {
        ALL_PARTS.into_iter().filter(|p| self.parts.contains_key(p)).collect()
    }

    fn mmdit(&self) -> &Plan {
        &self.parts[TRANSFORMER].plans[0]
    }

    /// One line naming the model: variant, depth, width and the parts present.
    pub fn describe(&self) -> String {
        let m = self.mmdit();
        let (h, n) = (m.symbols.get("h").copied().unwrap_or(0), m.symbols.get("n").map_or(0, |n| n + 1));
        let names: Vec<&str> = self.present().into_iter().map(part_name).collect();
        format!("{} ({n} blocks, width {h}, {} heads; {})", self.variant.name(), self.heads, names.join(", "))
    }
}

fn part_name(part: &str) -> &'static str {
    match part {
        TRANSFORMER => "MMDiT",
        CLIP_L => "CLIP-L",
        CLIP_G => "CLIP-G",
        T5 => "T5",
        _ => "VAE",
    }
}

fn match_plans(source: &dyn TensorSource, kinds: &[&str]) -> Result<Vec<Plan>> {
    kinds.iter().map(|k| Plan::for_diffusers(source, &table_for(k)?)).collect()
}

fn plan_kinds(part: &str) -> &'static [&'static str] {
    match part {
        TRANSFORMER => &["mmdit-sd3"],
        CLIP_L | CLIP_G => &["clip-text-kerashub", "clip-projection-kerashub"],
        VAE => &["vae-encoder-kerashub", "vae-decoder-kerashub"],
        _ => &[],
    }
}

/// The variant and heads of a matched MMDiT, and the CLIPs' widths checked against its pooled input.
fn finish_model(path: &Path, parts: BTreeMap<&'static str, Piece>, heads: Option<usize>) -> Result<Sd3Model> {
    let mmdit = &parts.get(TRANSFORMER).context("no MMDiT")?.plans[0];
    let heads = sd3::mmdit_heads(mmdit, heads).with_context(|| format!("{}: the MMDiT", path.display()))?;
    if let (Some(l), Some(g)) = (parts.get(CLIP_L), parts.get(CLIP_G)) {
        let (dl, dg, pooled) = (l.plans[0].symbols["d"], g.plans[0].symbols["d"], mmdit.symbols["pooled"]);
        ensure!(dl + dg == pooled, "{}: the MMDiT's pooled input ({pooled}) is not CLIP-L's width plus CLIP-G's ({dl} + {dg})", path.display());
    }
    Ok(Sd3Model { path: path.to_owned(), variant: Variant::of(mmdit), heads, parts })
}

/// Opens and checks a Stability SD3 single file: every tensor belongs to a part, every part's
/// tensors are all there with consistent shapes. Errors name the file and the tensor.
pub fn open_file(path: &Path) -> Result<Sd3Model> {
    let source = open_tensors(path).with_context(|| path.display().to_string())?;
    let in_file = |what: String| format!("{}: {what}", path.display());
    if !is_sd3_source(&*source) {
        let keys = source.keys();
        let sample: Vec<String> = keys.iter().take(3).map(|k| format!("`{k}`")).collect();
        bail!("{}", in_file(format!("not a Stable Diffusion 3 single file: no `{MMDIT_PROBE}*` tensors ({} tensors, such as {})", keys.len(), sample.join(", "))));
    }
    let mut parts = BTreeMap::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for part in ALL_PARTS {
        let table = part_table(part)?;
        let prefix = table.prefix.clone();
        let view = ComponentView::new(source.clone(), table, false).with_context(|| in_file(format!("the {}", part_name(part))))?;
        seen.extend(source.keys().into_iter().filter(|k| k.starts_with(&prefix)));
        if !view.is_present() {
            continue;
        }
        let what = format!("the {} (`{prefix}*`)", part_name(part));
        if let Some(k) = view.unknown.first() {
            bail!("{}", in_file(format!("tensor `{k}`: not a tensor of SD3's {}", part_name(part))));
        }
        let plans = match_plans(&view, plan_kinds(part)).with_context(|| in_file(what.clone()))?;
        // Every tensor the table renamed must be one the model has.
        if !plans.is_empty() {
            let used: BTreeSet<&str> = plans.iter().flat_map(|p| p.tensors.iter().map(|t| t.source.as_str())).collect();
            if let Some(k) = view.keys().iter().find(|k| !used.contains(k.as_str())) {
                bail!("{}", in_file(format!("tensor {}: not a tensor of SD3's {}", view.describe(k), part_name(part))));
            }
        }
        parts.insert(part, Piece { source: Rc::new(view), plans });
    }
    if let Some(k) = source.keys().iter().find(|k| !seen.contains(*k)) {
        bail!("{}", in_file(format!("tensor `{k}`: not part of an SD3 MMDiT, CLIP-L, CLIP-G, T5 or VAE")));
    }
    finish_model(path, parts, None)
}


/// True when `folder` is a diffusers `StableDiffusion3Pipeline` folder (by its model index).
pub fn is_sd3_folder(folder: &Path) -> bool {
    read_json(&folder.join("model_index.json")).ok().and_then(|v| v.get("_class_name")?.as_str().map(|c| c.starts_with("StableDiffusion3"))).unwrap_or(false)
}

/// The safetensors weights of a folder part: plain, the fp16 variant, or sharded (an
/// `.safetensors.index.json` beside its shards, as T5-XXL comes).
pub(crate) fn part_weights(folder: &Path, part: &str) -> Result<Rc<dyn TensorSource>> {
    let stem = if part.starts_with("text_encoder") { "model" } else { "diffusion_pytorch_model" };
    let dir = folder.join(part);
    for name in [format!("{stem}.safetensors"), format!("{stem}.fp16.safetensors")] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(Rc::new(StFile::open(&p).with_context(|| p.display().to_string())?));
        }
    }
    for name in [format!("{stem}.safetensors.index.json"), format!("{stem}.safetensors.index.fp16.json"), format!("{stem}.fp16.safetensors.index.json")] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(Rc::new(Shards::open(&p)?));
        }
    }
    bail!("{}: no {stem}.safetensors (safetensors weights are needed)", dir.display())
}

/// Opens the parts of an SD3 diffusers folder that exist (the transformer must).
pub fn open_folder(folder: &Path) -> Result<Sd3Model> {
    ensure!(is_sd3_folder(folder), "{}: not a Stable Diffusion 3 diffusers folder (model_index.json of StableDiffusion3Pipeline)", folder.display());
    let mut parts = BTreeMap::new();
    for part in ALL_PARTS {
        if !folder.join(part).is_dir() {
            ensure!(part != TRANSFORMER, "{}: no transformer/ folder", folder.display());
            continue;
        }
        let source = part_weights(folder, part)?;
        let plans = match_plans(&*source, plan_kinds(part)).with_context(|| source.origin().display().to_string())?;
        parts.insert(part, Piece { source, plans });
    }
    let heads = read_json(&folder.join("transformer/config.json")).ok().and_then(|c| c.get("num_attention_heads")?.as_u64()).map(|h| h as usize);
    finish_model(folder, parts, heads)
}

/// A sharded safetensors model (`*.safetensors.index.json` and its shards) as one source.
struct Shards {
    path: PathBuf,
    files: Vec<StFile>,
    map: BTreeMap<String, usize>,
}

impl Shards {
    fn open(index: &Path) -> Result<Shards> {
        let value = read_json(index)?;
        let weight_map = value.get("weight_map").and_then(Value::as_object).with_context(|| format!("{}: no weight_map", index.display()))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let (mut files, mut names, mut map) = (Vec::new(), Vec::<String>::new(), BTreeMap::new());
        for (key, shard) in weight_map {
            let shard = shard.as_str().with_context(|| format!("{}: `{key}` names no shard", index.display()))?;
            let at = match names.iter().position(|n| n == shard) {
                Some(i) => i,
                None => {
                    let p = dir.join(shard);
                    files.push(StFile::open(&p).with_context(|| p.display().to_string())?);
                    names.push(shard.to_string());
                    files.len() - 1
                }
            };
            ensure!(files[at].contains(key), "{}: tensor `{key}` is not in {shard}", index.display());
            map.insert(key.clone(), at);
        }
        Ok(Shards { path: index.to_owned(), files, map })
    }

    fn file(&self, key: &str) -> Result<&StFile> {
        self.map.get(key).map(|i| &self.files[*i]).with_context(|| format!("tensor `{key}`: not found"))
    }
}

impl TensorSource for Shards {
    fn origin(&self) -> &Path {
        &self.path
    }
    fn keys(&self) -> Vec<String> {
        self.map.keys().cloned().collect()
    }
    fn contains(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }
    fn info(&self, key: &str) -> Result<TensorInfo> {
        TensorSource::info(self.file(key)?, key)
    }
    fn read(&self, key: &str) -> Result<RawTensor> {
        self.file(key)?.read(key)
    }
    fn with_bytes(&self, key: &str, f: &mut BytesFn<'_>) -> Result<()> {
        TensorSource::with_bytes(self.file(key)?, key, f)
    }
}

/// What an SD3 single file was written with.
#[derive(Debug)]
pub struct Sd3Exported {
    pub out: PathBuf,
    pub tensors: usize,
    pub variant: Variant,
    pub parts: Vec<&'static str>,
}

/// The header metadata: Stability's model-spec keys.
fn metadata(out: &Path, variant: Variant, source: &str) -> BTreeMap<String, String> {
    let arch = match variant {
        Variant::Sd3Medium => "stable-diffusion-v3-medium",
        Variant::Sd35Medium => "stable-diffusion-v3.5-medium",
        Variant::Sd35Large => "stable-diffusion-v3.5-large",
    };
    let title = out.file_stem().unwrap_or_default().to_string_lossy().to_string();
    [
        ("modelspec.sai_model_spec", "1.0.0"),
        ("modelspec.architecture", arch),
        ("modelspec.implementation", "https://github.com/Stability-AI/sd3.5"),
        ("modelspec.title", &title),
        ("modelspec.resolution", "1024x1024"),
        ("dreambridge.source", source),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Writes the components; `parts` name what is in them.
fn write(opts: &ExportOptions, components: Vec<(&'static str, Vec<ExportTensor>)>, variant: Variant, source: &str) -> Result<Sd3Exported> {
    let parts: Vec<&'static str> = components.iter().map(|(p, _)| part_name(p)).collect();
    let components = components.into_iter().map(|(p, tensors)| Ok(ExportComponent { table: part_table(p)?, tensors })).collect::<Result<Vec<_>>>()?;
    let dtype = opts.half.then_some(DType::F16);
    let tensors = write_single_file(&opts.out, &components, dtype, &metadata(&opts.out, variant, source))?;
    Ok(Sd3Exported { out: opts.out.clone(), tensors, variant, parts })
}

/// An SD3 diffusers folder -> one Stability single file (with T5 when the folder has it).
pub fn diffusers_to_single_file(folder: &Path, opts: &ExportOptions) -> Result<Sd3Exported> {
    check_destination(&opts.out, opts.force, &[folder])?;
    let model = open_folder(folder)?;
    let components = model.present().into_iter().map(|p| Ok((p, model.parts[p].tensors()?))).collect::<Result<Vec<_>>>()?;
    write(opts, components, model.variant, &format!("diffusers folder {}", folder.display()))
}

/// The diffusers tensors of a KerasHub plan, re-laid-out and their rows picked as the
/// KerasHub table says (fused q/k/v, swapped halves).
fn keras_tensors<'a>(file: &'a crate::keras::KerasFile, plans: &[&'a Plan]) -> Vec<ExportTensor<'a>> {
    plans
        .iter()
        .flat_map(|p| &p.tensors)
        .map(|t| {
            let full = t.full_diffusers_shape();
            ExportTensor {
                key: t.spec.key.clone(),
                info: TensorInfo { dtype: t.dtype, shape: t.diffusers_shape.clone() },
                origin: Origin::Keras(file),
                source_key: t.source.clone(),
                op: Some(t.spec.op),
                view: Some(t.op_keras_shape()),
                rows: (t.spec.rows != Rows::All).then(|| (t.spec.rows.runs(full[0]), full[1..].iter().product())),
            }
        })
        .collect()
}

/// A KerasHub SD3 input (+ a base for the parts it lacks: an SD3 diffusers folder or SD3
/// single file) -> one Stability single file, the KerasHub table composed with Stability's.
pub fn keras_to_single_file(input: &Sd3Keras, base: Option<&Path>, opts: &ExportOptions) -> Result<Sd3Exported> {
    let mut inputs: Vec<&Path> = vec![&input.path];
    inputs.extend(base);
    check_destination(&opts.out, opts.force, &inputs)?;
    let base = match base {
        Some(b) if b.is_dir() => Some(open_folder(b)?),
        Some(b) => Some(open_file(b)?),
        None => None,
    };
    if let Some(b) = &base {
        if let Some(l) = b.parts.get(CLIP_L).zip(b.parts.get(CLIP_G)).filter(|_| input.clip_l.is_none()) {
            let (pooled, dl, dg) = (input.mmdit.symbols["pooled"], l.0.plans[0].symbols["d"], l.1.plans[0].symbols["d"]);
            ensure!(dl + dg == pooled, "{}: its CLIP widths ({dl} + {dg}) do not fit the MMDiT's pooled input ({pooled})", b.path.display());
        }
    }
    let from_base = |part: &str| -> Result<Option<Vec<ExportTensor<'_>>>> { base.as_ref().and_then(|b| b.parts.get(part)).map(Piece::tensors).transpose() };
    let mut components = vec![(TRANSFORMER, keras_tensors(&input.file, &[&input.mmdit]))];
    for (part, given) in [(CLIP_L, &input.clip_l), (CLIP_G, &input.clip_g)] {
        match given {
            Some(c) => components.push((part, keras_tensors(&input.file, &[&c.encoder, &c.projection]))),
            None => components.extend(from_base(part)?.map(|t| (part, t))),
        }
    }
    components.extend(from_base(T5)?.map(|t| (T5, t)));
    match &input.vae {
        Some((e, d)) => components.push((VAE, keras_tensors(&input.file, &[e, d]))),
        None => components.extend(from_base(VAE)?.map(|t| (VAE, t))),
    }
    if input.form == Form::Mmdit && base.is_none() {
        eprintln!("note: the MMDiT alone (no CLIPs nor VAE); give --base (an SD3 diffusers folder or single file) for a complete file");
    }
    let source = format!("{} {}", input.form.describe(), input.path.display());
    write(opts, components, input.variant, &source)
}

/// What a diffusers folder was written from.
#[derive(Debug)]
pub struct Sd3FolderWritten {
    pub out: PathBuf,
    pub variant: Variant,
    pub from_file: Vec<&'static str>,
    pub from_base: Vec<String>,
}

/// The config of `part` in the base folder, if it has one (an unreadable one is an error naming it).
fn base_config(base: Option<&Path>, part: &str) -> Result<Option<Value>> {
    check_base_config(base, part, part_name(part), &Value::Null, &[])
}

/// `derived` with the base config's values over it, once the base agrees on the fields the
/// weights fix (else an error naming the field).
fn checked_config(base: Option<&Path>, part: &str, derived: Value, fields: &[&str]) -> Result<Value> {
    merged_base_config(base, part, part_name(part), derived, fields)
}

/// How to write a diffusers folder from an SD3 single file.
#[derive(Clone, Debug, Default)]
pub struct Sd3ToFolderOptions {
    /// An SD3 diffusers folder supplying the parts the file lacks, T5's config and tokenizer,
    /// the tokenizers, scheduler and configs.
    pub base: Option<PathBuf>,
    pub out: PathBuf,
    pub half: bool,
    pub force: bool,
}

/// One Stability SD3 single file -> a diffusers `StableDiffusion3Pipeline` folder.
pub fn single_file_to_diffusers(checkpoint: &Path, opts: &Sd3ToFolderOptions) -> Result<Sd3FolderWritten> {
    let model = open_file(checkpoint)?;
    let base = opts.base.as_deref();
    if let Some(b) = base {
        ensure!(is_sd3_folder(b), "{}: not a Stable Diffusion 3 diffusers folder (--base must be one: model_index.json of StableDiffusion3Pipeline)", b.display());
    }
    let has_base = |dir: &str| base.is_some_and(|b| b.join(dir).is_dir());
    for (part, prefix) in [(CLIP_L, "text_encoders.clip_l.*"), (CLIP_G, "text_encoders.clip_g.*"), (VAE, "first_stage_model.*")] {
        if !model.parts.contains_key(part) {
            ensure!(has_base(part), "{}: has no {} (`{prefix}`); give --base with an SD3 diffusers folder that has {part}/", checkpoint.display(), part_name(part));
        }
    }
    if model.parts.contains_key(T5) {
        ensure!(
            base.is_some_and(|b| b.join("text_encoder_3/config.json").is_file() && b.join("tokenizer_3").is_dir()),
            "{}: holds a T5 encoder (`text_encoders.t5xxl.*`) without its config and tokenizer; give --base with an SD3 diffusers folder that has text_encoder_3/config.json and tokenizer_3/",
            checkpoint.display()
        );
    }
    let mut inputs: Vec<&Path> = vec![checkpoint];
    inputs.extend(base);
    let staging = Staging::new(&opts.out, opts.force, &inputs)?;
    let fill = || -> Result<Vec<String>> {
        let mmdit = model.mmdit();
        let base_transformer = base_config(base, TRANSFORMER)?;
        let base_usize = |c: &Option<Value>, k: &str| c.as_ref().and_then(|c| c.get(k)?.as_u64()).map(|v| v as usize);
        // Heads: the weights' (q/k norms), else the base's, else width / 64.
        let heads = sd3::mmdit_heads(mmdit, base_usize(&base_transformer, "num_attention_heads")).with_context(|| format!("{}: the MMDiT", checkpoint.display()))?;
        let mut config = sd3::transformer_config(mmdit, Some(heads), base_usize(&base_transformer, "sample_size"))?;
        set_half(&mut config, opts.half);
        write_json(&staging, "transformer/config.json", &config)?;
        let weights = |part: &str| sd3::weights_name((part, if part.starts_with("text_encoder") { "model" } else { "diffusion_pytorch_model" }), opts.half);
        let piece = &model.parts[TRANSFORMER];
        write_weights(&staging, &weights(TRANSFORMER), &*piece.source, &piece.plans, opts.half)?;
        for (part, which, tokenizer_dir) in [(CLIP_L, Clip::L, "tokenizer"), (CLIP_G, Clip::G, "tokenizer_2")] {
            if let Some(piece) = model.parts.get(part) {
                let given = base_config(base, part)?;
                let act = given.as_ref().and_then(|c| c.get("hidden_act")?.as_str().map(str::to_string));
                let derived = sd3::clip_config(&piece.plans[0], which, act.as_deref(), base_usize(&given, "num_attention_heads"))?;
                let mut config = checked_config(base, part, derived, &["hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "max_position_embeddings"])?;
                set_half(&mut config, opts.half);
                write_json(&staging, &format!("{part}/config.json"), &config)?;
                write_weights(&staging, &weights(part), &*piece.source, &piece.plans, opts.half)?;
            }
            if has_base(tokenizer_dir) {
                copy_tree(&base.unwrap().join(tokenizer_dir), &staging.path(tokenizer_dir)?, &|_| false)?;
            } else {
                write_clip_tokenizer(&staging, tokenizer_dir, which, tokenizer::VOCAB_JSON, tokenizer::MERGES_TXT)?;
            }
        }
        if let Some(piece) = model.parts.get(T5) {
            let b = base.expect("checked above");
            crate::output::copy_file(&b.join("text_encoder_3/config.json"), &staging.path("text_encoder_3/config.json")?)?;
            copy_tree(&b.join("tokenizer_3"), &staging.path("tokenizer_3")?, &|_| false)?;
            write_all(&staging, &weights(T5), &*piece.source, opts.half)?;
        }
        if let Some(piece) = model.parts.get(VAE) {
            let given = base_config(base, VAE)?;
            let f = |k: &str, d: f64| given.as_ref().and_then(|c| c.get(k)?.as_f64()).unwrap_or(d);
            let derived = sd3::vae_config(&piece.plans[0], &piece.plans[1], f("scaling_factor", sd3::VAE_SCALE), f("shift_factor", sd3::VAE_SHIFT))?;
            let config = checked_config(base, VAE, derived, &["block_out_channels", "latent_channels", "in_channels", "out_channels"])?;
            write_json(&staging, "vae/config.json", &config)?;
            write_weights(&staging, &weights(VAE), &*piece.source, &piece.plans, opts.half)?;
        }
        let from_base = rest_from_base(&staging, base, &|p| model.parts.contains_key(p), &[CLIP_L, CLIP_G, VAE], &sd3::scheduler_config(sd3::SCHEDULER_SHIFT))?;
        write_json(&staging, "model_index.json", &sd3::model_index(model.parts.contains_key(T5)))?;
        Ok(from_base)
    };
    let filled = fill();
    let (from_base, out) = staging.finish(filled)?;
    Ok(Sd3FolderWritten { out, variant: model.variant, from_file: model.present().into_iter().map(part_name).collect(), from_base })
}

fn set_half(config: &mut Value, half: bool) {
    if half {
        config["torch_dtype"] = "float16".into();
    }
}

/// Every tensor of `source`, as it is (fp16 with `half`), into `relative`.
pub(crate) fn write_all(staging: &Staging, relative: &str, source: &dyn TensorSource, half: bool) -> Result<()> {
    let outputs: Vec<Output> = source
        .keys()
        .into_iter()
        .map(|k| {
            let info = source.info(&k).with_context(|| format!("tensor {}", source.describe(&k)))?;
            let elements = info.shape.iter().product();
            let tensor = PendingTensor { key: k.clone(), dtype: if half { DType::F16 } else { info.dtype }, shape: info.shape };
            Ok(Output { tensor, parts: vec![Part::whole(Origin::Tensors(source), k, None, elements)] })
        })
        .collect::<Result<_>>()?;
    let progress = Progress::new(relative.split('/').next().unwrap_or(relative), total_bytes(&outputs));
    let pending = outputs.iter().map(|o| o.tensor.clone()).collect();
    write_outputs(StWriter::create(&staging.path(relative)?, pending)?, &outputs, &progress)?;
    progress.finish(&format!("{} tensors -> {relative}", outputs.len()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::rename::{Imported, Reshape};

    #[test]
    fn stability_names_fuse_qkv_and_swap_the_continuous_norms() {
        let t = part_table(TRANSFORMER).unwrap();
        let k = t.export_in("transformer_blocks.3.attn.add_k_proj.weight", Some(3)).unwrap();
        assert_eq!((k.key.as_str(), k.op, k.part), ("model.diffusion_model.joint_blocks.3.context_block.attn.qkv.weight", Reshape::Concat, Some((1, 3))));
        let cases = [
            ("pos_embed.pos_embed", "pos_embed", Reshape::Copy),
            ("pos_embed.proj.weight", "x_embedder.proj.weight", Reshape::Copy),
            ("time_text_embed.timestep_embedder.linear_2.bias", "t_embedder.mlp.2.bias", Reshape::Copy),
            ("time_text_embed.text_embedder.linear_1.weight", "y_embedder.mlp.0.weight", Reshape::Copy),
            ("transformer_blocks.1.attn.norm_added_q.weight", "joint_blocks.1.context_block.attn.ln_q.weight", Reshape::Copy),
            ("transformer_blocks.0.attn2.to_out.0.bias", "joint_blocks.0.x_block.attn2.proj.bias", Reshape::Copy),
            ("transformer_blocks.1.ff_context.net.0.proj.weight", "joint_blocks.1.context_block.mlp.fc1.weight", Reshape::Copy),
            ("transformer_blocks.1.norm1_context.linear.bias", "joint_blocks.1.context_block.adaLN_modulation.1.bias", Reshape::Copy),
            ("transformer_blocks.3.norm1_context.linear.bias", "joint_blocks.3.context_block.adaLN_modulation.1.bias", Reshape::SwapHalves),
            ("transformer_blocks.3.norm1.linear.weight", "joint_blocks.3.x_block.adaLN_modulation.1.weight", Reshape::Copy),
            ("norm_out.linear.weight", "final_layer.adaLN_modulation.1.weight", Reshape::SwapHalves),
            ("proj_out.bias", "final_layer.linear.bias", Reshape::Copy),
        ];
        for (d, l, op) in cases {
            let r = t.export_in(d, Some(3)).unwrap_or_else(|| panic!("{d}"));
            assert_eq!((r.key.as_str(), r.op), (format!("model.diffusion_model.{l}").as_str(), op), "{d}");
            let Imported::Tensors(back) = t.import_in(&r.key, Some(3)) else { panic!("{l}") };
            assert_eq!((back[0].key.as_str(), back[0].op), (d, op), "{l}");
        }
        assert_eq!(t.import("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"), {
            let parts = ["to_q", "to_k", "to_v"].iter().enumerate().map(|(i, p)| crate::mapping::rename::Renamed {
                key: format!("transformer_blocks.0.attn.{p}.weight"),
                op: Reshape::Concat,
                part: Some((i, 3)),
                index: Some(0),
            });
            Imported::Tensors(parts.collect())
        });
    }

    #[test]
    fn clip_and_t5_keep_transformers_names_under_their_prefixes() {
        let l = part_table(CLIP_L).unwrap();
        assert_eq!(l.export("text_projection.weight").unwrap().key, "text_encoders.clip_l.transformer.text_projection.weight");
        assert_eq!(l.identity_if_missing, vec![("text_projection.weight".to_string(), "text_model.final_layer_norm.weight".to_string())]);
        let g = part_table(CLIP_G).unwrap();
        assert_eq!(g.export("text_model.encoder.layers.2.mlp.fc1.bias").unwrap().key, "text_encoders.clip_g.transformer.text_model.encoder.layers.2.mlp.fc1.bias");
        assert_eq!(g.import("text_encoders.clip_g.transformer.text_model.embeddings.position_ids"), Imported::Ignored);
        let t5 = part_table(T5).unwrap();
        assert_eq!(t5.export("encoder.block.0.layer.1.DenseReluDense.wi_0.weight").unwrap().key, "text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wi_0.weight");
        assert_eq!(part_table(VAE).unwrap().prefix, "first_stage_model.");
    }
}
