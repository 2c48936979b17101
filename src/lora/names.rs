//! kohya module names (`lora_unet_down_blocks_0_..._to_q`, SDXL's `lora_unet_input_blocks_4_1_..._to_q`)
//! <-> diffusers module paths (`down_blocks.0....to_q`), driven by `mappings/lora_kohya.toml`: its
//! prefixes and word list, and for LDM-numbered UNet names the single-file UNet rename tables
//! (`mappings/ldm_unet_sdxl.toml`, `ldm_unet.toml`).

use super::{Family, Part};
use crate::mapping::rename::{rename_table_named, Imported, RenameTable};
use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

const TABLE: &str = include_str!("../../mappings/lora_kohya.toml");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    prefixes: RawPrefixes,
    written: BTreeMap<String, RawWritten>,
    ldm_numbering: BTreeMap<String, String>,
    vocabulary: BTreeMap<String, Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrefixes {
    unet: Vec<String>,
    text_encoder: Vec<String>,
    text_encoder_2: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWritten {
    unet: String,
    text_encoder: String,
    text_encoder_2: Option<String>,
    unet_numbering: String,
}

/// What one family writes.
struct Written {
    prefixes: BTreeMap<Part, String>,
    /// UNet names in LDM numbering (else diffusers numbering).
    ldm: bool,
}

/// The parsed table.
struct Names {
    /// (prefix, part), longest prefix first.
    prefixes: Vec<(String, Part)>,
    written: BTreeMap<Family, Written>,
    /// The rename table reading (and, where `Written::ldm`, writing) LDM-numbered UNet names.
    ldm: BTreeMap<Family, RenameTable>,
    /// First segments of LDM-numbered UNet paths (`input_blocks`, `middle_block`, `out`, ...).
    ldm_roots: BTreeSet<String>,
    words: BTreeSet<String>,
    /// Most "_"-joined tokens in one word.
    longest: usize,
}

fn names() -> &'static Names {
    static NAMES: OnceLock<Names> = OnceLock::new();
    NAMES.get_or_init(|| parse_table(TABLE).expect("mappings/lora_kohya.toml is valid (checked by the tests)"))
}

fn family_named(name: &str) -> Result<Family> {
    match name {
        "sd" => Ok(Family::Sd),
        "sdxl" => Ok(Family::Sdxl),
        other => bail!("unknown family `{other}` (sd, sdxl)"),
    }
}

fn parse_table(text: &str) -> Result<Names> {
    let raw: RawTable = toml::from_str(text).context("mappings/lora_kohya.toml")?;
    let mut prefixes = Vec::new();
    for (part, list) in [(Part::Unet, &raw.prefixes.unet), (Part::TextEncoder, &raw.prefixes.text_encoder), (Part::TextEncoder2, &raw.prefixes.text_encoder_2)] {
        ensure!(!list.is_empty(), "mappings/lora_kohya.toml: no {} prefix", part.name());
        prefixes.extend(list.iter().map(|p| (p.clone(), part)));
    }
    prefixes.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    let mut written = BTreeMap::new();
    for (name, w) in &raw.written {
        let family = family_named(name).context("mappings/lora_kohya.toml [written]")?;
        let mut parts = BTreeMap::from([(Part::Unet, w.unet.clone()), (Part::TextEncoder, w.text_encoder.clone())]);
        if let Some(p) = &w.text_encoder_2 {
            parts.insert(Part::TextEncoder2, p.clone());
        }
        for (part, p) in &parts {
            ensure!(prefixes.iter().any(|(q, r)| q == p && r == part), "mappings/lora_kohya.toml [written.{name}]: `{p}` is not a {} prefix read", part.name());
        }
        let ldm = match w.unet_numbering.as_str() {
            "ldm" => true,
            "diffusers" => false,
            other => bail!("mappings/lora_kohya.toml [written.{name}]: unet_numbering `{other}` (diffusers, ldm)"),
        };
        written.insert(family, Written { prefixes: parts, ldm });
    }
    ensure!(written.len() == 2 && written[&Family::Sdxl].prefixes.contains_key(&Part::TextEncoder2), "mappings/lora_kohya.toml: [written.sd] and [written.sdxl] (with text_encoder_2) are needed");
    let mut ldm = BTreeMap::new();
    for (name, table) in &raw.ldm_numbering {
        let family = family_named(name).context("mappings/lora_kohya.toml [ldm_numbering]")?;
        let table = rename_table_named(table).with_context(|| format!("mappings/lora_kohya.toml [ldm_numbering] {name}"))?;
        ensure!(table.component == "unet", "mappings/lora_kohya.toml [ldm_numbering] {name}: `{}` is no UNet table", table.name);
        ldm.insert(family, table);
    }
    ensure!(ldm.len() == 2, "mappings/lora_kohya.toml: [ldm_numbering] needs sd and sdxl");
    let ldm_roots = ldm.values().flat_map(|t| t.layout_roots()).collect();
    let words: BTreeSet<String> = raw.vocabulary.into_values().flatten().collect();
    let longest = words.iter().map(|w| w.split('_').count()).max().unwrap_or(1);
    Ok(Names { prefixes, written, ldm, ldm_roots, words, longest })
}

