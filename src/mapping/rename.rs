//! Layouts that hold diffusers' tensors under other names, such as the original Stable Diffusion
//! (LDM) single-file checkpoint or Stability's SD3 one: one table per component
//! (`mappings/ldm_*.toml`, `mappings/sai_*_sd3.toml`), read in both directions by the functions
//! here. A table maps module prefixes (with index arithmetic over declared ranges), then renames
//! inside a module; the rest of a name is kept. Tensors move as bytes: a Linear ⇄ 1×1-conv
//! reshape changes only the shape, q/k/v fused into one tensor along the first axis is a
//! concatenation of their rows, and Stability's (shift, scale) against diffusers' (scale, shift)
//! swaps the two halves of the rows. A table may rename the last repetition of its open range
//! otherwise (`[last_repeat]`: Stability's last MMDiT block).

use super::expr::{Expr, Symbols};
use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;

/// Embedded copies of `mappings/ldm_*.toml` and `mappings/sai_*_sd3.toml`.
const RENAME_TABLES: &[(&str, &str)] = &[
    ("ldm_unet", include_str!("../../mappings/ldm_unet.toml")),
    ("ldm_vae", include_str!("../../mappings/ldm_vae.toml")),
    ("ldm_text_encoder_sd1", include_str!("../../mappings/ldm_text_encoder_sd1.toml")),
    ("ldm_text_encoder_sd2", include_str!("../../mappings/ldm_text_encoder_sd2.toml")),
    ("sai_mmdit_sd3", include_str!("../../mappings/sai_mmdit_sd3.toml")),
    ("sai_clip_l_sd3", include_str!("../../mappings/sai_clip_l_sd3.toml")),
    ("sai_clip_g_sd3", include_str!("../../mappings/sai_clip_g_sd3.toml")),
    ("sai_t5xxl_sd3", include_str!("../../mappings/sai_t5xxl_sd3.toml")),
    ("ldm_unet_sdxl", include_str!("../../mappings/ldm_unet_sdxl.toml")),
    ("ldm_clip_l_sdxl", include_str!("../../mappings/ldm_clip_l_sdxl.toml")),
    ("ldm_clip_g_sdxl", include_str!("../../mappings/ldm_clip_g_sdxl.toml")),
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    /// Another table this one is a delta of: its fields are taken where this one does not give
    /// them, its module rows kept unless `drop_modules` names them or a row here has the same
    /// diffusers pattern, its inner sets kept unless redefined here, its `[import]` kept unless
    /// this table has one.
    extends: Option<String>,
    layout: Option<String>,
    component: Option<String>,
    sd_version: Option<u8>,
    prefix: Option<String>,
    #[serde(default)]
    modules: Vec<[String; 4]>,
    /// Module rows of the extended table left out (by their diffusers pattern).
    #[serde(default)]
    drop_modules: Vec<String>,
    #[serde(default)]
    inner: BTreeMap<String, Vec<[String; 3]>>,
    #[serde(default)]
    read_aliases: BTreeMap<String, String>,
    import: Option<RawImport>,
    #[serde(default)]
    last_repeat: RawLastRepeat,
}

