//! KerasHub LoRA files (`backbone.enable_lora(rank, target_layer_names)` then
//! `save_lora_weights("x.lora.h5")`) of Stable Diffusion 3 <-> diffusers' SD3 LoRA in PEFT names
//! (`transformer.<module>.lora_A.weight`, `text_encoder.`, `text_encoder_2.`), which
//! `StableDiffusion3Pipeline.load_lora_weights` reads.
//!
//! A `.lora.h5` holds `lora/vars/rank` and, per adapted layer, `lora/<i>/vars/lora_kernel_a`
//! and `lora/<i>/vars/lora_kernel_b`, where `<i>` is the layer's place among the backbone's
//! layers that have weights, in Keras' `_flatten_layers` order: depth first, the backbone's own
//! layers in creation order and every layer's sub-layers in reverse creation order. That order is
//! not in any file, so [`flattened_layers`] rebuilds it from keras-hub's class structure (checked
//! against keras-hub's own list in the tests). Keras applies `a @ b` with scale 1 (alpha = rank).
//!
//! Layout: a Dense kernel `(in, out)` has `a (in, r)`, `b (r, out)`: PEFT `lora_A = aᵀ`,
//! `lora_B = bᵀ`. Keras' per-head attention kernels `(D, heads, head_dim)` have `a (D, heads, r)`
//! and one `b (r, head_dim)` shared by every head: exactly a PEFT adapter of rank heads·r with a
//! block-diagonal `lora_B`. q, k and v fused in one MMDiT Dense share `a`: each diffusers
//! projection gets `lora_A = aᵀ` and its rows of `bᵀ`. Within each diffusers model the ranks are
//! padded with zeros to one rank, so diffusers' one `lora_alpha` (= that rank) scales every
//! module by 1, as Keras does.
//!
//! The way back folds each module's PEFT scale (`lora_alpha / r`) into `a` and writes every
//! layer at one rank, the least that holds each update exactly: fused q/k/v take the sum of their
//! parts' ranks; a per-head kernel takes heads·r (`b` stacks every head's `lora_B`, each head's
//! `a` uses its own block) or head_dim (`b` the identity) where that is less. `load_lora_weights`
//! fills the layers `enable_lora` chose by name, so the file holds every layer with an adapted
//! layer's name (zeros where diffusers' file had none), and the command prints the
//! `enable_lora` call that matches it.

mod factors;
mod order;

pub use factors::{to_diffusers, to_keras, Adapter, KerasFactors};
pub use order::{flattened_layers, structure, FlatLayer, Structure};

