//! LoRA factors between KerasHub's layout (`a`, `b` on the Keras kernel) and PEFT's (`lora_A`,
//! `lora_B` on the diffusers weight).

use super::order::FlatLayer;
use super::KernelMap;
use crate::mapping::Op;
use crate::convert::plan::PlannedTensor;
use crate::tensor::{DType, RawTensor};
use anyhow::{ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// One adapter in diffusers' terms: `lora_A (rank, d_in)`, `lora_B (d_out, rank)` in f32, the
/// scale folded in.
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter {
    /// `transformer.transformer_blocks.0.attn.to_q` (model prefix and module path).
    pub key: String,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub rank: usize,
    pub d_in: usize,
    pub d_out: usize,
}

/// One Keras layer's LoRA kernels: `a` of shape `kernel[..-1] + (rank,)`, `b (rank, kernel[-1])`.
#[derive(Clone, Debug, PartialEq)]
pub struct KerasFactors {
    pub a: RawTensor,
    pub b: RawTensor,
}

/// `transformer.transformer_blocks.0.attn.to_q` from a weight key.
pub fn adapter_key(prefix: &str, weight_key: &str) -> String {
    format!("{prefix}.{}", weight_key.strip_suffix(".weight").unwrap_or(weight_key))
}

/// Whether a Keras kernel is a per-head attention kernel `(D, heads, head_dim)` whose LoRA `b`
/// is shared by every head (its last axis is a head's width, not the diffusers output width).
fn per_head(keras: &[usize], full: &[usize]) -> bool {
    keras.len() == 3 && keras[2] != full[0]
}

/// The Keras columns, in diffusers row order, of a diffusers tensor that is (part of) a Keras
/// kernel with `out_cols` columns.
fn columns(t: &PlannedTensor, out_cols: usize) -> Vec<usize> {
    t.spec.rows.runs(out_cols).into_iter().flatten().collect()
}

fn f32_tensor(shape: Vec<usize>, values: &[f32]) -> RawTensor {
    RawTensor { dtype: DType::F32, shape, data: bytemuck::cast_slice(values).to_vec() }
}

/// The kernels a LoRA can go on: Dense and EinsumDense ones (KerasHub's convolutions can take a
/// LoRA too, but diffusers' SD3 LoRAs never adapt the patch embedding; refused by name).
fn dense_targets<'m>(map: &'m KernelMap, kernel: &str, what: &dyn Fn() -> String) -> Result<&'m [(String, PlannedTensor)]> {
    let targets = map.kernels.get(kernel).with_context(|| format!("{}: no diffusers tensor for `{kernel}`", what()))?;
    ensure!(targets.iter().all(|(_, t)| t.spec.op == Op::Dense), "{}: `{kernel}` is a convolution; only LoRA on Dense layers is converted", what());
    Ok(targets)
}

