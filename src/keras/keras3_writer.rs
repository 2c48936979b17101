//! Writes Keras 3 `.weights.h5` files: each variable a dataset `<layer path>/vars/<n>`, found by
//! Keras' loader by that path alone (`H5IOStore.get`).

use crate::tensor::{DType, RawTensor};
use anyhow::{Context, Result};
use std::path::Path;

pub struct Keras3Writer {
    file: hdf5::File,
}

impl Keras3Writer {
    /// Creates the file with the root groups Keras writes (`layers`, `vars`).
    pub fn create(path: &Path) -> Result<Keras3Writer> {
        let file = hdf5::File::create(path).map_err(|e| anyhow::anyhow!("{}: cannot create HDF5 file ({e})", path.display()))?;
        let writer = Keras3Writer { file };
        writer.group("layers")?;
        writer.group("vars")?;
        Ok(writer)
    }

    /// The group at `path`, created with its parents where missing.
    fn group(&self, path: &str) -> Result<hdf5::Group> {
        let mut at = String::new();
        let mut group = self.file.group("/")?;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            group = if self.file.link_exists(&at) { self.file.group(&at)? } else { group.create_group(part).with_context(|| format!("group `{at}`: cannot create"))? };
        }
        Ok(group)
    }

    /// Writes one variable at `path` (`layers/.../vars/0`) in its own type; bfloat16 as Keras 3
    /// stores it (a 2-byte opaque type with the attribute `dtype` = "bfloat16").
    pub fn write(&self, path: &str, tensor: RawTensor) -> Result<()> {
        let (dir, name) = path.rsplit_once('/').with_context(|| format!("`{path}` has no group"))?;
        let g = self.group(dir)?;
        let shape = tensor.shape.clone();
        let written = match tensor.dtype {
            DType::BF16 => super::h5ffi::write_opaque(&g, name, &shape, &tensor.data, None, Some("bfloat16")).map_err(|e| hdf5::Error::from(e.to_string().as_str())),
            DType::F32 => {
                let v: Vec<f32> = bytemuck::pod_collect_to_vec(&tensor.data);
                g.new_dataset_builder().with_data(&ndarray::ArrayView::from_shape(shape, &v)?).create(name).map(|_| ())
            }
            _ => {
                let v: Vec<half::f16> = bytemuck::pod_collect_to_vec(&tensor.data);
                g.new_dataset_builder().with_data(&ndarray::ArrayView::from_shape(shape, &v)?).create(name).map(|_| ())
            }
        };
        written.map_err(|e| anyhow::anyhow!("tensor `{path}`: cannot write ({e})"))
    }

    pub fn finish(self) -> Result<()> {
        self.file.flush()?;
        self.file.close()?;
        Ok(())
    }
}