/// A kohya module name taken apart.
#[derive(Clone, Debug, PartialEq)]
pub struct KohyaName {
    pub part: Part,
    /// The dotted module path as named: diffusers' (text encoders: with `text_model.`), or for a
    /// UNet name in LDM numbering the LDM path (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`).
    pub path: String,
    /// The UNet path is in LDM numbering (see [`resolve`]).
    pub ldm: bool,
}

/// The kohya name of `module` (a diffusers path; text-encoder paths under `text_model.`) as
/// `family` writes it: SDXL's UNet names in LDM numbering (as kohya sd-scripts), text encoders
/// as `lora_te1_`/`lora_te2_`; SD 1.x/2.x's with diffusers numbering and `lora_te_`.
pub fn to_kohya(part: Part, module: &str, family: Family) -> Result<String> {
    let n = names();
    let written = &n.written[&family];
    let prefix = written.prefixes.get(&part).with_context(|| format!("LoRA module `{module}` of the {}: {} has no {}", part.name(), family.name(), part.name()))?;
    let path = match (part, written.ldm) {
        (Part::Unet, true) => {
            let table = &n.ldm[&family];
            let renamed = table.export(module).with_context(|| format!("LoRA module `{module}`: no {} UNet module in `mappings/{}.toml`", family.name(), table.name))?;
            renamed.key.strip_prefix(&table.prefix).expect("exported names carry the table's prefix").to_owned()
        }
        _ => module.to_owned(),
    };
    Ok(format!("{prefix}_{}", path.replace('.', "_")))
}

/// Whether `name` starts with a kohya prefix.
pub fn has_kohya_prefix(name: &str) -> bool {
    names().prefixes.iter().any(|(p, _)| name.strip_prefix(p.as_str()).is_some_and(|rest| rest.starts_with('_')))
}

/// Splits a kohya module name into its part and path (LDM numbering kept, see [`resolve`]).
pub fn parse(name: &str) -> Result<KohyaName> {
    let n = names();
    let (part, rest) = n
        .prefixes
        .iter()
        .find_map(|(p, part)| name.strip_prefix(p.as_str()).and_then(|r| r.strip_prefix('_')).map(|r| (*part, r)))
        .with_context(|| format!("`{name}` has no kohya prefix (lora_unet_, lora_te_, lora_te1_, lora_te2_)"))?;
    let tokens: Vec<&str> = rest.split('_').collect();
    if tokens.iter().any(|t| t.is_empty()) {
        bail!("`{name}`: empty path segment");
    }
    let mut segments = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let take = (2..=n.longest.min(tokens.len() - i)).rev().find(|len| n.words.contains(&tokens[i..i + len].join("_"))).unwrap_or(1);
        segments.push(tokens[i..i + take].join("_"));
        i += take;
    }
    let ldm = part == Part::Unet && n.ldm_roots.contains(&segments[0]);
    let path = segments.join(".");
    Ok(KohyaName { part, path: if ldm { path } else { part.normalize(&path) }, ldm })
}

