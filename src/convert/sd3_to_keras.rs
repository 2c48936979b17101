//! A diffusers `StableDiffusion3Pipeline` folder -> KerasHub: a preset folder that
//! `StableDiffusion3Backbone.from_preset` loads, or the MMDiT alone as the `.weights.h5` that
//! `backbone.diffuser.load_weights` reads.

use super::kerashub::{self, MMDIT_ROOT};
use super::plan::{Plan, PlannedTensor};
use crate::diffusers::sd3::{self, Clip, Variant};
use crate::diffusers::st_read::StFile;
use crate::keras::keras3_writer::Keras3Writer;
use crate::mapping::table::Rows;
use crate::mapping::{table_for, Op, Symbols};
use crate::output::Staging;
use crate::tensor::{DType, RawTensor, TensorSource};
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// One component's tensors (a folder's file, or a part of a single file seen under diffusers'
/// names) and the plans matched on them, with the Keras root of each.
pub struct Matched {
    pub source: Rc<dyn TensorSource>,
    pub plans: Vec<(Plan, &'static str)>,
}

/// An SD3 diffusers folder, matched against the KerasHub tables.
pub struct Sd3Folder {
    pub path: PathBuf,
    pub transformer: Matched,
    pub variant: Variant,
    pub heads: usize,
    /// CLIP-L and CLIP-G (encoder, projection), with their configs.
    pub clips: Vec<(Matched, Value)>,
    pub vae: Option<Matched>,
    pub scheduler_shift: f64,
    pub sample_size: usize,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))
}

/// The safetensors weights of `dir` (plain, else the fp16 variant).
fn weights(folder: &Path, part: (&str, &str)) -> Result<PathBuf> {
    for half in [false, true] {
        let p = folder.join(sd3::weights_name(part, half));
        if p.is_file() {
            return Ok(p);
        }
    }
    anyhow::bail!("{}: no {}.safetensors (safetensors weights are needed)", folder.join(part.0).display(), part.1)
}

/// True when `folder` is an SD3 pipeline (or holds an SD3 transformer).
pub fn is_sd3_folder(folder: &Path) -> bool {
    let index = read_json(&folder.join("model_index.json")).ok();
    index.as_ref().and_then(|v| v.get("_class_name")?.as_str().map(|c| c.starts_with("StableDiffusion3"))).unwrap_or(false)
        || read_json(&folder.join("transformer/config.json")).ok().and_then(|v| v.get("_class_name")?.as_str().map(|c| c == "SD3Transformer2DModel")).unwrap_or(false)
}

