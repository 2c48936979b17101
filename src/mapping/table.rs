//! The mapping tables of `mappings/`, parsed and expanded into one flat list of tensors per model.

use super::expr::{parse_params, parse_shape, Expr, Symbols};
use super::op::Op;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;

/// Embedded copies of `mappings/*.toml` (the tables are data, compiled in so the binary stands alone).
const TEMPLATES: &str = include_str!("../../mappings/templates.toml");
const MODEL_TABLES: &[(&str, &str)] = &[
    ("unet_sd1", include_str!("../../mappings/unet_sd1.toml")),
    ("unet_sd2", include_str!("../../mappings/unet_sd2.toml")),
    ("text_encoder_sd1", include_str!("../../mappings/text_encoder_sd1.toml")),
    ("text_encoder_sd2", include_str!("../../mappings/text_encoder_sd2.toml")),
    ("vae_encoder", include_str!("../../mappings/vae_encoder.toml")),
    ("vae_decoder", include_str!("../../mappings/vae_decoder.toml")),
];
/// KerasHub's Stable Diffusion 3 parts (Keras 3 files only, found by path, never by detection
/// among the KerasCV tables).
const KERAS_HUB_TABLES: &[(&str, &str)] = &[
    ("mmdit_sd3", include_str!("../../mappings/mmdit_sd3.toml")),
    ("clip_text_kerashub", include_str!("../../mappings/clip_text_kerashub.toml")),
    ("clip_projection_kerashub", include_str!("../../mappings/clip_projection_kerashub.toml")),
    ("vae_encoder_kerashub", include_str!("../../mappings/vae_encoder_kerashub.toml")),
    ("vae_decoder_kerashub", include_str!("../../mappings/vae_decoder_kerashub.toml")),
];

#[derive(Deserialize)]
struct RawTemplate {
    extends: Option<String>,
    #[serde(default)]
    tensors: Vec<Vec<String>>,
    #[serde(default)]
    replace: Vec<Vec<String>>,
}

#[derive(Deserialize, Default, Clone)]
struct RawHeads {
    per_block: Option<usize>,
    head_dim: Option<Vec<usize>>,
}

#[derive(Deserialize)]
struct RawTable {
    kind: String,
    extends: Option<String>,
    component: Option<String>,
    keras_class: Option<String>,
    key_prefix: Option<String>,
    layers: Option<Vec<[String; 4]>>,
    #[serde(default)]
    template_substitutions: BTreeMap<String, String>,
    heads: Option<RawHeads>,
    #[serde(default)]
    config: toml::Table,
    #[serde(default)]
    aliases: BTreeMap<String, String>,
    #[serde(default)]
    detect: RawDetect,
}

#[derive(Deserialize, Default)]
struct RawDetect {
    #[serde(default)]
    prefer_when: Vec<String>,
}

/// How the attention head count is derived for the config (it is not visible in the weights).
#[derive(Clone, Debug)]
pub enum Heads {
    /// Same head count in every block (SD1 UNet: 8).
    PerBlock(usize),
    /// Width / head_dim, with the first head_dim that divides every width of the model.
    HeadDim(Vec<usize>),
}

impl Heads {
    /// Head counts for a model's attention widths.
    pub fn for_widths(&self, widths: &[usize]) -> Vec<usize> {
        match self {
            Heads::PerBlock(n) => vec![*n; widths.len()],
            Heads::HeadDim(dims) => match dims.iter().find(|d| widths.iter().all(|w| *w % **d == 0)) {
                Some(d) => widths.iter().map(|w| w / d).collect(),
                None => vec![1; widths.len()],
            },
        }
    }
}

/// Which rows of a Keras tensor (in diffusers' layout, first axis) a diffusers tensor holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    /// All of them, in order.
    All,
    /// Part `index` of `of` equal parts (q, k, v fused into one Keras tensor).
    Part { index: usize, of: usize },
    /// Both halves, swapped: Stability's (shift, scale) order is diffusers' (scale, shift).
    SwapHalves,
}

impl Rows {
    /// How many times the diffusers tensor's first axis the Keras tensor's is.
    pub fn parts(self) -> usize {
        match self {
            Rows::Part { of, .. } => of,
            _ => 1,
        }
    }

    /// The runs of source rows, in order, that make the diffusers tensor, for a source tensor of
    /// `rows` rows (the diffusers tensor's first axis times [`Rows::parts`]).
    #[allow(clippy::single_range_in_vec_init)] // a list of ranges, one or two
    pub fn runs(self, rows: usize) -> Vec<std::ops::Range<usize>> {
        match self {
            Rows::All => vec![0..rows],
            Rows::Part { index, of } => vec![index * rows / of..(index + 1) * rows / of],
            Rows::SwapHalves => vec![rows / 2..rows, 0..rows / 2],
        }
    }
}

