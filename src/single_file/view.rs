//! One component of a single-file checkpoint seen under diffusers' names: the file's keys under
//! the component's prefix, renamed by its table, fused tensors split, 1×1 convs shown as Linear.
//! The mapping engine then matches it like any diffusers file.

use crate::mapping::rename::{diffusers_shape, Imported, RenameTable, Reshape};
use crate::tensor::{BytesFn, RawTensor, TensorInfo, TensorSource};
use anyhow::{bail, ensure, Context, Result};
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
        for key in source.keys() {
            match table.import(&key) {
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
        Ok(ComponentView { source, table, entries, ignored, unknown })
    }

    /// True when the file holds any tensor of this component.
    pub fn is_present(&self) -> bool {
        !self.entries.is_empty()
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
        self.entries.keys().cloned().collect()
    }

    fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    fn info(&self, key: &str) -> Result<TensorInfo> {
        let e = self.entries.get(key).with_context(|| format!("tensor {}: not found", self.describe(key)))?;
        let info = self.source.info(&e.layout_key)?;
        Ok(TensorInfo { dtype: info.dtype, shape: diffusers_shape(e.op, &info.shape, e.part).with_context(|| format!("tensor `{}`", e.layout_key))? })
    }

    fn read(&self, key: &str) -> Result<RawTensor> {
        let e = self.entries.get(key).with_context(|| format!("tensor {}: not found", self.describe(key)))?;
        let raw = self.source.read(&e.layout_key)?;
        let shape = diffusers_shape(e.op, &raw.shape, e.part).with_context(|| format!("tensor `{}`", e.layout_key))?;
        let data = match e.part {
            Some((k, n)) => {
                if raw.data.len() % n != 0 {
                    bail!("tensor `{}`: {} bytes do not split into {n} parts", e.layout_key, raw.data.len());
                }
                let size = raw.data.len() / n;
                raw.data[k * size..(k + 1) * size].to_vec()
            }
            None => raw.data,
        };
        Ok(RawTensor { dtype: raw.dtype, shape, data })
    }

    fn with_bytes(&self, key: &str, f: &mut BytesFn<'_>) -> Result<()> {
        let e = self.entries.get(key).with_context(|| format!("tensor {}: not found", self.describe(key)))?;
        self.source.with_bytes(&e.layout_key, &mut |dtype, shape, data| {
            let shape = diffusers_shape(e.op, shape, e.part).with_context(|| format!("tensor `{}`", e.layout_key))?;
            let data = match e.part {
                Some((k, n)) => {
                    ensure!(data.len() % n == 0, "tensor `{}`: {} bytes do not split into {n} parts", e.layout_key, data.len());
                    let size = data.len() / n;
                    &data[k * size..(k + 1) * size]
                }
                None => data,
            };
            f(dtype, &shape, data)
        })
    }

    fn describe(&self, key: &str) -> String {
        match self.layout_key(key) {
            Some(l) => format!("`{l}` (diffusers `{key}`)"),
            None => format!("`{key}`"),
        }
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        self.source.metadata()
    }
}