/// Matches every part of an SD3 folder that exists (the transformer must).
pub fn plan_sd3_folder(folder: &Path) -> Result<Sd3Folder> {
    let path = weights(folder, sd3::TRANSFORMER)?;
    let config = read_json(&folder.join("transformer/config.json"))?;
    let file = Rc::new(StFile::open(&path).with_context(|| path.display().to_string())?);
    let mmdit = Plan::for_diffusers(&*file, &table_for("mmdit-sd3")?).with_context(|| path.display().to_string())?;
    let heads = sd3::mmdit_heads(&mmdit, config.get("num_attention_heads").and_then(Value::as_u64).map(|h| h as usize)).with_context(|| path.display().to_string())?;
    let variant = Variant::of(&mmdit);
    let sample_size = config.get("sample_size").and_then(Value::as_u64).unwrap_or(128) as usize;
    let transformer = Matched { source: file, plans: vec![(mmdit, MMDIT_ROOT)] };
    let mut clips = Vec::new();
    for (part, (root, projection_root)) in [sd3::TEXT_ENCODER, sd3::TEXT_ENCODER_2].into_iter().zip(CLIP_ROOTS) {
        if !folder.join(part.0).is_dir() {
            continue;
        }
        let path = weights(folder, part)?;
        let config = read_json(&folder.join(part.0).join("config.json"))?;
        let file: Rc<dyn TensorSource> = Rc::new(StFile::open(&path).with_context(|| path.display().to_string())?);
        let d = config.get("hidden_size").and_then(Value::as_u64).context("no hidden_size")? as usize;
        let heads = config.get("num_attention_heads").and_then(Value::as_u64).context("no num_attention_heads")? as usize;
        ensure!(heads > 0 && d % heads == 0, "{}: hidden_size {d} is not a multiple of {heads} heads", part.0);
        clips.push((match_clip(file, heads, d, root, projection_root)?, config));
    }
    let vae = if folder.join("vae").is_dir() {
        let path = weights(folder, sd3::VAE)?;
        let file = Rc::new(StFile::open(&path).with_context(|| path.display().to_string())?);
        let encoder = Plan::for_diffusers(&*file, &table_for("vae-encoder-kerashub")?).with_context(|| path.display().to_string())?;
        let decoder = Plan::for_diffusers(&*file, &table_for("vae-decoder-kerashub")?).with_context(|| path.display().to_string())?;
        Some(Matched { source: file, plans: vec![(encoder, VAE_ROOTS.0), (decoder, VAE_ROOTS.1)] })
    } else {
        None
    };
    let scheduler_shift = read_json(&folder.join("scheduler/scheduler_config.json")).ok().and_then(|v| v.get("shift")?.as_f64()).unwrap_or(sd3::SCHEDULER_SHIFT);
    Ok(Sd3Folder { path: folder.to_owned(), transformer, variant, heads, clips, vae, scheduler_shift, sample_size })
}

/// The Keras roots of CLIP-L's and CLIP-G's encoder and projection.
const CLIP_ROOTS: [(&str, &str); 2] = [(kerashub::CLIP_L_ROOT, kerashub::CLIP_L_PROJECTION_ROOT), (kerashub::CLIP_G_ROOT, kerashub::CLIP_G_PROJECTION_ROOT)];
/// The Keras roots of the VAE's encoder and decoder.
const VAE_ROOTS: (&str, &str) = (kerashub::VAE_ENCODER_ROOT, kerashub::VAE_DECODER_ROOT);

/// A CLIP's encoder and projection matched on `source`, the per-head Keras shapes bound.
fn match_clip(source: Rc<dyn TensorSource>, heads: usize, d: usize, root: &'static str, projection_root: &'static str) -> Result<Matched> {
    let origin = source.origin().display().to_string();
    let known: Symbols = [("heads".to_string(), heads), ("hd".to_string(), d / heads)].into();
    let mut encoder = Plan::for_diffusers_with(&*source, &table_for("clip-text-kerashub")?, known.clone()).with_context(|| origin.clone())?;
    encoder.keras_shapes_with(&known)?;
    let projection = Plan::for_diffusers(&*source, &table_for("clip-projection-kerashub")?).with_context(|| format!("{origin}: KerasHub's SD3 needs each CLIP's text_projection"))?;
    Ok(Matched { source, plans: vec![(encoder, root), (projection, projection_root)] })
}