/// `raw` with the table it extends (recursively) filled in.
fn resolve_extends(raw: RawTable, depth: usize) -> Result<RawTable> {
    let Some(base_name) = raw.extends.clone() else { return Ok(raw) };
    ensure!(depth < 8, "`extends` loops");
    let text = RENAME_TABLES.iter().find(|(n, _)| *n == base_name).map(|(_, t)| *t).with_context(|| format!("extends unknown table `{base_name}`"))?;
    let base = resolve_extends(toml::from_str::<RawTable>(text).with_context(|| format!("mappings/{base_name}.toml"))?, depth + 1)?;
    for d in &raw.drop_modules {
        ensure!(base.modules.iter().any(|r| &r[0] == d), "drop_modules: `{d}` is not a module of `{base_name}`");
    }
    let mut modules: Vec<[String; 4]> =
        base.modules.into_iter().filter(|r| !raw.drop_modules.contains(&r[0]) && !raw.modules.iter().any(|m| m[0] == r[0])).collect();
    modules.extend(raw.modules);
    let mut inner = base.inner;
    inner.extend(raw.inner);
    let mut read_aliases = base.read_aliases;
    read_aliases.extend(raw.read_aliases);
    let mut last_inner = base.last_repeat.inner;
    last_inner.extend(raw.last_repeat.inner);
    Ok(RawTable {
        extends: None,
        layout: raw.layout.or(base.layout),
        component: raw.component.or(base.component),
        // A table's SD version is its own: a delta is another model's table.
        sd_version: raw.sd_version,
        prefix: raw.prefix.or(base.prefix),
        modules,
        drop_modules: Vec::new(),
        inner,
        read_aliases,
        import: raw.import.or(base.import),
        last_repeat: RawLastRepeat { inner: last_inner },
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLastRepeat {
    /// Inner-rename sets whose last repetition (of the open range) tries another set first.
    #[serde(default)]
    inner: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawImport {
    #[serde(default)]
    ignore: Vec<String>,
    drop_last_repeat_when: Option<String>,
    /// `[diffusers key, width key]`: a tensor that, when the file lacks it, is the identity of
    /// the width key's first dimension (CLIP-L's projection in Stability's SD3 files).
    #[serde(default)]
    identity_if_missing: Vec<[String; 2]>,
}

/// How a tensor's bytes relate across the two layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reshape {
    /// Same shape.
    Copy,
    /// diffusers Linear `[out, in]` ⇄ layout 1×1 conv `[out, in, 1, 1]`.
    LinearConv1x1,
    /// The layout tensor is the diffusers tensors concatenated along the first axis.
    Concat,
    /// Same shape, the two halves of the first axis swapped (Stability's (shift, scale) against
    /// diffusers' (scale, shift)).
    SwapHalves,
    /// A matrix stored transposed: diffusers Linear `[out, in]` ⇄ layout `[in, out]` (OpenCLIP's
    /// `text_projection`, applied as `x @ P`).
    Transpose,
}

impl std::str::FromStr for Reshape {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Reshape> {
        Ok(match s {
            "copy" => Reshape::Copy,
            "linear_conv1x1" => Reshape::LinearConv1x1,
            "concat" => Reshape::Concat,
            "swap_halves" => Reshape::SwapHalves,
            "transpose" => Reshape::Transpose,
            other => bail!("unknown op `{other}` (copy, linear_conv1x1, concat, swap_halves, transpose)"),
        })
    }
}

/// A name segment of an expanded module pattern: literal, or an index of an open range.
#[derive(Clone, Debug, PartialEq)]
enum Seg {
    Lit(String),
    Index,
}

/// One module row expanded for one binding of its bounded ranges.
#[derive(Clone, Debug)]
struct Module {
    diffusers: Vec<Seg>,
    layout: Vec<Seg>,
    inner: Option<String>,
}

/// A rename inside a module. `diffusers` holds one path, or several for a fused tensor.
#[derive(Clone, Debug)]
struct InnerRule {
    diffusers: Vec<Vec<String>>,
    layout: Vec<String>,
    op: Reshape,
}

/// One tensor name translated: its name on the other side and how the bytes relate.
#[derive(Clone, Debug, PartialEq)]
pub struct Renamed {
    pub key: String,
    pub op: Reshape,
    /// For `Concat`: this diffusers tensor is part `.0` of `.1` of the layout tensor.
    pub part: Option<(usize, usize)>,
    /// The value of the open-range index in the name (text-encoder layer), if any.
    pub index: Option<usize>,
}

/// What a layout name means on import.
#[derive(Clone, Debug, PartialEq)]
pub enum Imported {
    /// The diffusers tensors it holds (several for a fused tensor).
    Tensors(Vec<Renamed>),
    /// A tensor the table says diffusers does not load (buffers, unused heads).
    Ignored,
    /// Under the table's prefix but not a name the table knows.
    Unknown,
    /// Not under the table's prefix.
    Elsewhere,
}

/// A component's table (see the module docs).
#[derive(Clone, Debug)]
pub struct RenameTable {
    pub name: String,
    pub layout: String,
    /// diffusers component folder: `unet`, `vae` or `text_encoder`.
    pub component: String,
    pub sd_version: Option<u8>,
    /// Prefix of every layout key of the component, e.g. `model.diffusion_model.`.
    pub prefix: String,
    /// A layout key (under the prefix) whose presence means the last repetition is not loaded.
    pub drop_last_repeat_when: Option<String>,
    modules: Vec<Module>,
    inner: BTreeMap<String, Vec<InnerRule>>,
    read_aliases: Vec<(String, String)>,
    ignore: Vec<String>,
    /// Inner set -> the set tried first in the last repetition of the open range.
    last_inner: BTreeMap<String, String>,
    /// `(diffusers key, width key)`: see `identity_if_missing` in the table format.
    pub identity_if_missing: Vec<(String, String)>,
}

/// Every rename table.
pub fn rename_tables() -> Result<Vec<RenameTable>> {
    RENAME_TABLES.iter().map(|(name, text)| parse_table(name, text).with_context(|| format!("mappings/{name}.toml"))).collect()
}

/// The table named `name` (`mappings/<name>.toml`).
pub fn rename_table_named(name: &str) -> Result<RenameTable> {
    let text = RENAME_TABLES.iter().find(|(n, _)| *n == name).map(|(_, t)| *t).with_context(|| format!("no table `{name}`"))?;
    parse_table(name, text).with_context(|| format!("mappings/{name}.toml"))
}

/// The table of `layout` for a diffusers component (`sd_version` picks between versioned tables).
pub fn rename_table(layout: &str, component: &str, sd_version: Option<u8>) -> Result<RenameTable> {
    rename_tables()?
        .into_iter()
        .find(|t| t.layout == layout && t.component == component && (t.sd_version.is_none() || t.sd_version == sd_version))
        .with_context(|| format!("no `{layout}` table for the {component} of SD {}", sd_version.map_or("?".into(), |v| v.to_string())))
}

fn parse_table(name: &str, text: &str) -> Result<RenameTable> {
    let raw = resolve_extends(toml::from_str(text)?, 0)?;
    let import = raw.import.unwrap_or_default();
    let (layout, component, prefix) = (
        raw.layout.context("no `layout`")?,
        raw.component.context("no `component`")?,
        raw.prefix.context("no `prefix`")?,
    );
    let mut modules = Vec::new();
    for row in &raw.modules {
        let inner = (!row[2].is_empty()).then(|| row[2].clone());
        if let Some(i) = &inner {
            ensure!(raw.inner.contains_key(i), "module `{}` names unknown inner renames `{i}`", row[0]);
        }
        for (diffusers, layout) in expand_row(&row[0], &row[1], &row[3]).with_context(|| format!("module `{}`", row[0]))? {
            modules.push(Module { diffusers, layout, inner: inner.clone() });
        }
    }
    for (set, last) in &raw.last_repeat.inner {
        ensure!(raw.inner.contains_key(set) && raw.inner.contains_key(last), "[last_repeat]: `{set}` or `{last}` is not an inner set");
    }
    let mut inner = BTreeMap::new();
    for (set, rows) in &raw.inner {
        let rules = rows
            .iter()
            .map(|r| {
                let op: Reshape = r[2].parse()?;
                let diffusers = alternatives(&r[0])?;
                ensure!((diffusers.len() > 1) == (op == Reshape::Concat), "`{}`: `concat` goes with {{a|b|...}} and only with it", r[0]);
                Ok(InnerRule { diffusers, layout: segments(&r[1]), op })
            })
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("inner renames `{set}`"))?;
        inner.insert(set.clone(), rules);
    }
    Ok(RenameTable {
        name: name.to_string(),
        layout,
        component,
        sd_version: raw.sd_version,
        prefix,
        drop_last_repeat_when: import.drop_last_repeat_when,
        modules,
        inner,
        read_aliases: raw.read_aliases.into_iter().collect(),
        ignore: import.ignore,
        last_inner: raw.last_repeat.inner,
        identity_if_missing: import.identity_if_missing.into_iter().map(|[a, b]| (a, b)).collect(),
    })
}

/// The segments of a dotted path; the empty path has none (an inner rule for the module's own
/// tensor).
fn segments(path: &str) -> Vec<String> {
    if path.is_empty() {
        return Vec::new();
    }
    path.split('.').map(str::to_string).collect()
}

/// `a.{x|y}.b` -> [[a, x, b], [a, y, b]]; a path without braces -> itself.
fn alternatives(path: &str) -> Result<Vec<Vec<String>>> {
    let Some(open) = path.find('{') else { return Ok(vec![segments(path)]) };
    let close = path[open..].find('}').map(|c| open + c).with_context(|| format!("`{path}`: unclosed `{{`"))?;
    let (head, choices, tail) = (&path[..open], &path[open + 1..close], &path[close + 1..]);
    ensure!(!tail.contains('{'), "`{path}`: one {{a|b|...}} per name");
    Ok(choices.split('|').map(|c| segments(&format!("{head}{c}{tail}"))).collect())
}

/// Parses `i=0..3, n=0..` (inclusive bounds; no upper bound = an open range).
fn parse_ranges(text: &str) -> Result<Vec<(String, usize, Option<usize>)>> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|part| {
            let (sym, range) = part.split_once('=').with_context(|| format!("range `{part}` has no `=`"))?;
            let (lo, hi) = range.split_once("..").with_context(|| format!("range `{part}` has no `..`"))?;
            let hi = if hi.trim().is_empty() { None } else { Some(hi.trim().parse()?) };
            Ok((sym.trim().to_string(), lo.trim().parse()?, hi))
        })
        .collect()
}

