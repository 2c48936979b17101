//! Matching a mapping table against a checkpoint: every tensor found, its shape checked against
//! the table, and the model's symbols (widths, vocabulary, depth) bound. Detection = the table
//! that matches.

use crate::keras::{KerasFile, KerasFormat};
use crate::mapping::{all_tables, Expr, Layout, Op, Symbols, Table, TensorSpec};
use crate::tensor::{DType, TensorSource};
use anyhow::{anyhow, bail, ensure, Context, Result};

/// One tensor of a matched checkpoint.
#[derive(Clone, Debug)]
pub struct PlannedTensor {
    pub spec: TensorSpec,
    /// Dataset path (Keras) or key (safetensors) in the source file.
    pub source: String,
    pub dtype: DType,
    pub keras_shape: Vec<usize>,
    pub diffusers_shape: Vec<usize>,
    /// The source holds a 1x1 conv `(out, in, 1, 1)` where the table wants a Linear `(out, in)`.
    pub squeeze_source: bool,
}

/// A checkpoint matched against a table.
#[derive(Clone, Debug)]
pub struct Plan {
    pub table: Table,
    pub layout: Layout,
    pub symbols: Symbols,
    pub tensors: Vec<PlannedTensor>,
}

/// Which side a shape was read on.
#[derive(Clone, Copy)]
enum Side {
    Keras,
    Diffusers,
}

fn keras_order(op: Op, d: &[Expr]) -> Vec<Expr> {
    match (op, d) {
        (Op::Dense, [o, i]) => vec![i.clone(), o.clone()],
        (Op::Conv, [o, i, kh, kw]) => vec![kh.clone(), kw.clone(), i.clone(), o.clone()],
        (Op::Conv1x1Linear, [o, i]) => vec![Expr::parse("1").unwrap(), Expr::parse("1").unwrap(), i.clone(), o.clone()],
        _ => d.to_vec(),
    }
}

fn describe(exprs: &[Expr]) -> String {
    format!("[{}]", exprs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join(", "))
}

fn describe_symbols(symbols: &Symbols) -> String {
    symbols.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")
}

/// Checks `shape` against the table's expression for `spec`, binding symbols. Returns the
/// diffusers-side shape.
fn unify_shape(spec: &TensorSpec, shape: &[usize], side: Side, symbols: &mut Symbols) -> Result<Vec<usize>> {
    let exprs = match side {
        Side::Keras => keras_order(spec.op, &spec.shape),
        Side::Diffusers => spec.shape.clone(),
    };
    let fits = exprs.len() == shape.len() && exprs.iter().zip(shape).all(|(e, v)| e.unify(*v, symbols));
    if !fits {
        bail!(
            "shape {shape:?} does not fit the expected {} (known so far: {})",
            describe(&exprs),
            describe_symbols(symbols)
        );
    }
    let diffusers: Option<Vec<usize>> = spec.shape.iter().map(|e| e.eval(symbols)).collect();
    diffusers.ok_or_else(|| anyhow!("shape leaves a symbol unbound"))
}

impl Plan {
    /// Matches a Keras file (either format) against `table`.
    pub fn for_keras(file: &KerasFile, table: &Table) -> Result<Plan> {
        match file.format {
            KerasFormat::Keras3 => Self::for_keras3(file, table),
            _ => Self::for_legacy(file, table),
        }
    }

    fn for_legacy(file: &KerasFile, table: &Table) -> Result<Plan> {
        let found = file.layers.len();
        let fixed = table.fixed_layer_count();
        let repeats = if table.repeat_symbol().is_some() {
            ensure!(found > fixed, "expected more than {fixed} weighted layers, found {found}");
            found - fixed
        } else {
            0
        };
        let layout = table.expand(repeats)?;
        ensure!(layout.layers.len() == found, "expected {} weighted layers, found {found}", layout.layers.len());
        for (index, (spec_layer, layer)) in layout.layers.iter().zip(&file.layers).enumerate() {
            ensure!(
                spec_layer.tensors.len() == layer.weights.len(),
                "layer #{index} `{}`: expected {} weights for a {}, found {}",
                layer.name,
                spec_layer.tensors.len(),
                spec_layer.class,
                layer.weights.len()
            );
        }
        let mut symbols = table.initial_symbols(repeats);
        let mut tensors = Vec::new();
        for (spec_layer, layer) in layout.layers.iter().zip(&file.layers) {
            let specs = &layout.tensors[spec_layer.tensors.clone()];
            for (spec, path) in specs.iter().zip(&layer.weights) {
                tensors.push(plan_keras_tensor(file, spec, path, &mut symbols)?);
            }
        }
        Ok(Plan { table: table.clone(), layout, symbols, tensors })
    }

    fn for_keras3(file: &KerasFile, table: &Table) -> Result<Plan> {
        let mut repeats = 0;
        if let Some(class) = table.repeat_class() {
            while file.has_dataset(&format!("layers/{}", if repeats == 0 { class.to_string() } else { format!("{class}_{repeats}") })) {
                repeats += 1;
            }
            ensure!(repeats > 0, "no `layers/{class}` group");
        }
        let layout = table.expand(repeats)?;
        let mut symbols = table.initial_symbols(repeats);
        let mut tensors = Vec::new();
        for layer in &layout.layers {
            for spec in &layout.tensors[layer.tensors.clone()] {
                let path = format!("layers/{}/{}", layer.keras3_key, spec.keras3_suffix());
                ensure!(file.has_dataset(&path), "tensor `{path}` (for {}): not found", spec.key);
                tensors.push(plan_keras_tensor(file, spec, &path, &mut symbols)?);
            }
        }
        let total = file.keras3_datasets()?.len();
        ensure!(total == tensors.len(), "the file holds {total} tensors under `layers/`, the model has {}", tensors.len());
        Ok(Plan { table: table.clone(), layout, symbols, tensors })
    }