/// One tensor of a template: Keras sub-path, diffusers key suffix, op, diffusers shape, and the
/// options of an optional fifth column (`keras=<shape>`: the Keras shape where it is not the op's
/// own, e.g. attention kernels split per head; `when=<feature>` / `when=!<feature>`: present
/// only in the layers that have / lack a feature, such as q/k norms or a second attention).
#[derive(Clone, Debug)]
struct TemplateTensor {
    keras: String,
    key: String,
    op: Op,
    rows: Rows,
    shape: Vec<Expr>,
    keras_shape: Option<Vec<Expr>>,
    when: Option<When>,
}

/// A tensor that exists only in layers with (`present`) or without a feature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct When {
    pub feature: String,
    pub present: bool,
}

/// One row of a model table: a weighted Keras layer (or `n` of them).
#[derive(Clone, Debug)]
struct Row {
    class: String,
    repeat: Option<String>,
    prefix: String,
    template: String,
    params: BTreeMap<String, Expr>,
}

/// A model table (one sub-model and SD version), with its templates resolved.
#[derive(Clone, Debug)]
pub struct Table {
    pub kind: String,
    pub component: String,
    pub keras_class: String,
    pub key_prefix: String,
    pub heads: Heads,
    pub config: serde_json::Map<String, serde_json::Value>,
    /// (current spelling, older spelling) pairs accepted when reading diffusers keys.
    pub aliases: Vec<(String, String)>,
    /// `symbol=value` conditions under which detection prefers this table over an equal match.
    pub prefer_when: Vec<(String, usize)>,
    rows: Vec<Row>,
    templates: BTreeMap<String, Vec<TemplateTensor>>,
}

/// A weighted Keras layer after expansion.
#[derive(Clone, Debug)]
pub struct LayerSpec {
    pub class: String,
    /// The repetition this layer is (0..n), for a repeated row.
    pub repeat: Option<usize>,
    /// Key under `layers/` in a Keras 3 `.weights.h5` (class name + per-class counter); also the
    /// group name dreambridge writes in legacy `.h5` files.
    pub keras3_key: String,
    pub tensors: std::ops::Range<usize>,
}

/// One tensor after expansion: where it sits on both sides and its diffusers shape.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub layer: usize,
    /// Sub-layer path and variable name inside the Keras layer, e.g. `entry_flow/group_normalization/gamma`.
    pub keras_path: String,
    /// Full diffusers / transformers key.
    pub key: String,
    pub op: Op,
    /// The rows of the Keras tensor this diffusers tensor holds.
    pub rows: Rows,
    /// Diffusers-side shape over the model symbols.
    pub shape: Vec<Expr>,
    /// The Keras shape, where the op's own rule does not give it.
    pub keras_shape: Option<Vec<Expr>>,
    pub when: Option<When>,
}

/// A table expanded for a given repeat count: every layer and tensor in Keras order.
#[derive(Clone, Debug)]
pub struct Layout {
    pub layers: Vec<LayerSpec>,
    pub tensors: Vec<TensorSpec>,
}

impl TensorSpec {
    /// Keras 3 dataset path inside `layers/<key>/`: sub-path + `vars/<index>`.
    pub fn keras3_suffix(&self) -> String {
        let (dir, var) = match self.keras_path.rsplit_once('/') {
            Some((d, v)) => (format!("{d}/"), v),
            None => (String::new(), self.keras_path.as_str()),
        };
        let index = if matches!(var, "bias" | "beta") { 1 } else { 0 };
        format!("{dir}vars/{index}")
    }
}

/// Every KerasCV model table, in detection order.
pub fn all_tables() -> Result<Vec<Table>> {
    tables_of(MODEL_TABLES)
}

/// KerasHub's tables (Stable Diffusion 3).
pub fn keras_hub_tables() -> Result<Vec<Table>> {
    tables_of(KERAS_HUB_TABLES)
}

fn tables_of(list: &[(&str, &str)]) -> Result<Vec<Table>> {
    let templates = parse_templates()?;
    let raw: BTreeMap<&str, RawTable> = list
        .iter()
        .map(|(name, text)| Ok((*name, toml::from_str(text).with_context(|| format!("mappings/{name}.toml"))?)))
        .collect::<Result<_>>()?;
    list.iter()
        .map(|(name, _)| resolve_table(name, &raw, &templates).with_context(|| format!("mappings/{name}.toml")))
        .collect()
}

