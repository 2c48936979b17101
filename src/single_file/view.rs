//! One component of a single-file checkpoint seen under diffusers' names: the file's keys under
//! the component's prefix, renamed by its table, fused tensors split, 1×1 convs shown as Linear.
//! The mapping engine then matches it like any diffusers file.

use crate::mapping::rename::{diffusers_shape, Imported, RenameTable, Reshape};
use crate::tensor::{BytesFn, DType, RawTensor, TensorInfo, TensorSource};
use anyhow::{ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

#[derive(Clone, Debug)]
struct Entry {
    layout_key: String,
    op: Reshape,
    part: Option<(usize, usize)>,
}

pub struct ComponentView {
    source: Arc<dyn TensorSource>,
    pub table: RenameTable,
    entries: BTreeMap<String, Entry>,
    /// Keys under the prefix that the table names as not loaded by diffusers.
    pub ignored: Vec<String>,
    /// Keys under the prefix that the table does not know.
    pub unknown: Vec<String>,
    /// Tensors the file lacks and the table defines (an identity projection).
    synthetic: BTreeMap<String, RawTensor>,
}

/// The bytes of part `part` of a layout tensor (of `shape`, `elem`-byte values), re-arranged by
/// `op` (halves swapped, a matrix transposed).
fn arrange<'a>(layout_key: &str, op: Reshape, part: Option<(usize, usize)>, data: &'a [u8], shape: &[usize], elem: usize) -> Result<std::borrow::Cow<'a, [u8]>> {
    let data = match part {
        Some((k, n)) => {
            ensure!(data.len() % n == 0, "tensor `{layout_key}`: {} bytes do not split into {n} parts", data.len());
            let size = data.len() / n;
            &data[k * size..(k + 1) * size]
        }
        None => data,
    };
    Ok(match op {
        Reshape::SwapHalves => {
            ensure!(data.len() % 2 == 0, "tensor `{layout_key}`: {} bytes do not split into two halves", data.len());
            let half = data.len() / 2;
            std::borrow::Cow::Owned([&data[half..], &data[..half]].concat())
        }
        Reshape::Transpose => {
            let &[rows, cols] = shape else { anyhow::bail!("tensor `{layout_key}`: shape {shape:?} is not a matrix to transpose") };
            ensure!(data.len() == rows * cols * elem, "tensor `{layout_key}`: {} bytes do not hold {rows}x{cols} values", data.len());
            let mut out = vec![0u8; data.len()];
            for r in 0..rows {
                for c in 0..cols {
                    let (from, to) = ((r * cols + c) * elem, (c * rows + r) * elem);
                    out[to..to + elem].copy_from_slice(&data[from..from + elem]);
                }
            }
            std::borrow::Cow::Owned(out)
        }
        _ => std::borrow::Cow::Borrowed(data),
    })
}

/// The identity matrix `[d, d]` in `dtype`.
fn identity(d: usize, dtype: DType) -> RawTensor {
    let one: Vec<u8> = match dtype {
        DType::F32 => 1f32.to_le_bytes().to_vec(),
        DType::F16 => half::f16::ONE.to_le_bytes().to_vec(),
        DType::BF16 => half::bf16::ONE.to_le_bytes().to_vec(),
    };
    let mut data = vec![0u8; d * d * dtype.size()];
    for i in 0..d {
        let at = (i * d + i) * dtype.size();
        data[at..at + dtype.size()].copy_from_slice(&one);
    }
    RawTensor { dtype, shape: vec![d, d], data }
}

/// The flattened name under which LDM training keeps the EMA copy of a UNet weight:
/// `model.diffusion_model.a.b` -> `model_ema.diffusion_modelab` (`LitEma` drops the dots).
pub fn ema_key(layout_key: &str) -> Option<String> {
    let rest = layout_key.strip_prefix("model.")?;
    Some(format!("model_ema.{}", rest.replace('.', "")))
}