/// Matches Stability's SD3 single file (see [`crate::single_file::sd3`]) as a folder would be:
/// its parts through Stability's tables, under diffusers' names. Its CLIPs' head counts are not in
/// the weights: width / 64, as both of SD3's (12 and 20). T5 has no place in a KerasHub preset
/// and is left out (a note says so).
pub fn plan_sd3_single_file(path: &Path) -> Result<Sd3Folder> {
    use crate::single_file::sd3::open_file;
    let mut model = open_file(path)?;
    let mut take = |part: &str| model.parts.remove(part);
    let piece = take(sd3::TRANSFORMER.0).context("no MMDiT")?;
    let mmdit = piece.plans.into_iter().next().context("no MMDiT plan")?;
    let config = sd3::transformer_config(&mmdit, Some(model.heads), None)?;
    let sample_size = config.get("sample_size").and_then(Value::as_u64).unwrap_or(128) as usize;
    let transformer = Matched { source: piece.source, plans: vec![(mmdit, MMDIT_ROOT)] };
    let mut clips = Vec::new();
    for ((part, which), (root, projection_root)) in [(sd3::TEXT_ENCODER.0, Clip::L), (sd3::TEXT_ENCODER_2.0, Clip::G)].into_iter().zip(CLIP_ROOTS) {
        let Some(piece) = take(part) else { continue };
        let d = piece.plans.first().and_then(|p| p.symbols.get("d").copied()).context("no CLIP width")?;
        let heads = (d / sd3::HEAD_DIM).max(1);
        let matched = match_clip(piece.source, heads, d, root, projection_root).with_context(|| path.display().to_string())?;
        let config = sd3::clip_config(&matched.plans[0].0, which, None, Some(heads))?;
        clips.push((matched, config));
    }
    let vae = take(sd3::VAE.0).map(|piece| {
        let mut plans = piece.plans.into_iter();
        let (encoder, decoder) = (plans.next().expect("the VAE's encoder plan"), plans.next().expect("the VAE's decoder plan"));
        Matched { source: piece.source, plans: vec![(encoder, VAE_ROOTS.0), (decoder, VAE_ROOTS.1)] }
    });
    if take(sd3::TEXT_ENCODER_3.0).is_some() {
        eprintln!("note: {}: its T5-XXL is left out (KerasHub's SD3 has no T5)", path.display());
    }
    Ok(Sd3Folder { path: path.to_owned(), transformer, variant: model.variant, heads: model.heads, clips, vae, scheduler_shift: sd3::SCHEDULER_SHIFT, sample_size })
}

/// What was written.
#[derive(Debug)]
pub struct Written {
    pub out: PathBuf,
    pub parts: Vec<String>,
}

/// keras-hub's shard size (`save_to_preset(max_shard_size=10)`), in Keras' GB (2^30 bytes).
pub const DEFAULT_MAX_SHARD_GB: f64 = 10.0;

/// Writes `folder` as a KerasHub preset folder, or, when `out` ends in `.weights.h5`, its MMDiT
/// alone (the file `backbone.diffuser.load_weights` reads); sharded as keras-hub shards above 10 GB.
pub fn sd3_to_keras(folder: &Path, out: &Path, force: bool) -> Result<Written> {
    sd3_to_keras_sharded(folder, out, force, DEFAULT_MAX_SHARD_GB)
}

/// The bytes the Keras file of `m` will hold (each tensor in its own type).
fn planned_bytes(m: &Matched) -> f64 {
    m.plans.iter().flat_map(|(p, _)| &p.tensors).map(|t| (t.diffusers_shape.iter().product::<usize>() * t.dtype.size()) as f64).sum()
}

/// [`sd3_to_keras`] with the shard size in Keras' GB: weights above it are written as Keras'
/// sharded form (`model.weights.json` and `model_NNNNN.weights.h5` in a preset; for the MMDiT
/// alone `<name>.weights.json` and `<name>_NNNNN.weights.h5` beside the `.weights.h5` asked for,
/// as Keras' `save_weights(max_shard_size=…)` renames it).
pub fn sd3_to_keras_sharded(folder: &Path, out: &Path, force: bool, max_shard_gb: f64) -> Result<Written> {
    write_keras(plan_sd3_folder(folder)?, out, force, max_shard_gb)
}

/// [`sd3_to_keras_sharded`] from Stability's SD3 single file.
pub fn single_file_to_keras(checkpoint: &Path, out: &Path, force: bool, max_shard_gb: f64) -> Result<Written> {
    write_keras(plan_sd3_single_file(checkpoint)?, out, force, max_shard_gb)
}