/// The family whose LDM numbering `paths` (LDM UNet paths of one file) are in: SDXL (what kohya
/// sd-scripts writes) unless they show SD 1.x/2.x's structure: attention at the first level
/// (`input_blocks.1.1`, `.2.1`), a fourth level (`input_blocks`/`output_blocks` past 8) or an
/// upsampler in slot 1 of `output_blocks.2`. A transformer depth over 1 is SDXL's.
pub fn ldm_family<'a>(paths: impl IntoIterator<Item = &'a str>) -> Family {
    let mut sd = false;
    for path in paths {
        let s: Vec<&str> = path.split('.').collect();
        let index = |i: usize| s.get(i).and_then(|v| v.parse::<usize>().ok());
        if s.windows(2).any(|w| w[0] == "transformer_blocks" && w[1].parse::<usize>().is_ok_and(|d| d > 0)) {
            return Family::Sdxl;
        }
        sd |= match s[0] {
            "input_blocks" => index(1).is_some_and(|b| b > 8 || ((b == 1 || b == 2) && index(2) == Some(1))),
            "output_blocks" => index(1).is_some_and(|b| b > 8) || s.starts_with(&["output_blocks", "2", "1", "conv"]),
            _ => false,
        };
    }
    if sd {
        Family::Sd
    } else {
        Family::Sdxl
    }
}

/// The diffusers module path of `name`, an LDM-numbered UNet path translated by `family`'s
/// rename table.
pub fn resolve(name: &KohyaName, family: Family) -> Result<String> {
    if !name.ldm {
        return Ok(name.path.clone());
    }
    let table = &names().ldm[&family];
    match table.import(&format!("{}{}", table.prefix, name.path)) {
        Imported::Tensors(t) if t.len() == 1 => Ok(t[0].key.clone()),
        _ => bail!("`{}` is no {} UNet module in LDM numbering (mappings/{}.toml)", name.path, family.name(), table.name),
    }
}

