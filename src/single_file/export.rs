//! Writes one single-file checkpoint from diffusers-named tensors of any origin (a diffusers
//! folder, KerasCV files seen through their tables, a trained model): each tensor renamed by
//! its component's table, fused tensors assembled from their parts, streamed in pieces
//! ([`crate::convert::stream`]) into a safetensors file that appears only once complete.

use crate::convert::stream::{total_bytes, write_outputs, Origin, Output, Part};
use crate::diffusers::st_write::{PendingTensor, StWriter};
use crate::mapping::op::Op;
use crate::mapping::rename::{layout_shape, RenameTable};
use crate::output::atomic_file;
use crate::progress::Progress;
use crate::tensor::{DType, TensorInfo};
use anyhow::{ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// A diffusers tensor to export: its key, dtype and diffusers shape, and where its bytes come
/// from (a tensor of some origin, re-laid-out by a KerasCV table's op or as it is).
pub struct ExportTensor<'a> {
    pub key: String,
    pub info: TensorInfo,
    pub origin: Origin<'a>,
    pub source_key: String,
    pub op: Option<Op>,
}

/// One component's tensors and its table.
pub struct ExportComponent<'a> {
    pub table: RenameTable,
    pub tensors: Vec<ExportTensor<'a>>,
}

/// One output tensor and the (component, tensor) inputs it is made of, in order.
struct Planned {
    key: String,
    dtype: DType,
    shape: Vec<usize>,
    parts: Vec<(usize, usize)>,
}

fn plan_outputs(components: &[ExportComponent], dtype: Option<DType>) -> Result<Vec<Planned>> {
    let mut outputs: Vec<Planned> = Vec::new();
    let mut fused: BTreeMap<String, (usize, Vec<Option<(usize, usize)>>)> = BTreeMap::new();
    for (c, comp) in components.iter().enumerate() {
        for (i, t) in comp.tensors.iter().enumerate() {
            let r = comp
                .table
                .export(&t.key)
                .with_context(|| format!("tensor `{}`: the {} table has no name for it", t.key, comp.table.component))?;
            match r.part {
                None => outputs.push(Planned {
                    key: r.key,
                    dtype: dtype.unwrap_or(t.info.dtype),
                    shape: layout_shape(r.op, &t.info.shape),
                    parts: vec![(c, i)],
                }),
                Some((k, n)) => {
                    let slot = fused.entry(r.key.clone()).or_insert_with(|| {
                        outputs.push(Planned { key: r.key.clone(), dtype: dtype.unwrap_or(t.info.dtype), shape: vec![], parts: vec![] });
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
    let planned = plan_outputs(components, dtype)?;
    let outputs: Vec<Output> = planned
        .iter()
        .map(|o| Output {
            tensor: PendingTensor { key: o.key.clone(), dtype: o.dtype, shape: o.shape.clone() },
            parts: o
                .parts
                .iter()
                .map(|(c, i)| {
                    let t = &components[*c].tensors[*i];
                    Part::whole(t.origin, t.source_key.clone(), t.op, t.info.shape.iter().product())
                })
                .collect(),
        })
        .collect();
    let name = path.file_name().unwrap_or_default().to_string_lossy().to_string();
    atomic_file(path, |temp| {
        let progress = Progress::new(&name, total_bytes(&outputs));
        let pending = outputs.iter().map(|o| o.tensor.clone()).collect();
        write_outputs(StWriter::create_with_metadata(temp, pending, metadata)?, &outputs, &progress)?;
        progress.finish(&format!("{} tensors -> {name}", outputs.len()));
        Ok(())
    })?;
    Ok(outputs.len())
}
