//! kohya module names (`lora_unet_down_blocks_0_..._to_q`) <-> diffusers module paths
//! (`down_blocks.0....to_q`), driven by the word list of `mappings/lora_kohya.toml`.

use super::Part;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

const TABLE: &str = include_str!("../../mappings/lora_kohya.toml");

#[derive(Deserialize)]
struct RawTable {
    prefixes: RawPrefixes,
    vocabulary: BTreeMap<String, Vec<String>>,
}

#[derive(Deserialize)]
struct RawPrefixes {
    unet: Vec<String>,
    text_encoder: Vec<String>,
    #[serde(default)]
    refused: BTreeMap<String, String>,
}

/// The parsed table.
struct Names {
    /// (prefix, part), longest prefix first; the first of each part is the written one.
    prefixes: Vec<(String, Part)>,
    written: BTreeMap<Part, String>,
    refused: BTreeMap<String, String>,
    words: BTreeSet<String>,
    /// Most "_"-joined tokens in one word.
    longest: usize,
}

fn names() -> &'static Names {
    static NAMES: OnceLock<Names> = OnceLock::new();
    NAMES.get_or_init(|| parse(TABLE).expect("mappings/lora_kohya.toml is valid (checked by the tests)"))
}

fn parse(text: &str) -> Result<Names> {
    let raw: RawTable = toml::from_str(text).context("mappings/lora_kohya.toml")?;
    let mut prefixes = Vec::new();
    let mut written = BTreeMap::new();
    for (part, list) in [(Part::Unet, &raw.prefixes.unet), (Part::TextEncoder, &raw.prefixes.text_encoder)] {
        let first = list.first().with_context(|| format!("mappings/lora_kohya.toml: no {} prefix", part.name()))?;
        written.insert(part, first.clone());
        prefixes.extend(list.iter().map(|p| (p.clone(), part)));
    }
    prefixes.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    let words: BTreeSet<String> = raw.vocabulary.into_values().flatten().collect();
    let longest = words.iter().map(|w| w.split('_').count()).max().unwrap_or(1);
    Ok(Names { prefixes, written, refused: raw.prefixes.refused, words, longest })
}

/// The kohya name of `module` (a diffusers path; text-encoder paths under `text_model.`).
pub fn to_kohya(part: Part, module: &str) -> String {
    format!("{}_{}", names().written[&part], module.replace('.', "_"))
}

/// Whether `name` starts with a kohya prefix (one read or one refused).
pub fn has_kohya_prefix(name: &str) -> bool {
    let n = names();
    n.prefixes.iter().map(|(p, _)| p).chain(n.refused.keys()).any(|p| name.strip_prefix(p.as_str()).is_some_and(|rest| rest.starts_with('_')))
}

/// The part and diffusers module path of a kohya module name.
pub fn from_kohya(name: &str) -> Result<(Part, String)> {
    let n = names();
    for (prefix, why) in &n.refused {
        if name.strip_prefix(prefix.as_str()).is_some_and(|rest| rest.starts_with('_')) {
            bail!("`{prefix}_` is {why}; not supported");
        }
    }
    let (part, rest) = n
        .prefixes
        .iter()
        .find_map(|(p, part)| name.strip_prefix(p.as_str()).and_then(|r| r.strip_prefix('_')).map(|r| (*part, r)))
        .with_context(|| format!("`{name}` has no kohya prefix (lora_unet_, lora_te_, lora_te1_)"))?;
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
    Ok((part, part.normalize(&segments.join("."))))
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

    #[test]
    fn every_sd1_module_round_trips() {
        let modules = sd1_modules();
        // 391 UNet (16 transformers, 22 resnets, 6 samplers, 5 others) + 99 CLIP.
        assert_eq!(modules.len(), 490);
        for (part, module) in modules {
            let name = to_kohya(part, &module);
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
        assert_eq!(to_kohya(Part::TextEncoder, "text_model.encoder.layers.0.mlp.fc1"), "lora_te_text_model_encoder_layers_0_mlp_fc1");
    }

    #[test]
    fn refuses_sdxl_and_unprefixed_names() {
        let err = from_kohya("lora_te2_text_model_encoder_layers_0_mlp_fc1").unwrap_err().to_string();
        assert!(err.contains("lora_te2_") && err.contains("SDXL"), "{err}");
        assert!(from_kohya("lora_vae_decoder_conv_in").is_err());
        assert!(has_kohya_prefix("lora_te2_x") && has_kohya_prefix("lora_te1_x") && !has_kohya_prefix("lora_tex"));
    }
}