fn write_keras(sd3: Sd3Folder, out: &Path, force: bool, max_shard_gb: f64) -> Result<Written> {
    ensure!(max_shard_gb > 0.0, "--max-shard-size must be above 0 GB");
    let max_bytes = max_shard_gb * (1u64 << 30) as f64;
    let folder = sd3.path.as_path();
    let mmdit_only = out.to_string_lossy().ends_with(".weights.h5");
    if mmdit_only {
        let part = vec![format!("{} MMDiT", sd3.variant.name())];
        if planned_bytes(&sd3.transformer) <= max_bytes {
            ensure!(force || !out.exists(), "{}: already exists (use --force to replace it)", out.display());
            crate::output::atomic_file(out, |temp| {
                let mut writer = Keras3Writer::create(temp)?;
                write_plans(&mut writer, &sd3.transformer, Some("layers/"))?;
                writer.finish()
            })?;
            return Ok(Written { out: out.to_owned(), parts: part });
        }
        let map = PathBuf::from(format!("{}.json", out.to_string_lossy().strip_suffix(".h5").unwrap_or_default()));
        let parent = map.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let temp = tempfile::Builder::new().prefix(".dreambridge-").tempdir_in(parent).with_context(|| format!("{}: cannot create a temp folder", parent.display()))?;
        let mut writer = Keras3Writer::create_sharded(&temp.path().join(map.file_name().context("no file name")?), max_bytes)?;
        write_plans(&mut writer, &sd3.transformer, Some("layers/"))?;
        let files = writer.files();
        writer.finish()?;
        for f in &files {
            let to = parent.join(f.file_name().context("no file name")?);
            ensure!(force || !to.exists(), "{}: already exists (use --force to replace it)", to.display());
        }
        for f in &files {
            std::fs::rename(f, parent.join(f.file_name().context("no file name")?)).with_context(|| format!("{}: cannot move into place", f.display()))?;
        }
        return Ok(Written { out: map, parts: part });
    }
    ensure!(sd3.clips.len() == 2 && sd3.vae.is_some(), "{}: a KerasHub preset needs text_encoder/, text_encoder_2/ and vae/ (for the MMDiT alone, name the output `<name>.weights.h5`)", folder.display());
    let staging = Staging::new(out, force, &[folder])?;
    let models: Vec<&Matched> = std::iter::once(&sd3.transformer).chain(sd3.clips.iter().map(|(m, _)| m)).chain(sd3.vae.as_ref()).collect();
    let fill = || -> Result<Vec<String>> {
        let total: f64 = models.iter().map(|m| planned_bytes(m)).sum();
        let mut writer = if total > max_bytes {
            Keras3Writer::create_sharded(&staging.path("model.weights.json")?, max_bytes)?
        } else {
            Keras3Writer::create(&staging.path("model.weights.h5")?)?
        };
        let mut count = 0;
        for m in &models {
            count += write_plans(&mut writer, m, None)?;
        }
        writer.finish()?;
        let dtype = sd3.transformer.plans[0].0.tensors[0].dtype;
        crate::convert::to_diffusers::write_json(&staging, "config.json", &backbone_config(&sd3, dtype)?)?;
        crate::convert::to_diffusers::write_json(&staging, "metadata.json", &metadata(count))?;
        crate::convert::to_diffusers::write_json(&staging, "preprocessor.json", &preprocessor_config())?;
        for (dir, asset) in [("tokenizer", "clip_l_tokenizer"), ("tokenizer_2", "clip_g_tokenizer")] {
            let (vocab, merges) = tokenizer_files(&folder.join(dir))?;
            staging.write(&format!("assets/{asset}/vocabulary.json"), vocab.as_bytes())?;
            staging.write(&format!("assets/{asset}/merges.txt"), merges.as_bytes())?;
        }
        Ok(vec![format!("{} MMDiT", sd3.variant.name()), "CLIP-L".into(), "CLIP-G".into(), "VAE".into()])
    };
    let filled = fill();
    let (parts, out) = staging.finish(filled)?;
    Ok(Written { out, parts })
}