/// The diffusers adapters of a KerasHub LoRA file's layers (`(index, a, b)`), scale 1.
pub fn to_diffusers(rank: usize, layers: &[super::LoraLayer], flat: &[FlatLayer], map: &KernelMap, file: &Path) -> Result<Vec<Adapter>> {
    let mut out = Vec::new();
    for (index, a, b) in layers {
        let what = || format!("{}: `lora/{index}`", file.display());
        let layer = flat.get(*index).with_context(|| format!("{}: the backbone's layer {index} is not in its text encoders or MMDiT (LoRA on the VAE is not converted)", what()))?;
        let kernel = layer.kernel.as_ref().with_context(|| format!("{} adapts `{}`, which has no kernel LoRA can carry", what(), layer.path))?;
        let what = || format!("{}: `lora/{index}` ({})", file.display(), layer.path);
        let targets = dense_targets(map, kernel, &what)?;
        let first = &targets[0].1;
        let (keras, full) = (&first.keras_shape, first.full_diffusers_shape());
        let n = keras.len();
        let want_a: Vec<usize> = keras[..n - 1].iter().copied().chain([rank]).collect();
        ensure!(a.shape == want_a && b.shape == [rank, keras[n - 1]], "{}: kernels {:?} / {:?} do not fit the kernel {keras:?} at rank {rank}", what(), a.shape, b.shape);
        let (av, bv) = (a.to_f32_values(), b.to_f32_values());
        let r = rank;
        if per_head(keras, &full) {
            // a (D, heads, r), b (r, head_dim): rank heads·r, lora_B block diagonal.
            let (d, heads, hd) = (keras[0], keras[1], keras[2]);
            ensure!(targets.len() == 1, "{}: a per-head kernel holding several diffusers tensors", what());
            let big = heads * r;
            let mut la = vec![0f32; big * d]; // row h·r+k = a[:, h, k]
            let mut lb = vec![0f32; heads * hd * big];
            for h in 0..heads {
                for k in 0..r {
                    for i in 0..d {
                        la[(h * r + k) * d + i] = av[(i * heads + h) * r + k];
                    }
                    for e in 0..hd {
                        lb[(h * hd + e) * big + h * r + k] = bv[k * hd + e];
                    }
                }
            }
            out.push(Adapter { key: adapter_key(&targets[0].0, &first.spec.key), a: la, b: lb, rank: big, d_in: d, d_out: heads * hd });
            continue;
        }
        // A Dense kernel read as (in, out): a (in, r), b (r, out); q/k/v fused take their columns.
        let (d_in, out_cols) = (keras[..n - 1].iter().product::<usize>(), keras[n - 1]);
        let mut la = vec![0f32; r * d_in];
        for i in 0..d_in {
            for k in 0..r {
                la[k * d_in + i] = av[i * r + k];
            }
        }
        for (prefix, t) in targets {
            let cols = columns(t, out_cols);
            let mut lb = Vec::with_capacity(cols.len() * r);
            for &c in &cols {
                lb.extend((0..r).map(|k| bv[k * out_cols + c]));
            }
            out.push(Adapter { key: adapter_key(prefix, &t.spec.key), a: la.clone(), b: lb, rank: r, d_in, d_out: cols.len() });
        }
    }
    Ok(out)
}

/// KerasHub kernels for diffusers adapters (each with its scale folded into `a`): per Keras
/// kernel, `a` and `b` at the rank that holds them exactly (fused q/k/v: the sum of the parts'
/// ranks; per-head kernels: heads·rank, or head_dim with `b` the identity where that is less).
/// Returns the kernels and their rank, before padding to one rank.
pub fn to_keras(adapters: &[Adapter], map: &KernelMap, file: &Path) -> Result<BTreeMap<String, (usize, KerasFactors)>> {
    let mut by_key: BTreeMap<String, (&str, usize)> = BTreeMap::new();
    for (kernel, targets) in &map.kernels {
        for (i, (prefix, t)) in targets.iter().enumerate() {
            by_key.insert(adapter_key(prefix, &t.spec.key), (kernel.as_str(), i));
        }
    }
    let mut grouped: BTreeMap<&str, Vec<(usize, &Adapter)>> = BTreeMap::new();
    for ad in adapters {
        let (kernel, i) = by_key
            .get(&ad.key)
            .copied()
            .with_context(|| format!("{}: module `{}`: no KerasHub layer holds it (a KerasHub LoRA covers the CLIPs' and the MMDiT's Dense layers)", file.display(), ad.key))?;
        grouped.entry(kernel).or_default().push((i, ad));
    }
    let mut out = BTreeMap::new();
    for (kernel, parts) in grouped {
        let what = || format!("{}: `{}`", file.display(), parts[0].1.key);
        let targets = dense_targets(map, kernel, &what)?;
        let first = &targets[0].1;
        let (keras, full) = (first.keras_shape.clone(), first.full_diffusers_shape());
        let n = keras.len();
        for (i, ad) in &parts {
            let t = &targets[*i].1;
            ensure!(
                ad.d_in == full[1..].iter().product::<usize>() && ad.d_out == t.diffusers_shape[0],
                "{}: module `{}`: lora_A/lora_B ({} -> {}) do not fit its weight {:?}",
                file.display(),
                ad.key,
                ad.d_in,
                ad.d_out,
                t.diffusers_shape
            );
        }
        let factors = if per_head(&keras, &full) {
            let ad = parts[0].1;
            let (d, heads, hd, r) = (keras[0], keras[1], keras[2], ad.rank);
            if heads * r <= hd {
                // b stacks every head's lora_B columns; head h's a uses only its own block.
                let big = heads * r;
                let mut a = vec![0f32; d * heads * big];
                let mut b = vec![0f32; big * hd];
                for h in 0..heads {
                    for k in 0..r {
                        for i in 0..d {
                            a[(i * heads + h) * big + h * r + k] = ad.a[k * d + i];
                        }
                        for e in 0..hd {
                            b[(h * r + k) * hd + e] = ad.b[(h * hd + e) * r + k];
                        }
                    }
                }
                (big, KerasFactors { a: f32_tensor(vec![d, heads, big], &a), b: f32_tensor(vec![big, hd], &b) })
            } else {
                // b the identity, a the whole update per head.
                let mut a = vec![0f32; d * heads * hd];
                for h in 0..heads {
                    for e in 0..hd {
                        let row = &ad.b[(h * hd + e) * r..(h * hd + e + 1) * r];
                        for i in 0..d {
                            a[(i * heads + h) * hd + e] = (0..r).map(|k| row[k] * ad.a[k * d + i]).sum();
                        }
                    }
                }
                let b: Vec<f32> = (0..hd * hd).map(|j| if j / hd == j % hd { 1.0 } else { 0.0 }).collect();
                (hd, KerasFactors { a: f32_tensor(vec![d, heads, hd], &a), b: f32_tensor(vec![hd, hd], &b) })
            }
        } else {
            let (d_in, out_cols) = (keras[..n - 1].iter().product::<usize>(), keras[n - 1]);
            let big: usize = parts.iter().map(|(_, ad)| ad.rank).sum();
            let mut a = vec![0f32; d_in * big];
            let mut b = vec![0f32; big * out_cols];
            let mut offset = 0;
            for (i, ad) in &parts {
                let cols = columns(&targets[*i].1, out_cols);
                for k in 0..ad.rank {
                    for j in 0..d_in {
                        a[j * big + offset + k] = ad.a[k * d_in + j];
                    }
                    for (row, &c) in cols.iter().enumerate() {
                        b[(offset + k) * out_cols + c] = ad.b[row * ad.rank + k];
                    }
                }
                offset += ad.rank;
            }
            let a_shape: Vec<usize> = keras[..n - 1].iter().copied().chain([big]).collect();
            (big, KerasFactors { a: f32_tensor(a_shape, &a), b: f32_tensor(vec![big, out_cols], &b) })
        };
        out.insert(kernel.to_string(), factors);
    }
    Ok(out)
}