/// The table of a model kind such as `unet-sd1` or `mmdit-sd3`.
pub fn table_for(kind: &str) -> Result<Table> {
    all_tables()?
        .into_iter()
        .chain(keras_hub_tables()?)
        .find(|t| t.kind == kind)
        .with_context(|| format!("no mapping table for model kind `{kind}`"))
}

fn parse_templates() -> Result<BTreeMap<String, Vec<TemplateTensor>>> {
    let raw: BTreeMap<String, RawTemplate> = toml::from_str(TEMPLATES).context("mappings/templates.toml")?;
    let mut out = BTreeMap::new();
    for name in raw.keys() {
        out.insert(name.clone(), resolve_template(name, &raw, 0).with_context(|| format!("template `{name}`"))?);
    }
    Ok(out)
}

fn resolve_template(name: &str, raw: &BTreeMap<String, RawTemplate>, depth: usize) -> Result<Vec<TemplateTensor>> {
    if depth > 8 {
        bail!("template `{name}` extends itself");
    }
    let t = raw.get(name).with_context(|| format!("unknown template `{name}`"))?;
    let mut tensors = match &t.extends {
        Some(base) => resolve_template(base, raw, depth + 1)?,
        None => Vec::new(),
    };
    tensors.extend(t.tensors.iter().map(parse_template_tensor).collect::<Result<Vec<_>>>()?);
    for rep in &t.replace {
        let new = parse_template_tensor(rep)?;
        let slot = tensors
            .iter_mut()
            .find(|old| old.key == new.key)
            .with_context(|| format!("`replace` names key `{}` that the base template lacks", new.key))?;
        *slot = new;
    }
    Ok(tensors)
}

fn parse_template_tensor(row: &Vec<String>) -> Result<TemplateTensor> {
    anyhow::ensure!(matches!(row.len(), 4 | 5), "a template tensor is [keras path, key, op, shape] or [.., options], got {row:?}");
    let (op, rows) = match row[2].split_once('+') {
        Some((op, "swap_halves")) => (op.parse()?, Rows::SwapHalves),
        Some((_, other)) => bail!("unknown op modifier `{other}` (swap_halves)"),
        None => (row[2].parse()?, Rows::All),
    };
    let (mut keras_shape, mut when) = (None, None);
    for option in row.get(4).map(|o| o.split(';').map(str::trim).filter(|o| !o.is_empty()).collect::<Vec<_>>()).unwrap_or_default() {
        match option.split_once('=') {
            Some(("keras", shape)) => keras_shape = Some(parse_shape(shape)?),
            Some(("when", f)) => {
                let (feature, present) = match f.trim().strip_prefix('!') {
                    Some(rest) => (rest, false),
                    None => (f.trim(), true),
                };
                when = Some(When { feature: feature.to_string(), present });
            }
            _ => bail!("unknown template option `{option}` (keras=<shape>, when=<feature>)"),
        }
    }
    Ok(TemplateTensor { keras: row[0].clone(), key: row[1].clone(), op, rows, shape: parse_shape(&row[3])?, keras_shape, when })
}

/// A key with a `{a|b|c}` group: the diffusers tensors fused, in order, along the first axis of
/// the one Keras tensor. Returns each key and its part.
fn split_key(key: &str, rows: Rows) -> Result<Vec<(String, Rows)>> {
    let Some(open) = key.find('{') else { return Ok(vec![(key.to_string(), rows)]) };
    let close = key[open..].find('}').with_context(|| format!("key `{key}`: `{{` without `}}`"))? + open;
    anyhow::ensure!(rows == Rows::All, "key `{key}`: a fused tensor cannot also swap halves");
    let names: Vec<&str> = key[open + 1..close].split('|').collect();
    Ok(names
        .iter()
        .enumerate()
        .map(|(index, n)| (format!("{}{n}{}", &key[..open], &key[close + 1..]), Rows::Part { index, of: names.len() }))
        .collect())
}

