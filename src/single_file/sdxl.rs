//! Stability AI's SDXL base single file (`sd_xl_base_1.0.safetensors` and the fine-tunes made
//! from it): the UNet under `model.diffusion_model.` (generative-models' layout), CLIP-L under
//! `conditioner.embedders.0.transformer.`, OpenCLIP ViT-bigG under `conditioner.embedders.1.model.`,
//! the VAE under `first_stage_model.` (the LDM layout with its quant convs). Names come from
//! `mappings/ldm_unet_sdxl.toml`, `ldm_clip_l_sdxl.toml`, `ldm_clip_g_sdxl.toml` (deltas of the
//! SD1/SD2 tables) and `ldm_vae.toml`; the configs are read from the weights
//! ([`crate::diffusers::sdxl`]). Both directions stream through diffusers' names.

use super::convert::{check_destination, merged_base_config, read_json, rest_from_base, write_weights, ExportOptions};
use super::export::{write_single_file, ExportComponent, ExportTensor};
use super::open_tensors;
use super::sd3::{part_weights, write_all};
use super::view::ComponentView;
use crate::convert::plan::Plan;
use crate::convert::sd3_to_diffusers::write_clip_tokenizer;
use crate::convert::stream::Origin;
use crate::convert::to_diffusers::write_json;
use crate::diffusers::configs::vae_config;
use crate::diffusers::sd3::Clip;
use crate::diffusers::sdxl;
use crate::diffusers::tokenizer;
use crate::mapping::rename::{rename_table, rename_table_named, RenameTable};
use crate::mapping::table_for;
use crate::output::{copy_tree, Staging};
use crate::tensor::{DType, TensorSource};
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

/// The pipeline parts, by diffusers folder, in file order.
const UNET: &str = "unet";
const CLIP_L: &str = "text_encoder";
const CLIP_G: &str = "text_encoder_2";
const VAE: &str = "vae";
const ALL_PARTS: [&str; 4] = [UNET, CLIP_L, CLIP_G, VAE];

/// Where each embedder of an SGM single file lives.
const CLIP_L_PREFIX: &str = "conditioner.embedders.0.transformer.";
const CLIP_G_PREFIX: &str = "conditioner.embedders.1.model.";
const REFINER_PREFIX: &str = "conditioner.embedders.0.model.";
/// OpenCLIP-G's projection (any `[projection, width]`; checked apart from the tower's tables,
/// whose projection is square).
const PROJECTION: &str = "text_projection.weight";
const ADD_EMBEDDING: &str = "model.diffusion_model.label_emb.0.0.weight";

/// The table of one part.
fn part_table(part: &str) -> Result<RenameTable> {
    match part {
        UNET => rename_table_named("ldm_unet_sdxl"),
        CLIP_L => rename_table_named("ldm_clip_l_sdxl"),
        CLIP_G => rename_table_named("ldm_clip_g_sdxl"),
        _ => rename_table(super::LAYOUT, "vae", None),
    }
}

fn part_name(part: &str) -> &'static str {
    match part {
        UNET => "UNet",
        CLIP_L => "CLIP-L",
        CLIP_G => "OpenCLIP-G",
        _ => "VAE",
    }
}

/// What family a file's keys say it is, for the SDXL checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// SDXL base (or a UNet-only SDXL file: added conditioning over three levels, no SD1/SD2 text
    /// encoder).
    SdxlBase,
    /// SDXL refiner: OpenCLIP-G as the only embedder, no CLIP-L.
    SdxlRefiner,
    /// Anything else (SD1/SD2, SD3, ...): not this module's.
    Other,
}

/// The family of `source` by its keys.
pub fn family(source: &dyn TensorSource) -> Family {
    let keys = source.keys();
    let has = |p: &str| keys.iter().any(|k| k.starts_with(p));
    if has(REFINER_PREFIX) && !has(CLIP_L_PREFIX) {
        return Family::SdxlRefiner;
    }
    // A UNet alone: the added conditioning over three levels (SD2 unCLIP's UNet has `label_emb`
    // too, over four levels and with an SD2 text encoder).
    let unet_only = source.contains(ADD_EMBEDDING) && !has("cond_stage_model.") && !has("model.diffusion_model.input_blocks.9.");
    if has(CLIP_L_PREFIX) || has(CLIP_G_PREFIX) || unet_only {
        return Family::SdxlBase;
    }
    Family::Other
}

