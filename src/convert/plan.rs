//! Matching a mapping table against a checkpoint: every tensor found, its shape checked against
//! the table, and the model's symbols (widths, vocabulary, depth) bound. Detection = the table
//! that matches.

use crate::keras::{KerasFile, KerasFormat};
use crate::mapping::{all_tables, Expr, Layout, Op, Symbols, Table, TensorSpec};
use std::collections::BTreeMap;
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
    /// For each optional feature of the table's templates (`when=`), the diffusers keys of the
    /// tensor that showed it, one per layer that has it (e.g. `dual`: the second attentions).
    pub features: BTreeMap<String, Vec<String>>,
}

impl PlannedTensor {
    /// The diffusers shape of the whole Keras tensor this one is part of (the same shape unless
    /// q, k and v share one Keras tensor).
    pub fn full_diffusers_shape(&self) -> Vec<usize> {
        let mut shape = self.diffusers_shape.clone();
        if let Some(first) = shape.first_mut() {
            *first *= self.spec.rows.parts();
        }
        shape
    }

    /// The Keras tensor's shape as the op reads it (a per-head attention kernel `(D, heads,
    /// head_dim)` is the Dense kernel `(D, heads·head_dim)` it stores).
    pub fn op_keras_shape(&self) -> Vec<usize> {
        self.spec.op.keras_shape(&self.full_diffusers_shape())
    }
}

impl Plan {
    /// Evaluates every table-given Keras shape with `known` symbols added (a diffusers source does
    /// not show Keras' per-head split); a shape still unbound is an error naming the tensor.
    pub fn keras_shapes_with(&mut self, known: &Symbols) -> Result<()> {
        let mut symbols = self.symbols.clone();
        symbols.extend(known.iter().map(|(k, v)| (k.clone(), *v)));
        for t in &mut self.tensors {
            if let Some(exprs) = &t.spec.keras_shape {
                let shape: Vec<usize> = exprs
                    .iter()
                    .map(|e| e.eval(&symbols))
                    .collect::<Option<_>>()
                    .with_context(|| format!("tensor `{}`: its Keras shape {} needs {}", t.source, describe(exprs), describe_symbols(&symbols)))?;
                ensure!(
                    shape.iter().product::<usize>() == t.full_diffusers_shape().iter().product::<usize>(),
                    "tensor `{}`: Keras shape {shape:?} does not hold its {:?}",
                    t.source,
                    t.full_diffusers_shape()
                );
                t.keras_shape = shape;
            }
        }
        self.symbols = symbols;
        Ok(())
    }
}

