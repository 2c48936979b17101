//! Folds LoRAs into base weights: `W' = W + multiplier · (alpha / r) · up · down`, into training
//! Vars or into a diffusers pipeline folder written anew.

use super::{LoraModule, LoraSet, Part};
use crate::diffusers::st_read::StFile;
use crate::diffusers::st_write::{PendingTensor, StWriter};
use crate::output::{copy_tree, one_line, Staging};
use crate::tensor::RawTensor;
use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Whether `m`'s product fits a weight of `weight_shape`: Linear `(out, in)`, conv
/// `(out, in, k, k)`; a Linear LoRA fits a 1×1 conv and a 1×1 conv LoRA a Linear.
pub fn check_fit(m: &LoraModule, weight_shape: &[usize]) -> Result<()> {
    /// `(in, kh, kw)` of a down factor's or a weight's trailing dims.
    fn inner(dims: &[usize]) -> Vec<usize> {
        let mut v = dims.to_vec();
        v.resize(3, 1);
        v
    }
    let fits = matches!(weight_shape.len(), 2 | 4)
        && weight_shape[0] == m.out_dim()
        && matches!(m.down.shape.len(), 2 | 4)
        && inner(&m.down.shape[1..]) == inner(&weight_shape[1..]);
    ensure!(fits, "LoRA factors down {:?}, up {:?} do not fit the weight {weight_shape:?}", m.down.shape, m.up.shape);
    Ok(())
}

/// `multiplier · (alpha / r) · up · down` as an f32 CPU tensor of `weight_shape`.
pub fn delta(m: &LoraModule, weight_shape: &[usize], multiplier: f64) -> Result<Tensor> {
    check_fit(m, weight_shape)?;
    let (r, out) = (m.rank(), m.out_dim());
    let cols: usize = m.down.shape[1..].iter().product();
    let up = Tensor::from_vec(m.up.to_f32_values(), (out, r), &Device::Cpu)?;
    let down = Tensor::from_vec(m.down.to_f32_values(), (r, cols), &Device::Cpu)?;
    Ok(up.matmul(&down)?.affine(multiplier * m.scale(), 0.0)?.reshape(weight_shape)?)
}

/// A one-line error about LoRA module `module` of `part`.
fn module_error(part: Part, module: &str, e: anyhow::Error) -> anyhow::Error {
    anyhow!("LoRA module `{module}` ({}): {}", part.name(), one_line(&e))
}

/// Adds every module's delta to the Var `<module>.weight` of `unet` or `text` (text Vars are keyed
/// `text_model.…`). Every module is checked first; nothing changes unless all fit.
pub fn merge_into_vars(loras: &[(&LoraSet, f64)], unet: &VarMap, text: &VarMap) -> Result<()> {
    let mut plan = Vec::new();
    for (set, multiplier) in loras {
        for ((part, module), m) in &set.modules {
            let vars = match part {
                Part::Unet => unet,
                Part::TextEncoder => text,
                Part::TextEncoder2 => return Err(module_error(*part, module, anyhow!("this model has no second text encoder loaded"))),
            };
            let key = format!("{module}.weight");
            let var = vars.data().lock().expect("VarMap lock").get(&key).cloned();
            let var = var.ok_or_else(|| module_error(*part, module, anyhow!("the model has no weight `{key}`")))?;
            check_fit(m, var.dims()).map_err(|e| module_error(*part, module, e))?;
            plan.push((var, m, *multiplier, *part, module));
        }
    }
    for (var, m, multiplier, part, module) in plan {
        let add = || -> Result<()> {
            let d = delta(m, var.dims(), multiplier)?.to_device(var.device())?;
            let merged = (var.as_tensor().to_dtype(candle_core::DType::F32)? + d)?.to_dtype(var.dtype())?;
            Ok(var.set(&merged)?)
        };
        add().map_err(|e| module_error(part, module, e))?;
    }
    Ok(())
}

/// The deltas to add to one weights file: by tensor key, each module with its multiplier.
type Additions<'a> = BTreeMap<String, Vec<(&'a LoraModule, f64)>>;