/// True when `path` is a checkpoint file of the SDXL family (base or refiner: the refiner is
/// then refused by name).
pub fn is_sdxl_file(path: &Path) -> bool {
    path.is_file() && open_tensors(path).is_ok_and(|s| family(&*s) != Family::Other)
}

/// One part of an SDXL model under diffusers' names.
pub struct Piece {
    pub source: Rc<dyn TensorSource>,
    /// The plans matched on the part (the CLIPs' and the VAE's; none for the UNet, whose tensors
    /// are taken as the table names them).
    pub plans: Vec<Plan>,
}

impl Piece {
    fn tensors(&self) -> Result<Vec<ExportTensor<'_>>> {
        let origin = Origin::Tensors(&*self.source);
        if !self.plans.is_empty() {
            let mut out: Vec<ExportTensor> = self
                .plans
                .iter()
                .flat_map(|p| &p.tensors)
                .map(|t| ExportTensor::plain(origin, &t.spec.key, crate::tensor::TensorInfo { dtype: t.dtype, shape: t.diffusers_shape.clone() }, &t.source))
                .collect();
            if self.source.contains(PROJECTION) {
                let info = self.source.info(PROJECTION).with_context(|| format!("tensor {}", self.source.describe(PROJECTION)))?;
                ensure!(info.shape.len() == 2, "tensor {}: shape {:?} is not a matrix", self.source.describe(PROJECTION), info.shape);
                out.push(ExportTensor::plain(origin, PROJECTION, info, PROJECTION));
            }
            return Ok(out);
        }
        self.source
            .keys()
            .into_iter()
            .filter(|k| !k.ends_with("position_ids"))
            .map(|k| {
                let info = self.source.info(&k).with_context(|| format!("tensor {}", self.source.describe(&k)))?;
                Ok(ExportTensor::plain(origin, &k, info, &k))
            })
            .collect()
    }
}

/// An SDXL base model from a folder or a single file: the parts it has.
pub struct SdxlModel {
    pub path: PathBuf,
    pub parts: BTreeMap<&'static str, Piece>,
}

impl SdxlModel {
    fn present(&self) -> Vec<&'static str> {
        ALL_PARTS.into_iter().filter(|p| self.parts.contains_key(p)).collect()
    }

    /// The width of the pooled text embedding: OpenCLIP-G's projection.
    fn pooled(&self) -> Option<usize> {
        let g = self.parts.get(CLIP_G)?;
        g.source.info("text_projection.weight").ok().map(|i| i.shape[0])
    }

    /// One line naming the model: its levels, depths and the parts present.
    pub fn describe(&self) -> String {
        let names: Vec<&str> = self.present().into_iter().map(part_name).collect();
        let unet = self.parts.get(UNET).and_then(|u| sdxl::unet_config(&*u.source, self.pooled()).ok());
        let shape = unet
            .map(|c| format!("UNet widths {}, transformer depths {}; ", c["block_out_channels"], c["transformer_layers_per_block"]))
            .unwrap_or_default();
        format!("SDXL base ({shape}{})", names.join(", "))
    }
}

/// The plans that check a part (every tensor present, shapes consistent): the KerasHub CLIP
/// tables (diffusers' names) for the text encoders, the VAE tables for the VAE.
fn part_plans(part: &str, source: &dyn TensorSource) -> Result<Vec<Plan>> {
    let kinds: &[&str] = match part {
        CLIP_L => &["clip-text-kerashub"],
        CLIP_G => &["clip-text-kerashub"],
        VAE => &["vae-encoder", "vae-decoder"],
        _ => &[],
    };
    kinds.iter().map(|k| Plan::for_diffusers(source, &table_for(k)?)).collect()
}

/// The refusal for a file of another family, naming it.
fn refuse(path: &Path, source: &dyn TensorSource) -> Result<()> {
    match family(source) {
        Family::SdxlBase => Ok(()),
        Family::SdxlRefiner => bail!(
            "{}: an SDXL refiner single file (OpenCLIP-G alone at `{REFINER_PREFIX}*`, no CLIP-L): not supported; only SDXL base files are",
            path.display()
        ),
        Family::Other => bail!("{}: not an SDXL base single file (no `{CLIP_L_PREFIX}*`, `{CLIP_G_PREFIX}*` nor `{ADD_EMBEDDING}`)", path.display()),
    }
}

