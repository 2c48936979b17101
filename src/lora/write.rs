//! Writes a [`LoraSet`] as diffusers' `pytorch_lora_weights.safetensors` keys or as a kohya file
//! (the format AUTOMATIC1111 and ComfyUI load), atomically, as the set's model family writes it.

use super::{names, Family, LoraModule, LoraSet, Part};
use crate::diffusers::st_write::{PendingTensor, StWriter};
use crate::output::atomic_file;
use crate::tensor::{DType, RawTensor};
use anyhow::{anyhow, bail, ensure, Result};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// [`write_diffusers_as`] the family the set shows (SD 1.x/2.x when nothing tells).
pub fn write_diffusers(set: &LoraSet, path: &Path) -> Result<()> {
    write_diffusers_as(set, path, super::describe::family(set).map_or(Family::Sd, |(f, _)| f))
}

/// Writes diffusers' keys in f32.
///
/// SD 1.x/2.x: the keys diffusers' `train_dreambooth_lora.py` saves (`unet.<m>.lora.down.weight`,
/// `text_encoder.<m>.lora_linear_layer.down.weight`, ...); diffusers reads no alpha there, so a
/// module whose alpha is not its rank gets `up · alpha / rank`.
///
/// SDXL: what `StableDiffusionXLPipeline.save_lora_weights` writes (`train_dreambooth_lora_sdxl.py`):
/// PEFT keys `unet.<m>.lora_A.weight` / `lora_B.weight`, `text_encoder.`, `text_encoder_2.`.
/// Factors are kept as they are; when an alpha is not its rank, the `lora_adapter_metadata` entry
/// (PEFT `LoraConfig` per part: `r`, `lora_alpha`, `target_modules`, `rank_pattern`,
/// `alpha_pattern`) carries the alphas, as `save_lora_weights(..., *_lora_adapter_metadata=)` does.
pub fn write_diffusers_as(set: &LoraSet, path: &Path, family: Family) -> Result<()> {
    let mut tensors = BTreeMap::new();
    let mut meta = BTreeMap::new();
    match family {
        Family::Sd => {
            for ((part, module), m) in &set.modules {
                let (prefix, layer) = match part {
                    Part::Unet => ("unet", "lora"),
                    Part::TextEncoder => ("text_encoder", "lora_linear_layer"),
                    Part::TextEncoder2 => bail!("{}: module `{module}` of {}: SD 1.x/2.x has one text encoder", path.display(), part.name()),
                };
                let up = if m.alpha == m.rank() as f64 { m.up.clone() } else { scaled(&m.up, m.scale()) };
                tensors.insert(format!("{prefix}.{module}.{layer}.down.weight"), m.down.clone());
                tensors.insert(format!("{prefix}.{module}.{layer}.up.weight"), up);
            }
        }
        Family::Sdxl => {
            for ((part, module), m) in &set.modules {
                tensors.insert(format!("{}.{module}.lora_A.weight", part.dir()), m.down.clone());
                tensors.insert(format!("{}.{module}.lora_B.weight", part.dir()), m.up.clone());
            }
            if set.modules.values().any(|m| m.alpha != m.rank() as f64) {
                meta.insert("lora_adapter_metadata".to_string(), adapter_metadata(set));
            }
        }
    }
    write_atomic(path, &tensors, &meta)
}