/// The safetensors weights of `part` in the pipeline folder `base` (the plain file, else its
/// `fp16` variant).
fn part_weights(base: &Path, part: Part) -> Result<PathBuf> {
    let dir = base.join(part.dir());
    let name = part.weights_name();
    let stem = name.trim_end_matches(".safetensors");
    if let Some(p) = [name.to_string(), format!("{stem}.fp16.safetensors")].into_iter().map(|n| dir.join(n)).find(|p| p.is_file()) {
        return Ok(p);
    }
    ensure!(!dir.join(format!("{name}.index.json")).is_file(), "{}: sharded weights are not supported yet", dir.join(format!("{name}.index.json")).display());
    if part == Part::TextEncoder2 && !dir.is_dir() {
        bail!("{}: the LoRA adapts `text_encoder_2` (an SDXL LoRA) but the base has no second text encoder", base.display());
    }
    bail!("{}: no {name} (safetensors weights are needed; .bin files are not read)", dir.display())
}

/// Every module of `loras` placed on its weight in the pipeline folder `base` (checked to exist and
/// fit), by part.
fn plan<'a>(base: &Path, loras: &[(&'a LoraSet, f64)]) -> Result<BTreeMap<Part, (StFile, Additions<'a>)>> {
    ensure!(base.join("model_index.json").is_file(), "{}: not a diffusers pipeline folder (no model_index.json)", base.display());
    let mut parts: BTreeMap<Part, (StFile, Additions)> = BTreeMap::new();
    for (set, multiplier) in loras {
        for ((part, module), m) in &set.modules {
            if !parts.contains_key(part) {
                let path = part_weights(base, *part)?;
                let file = StFile::open(&path).with_context(|| path.display().to_string())?;
                parts.insert(*part, (file, BTreeMap::new()));
            }
            let (file, adds) = parts.get_mut(part).expect("inserted above");
            let key = format!("{module}.weight");
            // transformers 5 saves `CLIPTextModel` without its `text_model.` level.
            let bare = module.strip_prefix("text_model.").filter(|_| *part != Part::Unet).map(|m| format!("{m}.weight"));
            let Some(key) = [Some(key.clone()), bare].into_iter().flatten().find(|k| file.contains(k)) else {
                return Err(module_error(*part, module, anyhow!("{} has no tensor `{key}`", file.path.display())));
            };
            let shape = file.info(&key).with_context(|| file.path.display().to_string())?.shape;
            check_fit(m, &shape).map_err(|e| module_error(*part, module, e))?;
            adds.entry(key).or_default().push((m, *multiplier));
        }
    }
    Ok(parts)
}

/// Checks that every module of `set` has a weight it fits in the pipeline folder `base`.
pub fn check_against(base: &Path, set: &LoraSet) -> Result<()> {
    plan(base, &[(set, 1.0)]).map(|_| ())
}

/// Writes the diffusers pipeline `base` with `loras` fused into its UNet and text encoders
/// (`text_encoder`, SDXL's `text_encoder_2`) to `out` (atomically; an existing `out` only with
/// `force`). Every module is checked against the base weights before anything is written; merged
/// tensors keep their stored dtype.
pub fn merge_pipeline(base: &Path, loras: &[(LoraSet, f64)], out: &Path, force: bool) -> Result<PathBuf> {
    let refs: Vec<(&LoraSet, f64)> = loras.iter().map(|(s, m)| (s, *m)).collect();
    let parts = plan(base, &refs)?;
    let staging = Staging::new(out, force, &[base])?;
    let work = || -> Result<()> {
        let rewritten: Vec<(&str, &str)> = parts.keys().map(|p| (p.dir(), p.weights_name())).collect();
        // The rewritten components' other weight files (fp16 variants, .bin) would be stale.
        let skip = |rel: &str| {
            rel.split('/').any(|s| s.starts_with('.'))
                || rewritten.iter().any(|(dir, name)| {
                    let stem = name.split('.').next().expect("a weights name has a stem");
                    rel.strip_prefix(&format!("{dir}/")).is_some_and(|f| !f.contains('/') && f.starts_with(stem))
                })
        };
        copy_tree(base, &staging.path("")?, &skip)?;
        for (part, (file, adds)) in &parts {
            let name = file.path.file_name().expect("a weights file has a name").to_string_lossy();
            let dest = staging.path(&format!("{}/{name}", part.dir()))?;
            rewrite(file, &dest, adds)?;
        }
        Ok(())
    };
    let result = work();
    Ok(staging.finish(result)?.1)
}

