//! The files of a folder to upload, hashed while streamed (never read whole into memory).

use anyhow::{Context, Result};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The Hub's preupload call looks at the first 512 bytes of each file.
pub const SAMPLE_LEN: usize = 512;

#[derive(Clone, Debug)]
pub struct LocalFile {
    pub path_in_repo: String,
    pub abs: PathBuf,
    pub size: u64,
    /// sha256 hex: the LFS object id.
    pub sha256: String,
    /// git blob sha1 hex: the id of a regular file in the repo.
    pub git_sha1: String,
    pub sample: Vec<u8>,
}

/// Every file under `dir`, with `prefix/` before its repo path. Skipped: hidden entries (`.git`,
/// staging folders) and training checkpoints (`checkpoint-*`), as diffusers' scripts skip them.
pub fn collect(dir: &Path, prefix: &str) -> Result<Vec<LocalFile>> {
    let mut paths = Vec::new();
    walk(dir, dir, &mut paths)?;
    paths.sort();
    paths
        .into_iter()
        .map(|(rel, abs)| {
            let path_in_repo = if prefix.is_empty() { rel } else { format!("{}/{rel}", prefix.trim_matches('/')) };
            hash_file(&abs, path_in_repo).with_context(|| abs.display().to_string())
        })
        .collect()
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("{}: cannot read", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with('.') || (dir == root && name.starts_with("checkpoint-")) {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            walk(root, &path, out)?;
        } else {
            let rel = path.strip_prefix(root)?.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
            out.push((rel, path));
        }
    }
    Ok(())
}

fn hash_file(abs: &Path, path_in_repo: String) -> Result<LocalFile> {
    let mut file = std::fs::File::open(abs)?;
    let size = file.metadata()?.len();
    let mut sha256 = Sha256::new();
    let mut sha1 = Sha1::new();
    sha1.update(format!("blob {size}\0").as_bytes());
    let mut sample = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if sample.len() < SAMPLE_LEN {
            sample.extend_from_slice(&buf[..n.min(SAMPLE_LEN - sample.len())]);
        }
        sha256.update(&buf[..n]);
        sha1.update(&buf[..n]);
    }
    Ok(LocalFile { path_in_repo, abs: abs.to_owned(), size, sha256: hex(&sha256.finalize()), git_sha1: hex(&sha1.finalize()), sample })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_match_git_and_sha256() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("unet")).unwrap();
        std::fs::write(dir.path().join("unet/a.txt"), b"hello\n").unwrap();
        std::fs::write(dir.path().join(".hidden"), b"x").unwrap();
        let files = collect(dir.path(), "sub").unwrap();
        assert_eq!(files.len(), 1);
        let f = &files[0];
        assert_eq!(f.path_in_repo, "sub/unet/a.txt");
        // `git hash-object` and `sha256sum` of "hello\n"
        assert_eq!(f.git_sha1, "ce013625030ba8dba906f756967f9e9ca394464a");
        assert_eq!(f.sha256, "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03");
        assert_eq!(f.sample, b"hello\n");
    }
}
