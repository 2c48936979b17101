//! Writes Keras-2 legacy weight files (`layer_names`, `backend`, `keras_version`, per-layer
//! `weight_names`), which both Keras 2 and Keras 3 `load_weights` read by position.

use crate::tensor::{DType, RawTensor};
use anyhow::{bail, Context, Result};
use hdf5::types::{FixedAscii, TypeDescriptor};
use ndarray::Array1;
use std::path::Path;

/// Keras splits an attribute above this many bytes into `name0`, `name1`, … (HDF5 object header limit).
const HDF5_OBJECT_HEADER_LIMIT: usize = 64512;
const KERAS_VERSION: &str = "2.14.0";

pub struct LegacyWriter {
    file: hdf5::File,
}

impl LegacyWriter {
    /// Creates the file with its root attributes; `layer_names` lists the weighted layers in order.
    pub fn create(path: &Path, layer_names: &[String]) -> Result<LegacyWriter> {
        let file = h5(hdf5::File::create(path)).context("cannot create HDF5 file")?;
        write_scalar_string(&file, "backend", "tensorflow")?;
        write_scalar_string(&file, "keras_version", KERAS_VERSION)?;
        write_string_list(&file, "layer_names", layer_names)?;
        Ok(LegacyWriter { file })
    }

    /// Creates a layer group with its `weight_names` (names relative to the group).
    pub fn begin_layer(&self, group: &str, weight_names: &[String]) -> Result<()> {
        let g = h5(self.file.create_group(group)).with_context(|| format!("layer `{group}`"))?;
        write_string_list(&g, "weight_names", weight_names)
    }

    /// Writes one weight as `<group>/<weight_name>`, keeping its float type (bf16 becomes f32,
    /// which HDF5 has no type for).
    pub fn write(&self, group: &str, weight_name: &str, tensor: RawTensor) -> Result<()> {
        let tensor = if tensor.dtype == DType::BF16 { tensor.cast(DType::F32) } else { tensor };
        let path = format!("{group}/{weight_name}");
        let g = h5(self.file.group(group))?;
        let result = match tensor.dtype {
            DType::F32 => {
                let v: Vec<f32> = bytemuck::pod_collect_to_vec(&tensor.data);
                g.new_dataset_builder().with_data(&ndarray::ArrayView::from_shape(tensor.shape.clone(), &v)?).create(weight_name)
            }
            _ => {
                let v: Vec<half::f16> = bytemuck::pod_collect_to_vec(&tensor.data);
                g.new_dataset_builder().with_data(&ndarray::ArrayView::from_shape(tensor.shape.clone(), &v)?).create(weight_name)
            }
        };
        h5(result).with_context(|| format!("tensor `{path}`: cannot write"))?;
        Ok(())
    }

    /// Creates `<group>/<weight_name>` with its storage allocated at once and never filled, and
    /// returns where in the file its bytes go (None where HDF5 gives no such place: then
    /// [`LegacyWriter::write`] it). The caller writes the bytes there itself, so large tensors
    /// stream from the converting thread to disk without libhdf5's copies.
    pub fn create_placed(&self, group: &str, weight_name: &str, dtype: DType, shape: &[usize]) -> Result<Option<u64>> {
        use hdf5::dataset::{AllocTime, FillTime};
        let g = h5(self.file.group(group))?;
        let builder = match dtype {
            DType::F32 => g.new_dataset::<f32>(),
            DType::F16 => g.new_dataset::<half::f16>(),
            DType::BF16 => bail!("bf16 has no HDF5 type; cast to f32 first"),
        };
        let ds = h5(builder.shape(shape.to_vec()).alloc_time(Some(AllocTime::Early)).fill_time(FillTime::Never).create(weight_name))
            .with_context(|| format!("tensor `{group}/{weight_name}`: cannot create"))?;
        Ok(ds.offset())
    }

    /// Writes the bytes of a dataset made by [`LegacyWriter::create_placed`] that has no place.
    pub fn write_unplaced(&self, group: &str, weight_name: &str, dtype: DType, data: &[u8]) -> Result<()> {
        let ds = h5(self.file.dataset(&format!("{group}/{weight_name}")))?;
        let written = match dtype {
            DType::F32 => ds.write_raw(&bytemuck::pod_collect_to_vec::<u8, f32>(data)),
            _ => ds.write_raw(&bytemuck::pod_collect_to_vec::<u8, half::f16>(data)),
        };
        h5(written).with_context(|| format!("tensor `{group}/{weight_name}`: cannot write"))
    }

    pub fn finish(self) -> Result<()> {
        h5(self.file.flush())?;
        h5(self.file.close())?;
        Ok(())
    }
}

/// An HDF5 error in one line. A failed system call (a full disk, say) becomes the OS error it
/// carries; HDF5's own report spans several lines and names the file by its staging path.
fn h5<T>(r: hdf5::Result<T>) -> Result<T> {
    r.map_err(|e| {
        let text = e.to_string();
        let errno = text.split("errno = ").nth(1).and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse::<i32>().ok());
        match errno {
            Some(n) => anyhow::Error::from(std::io::Error::from_raw_os_error(n)),
            None => anyhow::anyhow!("{}", text.lines().next().unwrap_or("HDF5 error").trim()),
        }
    })
}

fn fixed(s: &str) -> Result<FixedAscii<512>> {
    FixedAscii::<512>::from_ascii(s.as_bytes()).with_context(|| format!("name `{s}` is not ASCII or longer than 512"))
}

fn write_scalar_string(loc: &hdf5::Location, name: &str, value: &str) -> Result<()> {
    let data = ndarray::arr0(fixed(value)?);
    h5(loc.new_attr_builder().with_data_as(data.view(), &TypeDescriptor::FixedAscii(value.len().max(1))).create(name))?;
    Ok(())
}

/// Writes a 1-D fixed-length string attribute, split like Keras when it would exceed the header limit.
fn write_string_list(loc: &hdf5::Location, name: &str, values: &[String]) -> Result<()> {
    let width = values.iter().map(String::len).max().unwrap_or(0).max(1);
    let chunks = (values.len() * width).div_ceil(HDF5_OBJECT_HEADER_LIMIT).max(1);
    if values.is_empty() {
        // Keras writes weightless layers' weight_names as an empty float64 array; mirror that.
        h5(loc.new_attr::<f64>().shape(0).create(name))?;
        return Ok(());
    }
    let per_chunk = values.len().div_ceil(chunks);
    for (i, part) in values.chunks(per_chunk).enumerate() {
        let attr_name = if chunks == 1 { name.to_string() } else { format!("{name}{i}") };
        let data: Array1<FixedAscii<512>> = part.iter().map(|s| fixed(s)).collect::<Result<Vec<_>>>()?.into();
        if part.iter().any(|s| s.len() > 512) {
            bail!("name too long in `{attr_name}`");
        }
        h5(loc.new_attr_builder().with_data_as(data.view(), &TypeDescriptor::FixedAscii(width)).create(attr_name.as_str()))?;
    }
    Ok(())
}
