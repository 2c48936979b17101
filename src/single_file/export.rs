//! Writes one single-file checkpoint from diffusers-named tensors of any origin (a diffusers
//! folder, KerasCV files seen through their tables, a trained model): each tensor renamed by
//! its component's table, fused tensors assembled from their parts, streamed one tensor at a
//! time into a safetensors file that appears only once complete.

use crate::diffusers::st_write::{PendingTensor, StWriter};
use crate::mapping::rename::{layout_shape, RenameTable};
use crate::output::atomic_file;
use crate::progress::Progress;
use crate::tensor::{DType, RawTensor, TensorInfo};
use anyhow::{ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// A diffusers tensor to export: its key, dtype and diffusers shape, and how to read it in
/// diffusers' layout.
pub struct ExportTensor<'a> {
    pub key: String,
    pub info: TensorInfo,
    pub read: Box<dyn Fn() -> Result<RawTensor> + 'a>,
}

/// One component's tensors and its table.
pub struct ExportComponent<'a> {
    pub table: RenameTable,
    pub tensors: Vec<ExportTensor<'a>>,
}

/// One output tensor and the (component, tensor) inputs it is made of, in order.
struct Output {
    key: String,
    dtype: DType,
    shape: Vec<usize>,
    parts: Vec<(usize, usize)>,
}

fn plan_outputs(components: &[ExportComponent], dtype: Option<DType>) -> Result<Vec<Output>> {
    let mut outputs: Vec<Output> = Vec::new();
    let mut fused: BTreeMap<String, (usize, Vec<Option<(usize, usize)>>)> = BTreeMap::new();
    for (c, comp) in components.iter().enumerate() {
        for (i, t) in comp.tensors.iter().enumerate() {
            let r = comp
                .table
                .export(&t.key)
                .with_context(|| format!("tensor `{}`: the {} table has no name for it", t.key, comp.table.component))?;
            match r.part {
                None => outputs.push(Output {
                    key: r.key,
                    dtype: dtype.unwrap_or(t.info.dtype),
                    shape: layout_shape(r.op, &t.info.shape),
                    parts: vec![(c, i)],
                }),
                Some((k, n)) => {
                    let slot = fused.entry(r.key.clone()).or_insert_with(|| {
                        outputs.push(Output { key: r.key.clone(), dtype: dtype.unwrap_or(t.info.dtype), shape: vec![], parts: vec![] });
                        (outputs.len() - 1, vec![None; n])
                    });
                    slot.1[k] = Some((c, i));
                }
            }
        }
    }
    for (key, (at, parts)) in fused {
        let parts: Vec<(usize, usize)> =
            parts.iter().enumerate().map(|(k, p)| p.with_context(|| format!("`{key}`: part {k} of {} is missing", parts.len()))).collect::<Result<_>>()?;
        let infos: Vec<&TensorInfo> = parts.iter().map(|(c, i)| &components[*c].tensors[*i].info).collect();
        let rest = &infos[0].shape[1..];
        for (info, (c, i)) in infos.iter().zip(&parts) {
            ensure!(
                !info.shape.is_empty() && &info.shape[1..] == rest,
                "`{key}`: part `{}` has shape {:?}, unlike {:?}",
                components[*c].tensors[*i].key,
                info.shape,
                infos[0].shape
            );
        }
        let mut shape = vec![infos.iter().map(|i| i.shape[0]).sum()];
        shape.extend_from_slice(rest);
        outputs[at].shape = shape;
        outputs[at].parts = parts;
    }
    let mut seen = std::collections::BTreeSet::new();
    for o in &outputs {
        ensure!(seen.insert(o.key.as_str()), "two tensors export to `{}`", o.key);
    }
    Ok(outputs)
}

/// Writes `components` to `path` (fp16 when `dtype` says so) with `metadata` in the header;
/// returns the number of tensors written. `path` appears only once the file is complete.
pub fn write_single_file(path: &Path, components: &[ExportComponent], dtype: Option<DType>, metadata: &BTreeMap<String, String>) -> Result<usize> {
    let outputs = plan_outputs(components, dtype)?;
    let pending: Vec<PendingTensor> = outputs.iter().map(|o| PendingTensor { key: o.key.clone(), dtype: o.dtype, shape: o.shape.clone() }).collect();
    let total: u64 = pending.iter().map(|p| (p.shape.iter().product::<usize>() * p.dtype.size()) as u64).sum();
    let name = path.file_name().unwrap_or_default().to_string_lossy().to_string();
    atomic_file(path, |temp| {
        let progress = Progress::new(&name, total);
        let mut writer = StWriter::create_with_metadata(temp, pending.clone(), metadata)?;
        for o in &outputs {
            let mut data = Vec::new();
            for (c, i) in &o.parts {
                let t = &components[*c].tensors[*i];
                let raw = (t.read)().with_context(|| format!("tensor `{}`", t.key))?;
                ensure!(raw.shape == t.info.shape, "tensor `{}`: read shape {:?}, expected {:?}", t.key, raw.shape, t.info.shape);
                let raw = raw.cast(o.dtype);
                if o.parts.len() == 1 {
                    data = raw.data;
                } else {
                    data.extend_from_slice(&raw.data);
                }
            }
            let tensor = RawTensor { dtype: o.dtype, shape: o.shape.clone(), data };
            writer.write_next(&o.key, &tensor)?;
            progress.advance(&o.key, tensor.data.len() as u64);
        }
        writer.finish()?;
        progress.finish(&format!("{} tensors -> {name}", outputs.len()));
        Ok(())
    })?;
    Ok(outputs.len())
}