/// The part and diffusers module path of one kohya module name (LDM numbering read as
/// [`ldm_family`] of the name alone says).
pub fn from_kohya(name: &str) -> Result<(Part, String)> {
    let parsed = parse(name)?;
    let family = ldm_family([parsed.path.as_str()].into_iter().filter(|_| parsed.ldm));
    Ok((parsed.part, resolve(&parsed, family)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every weighted module path of the SD 1.5 UNet and CLIP ViT-L text encoder.
    fn sd1_modules() -> Vec<(Part, String)> {
        let mut unet: Vec<String> = ["conv_in", "conv_out", "conv_norm_out", "time_embedding.linear_1", "time_embedding.linear_2"].map(String::from).to_vec();
        let resnet = |p: &str, shortcut: bool| {
            let mut v: Vec<String> = ["norm1", "conv1", "time_emb_proj", "norm2", "conv2"].iter().map(|s| format!("{p}.{s}")).collect();
            if shortcut {
                v.push(format!("{p}.conv_shortcut"));
            }
            v
        };
        let attention = |p: &str| {
            let mut v: Vec<String> = ["norm", "proj_in", "proj_out"].iter().map(|s| format!("{p}.{s}")).collect();
            let t = format!("{p}.transformer_blocks.0");
            for a in ["attn1", "attn2"] {
                v.extend(["to_q", "to_k", "to_v", "to_out.0"].iter().map(|s| format!("{t}.{a}.{s}")));
            }
            v.extend(["norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2"].iter().map(|s| format!("{t}.{s}")));
            v
        };
        for b in 0..4 {
            for r in 0..2 {
                unet.extend(resnet(&format!("down_blocks.{b}.resnets.{r}"), r == 0 && (1..3).contains(&b)));
                if b < 3 {
                    unet.extend(attention(&format!("down_blocks.{b}.attentions.{r}")));
                }
            }
            if b < 3 {
                unet.push(format!("down_blocks.{b}.downsamplers.0.conv"));
            }
            for r in 0..3 {
                unet.extend(resnet(&format!("up_blocks.{b}.resnets.{r}"), true));
                if b > 0 {
                    unet.extend(attention(&format!("up_blocks.{b}.attentions.{r}")));
                }
            }
            if b < 3 {
                unet.push(format!("up_blocks.{b}.upsamplers.0.conv"));
            }
        }
        unet.extend(resnet("mid_block.resnets.0", false));
        unet.extend(resnet("mid_block.resnets.1", false));
        unet.extend(attention("mid_block.attentions.0"));
        let mut text: Vec<String> =
            ["embeddings.token_embedding", "embeddings.position_embedding", "final_layer_norm"].iter().map(|s| format!("text_model.{s}")).collect();
        for l in 0..12 {
            let p = format!("text_model.encoder.layers.{l}");
            text.extend(
                ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"]
                    .iter()
                    .map(|s| format!("{p}.{s}")),
            );
        }
        unet.into_iter().map(|m| (Part::Unet, m)).chain(text.into_iter().map(|m| (Part::TextEncoder, m))).collect()
    }

    /// Every weighted module path of the SDXL base UNet (three levels, transformer depths 0/2/10,
    /// the text-time embedding) and of its two text encoders (CLIP-L 12 layers, OpenCLIP-G 32 with
    /// its projection).
    pub(crate) fn sdxl_modules() -> Vec<(Part, String)> {
        let mut unet: Vec<String> =
            ["conv_in", "conv_out", "conv_norm_out", "time_embedding.linear_1", "time_embedding.linear_2", "add_embedding.linear_1", "add_embedding.linear_2"]
                .map(String::from)
                .to_vec();
        let resnet = |p: &str, shortcut: bool| {
            let mut v: Vec<String> = ["norm1", "conv1", "time_emb_proj", "norm2", "conv2"].iter().map(|s| format!("{p}.{s}")).collect();
            if shortcut {
                v.push(format!("{p}.conv_shortcut"));
            }
            v
        };
        let attention = |p: &str, depth: usize| {
            let mut v: Vec<String> = ["norm", "proj_in", "proj_out"].iter().map(|s| format!("{p}.{s}")).collect();
            for d in 0..depth {
                let t = format!("{p}.transformer_blocks.{d}");
                for a in ["attn1", "attn2"] {
                    v.extend(["to_q", "to_k", "to_v", "to_out.0"].iter().map(|s| format!("{t}.{a}.{s}")));
                }
                v.extend(["norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2"].iter().map(|s| format!("{t}.{s}")));
            }
            v
        };
        let depth = [0, 2, 10];
        for b in 0..3 {
            for r in 0..2 {
                unet.extend(resnet(&format!("down_blocks.{b}.resnets.{r}"), r == 0 && b > 0));
                if depth[b] > 0 {
                    unet.extend(attention(&format!("down_blocks.{b}.attentions.{r}"), depth[b]));
                }
            }
            if b < 2 {
                unet.push(format!("down_blocks.{b}.downsamplers.0.conv"));
            }
            for r in 0..3 {
                unet.extend(resnet(&format!("up_blocks.{b}.resnets.{r}"), true));
                if depth[2 - b] > 0 {
                    unet.extend(attention(&format!("up_blocks.{b}.attentions.{r}"), depth[2 - b]));
                }
            }
            if b < 2 {
                unet.push(format!("up_blocks.{b}.upsamplers.0.conv"));
            }
        }
        unet.extend(resnet("mid_block.resnets.0", false));
        unet.extend(resnet("mid_block.resnets.1", false));
        unet.extend(attention("mid_block.attentions.0", 10));
        let clip = |layers: usize| {
            let mut v: Vec<String> =
                ["embeddings.token_embedding", "embeddings.position_embedding", "final_layer_norm"].iter().map(|s| format!("text_model.{s}")).collect();
            for l in 0..layers {
                let p = format!("text_model.encoder.layers.{l}");
                v.extend(
                    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"]
                        .iter()
                        .map(|s| format!("{p}.{s}")),
                );
            }
            v
        };
        let mut g = clip(32);
        g.push("text_projection".into());
        unet.into_iter().map(|m| (Part::Unet, m)).chain(clip(12).into_iter().map(|m| (Part::TextEncoder, m))).chain(g.into_iter().map(|m| (Part::TextEncoder2, m))).collect()
    }

    #[test]
    fn lora_kohya_table_parses() {
        let n = parse_table(TABLE).unwrap();
        assert_eq!(n.ldm_roots, ["input_blocks", "label_emb", "middle_block", "out", "output_blocks", "time_embed"].map(String::from).into());
        assert!(!n.written[&Family::Sd].ldm && n.written[&Family::Sdxl].ldm);
        let bad = TABLE.replace(r#"text_encoder_2 = "lora_te2"
unet_numbering = "ldm""#, r#"text_encoder_2 = "lora_te3"
unet_numbering = "ldm""#);
        assert!(parse_table(&bad).is_err_and(|e| e.to_string().contains("lora_te3")));
    }

    #[test]
    fn every_sdxl_module_round_trips_in_ldm_numbering() {
        let modules = sdxl_modules();
        let count = |p: Part| modules.iter().filter(|(q, _)| *q == p).count();
        // CLIP-L: 3 + 12 × 8; OpenCLIP-G: 3 + 32 × 8 + the projection.
        assert_eq!((count(Part::TextEncoder), count(Part::TextEncoder2)), (99, 260));
        let mut seen = BTreeSet::new();
        for (part, module) in &modules {
            let name = to_kohya(*part, module, Family::Sdxl).unwrap();
            assert!(seen.insert(name.clone()), "{name} twice");
            let parsed = parse(&name).unwrap();
            assert_eq!(parsed.ldm, *part == Part::Unet, "{name}");
            assert_eq!(from_kohya(&name).unwrap(), (*part, module.clone()), "{name}");
            // diffusers' `--output_kohya_format` names (diffusers numbering) read back too.
            let diffusers_numbered = format!("{}_{}", if *part == Part::Unet { "lora_unet" } else { ["lora_te1", "lora_te2"][(*part == Part::TextEncoder2) as usize] }, module.replace('.', "_"));
            assert_eq!(from_kohya(&diffusers_numbered).unwrap(), (*part, module.clone()), "{diffusers_numbered}");
        }
    }

    #[test]
    fn sdxl_names_as_kohya_sd_scripts_writes_them() {
        let cases = [
            ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
            ("down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj", "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_0_proj"),
            ("mid_block.attentions.0.proj_in", "lora_unet_middle_block_1_proj_in"),
            ("up_blocks.0.attentions.2.transformer_blocks.3.attn2.to_out.0", "lora_unet_output_blocks_2_1_transformer_blocks_3_attn2_to_out_0"),
            ("up_blocks.1.attentions.0.proj_out", "lora_unet_output_blocks_3_1_proj_out"),
            ("up_blocks.0.upsamplers.0.conv", "lora_unet_output_blocks_2_2_conv"),
            ("down_blocks.0.downsamplers.0.conv", "lora_unet_input_blocks_3_0_op"),
            ("down_blocks.1.resnets.0.conv_shortcut", "lora_unet_input_blocks_4_0_skip_connection"),
            ("up_blocks.2.resnets.1.time_emb_proj", "lora_unet_output_blocks_7_0_emb_layers_1"),
            ("mid_block.resnets.1.conv2", "lora_unet_middle_block_2_out_layers_3"),
            ("conv_in", "lora_unet_input_blocks_0_0"),
            ("conv_out", "lora_unet_out_2"),
            ("time_embedding.linear_1", "lora_unet_time_embed_0"),
            ("add_embedding.linear_2", "lora_unet_label_emb_0_2"),
        ];
        for (module, name) in cases {
            assert_eq!(to_kohya(Part::Unet, module, Family::Sdxl).unwrap(), name);
            assert_eq!(from_kohya(name).unwrap(), (Part::Unet, module.to_string()), "{name}");
        }
        assert_eq!(to_kohya(Part::TextEncoder, "text_model.encoder.layers.0.mlp.fc1", Family::Sdxl).unwrap(), "lora_te1_text_model_encoder_layers_0_mlp_fc1");
        assert_eq!(to_kohya(Part::TextEncoder2, "text_projection", Family::Sdxl).unwrap(), "lora_te2_text_projection");
        assert_eq!(from_kohya("lora_te2_text_projection").unwrap(), (Part::TextEncoder2, "text_projection".to_string()));
        assert_eq!(from_kohya("lora_te2_encoder_layers_31_self_attn_out_proj").unwrap(), (Part::TextEncoder2, "text_model.encoder.layers.31.self_attn.out_proj".to_string()));
        assert!(to_kohya(Part::TextEncoder2, "text_projection", Family::Sd).is_err());
    }

    #[test]
    fn ldm_numbering_of_an_sd1_unet_is_told_apart() {
        let sd = ["input_blocks.1.1.transformer_blocks.0.attn1.to_q", "output_blocks.11.1.proj_in"];
        assert_eq!(ldm_family(sd), Family::Sd);
        assert_eq!(ldm_family(["output_blocks.2.1.conv"]), Family::Sd);
        assert_eq!(ldm_family(["input_blocks.4.1.transformer_blocks.0.attn1.to_q", "output_blocks.2.1.proj_in"]), Family::Sdxl);
        assert_eq!(ldm_family(["input_blocks.1.1.transformer_blocks.1.attn1.to_q"]), Family::Sdxl, "depth 2 is SDXL's");
        // In SD 1.x's table output_blocks.2.1 is the first level's upsampler; in SDXL's, an attention.
        let up = parse("lora_unet_output_blocks_2_1_conv").unwrap();
        assert_eq!(resolve(&up, Family::Sd).unwrap(), "up_blocks.0.upsamplers.0.conv");
        let attn = parse("lora_unet_output_blocks_2_1_proj_in").unwrap();
        assert_eq!(resolve(&attn, Family::Sdxl).unwrap(), "up_blocks.0.attentions.2.proj_in");
        let err = from_kohya("lora_unet_input_blocks_x_1_proj_in").unwrap_err().to_string();
        assert!(err.contains("input_blocks.x.1.proj_in") && err.contains("LDM numbering"), "{err}");
    }

    #[test]
    fn every_sd1_module_round_trips() {
        let modules = sd1_modules();
        // 391 UNet (16 transformers, 22 resnets, 6 samplers, 5 others) + 99 CLIP.
        assert_eq!(modules.len(), 490);
        for (part, module) in modules {
            let name = to_kohya(part, &module, Family::Sd).unwrap();
            assert_eq!(from_kohya(&name).unwrap(), (part, module), "{name}");
        }
    }

    #[test]
    fn reads_kohya_examples() {
        let cases = [
            ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0", Part::Unet, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"),
            ("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj", Part::Unet, "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"),
            ("lora_te_text_model_encoder_layers_11_self_attn_q_proj", Part::TextEncoder, "text_model.encoder.layers.11.self_attn.q_proj"),
            ("lora_te1_text_model_encoder_layers_0_mlp_fc1", Part::TextEncoder, "text_model.encoder.layers.0.mlp.fc1"),
            ("lora_te_encoder_layers_0_mlp_fc2", Part::TextEncoder, "text_model.encoder.layers.0.mlp.fc2"),
            ("lora_unet_up_blocks_1_resnets_2_conv_shortcut", Part::Unet, "up_blocks.1.resnets.2.conv_shortcut"),
            ("lora_unet_down_blocks_1_resnets_0_time_emb_proj", Part::Unet, "down_blocks.1.resnets.0.time_emb_proj"),
            ("lora_unet_down_blocks_2_downsamplers_0_conv", Part::Unet, "down_blocks.2.downsamplers.0.conv"),
            ("lora_unet_time_embedding_linear_1", Part::Unet, "time_embedding.linear_1"),
            ("lora_unet_mid_block_resnets_1_conv1", Part::Unet, "mid_block.resnets.1.conv1"),
        ];
        for (name, part, module) in cases {
            assert_eq!(from_kohya(name).unwrap(), (part, module.to_string()), "{name}");
        }
        assert_eq!(to_kohya(Part::TextEncoder, "text_model.encoder.layers.0.mlp.fc1", Family::Sd).unwrap(), "lora_te_text_model_encoder_layers_0_mlp_fc1");
    }

    #[test]
    fn refuses_unprefixed_names() {
        assert!(from_kohya("lora_vae_decoder_conv_in").is_err());
        assert!(has_kohya_prefix("lora_te2_x") && has_kohya_prefix("lora_te1_x") && !has_kohya_prefix("lora_tex") && !has_kohya_prefix("lora_te3_x"));
    }
}