    /// Matches the diffusers tensors of `table`'s part of a component file (or of any source
    /// that shows diffusers' names, such as a single-file checkpoint's view).
    pub fn for_diffusers(file: &dyn TensorSource, table: &Table) -> Result<Plan> {
        let mut repeats = 0;
        if table.repeat_symbol().is_some() {
            while find_key(file, table, &table.repeat_probe_key(repeats).expect("table repeats")).is_some() {
                repeats += 1;
            }
            ensure!(repeats > 0, "no {}", file.describe(&table.repeat_probe_key(0).unwrap()));
        }
        let layout = table.expand(repeats)?;
        let mut symbols = table.initial_symbols(repeats);
        let mut tensors = Vec::new();
        for spec in &layout.tensors {
            let key = find_key(file, table, &spec.key).with_context(|| format!("tensor {}: missing", file.describe(&spec.key)))?;
            let info = file.info(&key).with_context(|| format!("tensor {}", file.describe(&key)))?;
            let squeeze = spec.op == Op::Conv1x1Linear && info.shape.len() == 4 && info.shape[2..] == [1, 1];
            let shape = if squeeze { info.shape[..2].to_vec() } else { info.shape.clone() };
            let diffusers_shape =
                unify_shape(spec, &shape, Side::Diffusers, &mut symbols).with_context(|| format!("tensor {}", file.describe(&key)))?;
            tensors.push(PlannedTensor {
                keras_shape: spec.op.keras_shape(&diffusers_shape),
                spec: spec.clone(),
                source: key,
                dtype: info.dtype,
                diffusers_shape,
                squeeze_source: squeeze,
            });
        }
        Ok(Plan { table: table.clone(), layout, symbols, tensors })
    }
}

fn plan_keras_tensor(file: &KerasFile, spec: &TensorSpec, path: &str, symbols: &mut Symbols) -> Result<PlannedTensor> {
    let info = file.info(path)?;
    let diffusers_shape =
        unify_shape(spec, &info.shape, Side::Keras, symbols).with_context(|| format!("tensor `{path}` (-> {})", spec.key))?;
    Ok(PlannedTensor {
        spec: spec.clone(),
        source: path.to_string(),
        dtype: info.dtype,
        keras_shape: info.shape,
        diffusers_shape,
        squeeze_source: false,
    })
}

/// Finds the key in a diffusers file, trying the table's prefix-less form and older spellings.
fn find_key(file: &dyn TensorSource, table: &Table, key: &str) -> Option<String> {
    let mut candidates = vec![key.to_string()];
    if let Some(bare) = key.strip_prefix(&table.key_prefix).filter(|_| !table.key_prefix.is_empty()) {
        candidates.push(bare.to_string());
    }
    for (current, old) in &table.aliases {
        let more: Vec<String> = candidates.iter().filter(|c| c.contains(current.as_str())).map(|c| c.replace(current.as_str(), old)).collect();
        candidates.extend(more);
    }
    candidates.into_iter().find(|c| file.contains(c))
}

/// Detection: the table that matches, or why none did. `sd_version` restricts versioned tables;
/// `focus` (a kind prefix such as `unet`) limits the explanation to the tables the user meant.
pub fn detect(try_one: impl Fn(&Table) -> Result<Plan>, sd_version: Option<u8>, focus: Option<&str>) -> Result<Plan> {
    let mut matches = Vec::new();
    let mut misses: Vec<(String, String)> = Vec::new();
    for table in all_tables()? {
        if sd_version.is_some() && table.sd_version().is_some_and(|v| Some(v) != sd_version) {
            continue;
        }
        match try_one(&table) {
            Ok(plan) => matches.push(plan),
            Err(e) => misses.push((table.kind.clone(), format!("{e:#}"))),
        }
    }
    if matches.is_empty() {
        if let Some(prefix) = focus {
            misses.retain(|(kind, _)| kind.starts_with(prefix));
        }
        bail!("{}", explain_misses(misses));
    }
    let pick = matches.iter().position(|p| p.table.preferred_for(&p.symbols)).unwrap_or(0);
    Ok(matches.swap_remove(pick))
}

/// Why no table matched: the tables whose layer structure fit (their first bad tensor) if any,
/// else the structural differences; identical reasons are merged.
fn explain_misses(misses: Vec<(String, String)>) -> String {
    let structural = |m: &str| m.contains("weighted layers") || m.contains("weights for a") || m.contains("tensors under") || m.contains("no `");
    let close: Vec<&(String, String)> = misses.iter().filter(|(_, m)| !structural(m)).collect();
    let chosen: Vec<&(String, String)> = if close.is_empty() { misses.iter().collect() } else { close.clone() };
    let mut merged: Vec<(Vec<&str>, &str)> = Vec::new();
    for (kind, reason) in chosen {
        match merged.iter_mut().find(|(_, r)| *r == reason.as_str()) {
            Some((kinds, _)) => kinds.push(kind),
            None => merged.push((vec![kind], reason)),
        }
    }
    let parts: Vec<String> = merged.iter().map(|(kinds, reason)| format!("as {}: {reason}", kinds.join("/"))).collect();
    if close.is_empty() {
        format!("not a KerasCV Stable Diffusion model this tool knows ({})", parts.join("; "))
    } else {
        format!("does not fit the mapping {}", parts.join("; "))
    }
}