use crate::convert::plan::{Plan, PlannedTensor};
use crate::mapping::Op;
use crate::tensor::{DType, RawTensor};
use anyhow::{bail, ensure, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The Keras kernels of a converted model: kernel dataset path -> the diffusers tensors it holds
/// (model prefix `transformer.`, `text_encoder.`, `text_encoder_2.`), from plans whose `source`
/// is the Keras path or whose layout gives it.
pub struct KernelMap {
    pub kernels: BTreeMap<String, Vec<(String, PlannedTensor)>>,
}

impl KernelMap {
    /// `plans`: (diffusers model prefix, Keras root, plan).
    pub fn new(plans: &[(&str, &str, &Plan)]) -> KernelMap {
        let mut kernels: BTreeMap<String, Vec<(String, PlannedTensor)>> = BTreeMap::new();
        for (prefix, root, plan) in plans {
            for t in &plan.tensors {
                if !matches!(t.spec.op, Op::Dense | Op::Conv | Op::Conv1x1Linear) {
                    continue;
                }
                let layer = &plan.layout.layers[t.spec.layer];
                let path = format!("{root}{}/{}", layer.keras3_key, t.spec.keras3_suffix());
                kernels.entry(path).or_default().push((prefix.to_string(), t.clone()));
            }
        }
        KernelMap { kernels }
    }
}

/// One adapted layer of a `.lora.h5`: its index among the backbone's weighted layers, `a`, `b`.
pub type LoraLayer = (usize, RawTensor, RawTensor);

/// A KerasHub `.lora.h5`: its rank and its adapted layers by index.
pub fn read_lora_h5(path: &Path) -> Result<(usize, Vec<LoraLayer>)> {
    let file = hdf5::File::open(path).map_err(|e| anyhow::anyhow!("{}: not an HDF5 file ({e})", path.display()))?;
    let lora = file.group("lora").map_err(|_| anyhow::anyhow!("{}: no `lora` group (not a KerasHub .lora.h5)", path.display()))?;
    let rank_ds = file.dataset("lora/vars/rank").map_err(|_| anyhow::anyhow!("{}: no `lora/vars/rank`", path.display()))?;
    let rank: i64 = rank_ds.read_scalar::<i64>().or_else(|_| rank_ds.read_scalar::<i32>().map(i64::from)).map_err(|e| anyhow::anyhow!("{}: `lora/vars/rank` is not an integer ({e})", path.display()))?;
    ensure!(rank > 0, "{}: rank {rank}", path.display());
    let mut layers = Vec::new();
    for name in lora.member_names()? {
        if name == "vars" {
            continue;
        }
        let index: usize = name.parse().with_context(|| format!("{}: `lora/{name}` is not a layer index", path.display()))?;
        let read = |var: &str| -> Result<RawTensor> {
            let p = format!("lora/{name}/vars/{var}");
            let ds = file.dataset(&p).map_err(|_| anyhow::anyhow!("{}: tensor `{p}`: not found", path.display()))?;
            let v: Vec<f32> = ds.read_raw::<f32>().map_err(|e| anyhow::anyhow!("{}: tensor `{p}`: cannot read ({e})", path.display()))?;
            Ok(RawTensor { dtype: DType::F32, shape: ds.shape(), data: bytemuck::cast_slice(&v).to_vec() })
        };
        layers.push((index, read("lora_kernel_a")?, read("lora_kernel_b")?));
    }
    layers.sort_by_key(|l| l.0);
    Ok((rank as usize, layers))
}

/// Writes the adapters as a PEFT-named safetensors file (atomically).
pub fn write_peft(path: &Path, adapters: &[Adapter]) -> Result<()> {
    use crate::diffusers::st_write::{PendingTensor, StWriter};
    let mut tensors: Vec<(String, RawTensor)> = Vec::new();
    for a in adapters {
        let t = |shape: Vec<usize>, v: &[f32]| RawTensor { dtype: DType::F32, shape, data: bytemuck::cast_slice(v).to_vec() };
        tensors.push((format!("{}.lora_A.weight", a.key), t(vec![a.rank, a.d_in], &a.a)));
        tensors.push((format!("{}.lora_B.weight", a.key), t(vec![a.d_out, a.rank], &a.b)));
    }
    crate::output::atomic_file(path, |temp| {
        let pending = tensors.iter().map(|(k, t)| PendingTensor { key: k.clone(), dtype: t.dtype, shape: t.shape.clone() }).collect();
        let mut w = StWriter::create(temp, pending)?;
        for (k, t) in &tensors {
            w.write_next(k, t)?;
        }
        w.finish()
    })
}

/// The backbone a LoRA file belongs to: its flattened layers and kernels, from a KerasHub preset
/// or backbone, or a diffusers SD3 folder.
pub struct Base {
    pub flat: Vec<FlatLayer>,
    pub map: KernelMap,
}

impl Base {
    pub fn open(path: &Path) -> Result<Base> {
        use crate::convert::{kerashub, sd3_to_keras};
        const ROOTS: [&str; 5] = [kerashub::MMDIT_ROOT, kerashub::CLIP_L_ROOT, kerashub::CLIP_L_PROJECTION_ROOT, kerashub::CLIP_G_ROOT, kerashub::CLIP_G_PROJECTION_ROOT];
        if path.is_dir() && sd3_to_keras::is_sd3_folder(path) {
            let f = sd3_to_keras::plan_sd3_folder(path)?;
            ensure!(f.clips.len() == 2, "{}: a KerasHub LoRA's layer numbers need both CLIPs (text_encoder/, text_encoder_2/)", path.display());
            let mmdit = &f.transformer.plans[0].0;
            let (l, g) = (&f.clips[0].0.plans, &f.clips[1].0.plans);
            let plans = [("transformer", ROOTS[0], mmdit), ("text_encoder", ROOTS[1], &l[0].0), ("text_encoder", ROOTS[2], &l[1].0), ("text_encoder_2", ROOTS[3], &g[0].0), ("text_encoder_2", ROOTS[4], &g[1].0)];
            return Ok(Base { flat: flattened_layers(&structure(mmdit, &l[0].0, &g[0].0)), map: KernelMap::new(&plans) });
        }
        let k = kerashub::open(path)?;
        let (Some(l), Some(g)) = (&k.clip_l, &k.clip_g) else {
            anyhow::bail!("{}: the MMDiT alone; a KerasHub LoRA's layer numbers need the whole backbone (a preset, a backbone .weights.h5 or a diffusers SD3 folder)", path.display())
        };
        let plans = [("transformer", ROOTS[0], &k.mmdit), ("text_encoder", ROOTS[1], &l.encoder), ("text_encoder", ROOTS[2], &l.projection), ("text_encoder_2", ROOTS[3], &g.encoder), ("text_encoder_2", ROOTS[4], &g.projection)];
        Ok(Base { flat: flattened_layers(&structure(&k.mmdit, &l.encoder, &g.encoder)), map: KernelMap::new(&plans) })
    }
}

/// `lora convert x.lora.h5 out.safetensors --to diffusers --base B`; returns the module count.
pub fn convert_to_diffusers(input: &Path, output: &Path, base: &Path, force: bool) -> Result<usize> {
    ensure!(force || !output.exists(), "{}: already exists (use --force to replace it)", output.display());
    let base = Base::open(base)?;
    let (rank, layers) = read_lora_h5(input)?;
    let mut adapters = to_diffusers(rank, &layers, &base.flat, &base.map, input)?;
    factors::pad_ranks(&mut adapters);
    write_peft(output, &adapters)?;
    Ok(adapters.len())
}

/// A diffusers SD3 LoRA in PEFT names (`transformer.`, `text_encoder.`, `text_encoder_2.`
/// prefixes; `lora_A`/`lora_B`, optional `.alpha`), each module's scale folded into `lora_A`.
///
/// The scale is diffusers' own: `alpha / rank` with alpha from the module's `.alpha`, else from
/// the file's `lora_adapter_metadata` (`<model>.lora_alpha`, `<model>.alpha_pattern`, ranks from
/// `<model>.r`, `<model>.rank_pattern`; a pattern matches a module path or its tail), else the
/// model's most common rank (what `load_lora_weights` assumes for a file without alphas).
pub fn read_peft_sd3(path: &Path) -> Result<Vec<Adapter>> {
    let file = crate::diffusers::st_read::StFile::open(path).with_context(|| path.display().to_string())?;
    let metadata: Option<serde_json::Value> = file.metadata().get("lora_adapter_metadata").and_then(|m| serde_json::from_str(m).ok());
    type Found = (Option<RawTensor>, Option<RawTensor>, Option<f64>); // lora_A, lora_B, alpha
    let mut modules: BTreeMap<String, Found> = BTreeMap::new();
    for key in file.keys() {
        let (module, kind) = ["lora_A.weight", "lora_B.weight", "alpha"]
            .iter()
            .find_map(|s| key.strip_suffix(&format!(".{s}")).map(|m| (m.to_string(), *s)))
            .with_context(|| format!("{}: tensor `{key}`: not a PEFT LoRA tensor (`<module>.lora_A.weight`, `.lora_B.weight`, `.alpha`)", path.display()))?;
        ensure!(
            ["transformer.", "text_encoder.", "text_encoder_2."].iter().any(|p| module.starts_with(p)),
            "{}: tensor `{key}`: not an SD3 LoRA module (`transformer.`, `text_encoder.` or `text_encoder_2.`)",
            path.display()
        );
        let t = file.read(&key).with_context(|| path.display().to_string())?;
        let entry = modules.entry(module).or_default();
        match kind {
            "lora_A.weight" => entry.0 = Some(t),
            "lora_B.weight" => entry.1 = Some(t),
            _ => entry.2 = t.to_f32_values().first().map(|v| *v as f64),
        }
    }
    ensure!(!modules.is_empty(), "{}: no LoRA tensors", path.display());
    let model = |key: &str| key.split('.').next().unwrap_or("").to_string();
    let mut common: BTreeMap<String, BTreeMap<usize, usize>> = BTreeMap::new();
    for (key, (a, _, _)) in &modules {
        if let Some(a) = a {
            *common.entry(model(key)).or_default().entry(a.shape[0]).or_default() += 1;
        }
    }
    let mut out = Vec::new();
    for (key, (a, b, alpha)) in modules {
        let a = a.with_context(|| format!("{}: module `{key}`: no `lora_A.weight`", path.display()))?;
        let b = b.with_context(|| format!("{}: module `{key}`: no `lora_B.weight`", path.display()))?;
        ensure!(
            a.shape.len() == 2 && b.shape.len() == 2 && a.shape[0] == b.shape[1],
            "{}: module `{key}`: lora_A {:?} and lora_B {:?} are not the factors of a Linear's LoRA",
            path.display(),
            a.shape,
            b.shape
        );
        let rank = a.shape[0];
        let m = model(&key);
        let local = &key[m.len() + 1..];
        let (alpha, r) = match (alpha, metadata.as_ref()) {
            (Some(alpha), _) => (alpha, rank as f64),
            (None, Some(meta)) if meta.get(format!("{m}.lora_alpha")).is_some() => {
                let pattern = |name: &str| meta.get(format!("{m}.{name}")).and_then(|p| p.as_object()).and_then(|p| p.iter().find(|(k, _)| local == k.as_str() || local.ends_with(&format!(".{k}"))).and_then(|(_, v)| v.as_f64()));
                let alpha = pattern("alpha_pattern").or_else(|| meta[format!("{m}.lora_alpha")].as_f64()).unwrap_or(rank as f64);
                let r = pattern("rank_pattern").or_else(|| meta.get(format!("{m}.r")).and_then(|v| v.as_f64())).unwrap_or(rank as f64);
                (alpha, r)
            }
            _ => {
                let counts = &common[&m];
                let most = counts.iter().max_by_key(|(r, n)| (**n, std::cmp::Reverse(**r))).map(|(r, _)| *r).unwrap_or(rank);
                (most as f64, rank as f64)
            }
        };
        let scale = (alpha / r) as f32;
        let av: Vec<f32> = a.to_f32_values().into_iter().map(|v| v * scale).collect();
        out.push(Adapter { key, a: av, b: b.to_f32_values(), rank, d_in: a.shape[1], d_out: b.shape[0] });
    }
    Ok(out)
}

/// Writes a KerasHub `.lora.h5` as `save_lora_weights` does (atomically): `lora/vars/rank` and
/// `lora/<i>/vars/lora_kernel_a`, `lora_kernel_b` in float32.
pub fn write_lora_h5(path: &Path, rank: usize, layers: &[(usize, KerasFactors)]) -> Result<()> {
    crate::output::atomic_file(path, |temp| {
        let file = hdf5::File::create(temp)?;
        let lora = file.create_group("lora")?;
        lora.create_group("vars")?.new_dataset::<i64>().create("rank")?.write_scalar(&(rank as i64))?;
        for (index, f) in layers {
            let vars = lora.create_group(&index.to_string())?.create_group("vars")?;
            for (name, t) in [("lora_kernel_a", &f.a), ("lora_kernel_b", &f.b)] {
                let values = t.to_f32_values();
                let array = ndarray::ArrayView::from_shape(ndarray::IxDyn(&t.shape), &values)?;
                vars.new_dataset_builder().with_data(&array).create(name)?;
            }
        }
        file.close()?;
        Ok(())
    })
}

/// What `lora convert --to keras` wrote: the rank and the layer names `enable_lora` must get.
#[derive(Debug)]
pub struct KerasLora {
    pub rank: usize,
    pub target_layer_names: Vec<String>,
    pub layers: usize,
    pub modules: usize,
}

impl KerasLora {
    /// The Python that loads the file into a backbone.
    pub fn enable_lora_call(&self) -> String {
        let names: Vec<String> = self.target_layer_names.iter().map(|n| format!("\"{n}\"")).collect();
        format!("backbone.enable_lora({}, target_layer_names=[{}])", self.rank, names.join(", "))
    }
}

/// `lora convert in.safetensors out.lora.h5 --to keras --base B`: a diffusers SD3 LoRA into a
/// KerasHub `.lora.h5` for the backbone `base`.
pub fn convert_to_keras(input: &Path, output: &Path, base: &Path, force: bool) -> Result<KerasLora> {
    ensure!(output.to_string_lossy().ends_with(".lora.h5"), "{}: KerasHub's load_lora_weights takes only files named `*.lora.h5`", output.display());
    ensure!(force || !output.exists(), "{}: already exists (use --force to replace it)", output.display());
    let base = Base::open(base)?;
    let adapters = read_peft_sd3(input)?;
    let kernels = to_keras(&adapters, &base.map, input)?;
    let rank = kernels.values().map(|(r, _)| *r).max().unwrap_or(0);
    let name = |l: &FlatLayer| l.path.rsplit('/').next().unwrap_or(&l.path).to_string();
    let mut names = BTreeSet::new();
    for l in &base.flat {
        if l.kernel.as_ref().is_some_and(|k| kernels.contains_key(k)) {
            names.insert(name(l));
        }
    }
    let mut layers = Vec::new();
    for (i, l) in base.flat.iter().enumerate() {
        let Some(kernel) = &l.kernel else { continue };
        if !names.contains(&name(l)) {
            continue;
        }
        let factors = match kernels.get(kernel) {
            Some((r, f)) => factors::pad_keras(f, *r, rank),
            None => {
                let targets = base.map.kernels.get(kernel).with_context(|| format!("`{}`: no kernel in the base", l.path))?;
                if targets.iter().any(|(_, t)| t.spec.op != Op::Dense) {
                    bail!("{}: the adapted layers' names include `{}`, a convolution's; only Dense layers are converted", input.display(), name(l));
                }
                factors::zero_factors(&targets[0].1.keras_shape, rank)
            }
        };
        layers.push((i, factors));
    }
    write_lora_h5(output, rank, &layers)?;
    Ok(KerasLora { rank, target_layer_names: names.into_iter().collect(), layers: layers.len(), modules: adapters.len() })
}

/// The full-size SD3 backbones (KerasHub's presets: CLIP-L 12 layers, CLIP-G 32, MMDiT of 24 or
/// 38 blocks of 64·blocks wide) whose layer numbering holds every layer of a `.lora.h5`: each index
/// a layer with a LoRA kernel, and the MMDiT attention kernels' `a` as wide as that MMDiT.
pub fn fitting_variants(layers: &[LoraLayer]) -> Vec<(&'static str, Vec<FlatLayer>)> {
    let variants: [(&str, usize, bool, Vec<usize>); 3] =
        [("SD3 medium", 24, false, Vec::new()), ("SD3.5 medium", 24, true, (0..=12).collect()), ("SD3.5 large", 38, true, Vec::new())];
    let mut out = Vec::new();
    for (name, blocks, qk_norm, dual) in variants {
        let flat = flattened_layers(&Structure { clip_l_layers: 12, clip_g_layers: 32, blocks, qk_norm, dual });
        let fits = layers.iter().all(|(index, a, _)| {
            flat.get(*index).is_some_and(|l| {
                let attention = ["attention_qkv", "attention_qkv2", "attention_proj", "attention_proj2"].iter().any(|n| l.path.ends_with(&format!("/{n}")));
                l.kernel.is_some() && (!attention || !l.path.starts_with("diffuser/") || a.shape.first() == Some(&(64 * blocks)))
            })
        });
        if fits {
            out.push((name, flat));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_zeros(shape: Vec<usize>) -> RawTensor {
        RawTensor { dtype: DType::F32, data: vec![0; shape.iter().product::<usize>() * 4], shape }
    }

    /// A LoRA on one MMDiT attention kernel tells the variant by its layer number and width; one on
    /// the CLIPs alone fits every variant; a number past any backbone fits none.
    #[test]
    fn the_variant_is_told_by_layer_numbers_and_widths() {
        let index_of = |blocks, qk_norm, dual: Vec<usize>, path: &str| {
            flattened_layers(&Structure { clip_l_layers: 12, clip_g_layers: 32, blocks, qk_norm, dual }).iter().position(|l| l.path == path).unwrap()
        };
        let qkv = "diffuser/joint_block_3/x_block/attention_qkv";
        let names = |layers: &[LoraLayer]| fitting_variants(layers).into_iter().map(|(n, _)| n).collect::<Vec<_>>();
        let large = (index_of(38, true, vec![], qkv), f32_zeros(vec![2432, 4]), f32_zeros(vec![4, 3 * 2432]));
        assert_eq!(names(&[large]), ["SD3.5 large"]);
        let medium = (index_of(24, false, vec![], qkv), f32_zeros(vec![1536, 4]), f32_zeros(vec![4, 3 * 1536]));
        assert_eq!(names(&[medium]), ["SD3 medium"]);
        let medium35 = (index_of(24, true, (0..=12).collect(), qkv), f32_zeros(vec![1536, 4]), f32_zeros(vec![4, 3 * 1536]));
        assert_eq!(names(&[medium35]), ["SD3.5 medium"]);
        let query = index_of(24, false, vec![], "clip_l/clip_l_encoder_block_0/attention/query");
        assert_eq!(names(&[(query, f32_zeros(vec![768, 12, 4]), f32_zeros(vec![4, 64]))]), ["SD3 medium", "SD3.5 medium", "SD3.5 large"]);
        assert!(names(&[(100_000, f32_zeros(vec![1, 1]), f32_zeros(vec![1, 1]))]).is_empty());
    }
}