/// Every binding of the bounded ranges, applied to both patterns; `{sym}` of an open range stays
/// an index segment (it must stand alone as a segment on both sides).
fn expand_row(diffusers: &str, layout: &str, ranges: &str) -> Result<Vec<(Vec<Seg>, Vec<Seg>)>> {
    let ranges = parse_ranges(ranges)?;
    let open: Vec<&str> = ranges.iter().filter(|r| r.2.is_none()).map(|r| r.0.as_str()).collect();
    ensure!(open.len() <= 1, "at most one open range");
    let mut bindings = vec![Symbols::new()];
    for (sym, lo, hi) in ranges.iter().filter(|r| r.2.is_some()) {
        bindings = bindings
            .into_iter()
            .flat_map(|b| {
                (*lo..=hi.unwrap()).map(move |v| {
                    let mut b = b.clone();
                    b.insert(sym.clone(), v);
                    b
                })
            })
            .collect();
    }
    bindings
        .iter()
        .map(|b| Ok((fill(diffusers, b, open.first().copied())?, fill(layout, b, open.first().copied())?)))
        .collect()
}

fn fill(pattern: &str, symbols: &Symbols, open: Option<&str>) -> Result<Vec<Seg>> {
    pattern
        .split('.')
        .map(|seg| {
            if open.is_some_and(|o| seg == format!("{{{o}}}")) {
                return Ok(Seg::Index);
            }
            let mut out = String::new();
            let mut rest = seg;
            while let Some(start) = rest.find('{') {
                let end = rest[start..].find('}').map(|e| start + e).with_context(|| format!("`{pattern}`: unclosed `{{`"))?;
                let expr = Expr::parse(&rest[start + 1..end])?;
                let value = expr.eval(symbols).with_context(|| format!("`{pattern}`: `{expr}` has a symbol without a range"))?;
                out.push_str(&rest[..start]);
                out.push_str(&value.to_string());
                rest = &rest[end + 1..];
            }
            out.push_str(rest);
            Ok(Seg::Lit(out))
        })
        .collect()
}

