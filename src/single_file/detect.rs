//! What a single file does not say outright: its SD version and whether it predicts noise
//! (`epsilon`) or velocity (`v_prediction`, the 768-px SD 2.x models). The rules are the ones
//! the loaders users know apply, in order; the one that decided is reported.

use crate::tensor::TensorSource;
use anyhow::{bail, Result};
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PredictionType {
    #[value(name = "epsilon")]
    Epsilon,
    #[value(name = "v_prediction", alias = "v")]
    V,
}

impl PredictionType {
    /// The scheduler config's `prediction_type` value.
    pub fn diffusers_name(self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::V => "v_prediction",
        }
    }
}

/// A decided prediction type and the rule that decided it.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    pub kind: PredictionType,
    pub reason: String,
}

/// SD2 if the text encoder is OpenCLIP's (`cond_stage_model.model.`), SD1 if it is the HF CLIP
/// (`cond_stage_model.transformer.`); a file without a text encoder is told by the UNet's
/// transformer projection: Linear on SD2, a 1×1 conv on SD1.
pub fn sd_version(source: &dyn TensorSource) -> Result<u8> {
    let keys = source.keys();
    let has = |prefix: &str| keys.iter().any(|k| k.starts_with(prefix));
    match (has("cond_stage_model.model."), has("cond_stage_model.transformer.")) {
        (true, false) => return Ok(2),
        (false, true) => return Ok(1),
        (true, true) => bail!("holds both an SD1 (`cond_stage_model.transformer.`) and an SD2 (`cond_stage_model.model.`) text encoder"),
        (false, false) => {}
    }
    let probe = "model.diffusion_model.input_blocks.1.1.proj_in.weight";
    match source.info(probe) {
        Ok(info) if info.shape.len() == 2 => Ok(2),
        Ok(_) => Ok(1),
        Err(_) => bail!("cannot tell SD1 from SD2 (no text encoder and no `{probe}`); give --sd-version"),
    }
}

/// The first rule that applies: the flag; a sidecar `<name>.yaml` (A1111's convention, the
/// original repo's `parameterization: "v"`); a `v_pred` key; `modelspec.prediction_type`
/// metadata; SD1 is epsilon; for SD2 ComfyUI's test, v when the standard deviation of
/// `output_blocks.11.1.transformer_blocks.0.norm1.bias` exceeds 0.09.
pub fn prediction(path: &Path, source: &dyn TensorSource, sd_version: u8, flag: Option<PredictionType>) -> Result<Prediction> {
    let decided = |kind, reason: &str| Ok(Prediction { kind, reason: reason.to_string() });
    if let Some(kind) = flag {
        return decided(kind, "--prediction-type");
    }
    let yaml = path.with_extension("yaml");
    if let Ok(text) = std::fs::read_to_string(&yaml) {
        let v = text.lines().any(|l| {
            let l = l.trim();
            l.starts_with("parameterization:") && matches!(l["parameterization:".len()..].trim().trim_matches(|c| c == '"' || c == '\''), "v")
        });
        let name = yaml.file_name().unwrap_or_default().to_string_lossy().to_string();
        return decided(if v { PredictionType::V } else { PredictionType::Epsilon }, &format!("sidecar {name}"));
    }
    if source.contains("v_pred") {
        return decided(PredictionType::V, "`v_pred` key");
    }
    if let Some(p) = source.metadata().get("modelspec.prediction_type") {
        let kind = if p == "v" || p == "v_prediction" { PredictionType::V } else { PredictionType::Epsilon };
        return decided(kind, "modelspec.prediction_type");
    }
    if sd_version == 1 {
        return decided(PredictionType::Epsilon, "SD 1.x");
    }
    let probe = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias";
    match source.read(probe) {
        Ok(t) => {
            let v = t.to_f32_values();
            let mean = v.iter().map(|x| *x as f64).sum::<f64>() / v.len().max(1) as f64;
            let var = v.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / v.len().max(1) as f64; // population std, as ComfyUI (unbiased=False)
            let kind = if var.sqrt() > 0.09 { PredictionType::V } else { PredictionType::Epsilon };
            decided(kind, &format!("SD 2.x, std of `{probe}` = {:.3} (ComfyUI's test: v above 0.09)", var.sqrt()))
        }
        Err(_) => decided(PredictionType::Epsilon, "SD 2.x without the probe tensor"),
    }
}
