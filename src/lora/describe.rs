//! A LoRA set in a few lines: format, modules, ranks and alphas, targets, base model.

use super::write::{declared_family, KohyaInfo};
use super::{Family, LoraModule, LoraSet, Part};
use crate::models::lora::Targets;
use std::collections::BTreeSet;
use std::fmt::Write;

/// The SD version the set's shapes show: a cross-attention `to_k` input width (768: SD1, 1024:
/// SD2), else a text-encoder attention width.
pub fn shape_version(set: &LoraSet) -> Option<u8> {
    let by_width = |w: usize| match w {
        768 => Some(1),
        1024 => Some(2),
        _ => None,
    };
    let cross = set.modules.iter().find(|((p, m), _)| *p == Part::Unet && m.ends_with("attn2.to_k")).map(|(_, m)| m.in_dim());
    let text = set.modules.iter().find(|((p, m), _)| *p == Part::TextEncoder && m.contains(".self_attn.")).map(|(_, m)| m.in_dim());
    cross.and_then(by_width).or_else(|| text.and_then(by_width))
}

/// The family the modules show, with the reason: `text_encoder_2` modules, the cross-attention
/// width (2048: SDXL; 768, 1024: SD 1/2), the UNet's block structure (SDXL: attention at the first
/// up level, transformer depth over 1, the text-time embedding; SD 1.x/2.x: attention at the first
/// down level, a fourth level, a downsampler at the third); else what the metadata declares.
pub fn family(set: &LoraSet) -> Option<(Family, &'static str)> {
    if set.count(Part::TextEncoder2) > 0 {
        return Some((Family::Sdxl, "text_encoder_2 modules"));
    }
    let cross = set.modules.iter().find(|((p, m), _)| *p == Part::Unet && m.ends_with("attn2.to_k")).map(|(_, m)| m.in_dim());
    match cross {
        Some(2048) => return Some((Family::Sdxl, "2048-wide cross-attention")),
        Some(768 | 1024) => return Some((Family::Sd, "768/1024-wide cross-attention")),
        _ => {}
    }
    let unet: Vec<Vec<&str>> = set.modules.keys().filter(|(p, _)| *p == Part::Unet).map(|(_, m)| m.split('.').collect()).collect();
    let has = |f: &dyn Fn(&[&str]) -> bool| unet.iter().any(|s| f(s));
    let deep = |s: &[&str]| s.windows(2).any(|w| w[0] == "transformer_blocks" && w[1].parse::<usize>().is_ok_and(|d| d > 0));
    if has(&|s| s.starts_with(&["up_blocks", "0", "attentions"]) || s[0] == "add_embedding" || deep(s)) {
        return Some((Family::Sdxl, "UNet block structure"));
    }
    if has(&|s| s.starts_with(&["down_blocks", "0", "attentions"]) || s.starts_with(&["down_blocks", "3"]) || s.starts_with(&["up_blocks", "3"]) || s.starts_with(&["down_blocks", "2", "downsamplers"])) {
        return Some((Family::Sd, "UNet block structure"));
    }
    declared_family(&set.metadata).map(|f| (f, "as the metadata says"))
}

/// The SD version the file's kohya / modelspec metadata declares.
pub fn declared_version(set: &LoraSet) -> Option<u8> {
    KohyaInfo::from_metadata(&set.metadata, "").1
}

/// The SD version from the shapes, else from the metadata.
pub fn base_version(set: &LoraSet) -> Option<u8> {
    shape_version(set).or_else(|| declared_version(set))
}

/// The smallest of dreambridge's target sets covering every UNet module.
pub fn targets(set: &LoraSet) -> Option<Targets> {
    let unet: Vec<&str> = set.modules.keys().filter(|(p, _)| *p == Part::Unet).map(|(_, m)| m.as_str()).collect();
    [Targets::Attn, Targets::Transformer, Targets::TransformerConv].into_iter().find(|t| unet.iter().all(|m| t.covers(m)))
}

/// How a kohya file's `lora_unet_*` names number the UNet blocks, for `inspect`: `None` for a file
/// with no kohya UNet names.
pub fn kohya_numbering(keys: &[String]) -> Option<&'static str> {
    let unet: Vec<super::names::KohyaName> = keys
        .iter()
        .filter_map(|k| k.split_once('.').map(|(name, _)| name))
        .filter_map(|name| super::names::parse(name).ok())
        .filter(|n| n.part == Part::Unet)
        .collect();
    let ldm = unet.iter().filter(|n| n.ldm).count();
    match (ldm, unet.len()) {
        (_, 0) => None,
        (0, _) => Some("diffusers numbering (lora_unet_down_blocks_…, as kohya writes SD 1.x/2.x and diffusers' --output_kohya_format writes SDXL)"),
        (l, n) if l == n => Some("LDM numbering (lora_unet_input_blocks_…/middle_block_…/output_blocks_…, as kohya sd-scripts writes SDXL)"),
        _ => Some("mixed LDM and diffusers numbering"),
    }
}

/// Distinct values, joined: `4` or `4, 8`.
fn distinct(modules: &[&LoraModule], f: impl Fn(&LoraModule) -> String) -> String {
    modules.iter().map(|m| f(m)).collect::<BTreeSet<_>>().into_iter().collect::<Vec<_>>().join(", ")
}