/// Matches `pattern` against the start of `name`; returns the open index if any.
fn match_prefix(pattern: &[Seg], name: &[&str]) -> Option<Option<usize>> {
    if pattern.len() > name.len() {
        return None;
    }
    let mut index = None;
    for (p, n) in pattern.iter().zip(name) {
        match p {
            Seg::Lit(l) if l == n => {}
            Seg::Index if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && (n.len() == 1 || !n.starts_with('0')) => {
                index = Some(n.parse().ok()?)
            }
            _ => return None,
        }
    }
    Some(index)
}

fn starts_with(name: &[&str], path: &[String]) -> bool {
    path.len() <= name.len() && path.iter().zip(name).all(|(p, n)| p == n)
}

fn render(pattern: &[Seg], index: Option<usize>) -> Vec<String> {
    pattern
        .iter()
        .map(|s| match s {
            Seg::Lit(l) => l.clone(),
            Seg::Index => index.expect("an index segment was matched").to_string(),
        })
        .collect()
}

impl RenameTable {
    /// The first segment of every module's layout name (`input_blocks`, `middle_block`, ...):
    /// a name under the prefix starting with none of them is no name of this layout.
    pub fn layout_roots(&self) -> std::collections::BTreeSet<String> {
        self.modules
            .iter()
            .filter_map(|m| match m.layout.first() {
                Some(Seg::Lit(l)) => Some(l.clone()),
                _ => None,
            })
            .collect()
    }

    /// The layout name of a diffusers tensor, or `None` if no module of the table holds it.
    pub fn export(&self, diffusers_key: &str) -> Option<Renamed> {
        self.export_in(diffusers_key, None)
    }