impl ComponentView {
    /// The component of `source` that `table` describes; with `ema`, UNet weights come from the
    /// file's EMA copy.
    pub fn new(source: Arc<dyn TensorSource>, table: RenameTable, ema: bool) -> Result<ComponentView> {
        let mut entries = BTreeMap::new();
        let (mut ignored, mut unknown) = (Vec::new(), Vec::new());
        let mut indexed: Vec<(String, usize)> = Vec::new();
        // Tables that rename the last repetition otherwise (Stability's last MMDiT block) need
        // it first.
        let last = if table.has_last_repeat_rules() {
            source
                .keys()
                .iter()
                .filter_map(|k| match table.import(k) {
                    Imported::Tensors(r) => r.first().and_then(|r| r.index),
                    _ => None,
                })
                .max()
        } else {
            None
        };
        for key in source.keys() {
            match table.import_in(&key, last) {
                Imported::Tensors(renamed) => {
                    for r in renamed {
                        if let Some(i) = r.index {
                            indexed.push((r.key.clone(), i));
                        }
                        entries.insert(r.key, Entry { layout_key: key.clone(), op: r.op, part: r.part });
                    }
                }
                Imported::Ignored => ignored.push(key),
                Imported::Unknown => unknown.push(key),
                Imported::Elsewhere => {}
            }
        }
        // A whole OpenCLIP tower: diffusers loads all blocks but the last (SD2 uses the
        // penultimate layer's output).
        if let Some(marker) = &table.drop_last_repeat_when {
            if source.contains(&format!("{}{marker}", table.prefix)) {
                if let Some(last) = indexed.iter().map(|(_, i)| *i).max() {
                    for (key, _) in indexed.iter().filter(|(_, i)| *i == last) {
                        if let Some(e) = entries.remove(key) {
                            if !ignored.contains(&e.layout_key) {
                                ignored.push(e.layout_key);
                            }
                        }
                    }
                }
            }
        }
        if ema && table.component == "unet" {
            for e in entries.values_mut() {
                let flat = ema_key(&e.layout_key).context("not a UNet key")?;
                ensure!(
                    source.contains(&flat),
                    "--ema: the file has no EMA copy of `{}` (`{flat}`){}",
                    e.layout_key,
                    if source.keys().iter().any(|k| k.starts_with("model_ema.")) { "" } else { "; it holds no EMA weights at all" }
                );
                e.layout_key = flat;
            }
        }
        let mut synthetic = BTreeMap::new();
        for (key, width) in &table.identity_if_missing {
            if entries.contains_key(key) {
                continue;
            }
            if let Some(e) = entries.get(width) {
                let info = source.info(&e.layout_key)?;
                let d = *info.shape.first().with_context(|| format!("tensor `{}`: a scalar", e.layout_key))?;
                synthetic.insert(key.clone(), identity(d, info.dtype));
            }
        }
        Ok(ComponentView { source, table, entries, ignored, unknown, synthetic })
    }

    /// True when the file holds any tensor of this component.
    pub fn is_present(&self) -> bool {
        !self.entries.is_empty()
    }

    /// The diffusers keys the file lacks and the view supplies (an identity projection).
    pub fn synthetic_keys(&self) -> Vec<String> {
        self.synthetic.keys().cloned().collect()
    }

    /// The file's own key behind a diffusers key.
    pub fn layout_key(&self, diffusers_key: &str) -> Option<String> {
        self.entries.get(diffusers_key).map(|e| e.layout_key.clone()).or_else(|| self.table.export(diffusers_key).map(|r| r.key))
    }
}

impl TensorSource for ComponentView {
    fn origin(&self) -> &Path {
        self.source.origin()
    }

    fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.entries.keys().chain(self.synthetic.keys()).cloned().collect();
        keys.sort();
        keys
    }

    fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key) || self.synthetic.contains_key(key)
    }

    fn info(&self, key: &str) -> Result<TensorInfo> {
        if let Some(t) = self.synthetic.get(key) {
            return Ok(TensorInfo { dtype: t.dtype, shape: t.shape.clone() });
        }
        let e = self.entries.get(key).with_context(|| format!("tensor {}: not found", self.describe(key)))?;
        let info = self.source.info(&e.layout_key)?;
        Ok(TensorInfo { dtype: info.dtype, shape: diffusers_shape(e.op, &info.shape, e.part).with_context(|| format!("tensor `{}`", e.layout_key))? })
    }

    fn read(&self, key: &str) -> Result<RawTensor> {
        if let Some(t) = self.synthetic.get(key) {
            return Ok(t.clone());
        }
        let e = self.entries.get(key).with_context(|| format!("tensor {}: not found", self.describe(key)))?;
        let raw = self.source.read(&e.layout_key)?;
        let shape = diffusers_shape(e.op, &raw.shape, e.part).with_context(|| format!("tensor `{}`", e.layout_key))?;
        let data = arrange(&e.layout_key, e.op, e.part, &raw.data, &raw.shape, raw.dtype.size())?.into_owned();
        Ok(RawTensor { dtype: raw.dtype, shape, data })
    }

    fn with_bytes(&self, key: &str, f: &mut BytesFn<'_>) -> Result<()> {
        if let Some(t) = self.synthetic.get(key) {
            return f(t.dtype, &t.shape, &t.data);
        }
        let e = self.entries.get(key).with_context(|| format!("tensor {}: not found", self.describe(key)))?;
        self.source.with_bytes(&e.layout_key, &mut |dtype, shape, data| {
            let out_shape = diffusers_shape(e.op, shape, e.part).with_context(|| format!("tensor `{}`", e.layout_key))?;
            f(dtype, &out_shape, &arrange(&e.layout_key, e.op, e.part, data, shape, dtype.size())?)
        })
    }

    fn describe(&self, key: &str) -> String {
        if self.synthetic.contains_key(key) {
            return format!("`{key}` (the identity; not in the file)");
        }
        match self.layout_key(key) {
            Some(l) => format!("`{l}` (diffusers `{key}`)"),
            None => format!("`{key}`"),
        }
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        self.source.metadata()
    }
}
