//! Reads a LoRA safetensors file (kohya, diffusers, old attention-processor or PEFT keys) into a
//! [`LoraSet`]: factors as f32, alphas resolved, every module checked for both factors.

use super::{names, Format, LoraModule, LoraSet, Part};
use crate::diffusers::st_read::StFile;
use crate::output::one_line;
use crate::tensor::{DType, RawTensor};
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// Which factor of a module a tensor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Down,
    Up,
    Alpha,
}

/// Where one key of a LoRA file goes.
#[derive(Clone, Debug, PartialEq)]
pub struct Slot {
    pub part: Part,
    /// The diffusers module path (for a kohya UNet name in LDM numbering, as SDXL's table reads
    /// it; [`read`] rereads such names as the whole file's names say, see [`names::ldm_family`]).
    pub module: String,
    pub kind: Kind,
    /// The naming the key is in (`None` for an alpha outside kohya files, which any naming has).
    pub format: Option<Format>,
    /// A kohya UNet name in LDM numbering, as named (`input_blocks.4.1....`).
    pub ldm: Option<names::KohyaName>,
}

/// Places one key; the error says why it is no LoRA tensor this reader takes.
pub fn classify(key: &str) -> Result<Slot> {
    if names::has_kohya_prefix(key) {
        classify_kohya(key)
    } else {
        classify_diffusers(key)
    }
}

/// Whether `keys` is a LoRA file's key set: not empty and every key placed.
pub fn is_lora(keys: &[String]) -> bool {
    !keys.is_empty() && keys.iter().all(|k| classify(k).is_ok())
}

fn classify_kohya(key: &str) -> Result<Slot> {
    let (name, suffix) = key.split_once('.').context("no `.lora_down.weight`-style suffix")?;
    let kind = match suffix {
        "lora_down.weight" | "lora_A.weight" => Kind::Down,
        "lora_up.weight" | "lora_B.weight" => Kind::Up,
        "alpha" => Kind::Alpha,
        other => bail!("{}", unsupported_factor(other).unwrap_or_else(|| format!("unknown kohya LoRA tensor `.{other}`"))),
    };
    let parsed = names::parse(name)?;
    let module = names::resolve(&parsed, names::ldm_family([parsed.path.as_str()].into_iter().filter(|_| parsed.ldm)))?;
    Ok(Slot { part: parsed.part, module, kind, format: Some(Format::Kohya), ldm: parsed.ldm.then_some(parsed) })
}

/// The reason for refusing a LyCORIS / DoRA factor named by `text`, if it is one.
fn unsupported_factor(text: &str) -> Option<String> {
    let what = [
        ("lora_mid", "LoCon/LyCORIS `lora_mid` (Tucker) factors"),
        ("hada_", "LyCORIS LoHa factors"),
        ("lokr_", "LyCORIS LoKr factors"),
        ("dora_scale", "DoRA magnitudes"),
        ("lora_magnitude_vector", "DoRA magnitudes"),
        ("lora_embedding_", "embedding LoRAs"),
        ("oft_", "OFT factors"),
        ("w_norm", "LyCORIS norm weights"),
        ("b_norm", "LyCORIS norm weights"),
    ];
    let (_, name) = what.iter().find(|(needle, _)| text.contains(needle))?;
    Some(format!("{name} are not supported (only LoRA/LoCon up/down factors)"))
}

/// Top-level module names that mark an unprefixed key as the UNet's.
const UNET_ROOTS: &[&str] = &["down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding"];