/// Zero factors of rank `rank` for a Keras kernel of shape `keras`.
pub fn zero_factors(keras: &[usize], rank: usize) -> KerasFactors {
    let n = keras.len();
    let a_shape: Vec<usize> = keras[..n - 1].iter().copied().chain([rank]).collect();
    let zeros = |shape: Vec<usize>| f32_tensor(shape.clone(), &vec![0f32; shape.iter().product()]);
    KerasFactors { a: zeros(a_shape), b: zeros(vec![rank, keras[n - 1]]) }
}

/// Pads Keras factors of rank `from` to rank `to` with zero columns of `a` and zero rows of `b`.
pub fn pad_keras(f: &KerasFactors, from: usize, to: usize) -> KerasFactors {
    if from == to {
        return f.clone();
    }
    let a = f.a.to_f32_values();
    let rows = a.len() / from;
    let mut padded = vec![0f32; rows * to];
    for i in 0..rows {
        padded[i * to..i * to + from].copy_from_slice(&a[i * from..(i + 1) * from]);
    }
    let mut b = f.b.to_f32_values();
    b.resize(to * f.b.shape[1], 0.0);
    let mut a_shape = f.a.shape.clone();
    *a_shape.last_mut().unwrap() = to;
    KerasFactors { a: f32_tensor(a_shape, &padded), b: f32_tensor(vec![to, f.b.shape[1]], &b) }
}

/// Pads every adapter of a diffusers model (key prefix up to the first `.`) to that model's
/// largest rank, with zero rows of `lora_A` and zero columns of `lora_B`.
pub fn pad_ranks(adapters: &mut [Adapter]) {
    let mut max: BTreeMap<String, usize> = BTreeMap::new();
    for a in adapters.iter() {
        let m = a.key.split('.').next().unwrap_or("").to_string();
        let e = max.entry(m).or_insert(0);
        *e = (*e).max(a.rank);
    }
    for a in adapters.iter_mut() {
        let r = max[a.key.split('.').next().unwrap_or("")];
        if r == a.rank {
            continue;
        }
        a.a.resize(r * a.d_in, 0.0);
        let mut b = vec![0f32; a.d_out * r];
        for o in 0..a.d_out {
            b[o * r..o * r + a.rank].copy_from_slice(&a.b[o * a.rank..(o + 1) * a.rank]);
        }
        a.b = b;
        a.rank = r;
    }
}
