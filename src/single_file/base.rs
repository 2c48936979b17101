//! A single-file checkpoint as the base of `train` and `generate`: converted once into a
//! diffusers folder in dreambridge's cache (keyed by the file's path, size and modification
//! time), which the trainer then reads like any base folder.

use super::convert::{describe_prediction, single_file_to_diffusers, ToFolderOptions};
use super::is_single_file;
use anyhow::{Context, Result};
use sha2::Digest;
use std::path::{Path, PathBuf};

/// `$DREAMBRIDGE_CACHE`, else `$XDG_CACHE_HOME/dreambridge`, else `~/.cache/dreambridge`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DREAMBRIDGE_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("dreambridge")
}

/// The diffusers folder for a base given as a folder, a Hub repo id, a single file or a Hub file
/// (`hf://owner/repo/file.safetensors`, a resolve URL).
pub fn resolve_base(spec: &Path) -> Result<PathBuf> {
    resolve_base_at(spec, None)
}

/// [`resolve_base`] at a Hub revision (`--revision`) for repo ids.
pub fn resolve_base_at(spec: &Path, revision: Option<&str>) -> Result<PathBuf> {
    let local = crate::hub::download::local_file_or_hub_at(spec, revision)?;
    if !is_single_file(&local) {
        return Ok(local);
    }
    let meta = std::fs::metadata(&local).with_context(|| format!("{}: cannot read", local.display()))?;
    let canonical = std::fs::canonicalize(&local).unwrap_or(local.clone());
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    let digest = sha2::Sha256::digest(format!("{}\n{}\n{mtime}", canonical.display(), meta.len()).as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let stem = local.file_stem().unwrap_or_default().to_string_lossy().to_string();
    let folder = cache_dir().join("single-file").join(format!("{stem}-{hex}"));
    if folder.join("model_index.json").is_file() {
        eprintln!("{}: using its diffusers form in {}", local.display(), folder.display());
        return Ok(folder);
    }
    eprintln!("{}: converting the single file to a diffusers folder in {}", local.display(), folder.display());
    if super::sdxl::is_sdxl_file(&local) {
        let done = super::sdxl::single_file_to_diffusers(&local, &super::sdxl::SdxlToFolderOptions { base: None, out: folder, half: false, force: false })?;
        eprintln!("SDXL base");
        return Ok(done.out);
    }
    let done = single_file_to_diffusers(&local, &ToFolderOptions { out: folder.clone(), ..Default::default() })?;
    eprintln!("SD {} base, prediction {}", done.sd_version, describe_prediction(&done.prediction));
    Ok(done.out)
}
