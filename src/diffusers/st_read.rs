//! Reads safetensors files through a memory map: one tensor at a time, no whole-file copy.

use crate::tensor::{DType, RawTensor};
use anyhow::{bail, Context, Result};
use safetensors::tensor::{Metadata, SafeTensors};
use std::path::{Path, PathBuf};

pub struct StFile {
    pub path: PathBuf,
    map: memmap2::Mmap,
    header_len: usize,
    metadata: Metadata,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl StFile {
    pub fn open(path: &Path) -> Result<StFile> {
        let file = std::fs::File::open(path).context("cannot open")?;
        // SAFETY: the map is read-only and the file is not modified while dreambridge runs.
        let map = unsafe { memmap2::Mmap::map(&file) }.context("cannot map")?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| anyhow::anyhow!("not a valid safetensors file: {e}"))?;
        Ok(StFile { path: path.to_owned(), map, header_len, metadata })
    }

    /// Tensor names, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.metadata.tensors().into_keys().collect();
        keys.sort();
        keys
    }

    /// The header's `__metadata__` string map (empty when the file has none).
    pub fn metadata(&self) -> std::collections::BTreeMap<String, String> {
        self.metadata.metadata().iter().flatten().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn contains(&self, key: &str) -> bool {
        self.metadata.info(key).is_some()
    }

    pub fn info(&self, key: &str) -> Result<StInfo> {
        let info = self.metadata.info(key).with_context(|| format!("tensor `{key}`: not found"))?;
        Ok(StInfo { dtype: DType::from_safetensors(info.dtype).with_context(|| format!("tensor `{key}`"))?, shape: info.shape.clone() })
    }

    pub fn read(&self, key: &str) -> Result<RawTensor> {
        let info = self.metadata.info(key).with_context(|| format!("tensor `{key}`: not found"))?;
        let dtype = DType::from_safetensors(info.dtype).with_context(|| format!("tensor `{key}`"))?;
        let (start, end) = info.data_offsets;
        let base = 8 + self.header_len;
        if base + end > self.map.len() {
            bail!("tensor `{key}`: data runs past the end of the file (truncated?)");
        }
        Ok(RawTensor { dtype, shape: info.shape.clone(), data: self.map[base + start..base + end].to_vec() })
    }
}
