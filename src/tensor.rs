//! A tensor as raw little-endian bytes with its element type and shape.

use anyhow::{bail, Result};
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
pub trait TensorSource {
    /// The file the tensors come from (for messages).
    fn origin(&self) -> &std::path::Path;
    /// Tensor names, sorted.
    fn keys(&self) -> Vec<String>;
    fn contains(&self, key: &str) -> bool;
    fn info(&self, key: &str) -> Result<TensorInfo>;
    fn read(&self, key: &str) -> Result<RawTensor>;
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
        let values = self.to_f32_values();
        let data = match dtype {
            DType::F32 => bytemuck::cast_slice(&values).to_vec(),
            DType::F16 => bytemuck::cast_slice(&values.iter().map(|v| f16::from_f32(*v)).collect::<Vec<_>>()).to_vec(),
            DType::BF16 => bytemuck::cast_slice(&values.iter().map(|v| bf16::from_f32(*v)).collect::<Vec<_>>()).to_vec(),
        };
        RawTensor { dtype, shape: self.shape, data }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
