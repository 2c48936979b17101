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

/// The checkpoint folder `--resume_from_checkpoint` names, as diffusers' scripts read it:
/// `latest` is the newest finished checkpoint in `dir`, or `None` when there is none yet (a
/// fresh run: diffusers starts training, which is what preemptible jobs passing `latest` on every
/// start rely on). Any other value is a checkpoint folder, either as given or, as diffusers takes
/// it, by its name in `dir` (`checkpoint-500`); one that does not exist is an error.
pub fn resolve(dir: &Path, spec: &str) -> Result<Option<PathBuf>> {
    if spec == "latest" {
        return Ok(list(dir)?.pop().map(|(_, path)| path));
    }
    let given = PathBuf::from(spec);
    let by_name = given.file_name().map(|name| dir.join(name));
    for candidate in std::iter::once(given.clone()).chain(by_name) {
        if candidate.join("state.json").is_file() {
            return Ok(Some(candidate));
        }
    }
    match given.is_dir() {
        true => anyhow::bail!("--resume_from_checkpoint {spec}: not a finished checkpoint (no state.json in it)"),
        false => anyhow::bail!("--resume_from_checkpoint {spec}: no such checkpoint (nor `{}` in {})", given.file_name().unwrap_or_default().to_string_lossy(), dir.display()),
    }
}

/// Loads `spec` (`latest` or a checkpoint folder, see [`resolve`]): weights, optimiser state,
/// train state.
pub fn load(dir: &Path, spec: &str) -> Result<(HashMap<String, Tensor>, HashMap<String, Tensor>, TrainState)> {
    let path = resolve(dir, spec)?.with_context(|| format!("{}: no checkpoint to resume from", dir.display()))?;
    let read = |f: &str| candle_core::safetensors::load(path.join(f), &Device::Cpu).with_context(|| format!("{}: {f}", path.display()));
    let state: TrainState = serde_json::from_str(&std::fs::read_to_string(path.join("state.json"))?)?;
    Ok((read("weights.safetensors")?, read("optimizer.safetensors")?, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(dir: &Path, step: usize) -> PathBuf {
        let path = dir.join(format!("checkpoint-{step}"));
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("state.json"), "{}").unwrap();
        path
    }

    #[test]
    fn latest_without_a_checkpoint_is_a_fresh_start_and_a_named_one_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("output");
        // No output folder yet, then an empty one, then only an unfinished checkpoint.
        assert_eq!(resolve(&out, "latest").unwrap(), None);
        std::fs::create_dir_all(out.join("checkpoint-7")).unwrap();
        assert_eq!(resolve(&out, "latest").unwrap(), None);
        let err = resolve(&out, "checkpoint-9").unwrap_err().to_string();
        assert!(err.contains("checkpoint-9") && err.contains("no such checkpoint"), "{err}");
        let err = resolve(&out, out.join("checkpoint-7").to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("not a finished checkpoint"), "{err}");

        let (two, ten) = (finished(&out, 2), finished(&out, 10));
        assert_eq!(resolve(&out, "latest").unwrap(), Some(ten.clone()));
        // diffusers' spelling: the folder's name, looked up in the output folder, from anywhere.
        assert_eq!(resolve(&out, "checkpoint-2").unwrap(), Some(two.clone()));
        assert_eq!(resolve(&out, "elsewhere/checkpoint-2").unwrap(), Some(two));
        assert_eq!(resolve(&out, ten.to_str().unwrap()).unwrap(), Some(ten));
    }
}