fn resolve_table(name: &str, raw: &BTreeMap<&str, RawTable>, templates: &BTreeMap<String, Vec<TemplateTensor>>) -> Result<Table> {
    let own = &raw[name];
    let base = match &own.extends {
        Some(b) => Some(resolve_table(b, raw, templates)?),
        None => None,
    };
    let pick = |mine: &Option<String>, theirs: Option<&String>, what: &str| -> Result<String> {
        mine.clone().or_else(|| theirs.cloned()).with_context(|| format!("`{what}` is missing"))
    };
    let rows = match (&own.layers, &base) {
        (Some(layers), _) => layers.iter().map(parse_row).collect::<Result<Vec<_>>>()?,
        (None, Some(b)) => b.rows.clone(),
        (None, None) => bail!("`layers` is missing"),
    };
    let rows = rows
        .into_iter()
        .map(|mut r| {
            if let Some(sub) = own.template_substitutions.get(&r.template) {
                r.template = sub.clone();
            }
            r
        })
        .collect::<Vec<_>>();
    let mut used = BTreeMap::new();
    for r in &rows {
        let t = templates.get(&r.template).with_context(|| format!("unknown template `{}`", r.template))?;
        used.insert(r.template.clone(), t.clone());
    }
    let heads = match (&own.heads, &base) {
        (Some(h), _) => match (h.per_block, &h.head_dim) {
            (Some(n), None) => Heads::PerBlock(n),
            (None, Some(d)) if !d.is_empty() => Heads::HeadDim(d.clone()),
            _ => bail!("[heads] needs exactly one of per_block or head_dim"),
        },
        (None, Some(b)) => b.heads.clone(),
        (None, None) => Heads::PerBlock(1), // single-head attention (the VAE)
    };
    let mut config = base.as_ref().map(|b| b.config.clone()).unwrap_or_default();
    for (k, v) in &own.config {
        config.insert(k.clone(), serde_json::to_value(v)?);
    }
    let mut aliases: Vec<(String, String)> = base.as_ref().map(|b| b.aliases.clone()).unwrap_or_default();
    aliases.extend(own.aliases.iter().map(|(a, b)| (a.clone(), b.clone())));
    let prefer_when = own
        .detect
        .prefer_when
        .iter()
        .map(|c| {
            let (k, v) = c.split_once('=').with_context(|| format!("prefer_when `{c}` has no `=`"))?;
            Ok((k.trim().to_string(), v.trim().parse().with_context(|| format!("prefer_when `{c}`"))?))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Table {
        prefer_when,
        kind: own.kind.clone(),
        component: pick(&own.component, base.as_ref().map(|b| &b.component), "component")?,
        keras_class: pick(&own.keras_class, base.as_ref().map(|b| &b.keras_class), "keras_class")?,
        key_prefix: pick(&own.key_prefix, base.as_ref().map(|b| &b.key_prefix), "key_prefix")?,
        heads,
        config,
        aliases,
        rows,
        templates: used,
    })
}

fn parse_row(row: &[String; 4]) -> Result<Row> {
    let (class, repeat) = match row[0].split_once('*') {
        Some((c, n)) => (c.to_string(), Some(n.to_string())),
        None => (row[0].clone(), None),
    };
    Ok(Row { class, repeat, prefix: row[1].clone(), template: row[2].clone(), params: parse_params(&row[3])? })
}

impl Table {
    /// The SD version this table is for (`None` for the VAE, shared by both).
    pub fn sd_version(&self) -> Option<u8> {
        self.kind.strip_suffix("-sd1").map(|_| 1).or_else(|| self.kind.strip_suffix("-sd2").map(|_| 2))
    }

    /// True when `symbols` satisfy one of the table's `prefer_when` conditions.
    pub fn preferred_for(&self, symbols: &Symbols) -> bool {
        self.prefer_when.iter().any(|(k, v)| symbols.get(k) == Some(v))
    }

    /// The symbol that counts repeated layers (`n` for the CLIP encoder layers), if any.
    pub fn repeat_symbol(&self) -> Option<&str> {
        self.rows.iter().find_map(|r| r.repeat.as_deref())
    }

    /// The Keras class of the repeated row (its Keras 3 keys are `class`, `class_1`, ...).
    pub fn repeat_class(&self) -> Option<&str> {
        self.rows.iter().find(|r| r.repeat.is_some()).map(|r| r.class.as_str())
    }

    /// Weighted layers that do not repeat.
    pub fn fixed_layer_count(&self) -> usize {
        self.rows.iter().filter(|r| r.repeat.is_none()).count()
    }

    /// The diffusers key of the first tensor of repetition `i` (used to count repetitions in a
    /// diffusers file).
    pub fn repeat_probe_key(&self, i: usize) -> Option<String> {
        let row = self.rows.iter().find(|r| r.repeat.is_some())?;
        let first = self.templates[&row.template].first()?;
        Some(format!("{}{}.{}", self.key_prefix, row.prefix.replace("{i}", &i.to_string()), first.key))
    }

    /// Every layer and tensor, with repeats expanded to `repeats` copies.
    pub fn expand(&self, repeats: usize) -> Result<Layout> {
        let mut layers = Vec::new();
        let mut tensors = Vec::new();
        let mut class_counts: BTreeMap<String, usize> = BTreeMap::new();
        for row in &self.rows {
            let copies = if row.repeat.is_some() { repeats } else { 1 };
            for i in 0..copies {
                let count = class_counts.entry(row.class.clone()).or_insert(0);
                let keras3_key = if *count == 0 { row.class.clone() } else { format!("{}_{}", row.class, count) };
                *count += 1;
                let prefix = row.prefix.replace("{i}", &i.to_string()).replace("{n}", &repeats.to_string());
                let start = tensors.len();
                for t in &self.templates[&row.template] {
                    let subst = |exprs: &Vec<Expr>| -> Result<Vec<Expr>> {
                        exprs.iter().map(|d| d.substitute(&row.params)).collect::<Result<Vec<_>>>().with_context(|| format!("row `{}`", row.prefix))
                    };
                    let shape = subst(&t.shape)?;
                    let keras_shape = t.keras_shape.as_ref().map(subst).transpose()?;
                    for (key, rows) in split_key(&t.key, t.rows)? {
                        tensors.push(TensorSpec {
                            layer: layers.len(),
                            keras_path: t.keras.clone(),
                            key: format!("{}{}.{}", self.key_prefix, prefix, key),
                            op: t.op,
                            rows,
                            shape: shape.clone(),
                            keras_shape: keras_shape.clone(),
                            when: t.when.clone(),
                        });
                    }
                }
                let repeat = row.repeat.is_some().then_some(i);
                layers.push(LayerSpec { class: row.class.clone(), repeat, keras3_key, tensors: start..tensors.len() });
            }
        }
        Ok(Layout { layers, tensors })
    }

    /// Rows that do not repeat but share the repeated row's Keras class (the last, different
    /// block of a stack): a count of the class's layers includes them.
    pub fn fixed_rows_of_repeat_class(&self) -> usize {
        let class = self.repeat_class();
        self.rows.iter().filter(|r| r.repeat.is_none() && Some(r.class.as_str()) == class).count()
    }

    /// The repeat symbol bound to `repeats`, as the starting bindings for shape unification.
    pub fn initial_symbols(&self, repeats: usize) -> Symbols {
        let mut s = Symbols::new();
        if let Some(r) = self.repeat_symbol() {
            s.insert(r.to_string(), repeats);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_expands_to_the_documented_tensor_counts() {
        // Weighted layers and tensors of the real KerasCV models, counted at real size.
        let expected = [
            ("unet-sd1", 0, 49, 686),
            ("unet-sd2", 0, 49, 686),
            ("text-encoder-sd1", 12, 14, 196),
            ("text-encoder-sd2", 23, 25, 372),
            ("vae-encoder", 0, 18, 108),
            ("vae-decoder", 0, 22, 140),
        ];
        for (kind, repeats, layers, tensors) in expected {
            let layout = table_for(kind).unwrap().expand(repeats).unwrap();
            assert_eq!((layout.layers.len(), layout.tensors.len()), (layers, tensors), "{kind}");
        }
    }

    #[test]
    fn keras3_keys_count_per_class() {
        let layout = table_for("unet-sd1").unwrap().expand(0).unwrap();
        let keys: Vec<&str> = layout.layers.iter().map(|l| l.keras3_key.as_str()).collect();
        assert_eq!(&keys[..3], ["dense", "padded_conv2d", "dense_1"]);
        assert_eq!(keys[7], "padded_conv2d_1");
        assert_eq!(keys[47], "group_normalization");
        assert_eq!(keys[48], "padded_conv2d_4");
        let t = &layout.tensors[layout.layers[8].tensors.end - 2];
        assert_eq!(t.key, "down_blocks.1.resnets.0.conv_shortcut.weight");
        assert_eq!(t.keras3_suffix(), "residual_projection/conv2d/vars/0");
    }

    #[test]
    fn sd2_unet_differs_only_in_projections() {
        let a = table_for("unet-sd1").unwrap().expand(0).unwrap();
        let b = table_for("unet-sd2").unwrap().expand(0).unwrap();
        let differing: Vec<&str> = a
            .tensors
            .iter()
            .zip(&b.tensors)
            .filter(|(x, y)| x.op != y.op || x.keras_path != y.keras_path)
            .map(|(x, _)| x.key.as_str())
            .collect();
        // 16 SpatialTransformers x (proj_in, proj_out) x (weight, bias)
        assert_eq!(differing.len(), 16 * 4, "{differing:?}");
        assert!(differing.iter().all(|k| k.contains(".proj_in.") || k.contains(".proj_out.")));
    }
}
