//! Training checkpoints: `checkpoint-<step>/` holding the trained weights, the optimiser moments and
//! `state.json` (step, RNG state). Written into a temporary folder and renamed, so a kill mid-save
//! never damages the last good checkpoint; `latest` ignores unfinished ones.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    pub step: usize,
    pub rng_state: u64,
    /// The fp16 loss scale, when training in fp16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
}

/// Saves a checkpoint for `state.step` under `dir`, then removes the oldest beyond `keep`.
pub fn save(dir: &Path, weights: &HashMap<String, Tensor>, optimizer: &HashMap<String, Tensor>, state: &TrainState, keep: Option<usize>) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let name = format!("checkpoint-{}", state.step);
    let temp = dir.join(format!(".{name}.tmp"));
    if temp.exists() {
        std::fs::remove_dir_all(&temp)?;
    }
    std::fs::create_dir(&temp)?;
    candle_core::safetensors::save(weights, temp.join("weights.safetensors"))?;
    candle_core::safetensors::save(optimizer, temp.join("optimizer.safetensors"))?;
    std::fs::write(temp.join("state.json"), serde_json::to_string_pretty(state)?)?;
    let final_dir = dir.join(&name);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&temp, &final_dir)?;
    if let Some(keep) = keep {
        let mut all = list(dir)?;
        while all.len() > keep {
            let (_, oldest) = all.remove(0);
            std::fs::remove_dir_all(oldest)?;
        }
    }
    Ok(final_dir)
}

/// Finished checkpoints in `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(step) = name.strip_prefix("checkpoint-").and_then(|s| s.parse::<usize>().ok()) {
            if e.path().join("state.json").is_file() {
                out.push((step, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Loads `spec` (`latest` or a checkpoint folder): weights, optimiser state, train state.
pub fn load(dir: &Path, spec: &str) -> Result<(HashMap<String, Tensor>, HashMap<String, Tensor>, TrainState)> {
    let path = if spec == "latest" {
        list(dir)?.pop().with_context(|| format!("{}: no checkpoint to resume from", dir.display()))?.1
    } else {
        PathBuf::from(spec)
    };
    let read = |f: &str| candle_core::safetensors::load(path.join(f), &Device::Cpu).with_context(|| format!("{}: {f}", path.display()));
    let state: TrainState = serde_json::from_str(&std::fs::read_to_string(path.join("state.json"))?)?;
    Ok((read("weights.safetensors")?, read("optimizer.safetensors")?, state))
}
