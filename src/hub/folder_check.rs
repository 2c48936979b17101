//! Is a folder what `StableDiffusionPipeline.from_pretrained` needs? Lists everything missing.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// What `from_pretrained` would miss in `dir`, from its `model_index.json`.
pub fn missing_for_from_pretrained(dir: &Path) -> Result<Vec<String>> {
    let index = dir.join("model_index.json");
    let text = match std::fs::read_to_string(&index) {
        Ok(t) => t,
        Err(_) => return Ok(vec!["model_index.json".into()]),
    };
    let index: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", index.display()))?;
    let mut missing = Vec::new();
    for (name, entry) in index.as_object().context("model_index.json is not an object")? {
        let Some([lib, class]) = entry.as_array().map(|a| a.as_slice()) else { continue };
        if name.starts_with('_') || lib.is_null() || class.is_null() {
            continue;
        }
        let folder = dir.join(name);
        if !folder.is_dir() {
            missing.push(format!("{name}/"));
            continue;
        }
        let has = |f: &str| folder.join(f).is_file();
        let any_ext = |exts: &[&str]| {
            std::fs::read_dir(&folder)
                .map(|rd| rd.flatten().any(|e| exts.iter().any(|x| e.file_name().to_string_lossy().ends_with(x))))
                .unwrap_or(false)
        };
        match name.as_str() {
            "scheduler" => {
                if !has("scheduler_config.json") {
                    missing.push("scheduler/scheduler_config.json".into());
                }
            }
            "tokenizer" | "tokenizer_2" => {
                if !(has("tokenizer.json") || (has("vocab.json") && has("merges.txt"))) {
                    missing.push(format!("{name}/vocab.json + merges.txt (or tokenizer.json)"));
                }
            }
            "feature_extractor" => {
                if !has("preprocessor_config.json") {
                    missing.push("feature_extractor/preprocessor_config.json".into());
                }
            }
            _ => {
                if !has("config.json") {
                    missing.push(format!("{name}/config.json"));
                }
                if !any_ext(&[".safetensors", ".bin", ".safetensors.index.json"]) {
                    missing.push(format!("{name}/ weights (*.safetensors)"));
                }
            }
        }
    }
    Ok(missing)
}

/// A LoRA folder (what `load_lora_weights` reads): no pipeline index, and the adapter weights
/// diffusers looks for first.
pub fn is_lora_folder(dir: &Path) -> bool {
    !dir.join("model_index.json").exists() && dir.join(crate::lora::DIFFUSERS_FILE_NAME).is_file()
}

/// Refuses a folder `from_pretrained` (or, for a LoRA folder, `load_lora_weights`) could not
/// load, naming every missing piece.
pub fn check(dir: &Path) -> Result<()> {
    if is_lora_folder(dir) {
        return Ok(());
    }
    let missing = missing_for_from_pretrained(dir)?;
    if !missing.is_empty() {
        bail!("{}: not a loadable diffusers pipeline; missing: {}", dir.display(), missing.join(", "));
    }
    Ok(())
}