/// Writes every tensor of `m`'s plans under their roots (or `root` for all); returns the count
/// of parameters written.
fn write_plans(writer: &mut Keras3Writer, m: &Matched, root: Option<&str>) -> Result<usize> {
    let mut params = 0;
    let mut scratch = Vec::new(); // re-laid-out bytes, its memory reused
    for (plan, plan_root) in &m.plans {
        let root = root.unwrap_or(plan_root);
        for layer in &plan.layout.layers {
            let tensors = &plan.tensors[layer.tensors.clone()];
            let mut at = 0;
            while at < tensors.len() {
                // The diffusers tensors of one Keras tensor (q, k, v) are consecutive.
                let group = tensors[at..].iter().take_while(|t| t.spec.keras_path == tensors[at].spec.keras_path).count();
                let path = format!("{root}{}/{}", layer.keras3_key, tensors[at].spec.keras3_suffix());
                let first = &tensors[at];
                let context = || format!("{}: writing `{path}`", m.source.origin().display());
                params += first.keras_shape.iter().product::<usize>();
                if group == 1 && first.spec.rows == Rows::All {
                    // One diffusers tensor, rows in order: re-laid-out from where its bytes lie
                    // (a copy is written from there as it is).
                    let full = first.full_diffusers_shape();
                    m.source
                        .with_bytes(&first.source, &mut |dtype, _, data| {
                            ensure!(data.len() == full.iter().product::<usize>() * dtype.size(), "tensor `{}`: {} bytes for shape {full:?}", first.source, data.len());
                            if first.spec.op == Op::Copy {
                                return writer.write_bytes(&path, dtype, &first.keras_shape, data);
                            }
                            first.spec.op.to_keras_into(data, &full, dtype.size(), &mut scratch)?;
                            writer.write_bytes(&path, dtype, &first.keras_shape, &scratch)
                        })
                        .with_context(context)?;
                } else {
                    let tensor = keras_tensor(&*m.source, &tensors[at..at + group]).with_context(context)?;
                    writer.write(&path, tensor)?;
                }
                at += group;
            }
        }
    }
    Ok(params)
}

/// One Keras tensor from the diffusers tensors that make it: their rows placed where the Keras
/// tensor holds them (fused q/k/v, swapped halves), then re-laid-out by the op.
fn keras_tensor(file: &dyn TensorSource, parts: &[PlannedTensor]) -> Result<RawTensor> {
    let first = &parts[0];
    let full = first.full_diffusers_shape();
    ensure!(parts.len() == first.spec.rows.parts(), "tensor `{}`: {} of its {} parts found", first.source, parts.len(), first.spec.rows.parts());
    let read: Vec<RawTensor> = parts.iter().map(|p| file.read(&p.source).with_context(|| format!("tensor `{}`", p.source))).collect::<Result<_>>()?;
    let dtype = read[0].dtype;

    ensure!(read.iter().all(|r| r.dtype == dtype), "tensor `{}`: its q/k/v parts differ in dtype", first.source);
    let elem = dtype.size();
    let row = full[1..].iter().product::<usize>() * elem;
    let mut data = vec![0u8; full.iter().product::<usize>() * elem];
    for (p, r) in parts.iter().zip(&read) {
        let mut from = 0;
        for run in p.spec.rows.runs(full[0]) {
            let len = run.len() * row;
            data[run.start * row..run.start * row + len].copy_from_slice(&r.data[from..from + len]);
            from += len;
        }
        ensure!(from == r.data.len(), "tensor `{}`: {} bytes where {from} were expected", p.source, r.data.len());
    }
    let data = first.spec.op.to_keras(data, &full, elem)?;
    Ok(RawTensor { dtype, shape: first.keras_shape.clone(), data })
}

fn dtype_policy(name: &str) -> Value {
    json!({"module": "keras", "class_name": "DTypePolicy", "config": {"name": name}, "registered_name": null})
}

fn keras_dtype(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
    }
}

fn sym(plan: &Plan, name: &str) -> Result<usize> {
    plan.symbols.get(name).copied().with_context(|| format!("{}: `{name}` not bound", plan.table.kind))
}