/// diffusers' `lora_adapter_metadata`: per part, `<part>.r`, `.lora_alpha` (the most common
/// values), `.target_modules` (every module path), `.rank_pattern` / `.alpha_pattern` (the modules
/// that differ), as JSON with sorted keys and an indent of 2 (as `write_lora_layers`).
fn adapter_metadata(set: &LoraSet) -> String {
    fn most_common<T: Ord + Copy>(values: impl Iterator<Item = T>) -> T {
        let mut counts: BTreeMap<T, usize> = BTreeMap::new();
        for v in values {
            *counts.entry(v).or_default() += 1;
        }
        counts.into_iter().max_by_key(|(_, n)| *n).map(|(v, _)| v).expect("a part has modules")
    }
    let mut map = Map::new();
    for part in [Part::Unet, Part::TextEncoder, Part::TextEncoder2] {
        let modules: Vec<(&String, &LoraModule)> = set.modules.iter().filter(|((p, _), _)| *p == part).map(|((_, m), l)| (m, l)).collect();
        if modules.is_empty() {
            continue;
        }
        let r = most_common(modules.iter().map(|(_, m)| m.rank()));
        // f64 is not Ord: alphas are compared by their bits.
        let alpha = f64::from_bits(most_common(modules.iter().map(|(_, m)| m.alpha.to_bits())));
        // PEFT matches a target by the end of the module name; without `text_model.` a text
        // encoder's paths match both transformers 4's `CLIPTextModel` and 5's (which lost that level).
        let target = |k: &str| k.strip_prefix("text_model.").unwrap_or(k).to_owned();
        let rank_pattern: Map<String, Value> = modules.iter().filter(|(_, m)| m.rank() != r).map(|(k, m)| (target(k), json!(m.rank()))).collect();
        let alpha_pattern: Map<String, Value> = modules.iter().filter(|(_, m)| m.alpha != alpha).map(|(k, m)| (target(k), json!(m.alpha))).collect();
        let prefix = part.dir();
        map.insert(format!("{prefix}.r"), json!(r));
        map.insert(format!("{prefix}.lora_alpha"), json!(alpha));
        map.insert(format!("{prefix}.target_modules"), json!(modules.iter().map(|(k, _)| target(k)).collect::<Vec<_>>()));
        map.insert(format!("{prefix}.rank_pattern"), Value::Object(rank_pattern));
        map.insert(format!("{prefix}.alpha_pattern"), Value::Object(alpha_pattern));
    }
    serde_json::to_string_pretty(&Value::Object(map)).expect("JSON of plain values")
}

/// What a kohya file's metadata says about the training run.
#[derive(Clone, Debug, PartialEq)]
pub struct KohyaInfo {
    /// `ss_output_name`, `modelspec.title` (A1111 shows it as the LoRA's alias).
    pub output_name: String,
    /// `ss_sd_model_name`: the base model's name or Hub id.
    pub base_model: Option<String>,
    /// 1 or 2.
    pub sd_version: u8,
    pub v_prediction: bool,
    pub resolution: Option<usize>,
    pub learning_rate: Option<f64>,
    pub steps: Option<usize>,
}

impl Default for KohyaInfo {
    fn default() -> KohyaInfo {
        KohyaInfo { output_name: "lora".into(), base_model: None, sd_version: 1, v_prediction: false, resolution: None, learning_rate: None, steps: None }
    }
}

impl KohyaInfo {
    /// What a kohya file's own metadata says (for rewriting one), with `output_name` and
    /// `sd_version` as fallbacks; `None` when the metadata names no SD version.
    pub fn from_metadata(meta: &BTreeMap<String, String>, output_name: &str) -> (KohyaInfo, Option<u8>) {
        let version = meta.get("ss_v2").filter(|_| declared_family(meta) != Some(Family::Sdxl)).map(|v| if v == "True" { 2 } else { 1 }).or_else(|| {
            let arch = meta.get("modelspec.architecture")?;
            [("stable-diffusion-v1", 1), ("stable-diffusion-v2", 2)].into_iter().find(|(p, _)| arch.starts_with(p)).map(|(_, v)| v)
        });
        let v_prediction = meta.get("ss_base_model_version").is_some_and(|v| v.ends_with("_v")) || meta.get("modelspec.prediction_type").is_some_and(|p| p == "v");
        let resolution = meta.get("modelspec.resolution").and_then(|r| r.split('x').next()?.trim().parse().ok()).or_else(|| {
            meta.get("ss_resolution").and_then(|r| r.trim_matches(|c| c == '(' || c == ')').split(',').next()?.trim().parse().ok())
        });
        let info = KohyaInfo {
            output_name: meta.get("ss_output_name").cloned().unwrap_or_else(|| output_name.to_owned()),
            base_model: meta.get("ss_sd_model_name").cloned(),
            sd_version: version.unwrap_or(1),
            v_prediction,
            resolution,
            learning_rate: meta.get("ss_learning_rate").and_then(|v| v.parse().ok()),
            steps: meta.get("ss_steps").and_then(|v| v.parse().ok()),
        };
        (info, version)
    }

