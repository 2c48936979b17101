//! Downloads through the `hf-hub` crate into the Hub cache (`$HF_HOME/hub`, the layout Python's
//! huggingface_hub uses), honouring HF_ENDPOINT, HF_HOME and the token rules of `auth`.

use super::auth::resolve_token;
use anyhow::{Context, Result};
use hf_hub::api::sync::ApiBuilder;
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
        // .../snapshots/<commit>/<rfilename>: the snapshot folder is `depth` levels up.
        let depth = Path::new(&sibling.rfilename).components().count();
        snapshot = path.ancestors().nth(depth).map(Path::to_path_buf);
    }
    snapshot.with_context(|| format!("{repo_id}: the repository is empty"))
}

/// `namespace/name`, not a relative or absolute path.
fn is_repo_id(text: &str) -> bool {
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

/// Downloads one Hub file into the cache (resumable, progress shown) and returns its path.
pub fn hub_file(file: &HubFile) -> Result<PathBuf> {
    let token = resolve_token(None).ok().map(|t| t.secret().to_string());
    // Retries continue a broken download where it stopped (a Range request from the partial file).
    let mut builder = ApiBuilder::from_env().with_token(token).with_progress(std::io::stderr().is_terminal()).with_retries(3);
    if let Some(endpoint) = &file.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    let api = builder.build()?;
    let repo = api.repo(Repo::with_revision(file.repo_id.clone(), RepoType::Model, file.revision.clone()));
    repo.get(&file.path).map_err(|e| access_hint(e.into())).with_context(|| format!("{}: downloading {} at {}", file.repo_id, file.path, file.revision))
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
}

/// A KerasCV input as users give it: a local file or folder; a Hub file (`hf://…`, a resolve
/// URL); or a Hub repo id whose content is a SavedModel (as `push_to_hub_keras` writes it) or a
/// single weights file (`.h5`, `.keras`).
pub fn keras_input(spec: &Path) -> Result<PathBuf> {
    if spec.exists() {
        return Ok(spec.to_owned());
    }
    let text = spec.to_string_lossy().to_string();
    if parse_hub_file(&text).is_some() {
        return local_file_or_hub(spec);
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
