//! A tensor as raw little-endian bytes with its element type and shape.

use anyhow::{bail, Result};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The dtype's name in a safetensors header.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }

    pub fn from_safetensors(dtype: safetensors::Dtype) -> Result<DType> {
        Ok(match dtype {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => bail!("unsupported dtype {other:?} (expected F32, F16 or BF16)"),
        })
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        })
    }
}

/// A tensor's element type and shape, as a file's header states them.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// Named tensors read one at a time: a safetensors file, a torch pickle, or a view of either
/// under another layout's names. Errors name the tensor; callers add the file.
/// What [`TensorSource::with_bytes`] runs on a tensor: its dtype, shape and bytes.
pub type BytesFn<'a> = dyn FnMut(DType, &[usize], &[u8]) -> Result<()> + 'a;

pub trait TensorSource {
    /// The file the tensors come from (for messages).
    fn origin(&self) -> &std::path::Path;
    /// Tensor names, sorted.
    fn keys(&self) -> Vec<String>;
    fn contains(&self, key: &str) -> bool;
    fn info(&self, key: &str) -> Result<TensorInfo>;
    fn read(&self, key: &str) -> Result<RawTensor>;
    /// Runs `f` on `key`'s bytes (dtype, shape, data): where they lie for a mapped file, else
    /// after [`TensorSource::read`].
    fn with_bytes(&self, key: &str, f: &mut BytesFn<'_>) -> Result<()> {
        let raw = self.read(key)?;
        f(raw.dtype, &raw.shape, &raw.data)
    }
    /// How messages name `key` (a view names the file's own key beside diffusers').
    fn describe(&self, key: &str) -> String {
        format!("`{key}`")
    }
    /// The file's string metadata (safetensors `__metadata__`); empty where there is none.
    fn metadata(&self) -> std::collections::BTreeMap<String, String> {
        Default::default()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct RawTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    /// The values as f32 (exact for every supported dtype).
    pub fn to_f32_values(&self) -> Vec<f32> {
        match self.dtype {
            DType::F32 => bytemuck::pod_collect_to_vec(&self.data),
            DType::F16 => bytemuck::pod_collect_to_vec::<u8, f16>(&self.data).iter().map(|v| v.to_f32()).collect(),
            DType::BF16 => bytemuck::pod_collect_to_vec::<u8, bf16>(&self.data).iter().map(|v| v.to_f32()).collect(),
        }
    }

    /// An f32 tensor of `shape` holding `values`.
    pub fn from_f32(shape: &[usize], values: &[f32]) -> RawTensor {
        RawTensor { dtype: DType::F32, shape: shape.to_vec(), data: bytemuck::cast_slice(values).to_vec() }
    }

    /// The same tensor in `dtype` (round to nearest when narrowing; a no-op when equal).
    pub fn cast(self, dtype: DType) -> RawTensor {
        if dtype == self.dtype {
            return self;
        }
        let mut data = Vec::new();
        cast_into(self.dtype, &self.data, dtype, &mut data);
        RawTensor { dtype, shape: self.shape, data }
    }
}

/// `buf` holding exactly `len` bytes, reusing its memory: it is only zeroed where it grows, so
/// the caller must overwrite every byte. Conversions keep a few such buffers for all their
/// tensors instead of fresh pages per tensor.
pub fn reuse(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len {
        buf.resize(len, 0);
    }
    buf.truncate(len);
    buf
}

/// Little-endian elements of `from` (any alignment) re-encoded as `to` into `out` (its memory
/// reused): exact when widening, round to nearest even when narrowing, in cache-sized blocks
/// through the `half` crate's slice conversions (F16C where the CPU has it).
pub fn cast_into(from: DType, src: &[u8], to: DType, out: &mut Vec<u8>) {
    const BLOCK: usize = 4096;
    let count = src.len() / from.size();
    let dst = reuse(out, count * to.size());
    if from == to {
        dst.copy_from_slice(src);
        return;
    }
    let mut wide = [0f32; BLOCK];
    let mut narrow = [0u16; BLOCK];
    for (s, d) in src.chunks(BLOCK * from.size()).zip(dst.chunks_mut(BLOCK * to.size())) {
        let n = s.len() / from.size();
        let wide = &mut wide[..n];
        match from {
            DType::F32 => bytemuck::cast_slice_mut::<f32, u8>(wide).copy_from_slice(s),
            DType::F16 | DType::BF16 => {
                let narrow = &mut narrow[..n];
                bytemuck::cast_slice_mut::<u16, u8>(narrow).copy_from_slice(s);
                if from == DType::F16 {
                    bytemuck::cast_slice::<u16, f16>(narrow).convert_to_f32_slice(wide);
                } else {
                    bytemuck::cast_slice::<u16, bf16>(narrow).convert_to_f32_slice(wide);
                }
            }
        }
        match to {
            DType::F32 => d.copy_from_slice(bytemuck::cast_slice(wide)),
            DType::F16 | DType::BF16 => {
                let narrow = &mut narrow[..n];
                if to == DType::F16 {
                    bytemuck::cast_slice_mut::<u16, f16>(narrow).convert_from_f32_slice(wide);
                } else {
                    bytemuck::cast_slice_mut::<u16, bf16>(narrow).convert_from_f32_slice(wide);
                }
                d.copy_from_slice(bytemuck::cast_slice(narrow));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_casts_equal_the_scalar_roundings_at_any_alignment() {
        // A spread of f32 bit patterns (normals, subnormals, infinities, NaNs), unaligned.
        let values: Vec<f32> = (0..300_000u64).map(|i| f32::from_bits((i * 14_323) as u32 ^ (i as u32).rotate_left(19))).collect();
        let mut src = vec![0u8];
        src.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        let src = &src[1..];
        let (mut h, mut b, mut back) = (Vec::new(), Vec::new(), Vec::new());
        cast_into(DType::F32, src, DType::F16, &mut h);
        cast_into(DType::F32, src, DType::BF16, &mut b);
        let scalar_h: Vec<u8> = values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect();
        let scalar_b: Vec<u8> = values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect();
        assert!(h == scalar_h && b == scalar_b);
        cast_into(DType::F16, &h, DType::F32, &mut back);
        let widened: Vec<u8> = h.chunks(2).flat_map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32().to_le_bytes()).collect();
        assert!(back == widened);
        // A reused buffer that shrinks keeps no stale tail.
        cast_into(DType::F32, &src[..8], DType::F16, &mut h);
        assert_eq!(h, scalar_h[..4]);
    }

    #[test]
    fn casts_round_trip_through_half() {
        let t = RawTensor { dtype: DType::F32, shape: vec![3], data: [1.0f32, -2.5, 65504.0].iter().flat_map(|v| v.to_le_bytes()).collect() };
        let h = t.clone().cast(DType::F16);
        assert_eq!(h.data.len(), 6);
        assert_eq!(h.cast(DType::F32), t);
        let b = t.clone().cast(DType::BF16);
        assert_eq!(b.to_f32_values()[1], -2.5);
    }
}