    /// `ss_base_model_version`.
    fn base_model_version(&self, family: Family) -> &'static str {
        if family == Family::Sdxl {
            // kohya's `sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0`; A1111 takes `sdxl_*` as SDXL.
            return "sdxl_base_v1-0";
        }
        match (self.sd_version, self.v_prediction) {
            (2, true) => "sd_v2_v",
            (2, false) => "sd_v2",
            (_, true) => "sd_v1_v",
            (_, false) => "sd_v1",
        }
    }

    /// `modelspec.architecture`.
    fn architecture(&self, family: Family) -> &'static str {
        if family == Family::Sdxl {
            return "stable-diffusion-xl-v1-base/lora";
        }
        match (self.sd_version, self.v_prediction) {
            (2, true) => "stable-diffusion-v2-768-v/lora",
            (2, false) => "stable-diffusion-v2-512/lora",
            _ => "stable-diffusion-v1/lora",
        }
    }
}

/// What the metadata of a kohya (or ModelSpec) file declares the base model to be: SDXL when
/// `ss_base_model_version` starts with `sdxl` (as A1111 reads it) or `modelspec.architecture`
/// with `stable-diffusion-xl`; SD 1.x/2.x when it names SD 1 or 2.
pub fn declared_family(meta: &BTreeMap<String, String>) -> Option<Family> {
    let version = meta.get("ss_base_model_version").map(String::as_str);
    let arch = meta.get("modelspec.architecture").map(String::as_str);
    if version.is_some_and(|v| v.starts_with("sdxl")) || arch.is_some_and(|a| a.starts_with("stable-diffusion-xl")) {
        return Some(Family::Sdxl);
    }
    let sd = version.is_some_and(|v| v.starts_with("sd_v")) || arch.is_some_and(|a| a.starts_with("stable-diffusion-v")) || meta.contains_key("ss_v2");
    sd.then_some(Family::Sd)
}

/// [`write_kohya_as`] the family the set shows (SD 1.x/2.x when nothing tells).
pub fn write_kohya(set: &LoraSet, path: &Path, info: &KohyaInfo) -> Result<()> {
    write_kohya_as(set, path, info, super::describe::family(set).map_or(Family::Sd, |(f, _)| f))
}

/// Writes kohya keys (`.lora_down.weight`, `.lora_up.weight`, `.alpha`, all f32) with the `ss_*`
/// and `modelspec.*` metadata kohya's scripts write: for SD 1.x/2.x `lora_unet_*` in diffusers'
/// numbering and `lora_te_*`; for SDXL, as kohya sd-scripts' `sdxl_train_network.py`,
/// `lora_unet_*` in LDM numbering (`input_blocks_4_1_...`), `lora_te1_*` and `lora_te2_*`.
pub fn write_kohya_as(set: &LoraSet, path: &Path, info: &KohyaInfo, family: Family) -> Result<()> {
    ensure!(family == Family::Sdxl || matches!(info.sd_version, 1 | 2), "{}: SD version {} (expected 1 or 2)", path.display(), info.sd_version);
    let mut tensors = BTreeMap::new();
    for ((part, module), m) in &set.modules {
        let name = names::to_kohya(*part, module, family).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        tensors.insert(format!("{name}.lora_down.weight"), m.down.clone());
        tensors.insert(format!("{name}.lora_up.weight"), m.up.clone());
        tensors.insert(format!("{name}.alpha"), RawTensor { dtype: DType::F32, shape: vec![], data: (m.alpha as f32).to_le_bytes().to_vec() });
    }
    let mut meta = kohya_metadata(set, info, family);
    meta.insert("sshs_model_hash".into(), data_hash(&tensors));
    write_atomic(path, &tensors, &meta)
}