/// Drops the tensors of the features a layer lacks: a feature is present in a layer when the
/// first tensor that needs it (`when=feature`) is found by `exists`. Returns the layout left and
/// the keys of the tensors that showed each feature.
fn resolve_features(layout: Layout, exists: impl Fn(&TensorSpec) -> bool) -> (Layout, BTreeMap<String, Vec<String>>) {
    let mut features: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut out = Layout { layers: Vec::new(), tensors: Vec::new() };
    for layer in &layout.layers {
        let specs = &layout.tensors[layer.tensors.clone()];
        let mut has: BTreeMap<&str, bool> = BTreeMap::new();
        for spec in specs {
            if let Some(w) = spec.when.as_ref().filter(|w| w.present) {
                if !has.contains_key(w.feature.as_str()) {
                    let found = exists(spec);
                    has.insert(&w.feature, found);
                    if found {
                        features.entry(w.feature.clone()).or_default().push(spec.key.clone());
                    }
                }
            }
        }
        let start = out.tensors.len();
        for spec in specs {
            let keep = match &spec.when {
                None => true,
                Some(w) => has.get(w.feature.as_str()).copied().unwrap_or(false) == w.present,
            };
            if keep {
                out.tensors.push(crate::mapping::TensorSpec { layer: out.layers.len(), ..spec.clone() });
            }
        }
        out.layers.push(crate::mapping::LayerSpec { tensors: start..out.tensors.len(), ..layer.clone() });
    }
    (out, features)
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
        Side::Keras => match &spec.keras_shape {
            Some(k) => k.clone(),
            None => {
                let mut full = spec.shape.clone();
                if let Some(first) = full.first_mut() {
                    *first = first.times(spec.rows.parts());
                }
                keras_order(spec.op, &full)
            }
        },
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
        Ok(Plan { table: table.clone(), layout, symbols, tensors, features: BTreeMap::new() })
    }

    fn for_keras3(file: &KerasFile, table: &Table) -> Result<Plan> {
        Self::for_keras3_at(file, table, "layers/", Symbols::new())
    }

    /// Matches the part of a Keras 3 file under `root` (`layers/` for a whole file,
    /// `layers/mm_di_t/layers/` for the MMDiT inside a KerasHub backbone), starting from
    /// `known` symbols. Every dataset under `root` must be one of the table's.
    pub fn for_keras3_at(file: &KerasFile, table: &Table, root: &str, known: Symbols) -> Result<Plan> {
        let mut repeats = 0;
        if let Some(class) = table.repeat_class() {
            while file.has_dataset(&format!("{root}{}", if repeats == 0 { class.to_string() } else { format!("{class}_{repeats}") })) {
                repeats += 1;
            }
            let fixed = table.fixed_rows_of_repeat_class();
            ensure!(repeats > fixed, "no `{root}{class}` group");
            repeats -= fixed;
        }
        let path_of = |layout: &Layout, spec: &TensorSpec| format!("{root}{}/{}", layout.layers[spec.layer].keras3_key, spec.keras3_suffix());
        let expanded = table.expand(repeats)?;
        let (layout, features) = resolve_features(expanded.clone(), |spec| file.has_dataset(&path_of(&expanded, spec)));
        let mut symbols = table.initial_symbols(repeats);
        symbols.extend(known);
        let mut tensors = Vec::new();
        let mut paths = std::collections::BTreeSet::new();
        for spec in &layout.tensors {
            let path = path_of(&layout, spec);
            ensure!(file.has_dataset(&path), "tensor `{path}` (for {}): not found", spec.key);
            tensors.push(plan_keras_tensor(file, spec, &path, &mut symbols)?);
            paths.insert(path);
        }
        let total = file.keras3_datasets()?.iter().filter(|(p, _)| p.starts_with(root)).count();
        ensure!(total == paths.len(), "the file holds {total} tensors under `{root}`, the model has {}", paths.len());
        Ok(Plan { table: table.clone(), layout, symbols, tensors, features })
    }

    /// Matches the diffusers tensors of `table`'s part of a component file (or of any source
    /// that shows diffusers' names, such as a single-file checkpoint's view).
    pub fn for_diffusers(file: &dyn TensorSource, table: &Table) -> Result<Plan> {
        Self::for_diffusers_with(file, table, Symbols::new())
    }

    /// As [`Plan::for_diffusers`], with symbols the weights do not show (attention heads) known.
    pub fn for_diffusers_with(file: &dyn TensorSource, table: &Table, known: Symbols) -> Result<Plan> {
        let mut repeats = 0;
        if table.repeat_symbol().is_some() {
            while find_key(file, table, &table.repeat_probe_key(repeats).expect("table repeats")).is_some() {
                repeats += 1;
            }
            let fixed = table.fixed_rows_of_repeat_class();
            ensure!(repeats > fixed, "no {}", file.describe(&table.repeat_probe_key(0).unwrap()));
            repeats -= fixed;
        }
        let (layout, features) = resolve_features(table.expand(repeats)?, |spec| find_key(file, table, &spec.key).is_some());
        let mut symbols = table.initial_symbols(repeats);
        symbols.extend(known);
        let mut tensors = Vec::new();
        for spec in &layout.tensors {
            let key = find_key(file, table, &spec.key).with_context(|| format!("tensor {}: missing", file.describe(&spec.key)))?;
            let info = file.info(&key).with_context(|| format!("tensor {}", file.describe(&key)))?;
            let squeeze = spec.op == Op::Conv1x1Linear && info.shape.len() == 4 && info.shape[2..] == [1, 1];
            let shape = if squeeze { info.shape[..2].to_vec() } else { info.shape.clone() };
            let diffusers_shape =
                unify_shape(spec, &shape, Side::Diffusers, &mut symbols).with_context(|| format!("tensor {}", file.describe(&key)))?;
            let mut full = diffusers_shape.clone();
            full[0] *= spec.rows.parts();
            // A Keras shape over symbols the weights do not show (attention heads) is the op's
            // own until a writer that needs it binds them ([`Plan::keras_shapes_with`]).
            let keras_shape = spec
                .keras_shape
                .as_ref()
                .and_then(|exprs| exprs.iter().map(|e| e.eval(&symbols)).collect::<Option<Vec<usize>>>())
                .unwrap_or_else(|| spec.op.keras_shape(&full));
            tensors.push(PlannedTensor { keras_shape, spec: spec.clone(), source: key, dtype: info.dtype, diffusers_shape, squeeze_source: squeeze });
        }
        Ok(Plan { table: table.clone(), layout, symbols, tensors, features })
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
