//! Downloads through the `hf-hub` crate into the Hub cache (`$HF_HOME/hub`, the layout Python's
//! huggingface_hub uses), honouring HF_ENDPOINT, HF_HOME and the token rules of `auth`.

use super::auth::resolve_token;
use anyhow::{Context, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Repo, RepoType};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// Fetches every file of a model repo at `revision` (default main); returns the snapshot folder.
pub fn snapshot(repo_id: &str, revision: Option<&str>) -> Result<PathBuf> {
    let token = resolve_token(None).ok().map(|t| t.secret().to_string());
    let api = ApiBuilder::from_env().with_token(token).with_progress(std::io::stderr().is_terminal()).with_retries(3).build()?;
    let repo = api.repo(Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.unwrap_or("main").to_string()));
    let info = repo.info().map_err(|e| access_hint(e.into())).with_context(|| format!("{repo_id}: cannot read the repo's file list"))?;
    let mut snapshot = None;
    for sibling in &info.siblings {
        let path = repo.get(&sibling.rfilename).with_context(|| format!("{repo_id}: downloading {}", sibling.rfilename))?;
        snapshot = snapshot_root(&path, &sibling.rfilename);
    }
    snapshot.with_context(|| format!("{repo_id}: the repository is empty"))
}

/// The snapshot folder of a downloaded file: `.../snapshots/<commit>/<rfilename>` less `rfilename`.
fn snapshot_root(local: &Path, rfilename: &str) -> Option<PathBuf> {
    local.ancestors().nth(Path::new(rfilename).components().count()).map(Path::to_path_buf)
}

/// `namespace/name`, not a relative or absolute path.
pub(crate) fn is_repo_id(text: &str) -> bool {
    text.split('/').count() == 2 && !text.starts_with('.') && !text.starts_with('/')
}

/// A local folder as is, or a Hub repo id (`namespace/name`) downloaded into the cache.
pub fn local_or_hub(spec: &Path) -> Result<PathBuf> {
    local_or_hub_at(spec, None)
}

/// [`local_or_hub`] at a Hub revision (branch, tag or commit; `--revision`).
pub fn local_or_hub_at(spec: &Path, revision: Option<&str>) -> Result<PathBuf> {
    if spec.exists() {
        return Ok(spec.to_owned());
    }
    let text = spec.to_string_lossy();
    anyhow::ensure!(is_repo_id(&text), "{}: no such folder (nor a Hub repo id `namespace/name`)", spec.display());
    eprintln!("{text}: fetching from the Hub{}", revision.map_or(String::new(), |r| format!(" at {r}")));
    snapshot(&text, revision)
}

/// A file in a Hub repo, as users write it.
#[derive(Clone, Debug, PartialEq)]
pub struct HubFile {
    /// Set when the spec was a URL (its scheme and host); otherwise HF_ENDPOINT applies.
    pub endpoint: Option<String>,
    pub repo_id: String,
    pub revision: String,
    pub path: String,
}

/// Parses `hf://owner/repo/path/in/repo[@revision]` and
/// `https://<endpoint>/owner/repo/resolve/<revision>/<path>` (`blob/` too, as copied from a browser).
pub fn parse_hub_file(spec: &str) -> Option<HubFile> {
    if let Some(rest) = spec.strip_prefix("hf://") {
        let (rest, revision) = match rest.rsplit_once('@') {
            Some((r, rev)) if !rev.contains('/') => (r, rev.to_string()),
            _ => (rest, "main".to_string()),
        };
        let mut parts = rest.splitn(3, '/');
        let (owner, name, path) = (parts.next()?, parts.next()?, parts.next()?);
        if owner.is_empty() || name.is_empty() || path.is_empty() {
            return None;
        }
        return Some(HubFile { endpoint: None, repo_id: format!("{owner}/{name}"), revision, path: path.to_string() });
    }
    let (scheme, rest) = spec.split_once("://").filter(|(s, _)| *s == "http" || *s == "https")?;
    let (host, rest) = rest.split_once('/')?;
    let parts: Vec<&str> = rest.splitn(5, '/').collect();
    match parts.as_slice() {
        [owner, name, "resolve" | "blob", revision, path] if !path.is_empty() => Some(HubFile {
            endpoint: Some(format!("{scheme}://{host}")),
            repo_id: format!("{owner}/{name}"),
            revision: revision.to_string(),
            path: path.split('?').next().unwrap_or(path).to_string(),
        }),
        _ => None,
    }
}

