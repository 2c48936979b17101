//! `dreambridge push`: one commit that publishes a pipeline folder. Order: check the folder, write
//! a model card if it has none, hash every file while streaming it, create the repo, preupload,
//! send LFS objects (the server may already have some), then the commit. Nothing is committed
//! unless every upload succeeded, so a failed push leaves the repo as it was.

use super::auth::{endpoint, resolve_token};
use super::client::HubClient;
use super::folder_check;
use super::local_files::{collect, LocalFile};
use super::model_card::{model_card, CardInfo};
use crate::progress::Progress;
use anyhow::{ensure, Context, Result};
use std::path::Path;

#[derive(Clone, Debug, Default)]
pub struct PushOptions {
    pub repo: String,
    /// Hub URL; `None` = `HF_ENDPOINT` or the public Hub.
    pub endpoint: Option<String>,
    pub token: Option<String>,
    pub private: bool,
    pub revision: Option<String>,
    pub path_in_repo: Option<String>,
    pub commit_message: Option<String>,
    pub card: CardInfo,
}

#[derive(Debug)]
pub struct Pushed {
    pub commit: String,
    pub uploaded_lfs: usize,
    pub skipped_lfs: usize,
    pub regular: usize,
    pub unchanged: usize,
}

pub fn push(dir: &Path, opts: &PushOptions) -> Result<Pushed> {
    ensure!(opts.repo.split('/').count() == 2, "--repo must be `namespace/name`, got `{}`", opts.repo);
    folder_check::check(dir)?;
    let token = resolve_token(opts.token.as_deref())?;
    write_card_if_missing(dir, opts)?;
    let files = collect(dir, opts.path_in_repo.as_deref().unwrap_or(""))?;
    let client = HubClient::new(&opts.endpoint.clone().unwrap_or_else(endpoint), token);
    let revision = opts.revision.clone().unwrap_or_else(|| "main".into());

    client.create_repo(&opts.repo, opts.private)?;
    if revision != "main" {
        client.create_branch(&opts.repo, &revision)?;
    }
    if let Some(card) = files.iter().find(|f| f.path_in_repo.ends_with("README.md")) {
        client.validate_yaml(&std::fs::read_to_string(&card.abs)?)?;
    }
    let modes = client.preupload(&opts.repo, &revision, &files)?;
    let mut lfs: Vec<&LocalFile> = Vec::new();
    let mut regular: Vec<&LocalFile> = Vec::new();
    let mut unchanged = 0;
    for (f, mode) in files.iter().zip(&modes) {
        let local_oid = if mode.lfs { &f.sha256 } else { &f.git_sha1 };
        if mode.remote_oid.as_deref() == Some(local_oid.as_str()) {
            unchanged += 1; // same bytes already at that path
        } else if mode.lfs {
            lfs.push(f);
        } else {
            regular.push(f);
        }
    }
    let actions = client.lfs_batch(&opts.repo, &revision, &lfs)?;
    let to_send: u64 = lfs.iter().zip(&actions).filter(|(_, a)| a.upload.is_some()).map(|(f, _)| f.size).sum();
    let progress = Progress::new("upload", to_send);
    let mut uploaded = 0;
    for (f, a) in lfs.iter().zip(&actions) {
        if a.upload.is_some() {
            client.upload_lfs(f, a, &|n| progress.advance(&f.path_in_repo, n)).with_context(|| format!("uploading {}", f.path_in_repo))?;
            uploaded += 1;
        }
    }
    progress.finish(&format!("{uploaded} LFS files sent, {} already on the Hub", lfs.len() - uploaded));
    let message = opts.commit_message.clone().unwrap_or_else(|| "Upload with dreambridge".into());
    let commit = client.commit(&opts.repo, &revision, &message, &regular, &lfs)?;
    Ok(Pushed { commit, uploaded_lfs: uploaded, skipped_lfs: lfs.len() - uploaded, regular: regular.len(), unchanged })
}

/// Creates the repo `name` or `namespace/name` on the Hub (`HF_ENDPOINT`), a bare name under the
/// token's user, and returns its full id (diffusers' `--push_to_hub` without `--hub_model_id`).
pub fn create_repo(name: &str, token: Option<&str>, private: bool) -> Result<String> {
    let token = resolve_token(token)?;
    HubClient::new(&endpoint(), token).create_repo_named(name, private)
}

/// Writes README.md (atomically) when the folder has none; an existing card is never touched.
fn write_card_if_missing(dir: &Path, opts: &PushOptions) -> Result<()> {
    let path = dir.join("README.md");
    if path.exists() {
        return Ok(());
    }
    let mut images: Vec<String> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".png") || n.ends_with(".jpg"))
        .collect();
    images.sort();
    let info = CardInfo { repo_id: opts.repo.clone(), lora: opts.card.lora || folder_check::is_lora_folder(dir), ..opts.card.clone() };
    crate::output::atomic_file(&path, |temp| Ok(std::fs::write(temp, model_card(&info, &images))?))
}