/// Copies `file` to `dest` tensor by tensor, adding the deltas in f32.
fn rewrite(file: &StFile, dest: &Path, adds: &Additions) -> Result<()> {
    let keys = file.keys();
    let mut pending = Vec::new();
    for k in &keys {
        let info = file.info(k).with_context(|| file.path.display().to_string())?;
        pending.push(PendingTensor { key: k.clone(), dtype: info.dtype, shape: info.shape });
    }
    let mut w = StWriter::create_with_metadata(dest, pending, &file.metadata())?;
    for k in &keys {
        let t = file.read(k).with_context(|| file.path.display().to_string())?;
        let t = match adds.get(k) {
            None => t,
            Some(list) => {
                let mut sum = Tensor::from_vec(t.to_f32_values(), t.shape.as_slice(), &Device::Cpu)?;
                for (m, multiplier) in list {
                    sum = (sum + delta(m, &t.shape, *multiplier)?)?;
                }
                let values = sum.flatten_all()?.to_vec1::<f32>()?;
                RawTensor::from_f32(&t.shape, &values).cast(t.dtype)
            }
        };
        w.write_next(k, &t)?;
    }
    w.finish()
}

/// `generate --lora` / `forward --lora`: reads each file and folds it into the given models'
/// Vars, `scales` as `lora merge --scale` takes them (none: 1; one: for all; else one per file).
/// A part given as `None` is left out (its modules are skipped); every module of a given part
/// must fit, or nothing changes.
pub fn merge_files_into_vars(files: &[PathBuf], scales: &[f64], unet: Option<&VarMap>, text: Option<&VarMap>) -> Result<()> {
    if files.is_empty() {
        return Ok(());
    }
    let scales = super::cli::scales_for(files.len(), scales)?;
    let mut sets = Vec::new();
    for file in files {
        let mut set = super::read::read(file)?;
        // A second text encoder (SDXL) is never given here: its modules are left out with it.
        set.modules.retain(|(part, _), _| match part {
            Part::Unet => unet.is_some(),
            Part::TextEncoder => text.is_some(),
            Part::TextEncoder2 => false,
        });
        sets.push(set);
    }
    let loras: Vec<(&LoraSet, f64)> = sets.iter().zip(scales).collect();
    let empty = VarMap::new();
    merge_into_vars(&loras, unet.unwrap_or(&empty), text.unwrap_or(&empty)).with_context(|| files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::read::tests::ramp;
    use crate::lora::Format;
    use candle_nn::Init;

    fn module(down: &[usize], up: &[usize], alpha: f64) -> LoraModule {
        LoraModule { down: ramp(down, 1.0), up: ramp(up, -2.0), alpha }
    }

    fn values(t: &RawTensor) -> Vec<f32> {
        t.to_f32_values()
    }

    /// `s · up · down` over `up (out, r)` and `down (r, cols)` by loops, in f64.
    fn direct(m: &LoraModule, s: f64) -> Vec<f32> {
        let (r, out) = (m.rank(), m.out_dim());
        let cols = m.down.data.len() / 4 / r;
        let (u, d) = (values(&m.up), values(&m.down));
        let mut v = vec![0f32; out * cols];
        for o in 0..out {
            for c in 0..cols {
                let sum: f64 = (0..r).map(|k| u[o * r + k] as f64 * d[k * cols + c] as f64).sum();
                v[o * cols + c] = (sum * s) as f32;
            }
        }
        v
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn lora_delta_matches_a_direct_product() {
        let linear = module(&[2, 5], &[3, 2], 1.0);
        let d = delta(&linear, &[3, 5], 0.5).unwrap();
        assert_eq!(d.dims(), &[3, 5]);
        close(&flat(&d), &direct(&linear, 0.5 * 0.5));
        // A Linear LoRA on a 1×1 conv, a 1×1 conv LoRA on a Linear.
        let on_conv = delta(&linear, &[3, 5, 1, 1], 1.0).unwrap();
        assert_eq!(on_conv.dims(), &[3, 5, 1, 1]);
        close(&flat(&on_conv), &direct(&linear, 0.5));
        let one = module(&[2, 5, 1, 1], &[3, 2, 1, 1], 2.0);
        close(&flat(&delta(&one, &[3, 5], 1.0).unwrap()), &direct(&one, 1.0));
        let conv = module(&[4, 3, 3, 3], &[6, 4, 1, 1], 2.0);
        let d = delta(&conv, &[6, 3, 3, 3], -1.0).unwrap();
        assert_eq!(d.dims(), &[6, 3, 3, 3]);
        close(&flat(&d), &direct(&conv, -0.5));
        for bad in [&[6, 3][..], &[6, 27], &[6, 3, 1, 1], &[5, 3, 3, 3]] {
            let err = delta(&conv, bad, 1.0).unwrap_err().to_string();
            assert!(err.contains("do not fit the weight"), "{err}");
        }
    }

    #[test]
    fn lora_merge_into_vars_checks_everything_first() {
        let (unet, text) = (VarMap::new(), VarMap::new());
        let q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
        let fc1 = "text_model.encoder.layers.0.mlp.fc1";
        let wq = unet.get((8, 8), &format!("{q}.weight"), Init::Const(1.0), candle_core::DType::F32, &Device::Cpu).unwrap();
        let wf = text.get((6, 4), &format!("{fc1}.weight"), Init::Const(0.5), candle_core::DType::F32, &Device::Cpu).unwrap();
        let mut modules = BTreeMap::new();
        modules.insert((Part::Unet, q.to_string()), module(&[2, 8], &[8, 2], 4.0));
        modules.insert((Part::TextEncoder, fc1.to_string()), module(&[2, 5], &[6, 2], 2.0));
        let mut set = LoraSet { modules, format: Format::Kohya, metadata: BTreeMap::new() };
        let err = merge_into_vars(&[(&set, 1.0)], &unet, &text).unwrap_err().to_string();
        assert!(err.contains(fc1) && err.contains("do not fit"), "{err}");
        assert_eq!(flat(&wq), vec![1.0; 64], "nothing merged");
        set.modules.insert((Part::Unet, "mid_block.attentions.0.proj_in".into()), module(&[2, 8], &[8, 2], 2.0));
        set.modules.remove(&(Part::TextEncoder, fc1.to_string()));
        let err = merge_into_vars(&[(&set, 1.0)], &unet, &text).unwrap_err().to_string();
        assert!(err.contains("no weight `mid_block.attentions.0.proj_in.weight`"), "{err}");
        set.modules.remove(&(Part::Unet, "mid_block.attentions.0.proj_in".into()));
        set.modules.insert((Part::TextEncoder, fc1.to_string()), module(&[2, 4], &[6, 2], 2.0));
        merge_into_vars(&[(&set, 1.0), (&set, -0.5)], &unet, &text).unwrap();
        let m = &set.modules[&(Part::Unet, q.to_string())];
        let expect: Vec<f32> = direct(m, 2.0 * 0.5).iter().map(|d| 1.0 + d).collect();
        close(&flat(&wq), &expect);
        let f = &set.modules[&(Part::TextEncoder, fc1.to_string())];
        close(&flat(&wf), &direct(f, 0.5).iter().map(|d| 0.5 + d).collect::<Vec<_>>());
    }

    /// The embedded sample converted to a diffusers folder.
    fn tiny_pipeline(dir: &Path) -> PathBuf {
        let (_sample_dir, inputs) = crate::sample::unpack().unwrap();
        let out = dir.join("base");
        let opts = crate::convert::to_diffusers::ToDiffusersOptions { out: out.clone(), ..Default::default() };
        crate::convert::to_diffusers::keras_to_diffusers(&inputs, &opts).unwrap();
        out
    }

    /// A module fitting `shape` (Linear, or a conv with the same kernel).
    fn fitting(shape: &[usize], rank: usize) -> LoraModule {
        let mut down = vec![rank];
        down.extend_from_slice(&shape[1..]);
        let up = if shape.len() == 4 { vec![shape[0], rank, 1, 1] } else { vec![shape[0], rank] };
        module(&down, &up, 1.0)
    }

    #[test]
    fn lora_merge_pipeline_adds_deltas_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let base = tiny_pipeline(dir.path());
        let unet = StFile::open(&base.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
        let text = StFile::open(&base.join("text_encoder/model.safetensors")).unwrap();
        let pick = |f: &StFile, end: &str| f.keys().into_iter().find(|k| k.ends_with(end)).unwrap_or_else(|| panic!("no `{end}`"));
        let targets = [
            (Part::Unet, pick(&unet, "attn2.to_k.weight"), &unet),
            (Part::Unet, pick(&unet, "resnets.0.conv1.weight"), &unet),
            (Part::TextEncoder, pick(&text, "self_attn.q_proj.weight"), &text),
        ];
        let mut modules = BTreeMap::new();
        for (part, key, file) in &targets {
            let shape = file.info(key).unwrap().shape;
            modules.insert((*part, key.strip_suffix(".weight").unwrap().to_string()), fitting(&shape, 2));
        }
        let set = LoraSet { modules, format: Format::Kohya, metadata: BTreeMap::new() };
        let out = dir.path().join("merged");
        let done = merge_pipeline(&base, &[(set.clone(), 0.8)], &out, false).unwrap();
        assert_eq!(done.canonicalize().unwrap(), out.canonicalize().unwrap());
        let merged_unet = StFile::open(&out.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
        let merged_text = StFile::open(&out.join("text_encoder/model.safetensors")).unwrap();
        for (part, key, file) in &targets {
            let merged = if *part == Part::Unet { &merged_unet } else { &merged_text };
            let (b, m) = (file.read(key).unwrap(), merged.read(key).unwrap());
            assert_eq!((m.dtype, &m.shape), (b.dtype, &b.shape));
            let lora = &set.modules[&(*part, key.strip_suffix(".weight").unwrap().to_string())];
            let expect: Vec<f32> = values(&b).iter().zip(direct(lora, 0.8 * lora.scale())).map(|(w, d)| w + d).collect();
            close(&values(&m), &expect);
            assert_ne!(values(&m), values(&b));
        }
        for (file, merged) in [(&unet, &merged_unet), (&text, &merged_text)] {
            assert_eq!(file.keys(), merged.keys());
            assert_eq!(file.metadata(), merged.metadata());
            for k in file.keys().iter().filter(|k| !targets.iter().any(|(_, t, _)| t == *k)) {
                assert_eq!(file.read(k).unwrap(), merged.read(k).unwrap(), "{k}");
            }
        }
        for f in ["model_index.json", "vae/diffusion_pytorch_model.safetensors", "unet/config.json"] {
            assert_eq!(std::fs::read(base.join(f)).unwrap(), std::fs::read(out.join(f)).unwrap(), "{f}");
        }
        assert!(merge_pipeline(&base, &[(set.clone(), 1.0)], &out, false).unwrap_err().to_string().contains("--force"));

        // A module that fits nothing: no output folder, nothing left beside it.
        let mut bad = set.clone();
        let (part, key, file) = &targets[0];
        let shape = file.info(key).unwrap().shape;
        bad.modules.insert((*part, key.strip_suffix(".weight").unwrap().to_string()), fitting(&[shape[0] + 1, shape[1]], 2));
        let missing = dir.path().join("bad");
        let err = merge_pipeline(&base, &[(set, 1.0), (bad, 1.0)], &missing, false).unwrap_err().to_string();
        assert!(err.contains(key.strip_suffix(".weight").unwrap()) && err.contains("do not fit"), "{err}");
        assert!(!missing.exists());
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
        assert!(left.iter().all(|n| !n.starts_with('.')), "{left:?}");
    }
}
