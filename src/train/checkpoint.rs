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

/// Saves a checkpoint for `state.step` under `dir`, then removes the oldest beyond `keep`. On
/// failure (a full disk, say) the error names the file, the half-written folder is removed and
/// the earlier checkpoints are untouched.
pub fn save(dir: &Path, weights: &HashMap<String, Tensor>, optimizer: &HashMap<String, Tensor>, state: &TrainState, keep: Option<usize>) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let name = format!("checkpoint-{}", state.step);
    let final_dir = dir.join(&name);
    let temp = dir.join(format!(".{name}.tmp"));
    if temp.exists() {
        std::fs::remove_dir_all(&temp).with_context(|| format!("{}: cannot remove", temp.display()))?;
    }
    if let Err(e) = write_files(&temp, &final_dir, weights, optimizer, state) {
        let _ = std::fs::remove_dir_all(&temp);
        return Err(e.context(match list(dir)?.pop() {
            Some((_, last)) => format!("{name} not saved; the last good checkpoint, {}, is kept", last.display()),
            None => format!("{name} not saved"),
        }));
    }
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).with_context(|| format!("{}: cannot replace", final_dir.display()))?;
    }
    std::fs::rename(&temp, &final_dir).with_context(|| format!("{}: cannot rename to {}", temp.display(), final_dir.display()))?;
    crate::output::sync_dir(dir);
    if let Some(keep) = keep {
        let mut all = list(dir)?;
        while all.len() > keep {
            let (_, oldest) = all.remove(0);
            std::fs::remove_dir_all(&oldest).with_context(|| format!("{}: cannot remove", oldest.display()))?;
        }
    }
    Ok(final_dir)
}

/// The checkpoint's three files in `temp`, each synced to disk before the folder is renamed;
/// errors name the file by its place in `final_dir`.
fn write_files(temp: &Path, final_dir: &Path, weights: &HashMap<String, Tensor>, optimizer: &HashMap<String, Tensor>, state: &TrainState) -> Result<()> {
    let failed = |f: &str| format!("{}: cannot write", final_dir.join(f).display());
    std::fs::create_dir(temp).with_context(|| format!("{}: cannot create", final_dir.display()))?;
    candle_core::safetensors::save(weights, temp.join("weights.safetensors")).with_context(|| failed("weights.safetensors"))?;
    candle_core::safetensors::save(optimizer, temp.join("optimizer.safetensors")).with_context(|| failed("optimizer.safetensors"))?;
    std::fs::write(temp.join("state.json"), serde_json::to_string_pretty(state)?).with_context(|| failed("state.json"))?;
    for f in ["weights.safetensors", "optimizer.safetensors", "state.json"] {
        std::fs::File::open(temp.join(f)).and_then(|h| h.sync_all()).with_context(|| failed(f))?;
    }
    Ok(())
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