/// `config.json` of the preset: the serialized `StableDiffusion3Backbone`.
fn backbone_config(sd3: &Sd3Folder, dtype: DType) -> Result<Value> {
    let policy = dtype_policy(keras_dtype(dtype));
    let mmdit = &sd3.transformer.plans[0].0;
    let grid = (sym(mmdit, "pp")? as f64).sqrt().round() as usize;
    let dual = sd3::dual_attention_layers(mmdit);
    let clip = |i: usize, name: &str| -> Result<Value> {
        let (m, config) = &sd3.clips[i];
        let enc = &m.plans[0].0;
        let n = sym(enc, "n")?;
        let act = config.get("hidden_act").and_then(Value::as_str).unwrap_or(if i == 0 { "quick_gelu" } else { "gelu" });
        Ok(json!({
            "module": "keras_hub.src.models.clip.clip_text_encoder",
            "class_name": "CLIPTextEncoder",
            "config": {
                "name": name, "trainable": true, "dtype": dtype_policy(keras_dtype(enc.tensors[0].dtype)),
                "vocabulary_size": sym(enc, "vocab")?, "embedding_dim": sym(enc, "d")?, "hidden_dim": sym(enc, "d")?,
                "num_layers": n, "num_heads": sym(enc, "heads")?, "intermediate_dim": sym(enc, "ff")?,
                "intermediate_activation": act, "intermediate_output_index": n.saturating_sub(2),
                "max_sequence_length": sym(enc, "pos")?,
            },
            "registered_name": "keras_hub>CLIPTextEncoder",
        }))
    };
    let vae_match = sd3.vae.as_ref().context("no VAE")?;
    let (enc, dec) = (&vae_match.plans[0].0, &vae_match.plans[1].0);
    let vae_config = read_json(&sd3.path.join("vae/config.json")).ok();
    let vae_f = |k: &str, d: f64| vae_config.as_ref().and_then(|v| v.get(k)?.as_f64()).unwrap_or(d);
    let encoder_filters: Vec<usize> = ["c0", "c1", "c2", "c3"].iter().map(|s| sym(enc, s)).collect::<Result<_>>()?;
    let decoder_filters: Vec<usize> = ["d0", "d1", "d2", "d3"].iter().map(|s| sym(dec, s)).collect::<Result<_>>()?;
    let image = sd3.sample_size * 8;
    Ok(json!({
        "module": "keras_hub.src.models.stable_diffusion_3.stable_diffusion_3_backbone",
        "class_name": "StableDiffusion3Backbone",
        "config": {
            "name": "stable_diffusion3_backbone", "trainable": true, "dtype": policy,
            "mmdit_patch_size": sym(mmdit, "p")?,
            "mmdit_hidden_dim": sym(mmdit, "h")?,
            "mmdit_num_layers": sym(mmdit, "n")? + 1,
            "mmdit_num_heads": sd3.heads,
            "mmdit_position_size": grid,
            "mmdit_qk_norm": if mmdit.features.contains_key("qk_norm") { json!("rms_norm") } else { Value::Null },
            "mmdit_dual_attention_indices": if dual.is_empty() { Value::Null } else { json!(dual) },
            "vae": {
                "module": "keras_hub.src.models.vae.vae_backbone",
                "class_name": "VAEBackbone",
                "config": {
                    "name": "vae", "trainable": true, "dtype": dtype_policy(keras_dtype(enc.tensors[0].dtype)),
                    "encoder_num_filters": encoder_filters, "encoder_num_blocks": [2, 2, 2, 2],
                    "decoder_num_filters": decoder_filters, "decoder_num_blocks": [3, 3, 3, 3],
                    "sampler_method": "sample", "input_channels": sym(enc, "img")?,
                    "sample_channels": 2 * sym(enc, "lat")?, "output_channels": sym(dec, "img")?,
                    "scale": vae_f("scaling_factor", sd3::VAE_SCALE), "shift": vae_f("shift_factor", sd3::VAE_SHIFT),
                },
                "registered_name": "VAEBackbone",
            },
            "clip_l": clip(0, "clip_l")?,
            "clip_g": clip(1, "clip_g")?,
            "t5": null,
            "latent_channels": sym(mmdit, "lat")?,
            "output_channels": sym(dec, "img")?,
            "num_train_timesteps": 1000,
            "shift": sd3.scheduler_shift,
            "image_shape": [image, image, 3],
        },
        "registered_name": "keras_hub>StableDiffusion3Backbone",
    }))
}