    /// True when the table renames differently in the last repetition of its open range: the
    /// callers then find that repetition first (the largest index) and pass it as `last`.
    pub fn has_last_repeat_rules(&self) -> bool {
        !self.last_inner.is_empty()
    }

    /// The inner rules of `set` for repetition `index`: the last repetition's set first.
    fn inner_rules(&self, set: &str, index: Option<usize>, last: Option<usize>) -> Vec<&InnerRule> {
        let mut rules = Vec::new();
        if index.is_some() && index == last {
            if let Some(l) = self.last_inner.get(set) {
                rules.extend(self.inner[l].iter());
            }
        }
        let first = rules.len();
        let overridden = |r: &InnerRule, rules: &[&InnerRule]| rules[..first].iter().any(|o| o.diffusers == r.diffusers);
        let base: Vec<&InnerRule> = self.inner[set].iter().filter(|r| !overridden(r, &rules)).collect();
        rules.extend(base);
        rules
    }

    /// As [`RenameTable::export`], `last` being the last repetition of the open range.
    pub fn export_in(&self, diffusers_key: &str, last: Option<usize>) -> Option<Renamed> {
        let name: Vec<&str> = diffusers_key.split('.').collect();
        let (module, index) = self
            .modules
            .iter()
            .filter_map(|m| match_prefix(&m.diffusers, &name).map(|i| (m, i)))
            .max_by_key(|(m, _)| m.diffusers.len())?;
        let rest = &name[module.diffusers.len()..];
        let mut out = render(&module.layout, index);
        let (mut op, mut part) = (Reshape::Copy, None);
        let mut kept = rest;
        if let Some(set) = &module.inner {
            let best = self
                .inner_rules(set, index, last)
                .into_iter()
                .flat_map(|r| r.diffusers.iter().enumerate().map(move |(k, d)| (r, k, d)))
                .filter(|(_, _, d)| starts_with(rest, d))
                .max_by_key(|(_, _, d)| d.len());
            if let Some((rule, k, d)) = best {
                out.extend(rule.layout.iter().cloned());
                op = rule.op;
                part = (rule.op == Reshape::Concat).then_some((k, rule.diffusers.len()));
                kept = &rest[d.len()..];
            }
        }
        out.extend(kept.iter().map(|s| s.to_string()));
        Some(Renamed { key: format!("{}{}", self.prefix, out.join(".")), op, part, index })
    }

    /// What a layout key means for diffusers (see [`Imported`]).
    pub fn import(&self, layout_key: &str) -> Imported {
        self.import_in(layout_key, None)
    }

    /// As [`RenameTable::import`], `last` being the last repetition of the open range.
    pub fn import_in(&self, layout_key: &str, last: Option<usize>) -> Imported {
        let Some(bare) = layout_key.strip_prefix(&self.prefix) else { return Imported::Elsewhere };
        let mut bare = bare.to_string();
        if self.ignore.contains(&bare) {
            return Imported::Ignored;
        }
        if let Some((from, to)) = self.read_aliases.iter().find(|(from, _)| bare.starts_with(from.as_str())) {
            bare = format!("{to}{}", &bare[from.len()..]);
        }
        let name: Vec<&str> = bare.split('.').collect();
        let Some((module, index)) = self
            .modules
            .iter()
            .filter_map(|m| match_prefix(&m.layout, &name).map(|i| (m, i)))
            .max_by_key(|(m, _)| m.layout.len())
        else {
            return Imported::Unknown;
        };
        let rest = &name[module.layout.len()..];
        let head = render(&module.diffusers, index);
        let join = |mid: &[String], kept: &[&str]| {
            let mut all = head.clone();
            all.extend(mid.iter().cloned());
            all.extend(kept.iter().map(|s| s.to_string()));
            all.join(".")
        };
        if let Some(set) = &module.inner {
            let best = self.inner_rules(set, index, last).into_iter().filter(|r| starts_with(rest, &r.layout)).max_by_key(|r| r.layout.len());
            if let Some(rule) = best {
                let kept = &rest[rule.layout.len()..];
                let n = rule.diffusers.len();
                return Imported::Tensors(
                    rule.diffusers
                        .iter()
                        .enumerate()
                        .map(|(k, d)| Renamed {
                            key: join(d, kept),
                            op: rule.op,
                            part: (rule.op == Reshape::Concat).then_some((k, n)),
                            index,
                        })
                        .collect(),
                );
            }
        }
        Imported::Tensors(vec![Renamed { key: join(&[], rest), op: Reshape::Copy, part: None, index }])
    }
}