fn classify_diffusers(key: &str) -> Result<Slot> {
    let (part, rest) = if let Some(r) = key.strip_prefix("unet.") {
        (Part::Unet, r)
    } else if let Some(r) = key.strip_prefix("text_encoder.") {
        (Part::TextEncoder, r)
    } else if let Some(r) = key.strip_prefix("text_encoder_2.") {
        (Part::TextEncoder2, r)
    } else {
        let r = key.strip_prefix("base_model.model.").unwrap_or(key);
        if r.starts_with("text_model.") {
            (Part::TextEncoder, r)
        } else if UNET_ROOTS.iter().any(|root| r.starts_with(&format!("{root}."))) || r.len() < key.len() {
            (Part::Unet, r)
        } else {
            bail!("{}", unsupported_factor(key).unwrap_or_else(|| "not a LoRA tensor (no unet./text_encoder./text_encoder_2. prefix, no UNet module path)".into()));
        }
    };
    let suffixes = [
        (".lora.down.weight", Kind::Down, Some(Format::Diffusers)),
        (".lora.up.weight", Kind::Up, Some(Format::Diffusers)),
        (".lora_linear_layer.down.weight", Kind::Down, Some(Format::Diffusers)),
        (".lora_linear_layer.up.weight", Kind::Up, Some(Format::Diffusers)),
        (".lora_A.weight", Kind::Down, Some(Format::Peft)),
        (".lora_B.weight", Kind::Up, Some(Format::Peft)),
        (".alpha", Kind::Alpha, None),
    ];
    let (module, kind, format) = match suffixes.iter().find_map(|(s, k, f)| rest.strip_suffix(s).map(|m| (m.to_owned(), *k, *f))) {
        Some(found) => found,
        None => old_attention_key(part, rest).with_context(|| unsupported_factor(rest).unwrap_or_else(|| "not a LoRA tensor".into()))?,
    };
    // `.processor` is where old diffusers hung its LoRA layers; the module is the layer itself.
    let module: Vec<&str> = module.split('.').filter(|s| *s != "processor").collect();
    ensure!(!module.is_empty() && module.iter().all(|s| !s.is_empty()), "empty module path");
    Ok(Slot { part, module: part.normalize(&module.join(".")), kind, format, ldm: None })
}

/// `<module>.processor.to_q_lora.down.weight` (the attention-processor LoRA of diffusers < 0.17).
fn old_attention_key(part: Part, rest: &str) -> Option<(String, Kind, Option<Format>)> {
    let (front, kind) = match rest.strip_suffix(".down.weight") {
        Some(front) => (front, Kind::Down),
        None => (rest.strip_suffix(".up.weight")?, Kind::Up),
    };
    let (module, proj) = front.rsplit_once('.')?;
    let layer = match (part, proj) {
        (Part::Unet, "to_q_lora") => "to_q",
        (Part::Unet, "to_k_lora") => "to_k",
        (Part::Unet, "to_v_lora") => "to_v",
        (Part::Unet, "to_out_lora") => "to_out.0",
        (Part::TextEncoder | Part::TextEncoder2, "to_q_lora") => "q_proj",
        (Part::TextEncoder | Part::TextEncoder2, "to_k_lora") => "k_proj",
        (Part::TextEncoder | Part::TextEncoder2, "to_v_lora") => "v_proj",
        (Part::TextEncoder | Part::TextEncoder2, "to_out_lora") => "out_proj",
        _ => return None,
    };
    Some((format!("{module}.{layer}"), kind, Some(Format::Diffusers)))
}

/// A module's tensors as found, each with its key.
#[derive(Default)]
struct Found {
    down: Option<(String, RawTensor)>,
    up: Option<(String, RawTensor)>,
    alpha: Option<(String, f64)>,
}