/// The repo of a Hub file at its revision, through its URL's endpoint (else HF_ENDPOINT).
fn hub_repo(file: &HubFile) -> Result<ApiRepo> {
    let token = resolve_token(None).ok().map(|t| t.secret().to_string());
    // Retries continue a broken download where it stopped (a Range request from the partial file).
    let mut builder = ApiBuilder::from_env().with_token(token).with_progress(std::io::stderr().is_terminal()).with_retries(3);
    if let Some(endpoint) = &file.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    Ok(builder.build()?.repo(Repo::with_revision(file.repo_id.clone(), RepoType::Model, file.revision.clone())))
}

/// Downloads one Hub file into the cache (resumable, progress shown) and returns its path.
pub fn hub_file(file: &HubFile) -> Result<PathBuf> {
    let repo = hub_repo(file)?;
    repo.get(&file.path).map_err(|e| access_hint(e.into())).with_context(|| format!("{}: downloading {} at {}", file.repo_id, file.path, file.revision))
}

/// A KerasCV input on the Hub: the file itself; else, when there is no such file (404), a TF
/// checkpoint prefix or a folder of that name, its files downloaded into one snapshot folder.
/// Returns the local file, prefix or folder.
fn hub_keras_file(file: &HubFile) -> Result<PathBuf> {
    let repo = hub_repo(file)?;
    let missing = match repo.get(&file.path) {
        Ok(path) => return Ok(path),
        Err(e) if is_not_found(&e) => e,
        Err(e) => return Err(access_hint(e.into())).with_context(|| format!("{}: downloading {} at {}", file.repo_id, file.path, file.revision)),
    };
    let names: Vec<String> = repo.info().map(|i| i.siblings.into_iter().map(|s| s.rfilename).collect()).unwrap_or_default();
    let Some(files) = prefix_or_folder_files(&names, &file.path) else {
        return Err(anyhow::Error::from(missing))
            .with_context(|| format!("{}: {} at {}: no such file, TF checkpoint prefix (`.index` + data shards) or folder", file.repo_id, file.path, file.revision));
    };
    let mut root = None;
    for name in &files {
        let local = repo.get(name).map_err(|e| access_hint(e.into())).with_context(|| format!("{}: downloading {name} at {}", file.repo_id, file.revision))?;
        root = snapshot_root(&local, name);
    }
    Ok(root.context("an empty file list")?.join(file.path.trim_end_matches('/')))
}

/// The Hub answered 404: no file at that path (a prefix or folder may still be).
fn is_not_found(e: &ApiError) -> bool {
    matches!(e, ApiError::RequestError(r) if matches!(**r, ureq::Error::Status(404, _)))
}

/// The repo files a path that is no file stands for: a TF checkpoint prefix (`path.index`, its
/// `path.data-NNNNN-of-NNNNN` shards and the folder's `checkpoint` file) or a folder (every file
/// under `path/`); `None` when it is neither.
fn prefix_or_folder_files(names: &[String], path: &str) -> Option<Vec<String>> {
    let path = path.trim_end_matches('/');
    let index = format!("{path}.index");
    if names.contains(&index) {
        let state = path.rsplit_once('/').map_or("checkpoint".to_string(), |(dir, _)| format!("{dir}/checkpoint"));
        let shard = |n: &str| n.strip_prefix(&format!("{path}.data-")).is_some_and(|rest| rest.contains("-of-"));
        return Some(names.iter().filter(|n| **n == index || **n == state || shard(n)).cloned().collect());
    }
    let folder = format!("{path}/");
    let files: Vec<String> = names.iter().filter(|n| n.starts_with(&folder)).cloned().collect();
    (!files.is_empty()).then_some(files)
}

/// A 401/403 from the Hub means a gated or private repo: say what to do about it.
fn access_hint(e: anyhow::Error) -> anyhow::Error {
    let text = e.to_string();
    if text.contains("status code 401") || text.contains("status code 403") {
        let how = if std::env::var_os("HF_TOKEN").is_some() { "HF_TOKEN is set but not accepted for it" } else { "set HF_TOKEN to a token with access" };
        return e.context(format!("the repo is gated or private ({how}; accept its terms on the Hub first if it is gated)"));
    }
    e
}

/// A local path as is, a Hub file (`hf://…`, a resolve URL) downloaded, or a Hub repo id.
pub fn local_file_or_hub(spec: &Path) -> Result<PathBuf> {
    local_file_or_hub_at(spec, None)
}