/// The layout shape of a tensor whose diffusers shape is `d` (for `Concat`, the shape of one
/// part; the caller sums the first axis over the parts).
pub fn layout_shape(op: Reshape, d: &[usize]) -> Vec<usize> {
    match op {
        Reshape::LinearConv1x1 if d.len() == 2 => vec![d[0], d[1], 1, 1],
        Reshape::Transpose if d.len() == 2 => vec![d[1], d[0]],
        _ => d.to_vec(),
    }
}

/// The diffusers shape of part `part` of a layout tensor of shape `l`.
pub fn diffusers_shape(op: Reshape, l: &[usize], part: Option<(usize, usize)>) -> Result<Vec<usize>> {
    Ok(match (op, part) {
        (Reshape::LinearConv1x1, _) if l.len() == 4 && l[2..] == [1, 1] => l[..2].to_vec(),
        (Reshape::Transpose, _) => {
            ensure!(l.len() == 2, "shape {l:?} is not a matrix to transpose");
            vec![l[1], l[0]]
        }
        (Reshape::Concat, Some((_, n))) => {
            ensure!(!l.is_empty() && l[0] % n == 0, "shape {l:?} does not split into {n} equal parts along its first axis");
            let mut d = l.to_vec();
            d[0] /= n;
            d
        }
        _ => l.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::table_for;

    fn diffusers_keys(kind: &str, repeats: usize) -> Vec<String> {
        table_for(kind).unwrap().expand(repeats).unwrap().tensors.into_iter().map(|t| t.key).collect()
    }

    #[test]
    fn unet_names_follow_the_original_layout() {
        let t = rename_table("ldm", "unet", Some(1)).unwrap();
        let cases = [
            ("conv_in.weight", "input_blocks.0.0.weight"),
            ("time_embedding.linear_2.bias", "time_embed.2.bias"),
            ("down_blocks.0.resnets.1.norm1.weight", "input_blocks.2.0.in_layers.0.weight"),
            ("down_blocks.1.resnets.0.conv_shortcut.weight", "input_blocks.4.0.skip_connection.weight"),
            ("down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight", "input_blocks.8.1.transformer_blocks.0.attn2.to_k.weight"),
            ("down_blocks.2.downsamplers.0.conv.weight", "input_blocks.9.0.op.weight"),
            ("down_blocks.3.resnets.1.time_emb_proj.weight", "input_blocks.11.0.emb_layers.1.weight"),
            ("mid_block.resnets.1.conv2.bias", "middle_block.2.out_layers.3.bias"),
            ("mid_block.attentions.0.proj_in.weight", "middle_block.1.proj_in.weight"),
            ("up_blocks.0.resnets.2.norm2.weight", "output_blocks.2.0.out_layers.0.weight"),
            ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.1.conv.weight"),
            ("up_blocks.1.upsamplers.0.conv.bias", "output_blocks.5.2.conv.bias"),
            ("up_blocks.3.attentions.2.proj_out.weight", "output_blocks.11.1.proj_out.weight"),
            ("conv_norm_out.weight", "out.0.weight"),
            ("conv_out.bias", "out.2.bias"),
        ];
        for (d, l) in cases {
            let r = t.export(d).unwrap_or_else(|| panic!("{d}"));
            assert_eq!(r.key, format!("model.diffusion_model.{l}"), "{d}");
            assert_eq!(t.import(&r.key), Imported::Tensors(vec![Renamed { key: d.into(), ..r.clone() }]), "{l}");
        }
    }

    #[test]
    fn vae_decoder_blocks_run_in_reverse_and_attention_becomes_1x1_convs() {
        let t = rename_table("ldm", "vae", None).unwrap();
        let r = t.export("decoder.up_blocks.0.resnets.2.conv_shortcut.weight").unwrap();
        assert_eq!(r.key, "first_stage_model.decoder.up.3.block.2.nin_shortcut.weight");
        assert_eq!(t.export("decoder.up_blocks.2.upsamplers.0.conv.weight").unwrap().key, "first_stage_model.decoder.up.1.upsample.conv.weight");
        assert_eq!(t.export("encoder.mid_block.resnets.1.norm2.bias").unwrap().key, "first_stage_model.encoder.mid.block_2.norm2.bias");
        let q = t.export("encoder.mid_block.attentions.0.to_q.weight").unwrap();
        assert_eq!((q.key.as_str(), q.op), ("first_stage_model.encoder.mid.attn_1.q.weight", Reshape::LinearConv1x1));
        let qb = t.export("encoder.mid_block.attentions.0.to_q.bias").unwrap();
        assert_eq!((qb.key.as_str(), qb.op), ("first_stage_model.encoder.mid.attn_1.q.bias", Reshape::Copy));
        assert_eq!(t.export("decoder.mid_block.attentions.0.to_out.0.weight").unwrap().key, "first_stage_model.decoder.mid.attn_1.proj_out.weight");
        assert_eq!(t.export("decoder.mid_block.attentions.0.group_norm.bias").unwrap().key, "first_stage_model.decoder.mid.attn_1.norm.bias");
        assert_eq!(layout_shape(Reshape::LinearConv1x1, &[8, 8]), vec![8, 8, 1, 1]);
        assert_eq!(diffusers_shape(Reshape::LinearConv1x1, &[8, 8, 1, 1], None).unwrap(), vec![8, 8]);
    }

    #[test]
    fn sd2_text_encoder_fuses_q_k_v_and_drops_what_diffusers_does_not_load() {
        let t = rename_table("ldm", "text_encoder", Some(2)).unwrap();
        let k = t.export("text_model.encoder.layers.17.self_attn.k_proj.bias").unwrap();
        assert_eq!(k.key, "cond_stage_model.model.transformer.resblocks.17.attn.in_proj_bias");
        assert_eq!((k.op, k.part, k.index), (Reshape::Concat, Some((1, 3)), Some(17)));
        assert_eq!(t.export("text_model.encoder.layers.3.mlp.fc2.weight").unwrap().key, "cond_stage_model.model.transformer.resblocks.3.mlp.c_proj.weight");
        assert_eq!(t.export("text_model.embeddings.position_embedding.weight").unwrap().key, "cond_stage_model.model.positional_embedding");
        let Imported::Tensors(parts) = t.import("cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight") else { panic!() };
        let keys: Vec<&str> = parts.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "text_model.encoder.layers.22.self_attn.q_proj.weight",
                "text_model.encoder.layers.22.self_attn.k_proj.weight",
                "text_model.encoder.layers.22.self_attn.v_proj.weight"
            ]
        );
        assert_eq!(t.import("cond_stage_model.model.text_projection"), Imported::Ignored);
        assert_eq!(t.import("cond_stage_model.model.visual.proj"), Imported::Unknown);
        assert_eq!(t.import("model.diffusion_model.out.0.weight"), Imported::Elsewhere);
        assert_eq!(t.import("cond_stage_model.model.transformer.resblocks.01.ln_1.weight"), Imported::Unknown);
        assert_eq!(diffusers_shape(Reshape::Concat, &[3072, 1024], Some((2, 3))).unwrap(), vec![1024, 1024]);
        assert!(diffusers_shape(Reshape::Concat, &[10], Some((0, 3))).is_err());
    }

    #[test]
    fn sd1_text_encoder_keeps_names_and_reads_the_prefix_without_text_model() {
        let t = rename_table("ldm", "text_encoder", Some(1)).unwrap();
        let key = "text_model.encoder.layers.0.self_attn.q_proj.weight";
        assert_eq!(t.export(key).unwrap().key, format!("cond_stage_model.transformer.{key}"));
        let Imported::Tensors(r) = t.import("cond_stage_model.transformer.encoder.layers.0.self_attn.q_proj.weight") else { panic!() };
        assert_eq!(r[0].key, key);
        assert_eq!(t.import("cond_stage_model.transformer.text_model.embeddings.position_ids"), Imported::Ignored);
    }

    #[test]
    fn every_diffusers_tensor_has_one_layout_name_and_comes_back() {
        // The whole key sets of SD1/SD2 at full size: export is injective (fused parts aside)
        // and import inverts it.
        let parts: [(&str, Option<u8>, Vec<String>); 4] = [
            ("unet", Some(1), diffusers_keys("unet-sd1", 0)),
            ("unet", Some(2), diffusers_keys("unet-sd2", 0)),
            ("vae", None, [diffusers_keys("vae-encoder", 0), diffusers_keys("vae-decoder", 0)].concat()),
            ("text_encoder", Some(2), diffusers_keys("text-encoder-sd2", 23)),
        ];
        for (component, version, keys) in parts {
            let t = rename_table("ldm", component, version).unwrap();
            let mut seen: BTreeMap<(String, Option<(usize, usize)>), String> = BTreeMap::new();
            for key in &keys {
                let r = t.export(key).unwrap_or_else(|| panic!("{component}: `{key}` has no layout name"));
                if let Some(other) = seen.insert((r.key.clone(), r.part), key.clone()) {
                    panic!("`{key}` and `{other}` both export to `{}`", r.key);
                }
                let Imported::Tensors(back) = t.import(&r.key) else { panic!("`{}` does not import", r.key) };
                let part = r.part.map_or(0, |p| p.0);
                assert_eq!(&back[part].key, key);
            }
            let fused = seen.keys().filter(|(_, p)| p.is_some()).count();
            assert_eq!(fused, if component == "text_encoder" { 23 * 6 } else { 0 });
        }
        assert_eq!(diffusers_keys("unet-sd1", 0).len(), 686);
    }

    #[test]
    fn sdxl_tables_are_deltas_of_the_sd_ones() {
        let u = rename_table_named("ldm_unet_sdxl").unwrap();
        assert_eq!((u.layout.as_str(), u.component.as_str(), u.prefix.as_str(), u.sd_version), ("ldm-sdxl", "unet", "model.diffusion_model.", None));
        let cases = [
            ("add_embedding.linear_1.weight", "label_emb.0.0.weight"),
            ("add_embedding.linear_2.bias", "label_emb.0.2.bias"),
            ("down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight", "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"),
            ("down_blocks.1.downsamplers.0.conv.weight", "input_blocks.6.0.op.weight"),
            ("up_blocks.0.attentions.2.proj_out.weight", "output_blocks.2.1.proj_out.weight"),
            ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.2.conv.weight"),
            ("up_blocks.1.upsamplers.0.conv.bias", "output_blocks.5.2.conv.bias"),
            ("up_blocks.2.resnets.2.conv_shortcut.weight", "output_blocks.8.0.skip_connection.weight"),
        ];
        for (d, l) in cases {
            let r = u.export(d).unwrap_or_else(|| panic!("{d}"));
            assert_eq!(r.key, format!("model.diffusion_model.{l}"), "{d}");
            let Imported::Tensors(back) = u.import(&r.key) else { panic!("{l}") };
            assert_eq!(back[0].key, d, "{l}");
        }
        let l = rename_table_named("ldm_clip_l_sdxl").unwrap();
        assert_eq!((l.component.as_str(), l.sd_version), ("text_encoder", None));
        let key = "text_model.encoder.layers.1.mlp.fc2.weight";
        assert_eq!(l.export(key).unwrap().key, format!("conditioner.embedders.0.transformer.{key}"));
        let g = rename_table_named("ldm_clip_g_sdxl").unwrap();
        assert_eq!((g.component.as_str(), g.drop_last_repeat_when.as_deref()), ("text_encoder_2", None));
        let p = g.export("text_projection.weight").unwrap();
        assert_eq!((p.key.as_str(), p.op), ("conditioner.embedders.1.model.text_projection", Reshape::Transpose));
        assert_eq!(g.import("conditioner.embedders.1.model.text_projection"), Imported::Tensors(vec![Renamed { key: "text_projection.weight".into(), ..p }]));
        let v = g.export("text_model.encoder.layers.31.self_attn.v_proj.bias").unwrap();
        assert_eq!((v.key.as_str(), v.part), ("conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_bias", Some((2, 3))));
        assert_eq!(g.import("conditioner.embedders.1.model.logit_scale"), Imported::Ignored);
        assert_eq!(layout_shape(Reshape::Transpose, &[96, 128]), vec![128, 96]);
        assert_eq!(diffusers_shape(Reshape::Transpose, &[128, 96], None).unwrap(), vec![96, 128]);
    }

    #[test]
    fn a_delta_table_must_name_rows_its_base_has() {
        let raw: RawTable = toml::from_str("extends = \"ldm_unet\"\ndrop_modules = [\"no_such_module\"]").unwrap();
        let e = resolve_extends(raw, 0).err().unwrap();
        assert!(format!("{e}").contains("no_such_module"), "{e}");
        let raw: RawTable = toml::from_str("extends = \"ldm_nothing\"").unwrap();
        assert!(resolve_extends(raw, 0).is_err());
    }
}