/// Reads a LoRA file. Errors name the file and the first key that cannot be placed.
pub fn read(path: &Path) -> Result<LoraSet> {
    let file = StFile::open(path).with_context(|| path.display().to_string())?;
    let at = |key: &str, e: anyhow::Error| anyhow!("{}: key `{key}`: {}", path.display(), one_line(&e));
    let keys = file.keys();
    ensure!(!keys.is_empty(), "{}: no tensors", path.display());
    let kohya = keys.iter().any(|k| names::has_kohya_prefix(k));
    if kohya {
        if let Some(k) = keys.iter().find(|k| !names::has_kohya_prefix(k)) {
            return Err(at(k, anyhow!("not a kohya key in a kohya file (lora_unet_/lora_te_/lora_te1_/lora_te2_ keys)")));
        }
    }
    let mut slots: Vec<(String, Slot)> = keys.into_iter().map(|k| classify(&k).map(|s| (k.clone(), s)).map_err(|e| at(&k, e))).collect::<Result<_>>()?;
    // LDM-numbered UNet names are read by one family's table, as all of them say.
    let family = names::ldm_family(slots.iter().filter_map(|(_, s)| s.ldm.as_ref()).map(|n| n.path.as_str()));
    for (key, slot) in &mut slots {
        if let Some(name) = &slot.ldm {
            slot.module = names::resolve(name, family).map_err(|e| at(key, e))?;
        }
    }
    let format = if kohya {
        Format::Kohya
    } else if slots.iter().any(|(_, s)| s.format == Some(Format::Peft)) {
        Format::Peft
    } else {
        Format::Diffusers
    };
    let mut found: BTreeMap<(Part, String), Found> = BTreeMap::new();
    for (key, slot) in slots {
        if slot.kind == Kind::Alpha {
            let alpha = file.read_scalar(&key).map_err(|e| at(&key, e))?;
            let entry = found.entry((slot.part, slot.module)).or_default();
            if let Some((other, _)) = &entry.alpha {
                return Err(at(&key, anyhow!("the same factor as `{other}`")));
            }
            entry.alpha = Some((key, alpha));
            continue;
        }
        let tensor = file.read(&key).map_err(|e| at(&key, e))?;
        let entry = found.entry((slot.part, slot.module)).or_default();
        let taken = match slot.kind {
            Kind::Down => entry.down.as_ref().map(|(k, _)| k.clone()),
            Kind::Up => entry.up.as_ref().map(|(k, _)| k.clone()),
            Kind::Alpha => entry.alpha.as_ref().map(|(k, _)| k.clone()),
        };
        if let Some(other) = taken {
            return Err(at(&key, anyhow!("the same factor as `{other}`")));
        }
        match slot.kind {
            Kind::Down => entry.down = Some((key, tensor.cast(DType::F32))),
            Kind::Up => entry.up = Some((key, tensor.cast(DType::F32))),
            Kind::Alpha => unreachable!("alphas are read above"),
        }
    }
    let metadata = file.metadata();
    let adapter = AdapterMetadata::parse(&metadata).map_err(|e| anyhow!("{}: metadata `lora_adapter_metadata`: {}", path.display(), one_line(&e)))?;
    let mut modules = BTreeMap::new();
    for ((part, module), f) in found {
        let (down, up) = match (f.down, f.up) {
            (Some(d), Some(u)) => (d, u),
            (Some((k, _)), None) => return Err(at(&k, anyhow!("no matching up factor"))),
            (None, Some((k, _))) => return Err(at(&k, anyhow!("no matching down factor"))),
            (None, None) => return Err(at(&f.alpha.expect("a module has at least one key").0, anyhow!("alpha without down/up factors"))),
        };
        check_factors(&down.1, &up.1).map_err(|e| at(&up.0, e))?;
        let rank = down.1.shape[0] as f64;
        let alpha = match f.alpha {
            // kohya (and A1111): a zero alpha means none.
            Some((_, a)) if a != 0.0 => a,
            Some(_) => rank,
            None => adapter.alpha(part, &module, rank),
        };
        modules.insert((part, module), LoraModule { down: down.1, up: up.1, alpha });
    }
    Ok(LoraSet { modules, format, metadata })
}

/// Down `(r, in)` with up `(out, r)`, or down `(r, in, k, k)` with up `(out, r, 1, 1)`.
fn check_factors(down: &RawTensor, up: &RawTensor) -> Result<()> {
    let (d, u) = (&down.shape, &up.shape);
    ensure!(d.len() == 2 || d.len() == 4, "down factor must be (r, in) or (r, in, k, k), got {d:?}");
    ensure!(d[0] > 0, "rank 0");
    ensure!(u.len() == d.len() && (u.len() == 2 || u[2..] == [1, 1]), "up factor {u:?} does not fit the down factor {d:?} (expected (out, r) or (out, r, 1, 1))");
    ensure!(u[1] == d[0], "rank {} differs from the down factor's rank {} (shapes {u:?}, {d:?})", u[1], d[0]);
    Ok(())
}

/// The PEFT `LoraConfig` fields of the `lora_adapter_metadata` entry, per part.
#[derive(Default)]
struct AdapterMetadata {
    parts: BTreeMap<Part, PartConfig>,
}

#[derive(Default)]
struct PartConfig {
    lora_alpha: Option<f64>,
    alpha_pattern: Vec<(String, f64)>,
    use_rslora: bool,
}

