//! A LoRA set in a few lines: format, modules, ranks and alphas, targets, base model.

use super::write::KohyaInfo;
use super::{LoraModule, LoraSet, Part};
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
    let (unet, text) = (set.count(Part::Unet), set.count(Part::TextEncoder));
    let _ = writeln!(out, "LoRA: {} format, {unet} UNet modules, {text} text-encoder modules", set.format.name());
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
    let base = match (shape_version(set), declared_version(set)) {
        (Some(1), _) => "SD1 (768-wide cross-attention)",
        (Some(_), _) => "SD2 (1024-wide cross-attention)",
        (None, Some(1)) => "SD1 (as the metadata says)",
        (None, Some(_)) => "SD2 (as the metadata says)",
        (None, None) => "unknown",
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
