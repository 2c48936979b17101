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
    let api = ApiBuilder::from_env().with_token(token).with_progress(std::io::stderr().is_terminal()).build()?;
    let repo = api.repo(Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.unwrap_or("main").to_string()));
    let info = repo.info().with_context(|| format!("{repo_id}: cannot read the repo's file list"))?;
    let mut snapshot = None;
    for sibling in &info.siblings {
        let path = repo.get(&sibling.rfilename).with_context(|| format!("{repo_id}: downloading {}", sibling.rfilename))?;
        // .../snapshots/<commit>/<rfilename>: the snapshot folder is `depth` levels up.
        let depth = Path::new(&sibling.rfilename).components().count();
        snapshot = path.ancestors().nth(depth).map(Path::to_path_buf);
    }
    snapshot.with_context(|| format!("{repo_id}: the repository is empty"))
}

/// A local folder as is, or a Hub repo id (`namespace/name`) downloaded into the cache.
pub fn local_or_hub(spec: &Path) -> Result<PathBuf> {
    if spec.exists() {
        return Ok(spec.to_owned());
    }
    let text = spec.to_string_lossy();
    let looks_like_repo = text.split('/').count() == 2 && !text.starts_with('.') && !text.starts_with('/');
    anyhow::ensure!(looks_like_repo, "{}: no such folder (nor a Hub repo id `namespace/name`)", spec.display());
    eprintln!("{text}: fetching from the Hub");
    snapshot(&text, None)
}