/// The folder's BPE files (`vocab.json`, `merges.txt`), else CLIP's (the same for both encoders).
fn tokenizer_files(dir: &Path) -> Result<(String, String)> {
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    if vocab.is_file() && merges.is_file() {
        let read = |p: &Path| std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()));
        return Ok((read(&vocab)?, read(&merges)?));
    }
    Ok((crate::diffusers::tokenizer::VOCAB_JSON.to_string(), crate::diffusers::tokenizer::MERGES_TXT.to_string()))
}

/// `preprocessor.json`: KerasHub's SD3 text preprocessor, two CLIP preprocessors of 77 tokens
/// whose tokenizers read `assets/clip_l_tokenizer/` and `assets/clip_g_tokenizer/`. CLIP-L pads
/// with its end token, CLIP-G with id 0 (`!`), as diffusers' two tokenizers do.
fn preprocessor_config() -> Value {
    let clip = |which: &str, pad_with_end_token: bool| {
        json!({
            "module": "keras_hub.src.models.clip.clip_preprocessor",
            "class_name": "CLIPPreprocessor",
            "config": {
                "name": format!("{which}_preprocessor"), "trainable": true, "dtype": dtype_policy("float32"),
                "tokenizer": {
                    "module": "keras_hub.src.models.clip.clip_tokenizer",
                    "class_name": "CLIPTokenizer",
                    "config": {
                        "name": format!("{which}_tokenizer"), "trainable": true, "dtype": dtype_policy("int32"),
                        "config_file": format!("{which}_tokenizer.json"), "sequence_length": null,
                        "add_prefix_space": false, "pad_with_end_token": pad_with_end_token,
                    },
                    "registered_name": "keras_hub>CLIPTokenizer",
                },
                "config_file": format!("{which}_preprocessor.json"), "sequence_length": 77,
                "add_start_token": true, "add_end_token": true, "to_lower": true,
            },
            "registered_name": "keras_hub>CLIPPreprocessor",
        })
    };
    json!({
        "module": "keras_hub.src.models.stable_diffusion_3.stable_diffusion_3_text_to_image_preprocessor",
        "class_name": "StableDiffusion3TextToImagePreprocessor",
        "config": {
            "name": "stable_diffusion_3_text_to_image_preprocessor", "trainable": true, "dtype": dtype_policy("float32"),
            "config_file": "preprocessor.json",
            "clip_l_preprocessor": clip("clip_l", true),
            "clip_g_preprocessor": clip("clip_g", false),
        },
        "registered_name": "keras_hub>StableDiffusion3TextToImagePreprocessor",
    })
}

/// `metadata.json`, as KerasHub's preset saver writes it.
fn metadata(parameters: usize) -> Value {
    json!({
        "keras_version": "3.15.1",
        "keras_hub_version": "0.32.0",
        "parameter_count": parameters,
        "date_saved": date_saved(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)),
        "tasks": ["ImageToImage", "Inpaint", "TextToImage"],
    })
}

/// KerasHub's `YYYY-MM-DD@HH:MM:SS` of Unix time `secs` (UTC), by the civil calendar (one
/// function does not warrant a date crate).
fn date_saved(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}@{:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_follow_the_civil_calendar() {
        assert_eq!(super::date_saved(1_796_447_783), "2026-12-05@05:16:23");
        assert_eq!(super::date_saved(951_868_799), "2000-02-29@23:59:59");
        assert_eq!(super::date_saved(0), "1970-01-01@00:00:00");
    }
}