/// [`local_file_or_hub`] with a revision for repo ids (a file spec names its own).
pub fn local_file_or_hub_at(spec: &Path, revision: Option<&str>) -> Result<PathBuf> {
    if spec.exists() {
        return Ok(spec.to_owned());
    }
    match parse_hub_file(&spec.to_string_lossy()) {
        Some(file) => {
            eprintln!("{}: fetching {} from the Hub", file.repo_id, file.path);
            hub_file(&file)
        }
        None => local_or_hub_at(spec, revision),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_file_specs_parse() {
        let f = parse_hub_file("hf://chansung/dreambooth-dog/ckpt/unet.h5@v2").unwrap();
        assert_eq!((f.repo_id.as_str(), f.revision.as_str(), f.path.as_str(), f.endpoint), ("chansung/dreambooth-dog", "v2", "ckpt/unet.h5", None));
        let f = parse_hub_file("hf://a/b/model.safetensors").unwrap();
        assert_eq!(f.revision, "main");
        let f = parse_hub_file("https://huggingface.co/chansung/dreambooth-dog/resolve/main/dreambooth_dog.h5").unwrap();
        assert_eq!(f.endpoint.as_deref(), Some("https://huggingface.co"));
        assert_eq!((f.repo_id.as_str(), f.path.as_str()), ("chansung/dreambooth-dog", "dreambooth_dog.h5"));
        let f = parse_hub_file("http://127.0.0.1:9000/o/r/blob/abc123/sub/x.ckpt?download=true").unwrap();
        assert_eq!((f.revision.as_str(), f.path.as_str()), ("abc123", "sub/x.ckpt"));
        assert_eq!(parse_hub_file("hf://a/b"), None);
        assert_eq!(parse_hub_file("https://example.com/a/b/tree/main/x"), None);
        assert_eq!(parse_hub_file("owner/repo"), None);
    }

    #[test]
    fn checkpoint_prefixes_and_folders_name_their_files() {
        let names: Vec<String> = [
            "README.md", "ckpt/checkpoint", "ckpt/ckpt.index", "ckpt/ckpt.data-00000-of-00001", "ckpt/ckpt-2.index", "cp.ckpt.index",
            "cp.ckpt.data-00000-of-00002", "cp.ckpt.data-00001-of-00002",
        ]
        .map(String::from)
        .to_vec();
        let files = |path: &str| prefix_or_folder_files(&names, path);
        assert_eq!(files("ckpt/ckpt").unwrap(), ["ckpt/checkpoint", "ckpt/ckpt.index", "ckpt/ckpt.data-00000-of-00001"]);
        assert_eq!(files("cp.ckpt").unwrap(), ["cp.ckpt.index", "cp.ckpt.data-00000-of-00002", "cp.ckpt.data-00001-of-00002"]);
        assert_eq!(files("ckpt/").unwrap().len(), 4);
        assert_eq!(files("ckpt/nope"), None);
        assert_eq!(files("ck"), None);
    }
}

/// A KerasCV input as users give it: a local file, folder or TF checkpoint prefix; a Hub file,
/// prefix or folder (`hf://…`, a resolve URL); or a Hub repo id whose content is a SavedModel (as
/// `push_to_hub_keras` writes it) or a single weights file (`.h5`, `.keras`).
pub fn keras_input(spec: &Path) -> Result<PathBuf> {
    // A TF checkpoint prefix (`ckpt/ckpt`) before any Hub reading: it looks like a repo id.
    if spec.exists() || crate::keras::is_checkpoint_prefix(spec) {
        return Ok(spec.to_owned());
    }
    let text = spec.to_string_lossy().to_string();
    if let Some(file) = parse_hub_file(&text) {
        eprintln!("{}: fetching {} from the Hub", file.repo_id, file.path);
        return hub_keras_file(&file);
    }
    let (repo, revision) = match text.rsplit_once('@') {
        Some((r, rev)) => (r.to_string(), Some(rev.to_string())),
        None => (text.clone(), None),
    };
    anyhow::ensure!(is_repo_id(&repo), "{text}: no such file or folder (nor a Hub file `hf://owner/repo/file` or repo id `owner/name`)");
    eprintln!("{repo}: fetching from the Hub");
    let folder = snapshot(&repo, revision.as_deref())?;
    if folder.join("saved_model.pb").is_file() {
        return Ok(folder);
    }
    let weights: Vec<PathBuf> = std::fs::read_dir(&folder)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "h5" || e == "keras"))
        .collect();
    match weights.as_slice() {
        [one] => Ok(one.clone()),
        [] => anyhow::bail!("{repo}: neither a SavedModel (no saved_model.pb) nor a repo with a .h5 / .keras file"),
        many => anyhow::bail!(
            "{repo}: holds several weight files ({}); name one as hf://{repo}/<file>",
            many.iter().map(|p| p.file_name().unwrap_or_default().to_string_lossy().to_string()).collect::<Vec<_>>().join(", ")
        ),
    }
}