impl AdapterMetadata {
    fn parse(metadata: &BTreeMap<String, String>) -> Result<AdapterMetadata> {
        let Some(text) = metadata.get("lora_adapter_metadata") else { return Ok(AdapterMetadata::default()) };
        let value: Value = serde_json::from_str(text).context("not JSON")?;
        let map = value.as_object().context("not a JSON object")?;
        let mut parts = BTreeMap::new();
        for (part, prefix) in [(Part::Unet, "unet."), (Part::TextEncoder, "text_encoder."), (Part::TextEncoder2, "text_encoder_2.")] {
            let field = |name: &str| map.get(&format!("{prefix}{name}")).filter(|v| !v.is_null());
            let mut config = PartConfig::default();
            if let Some(v) = field("lora_alpha") {
                config.lora_alpha = Some(v.as_f64().with_context(|| format!("`{prefix}lora_alpha` is not a number"))?);
            }
            if let Some(v) = field("alpha_pattern") {
                let patterns = v.as_object().with_context(|| format!("`{prefix}alpha_pattern` is not an object"))?;
                for (pattern, a) in patterns {
                    let a = a.as_f64().with_context(|| format!("`{prefix}alpha_pattern` `{pattern}` is not a number"))?;
                    config.alpha_pattern.push((pattern.clone(), a));
                }
            }
            config.use_rslora = field("use_rslora").and_then(Value::as_bool).unwrap_or(false);
            parts.insert(part, config);
        }
        Ok(AdapterMetadata { parts })
    }