/// The `ss_*` / `modelspec.*` entries.
fn kohya_metadata(set: &LoraSet, info: &KohyaInfo, family: Family) -> BTreeMap<String, String> {
    let (conv, linear): (Vec<&LoraModule>, Vec<&LoraModule>) = set.modules.values().partition(|m| m.is_conv());
    // As Python's `json.dumps`; kohya keeps `--network_args` values as the strings it was given.
    let args = match conv.is_empty() {
        true => "{}".to_string(),
        false => {
            let (dim, alpha) = (uniform(&conv, |m| m.rank().to_string()), uniform(&conv, |m| py_float(m.alpha)));
            format!(r#"{{"conv_dim": {}, "conv_alpha": {}}}"#, serde_json::Value::from(dim), serde_json::Value::from(alpha))
        }
    };
    let mut meta = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        meta.insert(k.to_string(), v);
    };
    put("ss_network_module", "networks.lora".into());
    put("ss_network_dim", uniform(if linear.is_empty() { &conv } else { &linear }, |m| m.rank().to_string()));
    put("ss_network_alpha", uniform(if linear.is_empty() { &conv } else { &linear }, |m| py_float(m.alpha)));
    put("ss_network_args", args);
    put("ss_v2", if info.sd_version == 2 && family == Family::Sd { "True" } else { "False" }.into());
    put("ss_base_model_version", info.base_model_version(family).into());
    put("ss_output_name", info.output_name.clone());
    put("modelspec.sai_model_spec", "1.0.0".into());
    put("modelspec.architecture", info.architecture(family).into());
    // kohya's sai_model_spec: SDXL files name Stability's implementation, SD 1.x/2.x diffusers'.
    put("modelspec.implementation", if family == Family::Sdxl { "https://github.com/Stability-AI/generative-models" } else { "diffusers" }.into());
    put("modelspec.title", info.output_name.clone());
    put("modelspec.prediction_type", if info.v_prediction { "v" } else { "epsilon" }.into());
    if let Some(b) = &info.base_model {
        put("ss_sd_model_name", b.clone());
    }
    if let Some(r) = info.resolution {
        put("ss_resolution", format!("({r}, {r})"));
        put("modelspec.resolution", format!("{r}x{r}"));
    }
    if let Some(lr) = info.learning_rate {
        put("ss_learning_rate", py_float(lr));
    }
    if let Some(s) = info.steps {
        put("ss_steps", s.to_string());
    }
    meta
}

/// The one value `f` gives every module, or `Dynamic` (as kohya's resize script writes).
fn uniform(modules: &[&LoraModule], f: impl Fn(&LoraModule) -> String) -> String {
    let values: std::collections::BTreeSet<String> = modules.iter().map(|m| f(m)).collect();
    match values.len() {
        1 => values.into_iter().next().expect("one value"),
        _ => "Dynamic".into(),
    }
}