/// `4`, `0.25`.
fn number(v: f64) -> String {
    format!("{v}")
}

pub fn describe(set: &LoraSet) -> String {
    let mut out = String::new();
    let (unet, text, text2) = (set.count(Part::Unet), set.count(Part::TextEncoder), set.count(Part::TextEncoder2));
    let second = if text2 > 0 { format!(", {text2} text-encoder-2 modules") } else { String::new() };
    let _ = writeln!(out, "LoRA: {} format, {unet} UNet modules, {text} text-encoder modules{second}", set.format.name());
    let family = family(set);
    let _ = match family {
        Some((f, why)) => writeln!(out, "family: {} ({why})", f.name()),
        None => writeln!(out, "family: unknown (SD 1.x/2.x assumed; nothing in the modules or metadata tells)"),
    };
    let all: Vec<&LoraModule> = set.modules.values().collect();
    if !all.is_empty() {
        let (ranks, alphas, scales) = (distinct(&all, |m| m.rank().to_string()), distinct(&all, |m| number(m.alpha)), distinct(&all, |m| number(m.scale())));
        let _ = writeln!(out, "rank {ranks}; alpha {alphas}; scale alpha/rank {scales}");
    }
    let target = match (unet, targets(set)) {
        (0, _) => "none (no UNet modules)".to_string(),
        (_, Some(t)) => t.name().to_string(),
        (_, None) => "other".to_string(),
    };
    let _ = writeln!(out, "targets: {target}");
    let base = match (family, shape_version(set), declared_version(set)) {
        (Some((Family::Sdxl, _)), ..) => "SDXL",
        (_, Some(1), _) => "SD1 (768-wide cross-attention)",
        (_, Some(_), _) => "SD2 (1024-wide cross-attention)",
        (_, None, Some(1)) => "SD1 (as the metadata says)",
        (_, None, Some(_)) => "SD2 (as the metadata says)",
        (_, None, None) => "unknown",
    };
    let _ = writeln!(out, "base model: {base}");
    let conv: Vec<&LoraModule> = all.iter().copied().filter(|m| m.is_conv()).collect();
    match conv.len() {
        0 => out.push_str("conv (LoCon) modules: none\n"),
        n => {
            let _ = writeln!(out, "conv (LoCon) modules: {n} (rank {}, alpha {})", distinct(&conv, |m| m.rank().to_string()), distinct(&conv, |m| number(m.alpha)));
        }
    }
    for key in ["ss_base_model_version", "ss_sd_model_name", "ss_output_name", "modelspec.architecture"] {
        if let Some(v) = set.metadata.get(key) {
            let _ = writeln!(out, "{key}: {v}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::read::tests::ramp;
    use crate::lora::Format;
    use std::collections::BTreeMap;

    fn set(modules: &[(Part, &str, &[usize], f64)]) -> LoraSet {
        let modules = modules
            .iter()
            .map(|(p, m, down, alpha)| {
                let up = if down.len() == 4 { vec![8, down[0], 1, 1] } else { vec![8, down[0]] };
                ((*p, m.to_string()), LoraModule { down: ramp(down, 0.0), up: ramp(&up, 0.0), alpha: *alpha })
            })
            .collect();
        LoraSet { modules, format: Format::Kohya, metadata: BTreeMap::from([("ss_output_name".to_string(), "dog".to_string())]) }
    }

    const T: &str = "down_blocks.0.attentions.0.transformer_blocks.0";

    #[test]
    fn lora_description_of_an_attn_set() {
        let s = set(&[
            (Part::Unet, &format!("{T}.attn2.to_k"), &[4, 768], 4.0),
            (Part::Unet, &format!("{T}.attn1.to_q"), &[4, 320], 4.0),
            (Part::TextEncoder, "text_model.encoder.layers.0.self_attn.q_proj", &[4, 768], 4.0),
        ]);
        let d = describe(&s);
        for line in ["kohya format, 2 UNet modules, 1 text-encoder modules", "rank 4; alpha 4; scale alpha/rank 1", "targets: attn", "base model: SD1", "conv (LoCon) modules: none", "ss_output_name: dog"] {
            assert!(d.contains(line), "{line}\n{d}");
        }
    }

    #[test]
    fn lora_description_of_locon_and_sd2() {
        let s = set(&[
            (Part::Unet, &format!("{T}.attn2.to_k"), &[8, 1024], 1.0),
            (Part::Unet, "down_blocks.0.attentions.0.proj_in", &[8, 320], 1.0),
            (Part::Unet, "down_blocks.0.resnets.0.conv1", &[4, 320, 3, 3], 1.0),
        ]);
        assert_eq!(targets(&s), Some(Targets::TransformerConv));
        let d = describe(&s);
        assert!(d.contains("base model: SD2") && d.contains("conv (LoCon) modules: 1 (rank 4, alpha 1)") && d.contains("rank 4, 8; alpha 1"), "{d}");
        let other = set(&[(Part::Unet, "conv_in", &[4, 4, 3, 3], 4.0)]);
        assert!(describe(&other).contains("targets: other") && describe(&other).contains("base model: unknown"));
        let mut declared = other.clone();
        declared.metadata.insert("ss_v2".into(), "False".into());
        assert!(describe(&declared).contains("base model: SD1 (as the metadata says)"), "{}", describe(&declared));
    }
}