/// Opens and checks an SDXL base single file: every tensor under a part's prefix is one the
/// table knows. Errors name the file and the tensor.
pub fn open_file(path: &Path) -> Result<SdxlModel> {
    let source = open_tensors(path).with_context(|| path.display().to_string())?;
    refuse(path, &*source)?;
    let in_file = |what: String| format!("{}: {what}", path.display());
    let mut parts = BTreeMap::new();
    for part in ALL_PARTS {
        let table = part_table(part)?;
        let prefix = table.prefix.clone();
        let view = ComponentView::new(source.clone(), table, false).with_context(|| in_file(format!("the {}", part_name(part))))?;
        if let Some(k) = view.unknown.first() {
            bail!("{}", in_file(format!("tensor `{k}`: not a tensor of SDXL's {}", part_name(part))));
        }
        if !view.is_present() {
            continue;
        }
        let plans = part_plans(part, &view).with_context(|| in_file(format!("the {} (`{prefix}*`)", part_name(part))))?;
        if !plans.is_empty() {
            let mut used: BTreeSet<&str> = plans.iter().flat_map(|p| p.tensors.iter().map(|t| t.source.as_str())).collect();
            used.insert(PROJECTION);
            if let Some(k) = view.keys().iter().find(|k| !used.contains(k.as_str())) {
                bail!("{}", in_file(format!("tensor {}: not a tensor of SDXL's {}", view.describe(k), part_name(part))));
            }
        }
        parts.insert(part, Piece { source: Rc::new(view), plans });
    }
    ensure!(parts.contains_key(UNET), "{}", in_file("no UNet tensors (`model.diffusion_model.*`)".into()));
    let model = SdxlModel { path: path.to_owned(), parts };
    // The configs must come out of the weights (widths and depths consistent), and the UNet have
    // every tensor of that structure and no other.
    check_unet(&model).with_context(|| in_file("the UNet".into()))?;
    for (part, proj) in [(CLIP_L, false), (CLIP_G, true)] {
        if let Some(p) = model.parts.get(part) {
            sdxl::clip_config(&*p.source, proj).with_context(|| in_file(format!("the {}", part_name(part))))?;
        }
    }
    Ok(model)
}


/// True when `folder` is a diffusers `StableDiffusionXLPipeline` folder (by its model index).
pub fn is_sdxl_folder(folder: &Path) -> bool {
    read_json(&folder.join("model_index.json")).ok().and_then(|v| v.get("_class_name")?.as_str().map(|c| c.starts_with("StableDiffusionXL"))).unwrap_or(false)
}

/// Opens the parts of an SDXL diffusers folder (all four are needed for a single file).
pub fn open_folder(folder: &Path) -> Result<SdxlModel> {
    ensure!(is_sdxl_folder(folder), "{}: not an SDXL diffusers folder (model_index.json of StableDiffusionXLPipeline)", folder.display());
    let mut parts = BTreeMap::new();
    for part in ALL_PARTS {
        ensure!(folder.join(part).is_dir(), "{}: no {part}/ folder (a single file holds the whole pipeline: UNet, both text encoders and VAE)", folder.display());
        let source = part_weights(folder, part)?;
        let plans = part_plans(part, &*source).with_context(|| source.origin().display().to_string())?;
        parts.insert(part, Piece { source, plans });
    }
    let model = SdxlModel { path: folder.to_owned(), parts };
    check_unet(&model).with_context(|| model.parts[UNET].source.origin().display().to_string())?;
    Ok(model)
}

/// The UNet's tensors are those of the structure its weights show (see [`sdxl::unet_keys`]).
fn check_unet(model: &SdxlModel) -> Result<()> {
    let unet = &*model.parts[UNET].source;
    let config = sdxl::unet_config(unet, model.pooled())?;
    let expected: BTreeSet<String> = sdxl::unet_keys(&config)?.into_iter().collect();
    let present: BTreeSet<String> = unet.keys().into_iter().collect();
    if let Some(k) = expected.difference(&present).next() {
        bail!("no tensor {}", unet.describe(k));
    }
    if let Some(k) = present.difference(&expected).next() {
        bail!("tensor {}: not a tensor of an SDXL UNet", unet.describe(k));
    }
    Ok(())
}