/// A number as Python's `str(float)` writes it (`4.0`, `0.0001`).
fn py_float(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e16 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// kohya's `sshs_model_hash`: SHA-256 of the data after the header (the tensors in key order, as
/// safetensors lays out tensors of one dtype).
fn data_hash(tensors: &BTreeMap<String, RawTensor>) -> String {
    let mut h = Sha256::new();
    for t in tensors.values() {
        h.update(&t.data);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// `up` times `s`, in f32.
fn scaled(up: &RawTensor, s: f64) -> RawTensor {
    let values: Vec<f32> = up.to_f32_values().iter().map(|v| (*v as f64 * s) as f32).collect();
    RawTensor::from_f32(&up.shape, &values)
}

/// Writes `tensors` (f32, in key order) with `metadata`, atomically (see [`atomic_file`]).
pub fn write_atomic(path: &Path, tensors: &BTreeMap<String, RawTensor>, metadata: &BTreeMap<String, String>) -> Result<()> {
    atomic_file(path, |temp| {
        let pending = tensors.iter().map(|(k, t)| PendingTensor { key: k.clone(), dtype: DType::F32, shape: t.shape.clone() }).collect();
        let mut w = StWriter::create_with_metadata(temp, pending, metadata)?;
        for (k, t) in tensors {
            w.write_next(k, &t.clone().cast(DType::F32))?;
        }
        w.finish()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::merge::delta;
    use crate::lora::read::read;
    use crate::lora::read::tests::{ramp, write_file};
    use crate::lora::Format;

    const Q: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    const FC1: &str = "text_model.encoder.layers.0.mlp.fc1";
    const CONV: &str = "down_blocks.0.resnets.0.conv1";

    fn module(down: &[usize], up: &[usize], alpha: f64) -> LoraModule {
        LoraModule { down: ramp(down, 1.0), up: ramp(up, -3.0), alpha }
    }

    /// A set over a Linear, a text Linear and a 3×3 conv, alpha = rank unless `alpha` is given.
    fn sample(alpha: Option<f64>) -> LoraSet {
        let mut modules = BTreeMap::new();
        modules.insert((Part::Unet, Q.to_string()), module(&[2, 8], &[8, 2], alpha.unwrap_or(2.0)));
        modules.insert((Part::TextEncoder, FC1.to_string()), module(&[2, 4], &[6, 2], alpha.unwrap_or(2.0)));
        modules.insert((Part::Unet, CONV.to_string()), module(&[3, 4, 3, 3], &[4, 3, 1, 1], alpha.unwrap_or(3.0)));
        LoraSet { modules, format: Format::Kohya, metadata: BTreeMap::new() }
    }

    #[test]
    fn lora_kohya_diffusers_kohya_round_trip_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let set = sample(None);
        let (k1, d, k2) = (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"), dir.path().join("c.safetensors"));
        write_kohya(&set, &k1, &KohyaInfo::default()).unwrap();
        let kohya = read(&k1).unwrap();
        assert_eq!(kohya.format, Format::Kohya);
        assert_eq!(kohya.modules, set.modules);
        write_diffusers(&kohya, &d).unwrap();
        let diffusers = read(&d).unwrap();
        assert_eq!((diffusers.format, &diffusers.modules), (Format::Diffusers, &set.modules));
        assert_eq!(diffusers.metadata, BTreeMap::from([("format".to_string(), "pt".to_string())]));
        write_kohya(&diffusers, &k2, &KohyaInfo::default()).unwrap();
        assert_eq!(std::fs::read(&k1).unwrap(), std::fs::read(&k2).unwrap());
    }

    #[test]
    fn lora_diffusers_kohya_diffusers_round_trip_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let (d1, k, d2) = (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"), dir.path().join("c.safetensors"));
        let path = write_file(dir.path(), "src.safetensors", &[(&format!("unet.{Q}.lora.down.weight"), ramp(&[4, 8], 0.0)), (&format!("unet.{Q}.lora.up.weight"), ramp(&[8, 4], 5.0))], &[]);
        let src = read(&path).unwrap();
        write_diffusers(&src, &d1).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&d1).unwrap(), "same keys, same bytes");
        write_kohya(&src, &k, &KohyaInfo::default()).unwrap();
        write_diffusers(&read(&k).unwrap(), &d2).unwrap();
        assert_eq!(std::fs::read(&d1).unwrap(), std::fs::read(&d2).unwrap());
    }

    #[test]
    fn lora_alpha_is_folded_into_up_for_diffusers() {
        let dir = tempfile::tempdir().unwrap();
        let set = sample(Some(1.0));
        let (k, d) = (dir.path().join("k.safetensors"), dir.path().join("d.safetensors"));
        write_kohya(&set, &k, &KohyaInfo::default()).unwrap();
        write_diffusers(&read(&k).unwrap(), &d).unwrap();
        let folded = read(&d).unwrap();
        for (key, m) in &set.modules {
            let f = &folded.modules[key];
            assert_eq!((f.alpha, &f.down), (f.rank() as f64, &m.down));
            assert_eq!(f.up, scaled(&m.up, m.scale()));
            let shape: Vec<usize> = if m.is_conv() { vec![4, 4, 3, 3] } else { vec![m.out_dim(), m.in_dim()] };
            let (a, b) = (delta(m, &shape, 0.7).unwrap(), delta(f, &shape, 0.7).unwrap());
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-6, "{key:?}: {diff}");
        }
    }

    #[test]
    fn lora_kohya_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.safetensors");
        let info = KohyaInfo {
            output_name: "sks_dog".into(),
            base_model: Some("stabilityai/stable-diffusion-2".into()),
            sd_version: 2,
            v_prediction: true,
            resolution: Some(768),
            learning_rate: Some(1e-4),
            steps: Some(400),
        };
        write_kohya(&sample(Some(1.0)), &path, &info).unwrap();
        let set = read(&path).unwrap();
        let m = &set.metadata;
        let expect = [
            ("ss_network_module", "networks.lora"),
            ("ss_network_dim", "2"),
            ("ss_network_alpha", "1.0"),
            ("ss_network_args", r#"{"conv_dim": "3", "conv_alpha": "1.0"}"#),
            ("ss_v2", "True"),
            ("ss_base_model_version", "sd_v2_v"),
            ("ss_output_name", "sks_dog"),
            ("ss_sd_model_name", "stabilityai/stable-diffusion-2"),
            ("ss_resolution", "(768, 768)"),
            ("ss_learning_rate", "0.0001"),
            ("ss_steps", "400"),
            ("modelspec.sai_model_spec", "1.0.0"),
            ("modelspec.architecture", "stable-diffusion-v2-768-v/lora"),
            ("modelspec.implementation", "diffusers"),
            ("modelspec.title", "sks_dog"),
            ("modelspec.resolution", "768x768"),
            ("modelspec.prediction_type", "v"),
        ];
        for (k, v) in expect {
            assert_eq!(m.get(k).map(String::as_str), Some(v), "{k}");
        }
        assert_eq!(m["sshs_model_hash"].len(), 64);
        let (back, version) = KohyaInfo::from_metadata(m, "x");
        assert_eq!((back, version), (info, Some(2)));
        let keys = crate::diffusers::st_read::StFile::open(&path).unwrap().keys();
        assert!(keys.contains(&format!("{}.alpha", names::to_kohya(Part::Unet, Q, Family::Sd).unwrap())));
        assert!(keys.iter().any(|k| k.starts_with("lora_te_text_model_encoder_layers_0_mlp_fc1.")));
    }

    #[test]
    fn lora_sdxl_metadata_is_declared_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let mut set = sample(Some(1.0));
        set.modules.insert((Part::TextEncoder2, "text_projection".into()), module(&[2, 6], &[4, 2], 2.0));
        let info = KohyaInfo { resolution: Some(1024), ..KohyaInfo::default() };
        write_kohya(&set, &path, &info).unwrap();
        let back = read(&path).unwrap();
        assert_eq!(back.modules, set.modules);
        let m = &back.metadata;
        assert_eq!((m["ss_base_model_version"].as_str(), m["ss_v2"].as_str(), m["modelspec.resolution"].as_str()), ("sdxl_base_v1-0", "False", "1024x1024"));
        assert_eq!(declared_family(m), Some(Family::Sdxl));
        // `ss_v2 = False` of an SDXL file declares no SD 1 version.
        assert_eq!(KohyaInfo::from_metadata(m, "x").1, None);
        let keys = crate::diffusers::st_read::StFile::open(&path).unwrap().keys();
        assert!(keys.contains(&"lora_te2_text_projection.alpha".to_string()) && keys.iter().any(|k| k.starts_with("lora_te1_text_model_encoder_layers_0_mlp_fc1.")));
        assert!(keys.contains(&"lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight".to_string()), "{keys:?}");
        let sd = BTreeMap::from([("ss_v2".to_string(), "True".to_string())]);
        assert_eq!((declared_family(&sd), declared_family(&BTreeMap::new())), (Some(Family::Sd), None));
    }

    #[test]
    fn lora_writes_are_atomic_and_name_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("missing").join("k.safetensors");
        let err = write_kohya(&sample(None), &target, &KohyaInfo::default()).unwrap_err().to_string();
        assert!(err.starts_with(&target.display().to_string()) && !err.contains("dreambridge-tmp"), "{err}");
        let path = dir.path().join("d.safetensors");
        std::fs::write(&path, b"old").unwrap();
        write_diffusers(&sample(None), &path).unwrap();
        assert_eq!(read(&path).unwrap().modules.len(), 3);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "no temp file left: {names:?}");
    }
}