    /// The alpha of `module` (scale = alpha / rank as stored), or `rank` when nothing says.
    fn alpha(&self, part: Part, module: &str, rank: f64) -> f64 {
        let Some(c) = self.parts.get(&part) else { return rank };
        let matches = |p: &str| module == p || module.ends_with(&format!(".{p}"));
        let alpha = c.alpha_pattern.iter().find(|(p, _)| matches(p)).map(|(_, a)| *a).or(c.lora_alpha);
        match alpha {
            // rsLoRA scales by alpha / sqrt(r).
            Some(a) if c.use_rslora => a * rank.sqrt(),
            Some(a) => a,
            None => rank,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::diffusers::st_write::{PendingTensor, StWriter};

    /// An f32 tensor of `shape` with values `start, start + 1, ...` (scaled down).
    pub fn ramp(shape: &[usize], start: f32) -> RawTensor {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|i| (start + i as f32) * 0.01).collect();
        RawTensor::from_f32(shape, &values)
    }

    pub fn scalar(v: f32) -> RawTensor {
        RawTensor { dtype: DType::F32, shape: vec![], data: v.to_le_bytes().to_vec() }
    }

    /// Writes `tensors` (in sorted key order) with `metadata` to `dir/name`.
    pub fn write_file(dir: &Path, name: &str, tensors: &[(&str, RawTensor)], metadata: &[(&str, &str)]) -> std::path::PathBuf {
        let path = dir.join(name);
        let mut sorted: Vec<&(&str, RawTensor)> = tensors.iter().collect();
        sorted.sort_by_key(|(k, _)| *k);
        let pending = sorted.iter().map(|(k, t)| PendingTensor { key: k.to_string(), dtype: t.dtype, shape: t.shape.clone() }).collect();
        let meta = metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut w = StWriter::create_with_metadata(&path, pending, &meta).unwrap();
        for (k, t) in sorted {
            w.write_next(k, t).unwrap();
        }
        w.finish().unwrap();
        path
    }

    const Q: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    const OUT: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0";

    fn read_err(tensors: &[(&str, RawTensor)]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), "bad.safetensors", tensors, &[]);
        let err = read(&path).unwrap_err().to_string();
        assert!(err.contains("bad.safetensors"), "{err}");
        err
    }

    #[test]
    fn lora_kohya_file_with_aliases_and_alpha() {
        let dir = tempfile::tempdir().unwrap();
        let k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
        let t = "lora_te_text_model_encoder_layers_0_mlp_fc1";
        let (down, up, alpha) = (format!("{k}.lora_A.weight"), format!("{k}.lora_B.weight"), format!("{k}.alpha"));
        let (tdown, tup) = (format!("{t}.lora_down.weight"), format!("{t}.lora_up.weight"));
        let path = write_file(
            dir.path(),
            "k.safetensors",
            &[(&down, ramp(&[2, 8], 0.0)), (&up, ramp(&[8, 2], 1.0)), (&alpha, scalar(1.0)), (&tdown, ramp(&[2, 4], 0.0)), (&tup, ramp(&[6, 2], 0.0))],
            &[("ss_network_dim", "2")],
        );
        let set = read(&path).unwrap();
        assert_eq!(set.format, Format::Kohya);
        assert_eq!(set.metadata["ss_network_dim"], "2");
        let q = &set.modules[&(Part::Unet, Q.to_string())];
        assert_eq!((q.alpha, q.rank(), q.scale()), (1.0, 2, 0.5));
        assert_eq!(q.down, ramp(&[2, 8], 0.0));
        let fc1 = &set.modules[&(Part::TextEncoder, "text_model.encoder.layers.0.mlp.fc1".to_string())];
        assert_eq!(fc1.alpha, 2.0, "no alpha tensor: alpha = rank");
    }

    #[test]
    fn lora_old_attention_processor_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor";
        let path = write_file(
            dir.path(),
            "old.safetensors",
            &[
                (&format!("{p}.to_q_lora.down.weight"), ramp(&[2, 8], 0.0)),
                (&format!("{p}.to_q_lora.up.weight"), ramp(&[8, 2], 0.0)),
                (&format!("unet.{p}.to_out_lora.down.weight"), ramp(&[2, 8], 0.0)),
                (&format!("unet.{p}.to_out_lora.up.weight"), ramp(&[8, 2], 0.0)),
                ("text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.down.weight", ramp(&[2, 4], 0.0)),
                ("text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.up.weight", ramp(&[4, 2], 0.0)),
            ],
            &[],
        );
        let set = read(&path).unwrap();
        assert_eq!(set.format, Format::Diffusers);
        let keys: Vec<(Part, String)> = set.modules.keys().cloned().collect();
        assert_eq!(
            keys,
            vec![(Part::Unet, OUT.to_string()), (Part::Unet, Q.to_string()), (Part::TextEncoder, "text_model.encoder.layers.0.self_attn.k_proj".to_string())]
        );
        assert!(set.modules.values().all(|m| m.scale() == 1.0));
    }

    #[test]
    fn lora_peft_keys_take_alpha_from_adapter_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let meta = r#"{"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn1.to_out.0": 2}, "text_encoder.lora_alpha": 1}"#;
        let path = write_file(
            dir.path(),
            "peft.safetensors",
            &[
                (&format!("unet.{Q}.lora_A.weight"), ramp(&[4, 8], 0.0)),
                (&format!("unet.{Q}.lora_B.weight"), ramp(&[8, 4], 0.0)),
                (&format!("unet.{OUT}.lora_A.weight"), ramp(&[4, 8], 0.0)),
                (&format!("unet.{OUT}.lora_B.weight"), ramp(&[8, 4], 0.0)),
                ("text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight", ramp(&[4, 4], 0.0)),
                ("text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight", ramp(&[4, 4], 0.0)),
            ],
            &[("lora_adapter_metadata", meta)],
        );
        let set = read(&path).unwrap();
        assert_eq!(set.format, Format::Peft);
        assert_eq!(set.modules[&(Part::Unet, Q.to_string())].alpha, 8.0);
        assert_eq!(set.modules[&(Part::Unet, OUT.to_string())].alpha, 2.0, "alpha_pattern suffix match");
        assert_eq!(set.modules[&(Part::TextEncoder, "text_model.encoder.layers.0.self_attn.q_proj".to_string())].alpha, 1.0, "text_model. prepended");
    }

    #[test]
    fn lora_peft_bare_prefix_and_alpha_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(
            dir.path(),
            "bare.safetensors",
            &[
                (&format!("base_model.model.{Q}.lora_A.weight"), ramp(&[2, 8], 0.0)),
                (&format!("base_model.model.{Q}.lora_B.weight"), ramp(&[8, 2], 0.0)),
                (&format!("base_model.model.{Q}.alpha"), scalar(4.0)),
            ],
            &[],
        );
        let set = read(&path).unwrap();
        assert_eq!(set.modules[&(Part::Unet, Q.to_string())].alpha, 4.0);
    }

    #[test]
    fn lora_half_precision_factors_become_f32() {
        let dir = tempfile::tempdir().unwrap();
        let (down, up) = (ramp(&[2, 8, 3, 3], 0.0), ramp(&[8, 2, 1, 1], 0.0));
        let k = "lora_unet_down_blocks_0_resnets_0_conv1";
        let path = write_file(
            dir.path(),
            "h.safetensors",
            &[(&format!("{k}.lora_down.weight"), down.clone().cast(DType::F16)), (&format!("{k}.lora_up.weight"), up.clone().cast(DType::BF16)), (&format!("{k}.alpha"), scalar(1.0).cast(DType::F16))],
            &[],
        );
        let set = read(&path).unwrap();
        let m = &set.modules[&(Part::Unet, "down_blocks.0.resnets.0.conv1".to_string())];
        assert_eq!(m.down.dtype, DType::F32);
        assert_eq!(m.down, down.cast(DType::F16).cast(DType::F32));
        assert_eq!(m.up, up.cast(DType::BF16).cast(DType::F32));
        assert!(m.is_conv());
    }

    #[test]
    fn lora_refusals_name_the_key() {
        let k = "lora_unet_down_blocks_0_resnets_0_conv1";
        type Case = (Vec<(String, RawTensor)>, &'static str, &'static str);
        let cases: Vec<Case> = vec![
            (vec![(format!("{k}.lora_down.weight"), ramp(&[2, 4, 3, 3], 0.0)), (format!("{k}.lora_mid.weight"), ramp(&[2, 2, 3, 3], 0.0))], "lora_mid.weight`", "lora_mid"),
            (vec![(format!("{k}.hada_w1_a"), ramp(&[2, 4], 0.0))], "hada_w1_a`", "LoHa"),
            (vec![("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight".into(), ramp(&[2, 4], 0.0))], "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight`", "no matching up"),
            (vec![("lora_unet_input_blocks_4_7_proj_in.lora_down.weight".into(), ramp(&[2, 4], 0.0))], "lora_unet_input_blocks_4_7_proj_in.lora_down.weight`", "LDM numbering"),
            (vec![("lora_te3_text_model_encoder_layers_0_mlp_fc1.lora_down.weight".into(), ramp(&[2, 4], 0.0))], "key `lora_te3_", "not a LoRA tensor"),
            (vec![(format!("unet.{Q}.lora.down.weight"), ramp(&[2, 8], 0.0))], "lora.down.weight`", "no matching up"),
            (vec![(format!("unet.{Q}.lora.down.weight"), ramp(&[2, 8], 0.0)), (format!("unet.{Q}.lora.up.weight"), ramp(&[8, 3], 0.0))], "lora.up.weight`", "rank 3 differs"),
            (vec![(format!("unet.{Q}.lora.down.weight"), ramp(&[2, 8], 0.0)), (format!("unet.{Q}.lora.up.weight"), ramp(&[8, 2], 0.0)), ("vae.encoder.conv_in.weight".into(), ramp(&[2], 0.0))], "key `vae.encoder.conv_in.weight`", "not a LoRA tensor"),
            (vec![(format!("{k}.lora_down.weight"), ramp(&[2, 4], 0.0)), (format!("unet.{Q}.lora.up.weight"), ramp(&[8, 2], 0.0))], "key `unet.", "not a kohya key"),
        ];
        for (tensors, key, why) in cases {
            let refs: Vec<(&str, RawTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t.clone())).collect();
            let err = read_err(&refs);
            assert!(err.contains(key) && err.contains(why), "{err}");
        }
    }

    #[test]
    fn lora_key_classification() {
        assert!(is_lora(&[format!("unet.{Q}.lora.down.weight"), format!("unet.{Q}.lora.up.weight")]));
        assert!(!is_lora(&["conv_in.weight".to_string()]));
        assert!(!is_lora(&[]));
        assert_eq!(classify("text_model.encoder.layers.1.mlp.fc2.lora_A.weight").unwrap().part, Part::TextEncoder);
    }
}
