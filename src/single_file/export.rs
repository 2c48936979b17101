//! Writes one single-file checkpoint from diffusers-named tensors of any origin (a diffusers
//! folder, KerasCV files seen through their tables, a trained model): each tensor renamed by
//! its component's table, fused tensors assembled from their parts, streamed in pieces
//! ([`crate::convert::stream`]) into a safetensors file that appears only once complete.

use crate::convert::stream::{total_bytes, write_outputs, Origin, Output, Part};
use crate::diffusers::st_write::{PendingTensor, StWriter};
use crate::mapping::op::Op;
use crate::mapping::rename::{layout_shape, RenameTable, Reshape};
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
    /// The shape the op reads the whole source tensor as, where it is not `info.shape` (always
    /// given with `rows`).
    pub view: Option<Vec<usize>>,
    /// Only these rows of the re-laid-out source (one of q/k/v fused in a Keras tensor, swapped
    /// halves), each `.1` values long.
    pub rows: Option<(Vec<std::ops::Range<usize>>, usize)>,
}

impl<'a> ExportTensor<'a> {
    /// A tensor stored with diffusers' name, shape and layout (bytes as they are).
    pub fn plain(origin: Origin<'a>, key: &str, info: TensorInfo, source_key: &str) -> ExportTensor<'a> {
        ExportTensor { key: key.to_string(), info, origin, source_key: source_key.to_string(), op: None, view: None, rows: None }
    }
}

/// Rows `wanted` (runs over a tensor of `rows` rows) taken from a tensor that is itself rows
/// `given` of its source (or all of it): the runs over the source.
fn compose_rows(given: Option<&Vec<std::ops::Range<usize>>>, wanted: &[std::ops::Range<usize>]) -> Vec<std::ops::Range<usize>> {
    let Some(given) = given else { return wanted.to_vec() };
    let source_row = |r: usize| -> usize {
        let mut at = r;
        for run in given {
            if at < run.len() {
                return run.start + at;
            }
            at -= run.len();
        }
        unreachable!("row {r} beyond the given runs")
    };
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for r in wanted.iter().flat_map(|w| w.clone()) {
        let s = source_row(r);
        match out.last_mut() {
            Some(last) if last.end == s => last.end += 1,
            _ => out.push(s..s + 1),
        }
    }
    out
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
    /// The halves of the first axis swapped on the way (one part only).
    swap: bool,
    /// A matrix transposed on the way (one part only).
    transpose: bool,
}

fn plan_outputs(components: &[ExportComponent], dtype: Option<DType>) -> Result<Vec<Planned>> {
    let mut outputs: Vec<Planned> = Vec::new();
    let mut fused: BTreeMap<String, (usize, Vec<Option<(usize, usize)>>)> = BTreeMap::new();
    for (c, comp) in components.iter().enumerate() {
        let name = |t: &ExportTensor, last| {
            comp.table.export_in(&t.key, last).with_context(|| format!("tensor `{}`: the {} table has no name for it", t.key, comp.table.component))
        };
        // The last repetition, for tables that rename it otherwise.
        let last = if comp.table.has_last_repeat_rules() {
            comp.tensors.iter().map(|t| name(t, None).map(|r| r.index)).collect::<Result<Vec<_>>>()?.into_iter().flatten().max()
        } else {
            None
        };
        for (i, t) in comp.tensors.iter().enumerate() {
            let r = name(t, last)?;
            if r.op == Reshape::Transpose {
                ensure!(t.op.is_none() && t.rows.is_none() && t.info.shape.len() == 2, "tensor `{}`: a re-laid-out or non-matrix tensor cannot be stored transposed", t.key);
            }
            match r.part {
                None => outputs.push(Planned {
                    key: r.key,
                    dtype: dtype.unwrap_or(t.info.dtype),
                    shape: layout_shape(r.op, &t.info.shape),
                    parts: vec![(c, i)],
                    swap: r.op == Reshape::SwapHalves,
                    transpose: r.op == Reshape::Transpose,
                }),
                Some((k, n)) => {
                    let slot = fused.entry(r.key.clone()).or_insert_with(|| {
                        outputs.push(Planned { key: r.key.clone(), dtype: dtype.unwrap_or(t.info.dtype), shape: vec![], parts: vec![], swap: false, transpose: false });
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
                    let mut part = Part::whole(t.origin, t.source_key.clone(), t.op, 0);
                    part.view = t.view.clone();
                    // The part's own rows of its source, then the layout's swapped halves.
                    let rows = t.info.shape.first().copied().unwrap_or(1);
                    let row_len: usize = t.info.shape.iter().skip(1).product();
                    let mut selected = t.rows.clone();
                    if o.swap {
                        let wanted = [rows / 2..rows, 0..rows / 2];
                        selected = Some((compose_rows(t.rows.as_ref().map(|r| &r.0), &wanted), row_len));
                    }
                    // The whole source tensor's values (a selection reads its rows out of it).
                    part.elements = t.view.as_ref().unwrap_or(&t.info.shape).iter().product();
                    if o.transpose {
                        // A diffusers-layout source (checked in the plan), transposed as a Keras
                        // Dense kernel is.
                        part.op = Some(Op::Dense);
                    }
                    part.rows = selected;
                    part
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