/// What an SDXL single file was written with.
#[derive(Debug)]
pub struct SdxlExported {
    pub out: PathBuf,
    pub tensors: usize,
    pub parts: Vec<&'static str>,
}

/// The header metadata: Stability's model-spec keys.
fn metadata(out: &Path, source: &str) -> BTreeMap<String, String> {
    let title = out.file_stem().unwrap_or_default().to_string_lossy().to_string();
    [
        ("modelspec.sai_model_spec", "1.0.0"),
        ("modelspec.architecture", "stable-diffusion-xl-v1-base"),
        ("modelspec.implementation", "https://github.com/Stability-AI/generative-models"),
        ("modelspec.title", &title),
        ("modelspec.resolution", "1024x1024"),
        ("modelspec.prediction_type", "epsilon"),
        ("dreambridge.source", source),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// An SDXL diffusers folder -> one Stability single file.
pub fn diffusers_to_single_file(folder: &Path, opts: &ExportOptions) -> Result<SdxlExported> {
    check_destination(&opts.out, opts.force, &[folder])?;
    let model = open_folder(folder)?;
    let components = model
        .present()
        .into_iter()
        .map(|p| Ok(ExportComponent { table: part_table(p)?, tensors: model.parts[p].tensors()? }))
        .collect::<Result<Vec<_>>>()?;
    let dtype = opts.half.then_some(DType::F16);
    let tensors = write_single_file(&opts.out, &components, dtype, &metadata(&opts.out, &format!("diffusers folder {}", folder.display())))?;
    Ok(SdxlExported { out: opts.out.clone(), tensors, parts: model.present().into_iter().map(part_name).collect() })
}

/// How to write a diffusers folder from an SDXL single file.
#[derive(Clone, Debug, Default)]
pub struct SdxlToFolderOptions {
    /// An SDXL diffusers folder supplying the parts the file lacks, the tokenizers, scheduler and
    /// configs (its configs must agree with the weights on the widths).
    pub base: Option<PathBuf>,
    pub out: PathBuf,
    pub half: bool,
    pub force: bool,
}

/// What a diffusers folder was written from.
#[derive(Debug)]
pub struct SdxlFolderWritten {
    pub out: PathBuf,
    pub from_file: Vec<&'static str>,
    pub from_base: Vec<String>,
}

/// `derived` with the base config's values over it, once the base agrees on `fields`.
fn checked_config(base: Option<&Path>, part: &str, derived: Value, fields: &[&str]) -> Result<Value> {
    merged_base_config(base, part, part_name(part), derived, fields)
}

fn weights_name(part: &str, half: bool) -> String {
    let stem = if part.starts_with("text_encoder") { "model" } else { "diffusion_pytorch_model" };
    format!("{part}/{stem}{}.safetensors", if half { ".fp16" } else { "" })
}

/// One SDXL base single file -> a diffusers `StableDiffusionXLPipeline` folder.
pub fn single_file_to_diffusers(checkpoint: &Path, opts: &SdxlToFolderOptions) -> Result<SdxlFolderWritten> {
    let model = open_file(checkpoint)?;
    let base = opts.base.as_deref();
    if let Some(b) = base {
        ensure!(is_sdxl_folder(b), "{}: not an SDXL diffusers folder (--base must be one: model_index.json of StableDiffusionXLPipeline)", b.display());
    }
    let has_base = |dir: &str| base.is_some_and(|b| b.join(dir).is_dir());
    for (part, prefix) in [(CLIP_L, CLIP_L_PREFIX), (CLIP_G, CLIP_G_PREFIX), (VAE, "first_stage_model.")] {
        if !model.parts.contains_key(part) {
            ensure!(has_base(part), "{}: has no {} (`{prefix}*`); give --base with an SDXL diffusers folder that has {part}/", checkpoint.display(), part_name(part));
        }
    }
    let mut inputs: Vec<&Path> = vec![checkpoint];
    inputs.extend(base);
    let staging = Staging::new(&opts.out, opts.force, &inputs)?;
    let fill = || -> Result<Vec<String>> {
        let set_half = |c: &mut Value| {
            if opts.half {
                c["torch_dtype"] = "float16".into();
            }
        };
        let unet = &model.parts[UNET];
        let derived = sdxl::unet_config(&*unet.source, model.pooled())?;
        let fixed = [
            "block_out_channels",
            "transformer_layers_per_block",
            "cross_attention_dim",
            "in_channels",
            "out_channels",
            "layers_per_block",
            "projection_class_embeddings_input_dim",
            "down_block_types",
            "up_block_types",
        ];
        write_json(&staging, "unet/config.json", &checked_config(base, UNET, derived, &fixed)?)?;
        write_all(&staging, &weights_name(UNET, opts.half), &*unet.source, opts.half)?;
        for (part, which, tokenizer_dir) in [(CLIP_L, Clip::L, "tokenizer"), (CLIP_G, Clip::G, "tokenizer_2")] {
            if let Some(piece) = model.parts.get(part) {
                let derived = sdxl::clip_config(&*piece.source, part == CLIP_G)?;
                let fixed = ["hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "max_position_embeddings", "projection_dim"];
                let mut config = checked_config(base, part, derived, &fixed)?;
                set_half(&mut config);
                write_json(&staging, &format!("{part}/config.json"), &config)?;
                write_all(&staging, &weights_name(part, opts.half), &*piece.source, opts.half)?;
            }
            if has_base(tokenizer_dir) {
                copy_tree(&base.unwrap().join(tokenizer_dir), &staging.path(tokenizer_dir)?, &|_| false)?;
            } else {
                write_clip_tokenizer(&staging, tokenizer_dir, which, tokenizer::VOCAB_JSON, tokenizer::MERGES_TXT)?;
            }
        }
        if let Some(piece) = model.parts.get(VAE) {
            let mut derived = vae_config(&piece.plans.iter().collect::<Vec<_>>())?;
            derived["scaling_factor"] = sdxl::VAE_SCALE.into();
            derived["sample_size"] = 1024.into();
            derived["force_upcast"] = true.into();
            let config = checked_config(base, VAE, derived, &["block_out_channels", "latent_channels", "in_channels", "out_channels"])?;
            write_json(&staging, "vae/config.json", &config)?;
            write_weights(&staging, &weights_name(VAE, opts.half), &*piece.source, &piece.plans, opts.half)?;
        }
        let from_base = rest_from_base(&staging, base, &|p| model.parts.contains_key(p), &[CLIP_L, CLIP_G, VAE], &sdxl::scheduler_config())?;
        write_json(&staging, "model_index.json", &sdxl::model_index())?;
        Ok(from_base)
    };
    let filled = fill();
    let (from_base, out) = staging.finish(filled)?;
    Ok(SdxlFolderWritten { out, from_file: model.present().into_iter().map(part_name).collect(), from_base })
}

/// SDXL has no Keras layout: KerasCV's `StableDiffusion` is SD 1.x / 2.x, KerasHub's
/// `StableDiffusion3Backbone` is SD3. A Keras conversion given an SDXL single file (base or
/// refiner) or an SDXL diffusers folder, as its input or as `--base`, stops here with one line
/// naming it, before the SD1/SD2 tables fail on the first tensor they do not know.
pub fn refuse_for_keras(path: &Path, role: &str) -> Result<()> {
    let what = if is_sdxl_folder(path) {
        "an SDXL diffusers folder"
    } else if is_sdxl_file(path) {
        "an SDXL single file"
    } else {
        return Ok(());
    };
    let role = if role.is_empty() { String::new() } else { format!(" ({role})") };
    bail!(
        "{}{role}: {what}; SDXL has no KerasCV or KerasHub layout (KerasCV has Stable Diffusion 1.x/2.x, KerasHub has SD3): convert SDXL between single file and diffusers only",
        path.display()
    )
}

/// The SDXL check of [`super::SingleFile::open`]: an SDXL file is refused there by name.
pub fn refuse_in_sd_reader(source: &Arc<dyn TensorSource>) -> Result<()> {
    match family(&**source) {
        Family::SdxlBase => bail!("an SDXL base single file: read here by `convert single-file-to-diffusers` / `diffusers-to-single-file` only"),
        Family::SdxlRefiner => bail!("an SDXL refiner single file (OpenCLIP-G alone at `{REFINER_PREFIX}*`, no CLIP-L): not supported"),
        Family::Other => Ok(()),
    }
}
