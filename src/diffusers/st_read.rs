//! Reads safetensors files through a memory map: one tensor at a time, no whole-file copy.

use crate::tensor::{DType, RawTensor, TensorSource};
pub use crate::tensor::TensorInfo as StInfo;
use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::{Metadata, SafeTensors};
use std::path::{Path, PathBuf};

pub struct StFile {
    pub path: PathBuf,
    map: memmap2::Mmap,
    header_len: usize,
    metadata: Metadata,
}

impl StFile {
    pub fn open(path: &Path) -> Result<StFile> {
        let file = std::fs::File::open(path).context("cannot open")?;
        // SAFETY: the map is read-only and the file is not modified while dreambridge runs.
        let map = unsafe { memmap2::Mmap::map(&file) }.context("cannot map")?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| anyhow::anyhow!("not a valid safetensors file ({e}; truncated?)"))?;
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

    /// A one-element tensor of any numeric dtype as f64 (LoRA alphas: kohya writes floats,
    /// diffusers' kohya conversion writes int64).
    pub fn read_scalar(&self, key: &str) -> Result<f64> {
        use safetensors::Dtype as D;
        let info = self.metadata.info(key).with_context(|| format!("tensor `{key}`: not found"))?;
        let count: usize = info.shape.iter().product();
        ensure!(count == 1, "tensor `{key}`: expected a single value, got shape {:?}", info.shape);
        let (start, end) = info.data_offsets;
        let base = 8 + self.header_len;
        ensure!(base + end <= self.map.len(), "tensor `{key}`: data runs past the end of the file (truncated?)");
        let b = &self.map[base + start..base + end];
        let fixed = |n: usize| -> Result<&[u8]> {
            ensure!(b.len() == n, "tensor `{key}`: {} bytes for one {:?}", b.len(), info.dtype);
            Ok(b)
        };
        Ok(match info.dtype {
            D::F64 => f64::from_le_bytes(fixed(8)?.try_into()?),
            D::F32 => f32::from_le_bytes(fixed(4)?.try_into()?) as f64,
            D::F16 => half::f16::from_le_bytes(fixed(2)?.try_into()?).to_f64(),
            D::BF16 => half::bf16::from_le_bytes(fixed(2)?.try_into()?).to_f64(),
            D::I64 => i64::from_le_bytes(fixed(8)?.try_into()?) as f64,
            D::I32 => i32::from_le_bytes(fixed(4)?.try_into()?) as f64,
            D::I16 => i16::from_le_bytes(fixed(2)?.try_into()?) as f64,
            D::U8 => fixed(1)?[0] as f64,
            other => bail!("tensor `{key}`: unsupported dtype {other:?} for a scalar"),
        })
    }

    pub fn read(&self, key: &str) -> Result<RawTensor> {
        let info = self.metadata.info(key).with_context(|| format!("tensor `{key}`: not found"))?;
        let dtype = DType::from_safetensors(info.dtype).with_context(|| format!("tensor `{key}`"))?;
        let (start, end) = info.data_offsets;
        let base = 8 + self.header_len;
        if base + end > self.map.len() {
            bail!("tensor `{key}`: data runs past the end of the file (truncated?)");
        }
        let data = self.map[base + start..base + end].to_vec();
        self.release(base + start, end - start);
        Ok(RawTensor { dtype, shape: info.shape.clone(), data })
    }

    /// Runs `f` on a tensor's bytes where they lie in the map (no copy), then drops those pages
    /// from the resident set as [`StFile::read`] does.
    pub fn with_bytes<R>(&self, key: &str, f: impl FnOnce(DType, &[usize], &[u8]) -> R) -> Result<R> {
        let info = self.metadata.info(key).with_context(|| format!("tensor `{key}`: not found"))?;
        let dtype = DType::from_safetensors(info.dtype).with_context(|| format!("tensor `{key}`"))?;
        let (start, end) = info.data_offsets;
        let base = 8 + self.header_len;
        ensure!(base + end <= self.map.len(), "tensor `{key}`: data runs past the end of the file (truncated?)");
        let out = f(dtype, &info.shape, &self.map[base + start..base + end]);
        self.release(base + start, end - start);
        Ok(out)
    }

    /// Drops the mapped pages of a range already copied out, so streaming a file through the map
    /// does not grow the resident set to the file's size (the page cache keeps them).
    fn release(&self, offset: usize, len: usize) {
        #[cfg(unix)]
        // SAFETY: a read-only mapping of a file not modified while dreambridge runs, and no
        // reference into the range outlives the copy above; discarded pages are read back from the
        // file if touched again.
        unsafe {
            let _ = self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len);
        }
    }
}

impl TensorSource for StFile {
    fn origin(&self) -> &Path {
        &self.path
    }
    fn keys(&self) -> Vec<String> {
        StFile::keys(self)
    }
    fn contains(&self, key: &str) -> bool {
        StFile::contains(self, key)
    }
    fn info(&self, key: &str) -> Result<StInfo> {
        StFile::info(self, key)
    }
    fn read(&self, key: &str) -> Result<RawTensor> {
        StFile::read(self, key)
    }
    fn with_bytes(&self, key: &str, f: &mut crate::tensor::BytesFn<'_>) -> Result<()> {
        StFile::with_bytes(self, key, f)?
    }
    fn metadata(&self) -> std::collections::BTreeMap<String, String> {
        StFile::metadata(self)
    }
}
