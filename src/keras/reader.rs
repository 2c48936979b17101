//! Opens KerasCV weight files: Keras-2 legacy `.h5` (`save_weights`, or `model.save` with its
//! `model_weights` group) and Keras-3 `.weights.h5`. Legacy files are read by the order of
//! `layer_names` / `weight_names`, never by the (session-dependent) names themselves.

use super::strings::{read_string, read_string_list};
use crate::tensor::{DType, RawTensor};
use anyhow::{bail, Context, Result};
use hdf5::types::{FloatSize, TypeDescriptor};
use std::io::Read;
use std::path::{Path, PathBuf};

const HDF5_SIGNATURE: &[u8; 8] = b"\x89HDF\r\n\x1a\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KerasFormat {
    /// Keras 2 `save_weights("x.h5")`: ordered `layer_names` / `weight_names` attributes.
    Legacy,
    /// Keras 3 `save_weights("x.weights.h5")`: `layers/<key>/.../vars/<n>` paths.
    Keras3,
}

/// A weighted layer of a legacy file: group name and dataset paths, in file order.
#[derive(Clone, Debug)]
pub struct KerasLayer {
    pub name: String,
    pub weights: Vec<String>,
}

pub struct KerasFile {
    pub path: PathBuf,
    pub format: KerasFormat,
    /// Weighted layers in `layer_names` order (legacy files only).
    pub layers: Vec<KerasLayer>,
    pub keras_version: Option<String>,
    file: hdf5::File,
}

/// Shape and dtype of a dataset, without reading it.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl KerasFile {
    pub fn open(path: &Path) -> Result<KerasFile> {
        check_signature(path)?;
        let file = hdf5::File::open(path).map_err(|e| anyhow::anyhow!("cannot open as HDF5 ({e}); is the file truncated?"))?;
        let root: hdf5::Group = if read_string_list(&file, "layer_names")?.is_none() && file.link_exists("model_weights") {
            file.group("model_weights")? // full-model save: weights live one level down
        } else {
            file.group("/")?
        };
        let keras_version = read_string(&root, "keras_version")?;
        if let Some(names) = read_string_list(&root, "layer_names")? {
            let mut layers = Vec::new();
            for name in names {
                let group = root.group(&name).with_context(|| format!("layer `{name}` is listed in layer_names but missing"))?;
                let weights = read_string_list(&group, "weight_names")?.unwrap_or_default();
                if !weights.is_empty() {
                    let base = root.name();
                    let prefix = if base == "/" { String::new() } else { format!("{}/", base.trim_start_matches('/')) };
                    let weights = weights.iter().map(|w| format!("{prefix}{name}/{w}")).collect();
                    layers.push(KerasLayer { name, weights });
                }
            }
            return Ok(KerasFile { path: path.to_owned(), format: KerasFormat::Legacy, layers, keras_version, file });
        }
        if file.link_exists("layers") {
            return Ok(KerasFile { path: path.to_owned(), format: KerasFormat::Keras3, layers: Vec::new(), keras_version, file });
        }
        bail!("not a Keras weights file: no `layer_names` attribute and no `layers` group")
    }

    pub fn has_dataset(&self, path: &str) -> bool {
        // link_exists needs every parent to exist; walk down so a missing parent is just "absent".
        let mut prefix = String::new();
        for part in path.split('/') {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if !self.file.link_exists(&prefix) {
                return false;
            }
        }
        true
    }

    pub fn info(&self, path: &str) -> Result<DatasetInfo> {
        let ds = self.file.dataset(path).with_context(|| format!("tensor `{path}`: not found"))?;
        Ok(DatasetInfo { dtype: float_dtype(&ds, path)?, shape: ds.shape() })
    }

    /// Reads one dataset as raw little-endian bytes in its own float type.
    pub fn read(&self, path: &str) -> Result<RawTensor> {
        let ds = self.file.dataset(path).with_context(|| format!("tensor `{path}`: not found"))?;
        let dtype = float_dtype(&ds, path)?;
        let fail = |e: hdf5::Error| anyhow::anyhow!("tensor `{path}`: cannot read data ({e}); is the file truncated?");
        // Native (little-endian) element bytes; libhdf5 converts big-endian files on read.
        let data: Vec<u8> = match dtype {
            DType::F32 => bytemuck::cast_slice(&ds.read_raw::<f32>().map_err(fail)?).to_vec(),
            _ => bytemuck::cast_slice(&ds.read_raw::<half::f16>().map_err(fail)?).to_vec(),
        };
        Ok(RawTensor { dtype, shape: ds.shape(), data })
    }

    /// Every dataset under `layers/` (Keras 3) with its info, sorted by path.
    pub fn keras3_datasets(&self) -> Result<Vec<(String, DatasetInfo)>> {
        let mut out = Vec::new();
        collect_datasets(&self.file.group("layers")?, "layers", &mut out)?;
        out.sort();
        out.into_iter().map(|p| Ok((p.clone(), self.info(&p)?))).collect()
    }
}

fn collect_datasets(group: &hdf5::Group, path: &str, out: &mut Vec<String>) -> Result<()> {
    for name in group.member_names()? {
        let child = format!("{path}/{name}");
        if let Ok(g) = group.group(&name) {
            collect_datasets(&g, &child, out)?;
        } else {
            out.push(child);
        }
    }
    Ok(())
}

fn float_dtype(ds: &hdf5::Dataset, path: &str) -> Result<DType> {
    match ds.dtype()?.to_descriptor()? {
        TypeDescriptor::Float(FloatSize::U4) => Ok(DType::F32),
        TypeDescriptor::Float(FloatSize::U2) => Ok(DType::F16),
        other => bail!("tensor `{path}`: unsupported element type {other:?} (expected float32 or float16)"),
    }
}

/// HDF5 files start with an 8-byte signature at offset 0, 512, 1024, 2048, … (after a user block).
fn check_signature(path: &Path) -> Result<()> {
    let mut file = std::fs::File::open(path).context("cannot open")?;
    let len = file.metadata()?.len();
    let mut head = vec![0u8; len.min(1 << 16) as usize];
    file.read_exact(&mut head)?;
    let mut offset = 0usize;
    while offset + 8 <= head.len() {
        if &head[offset..offset + 8] == HDF5_SIGNATURE {
            return Ok(());
        }
        offset = if offset == 0 { 512 } else { offset * 2 };
    }
    bail!("not an HDF5 file (no HDF5 signature)")
}
