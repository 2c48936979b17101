//! Atomic outputs: everything is written into a hidden staging folder beside the destination and
//! renamed into place at the end, so a failed run leaves nothing behind and an existing folder is
//! replaced only with `--force` (and only once the new one is complete).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct Staging {
    dest: PathBuf,
    temp: PathBuf,
    force: bool,
    committed: bool,
}

impl Staging {
    /// Refuses an existing destination without `force`, and any destination that is (or holds)
    /// one of `inputs`.
    pub fn new(dest: &Path, force: bool, inputs: &[&Path]) -> Result<Staging> {
        if dest.exists() && !force {
            bail!("{}: already exists (use --force to replace it)", dest.display());
        }
        let dest_abs = absolute(dest)?;
        for input in inputs {
            let input_abs = absolute(input)?;
            if input_abs.starts_with(&dest_abs) {
                bail!("{}: the output would overwrite the input {}", dest.display(), input.display());
            }
        }
        let parent = dest_abs.parent().context("output has no parent folder")?;
        std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
        let name = dest_abs.file_name().context("output has no name")?.to_string_lossy().to_string();
        let temp = parent.join(format!(".{name}.dreambridge-tmp-{}", std::process::id()));
        if temp.exists() {
            std::fs::remove_dir_all(&temp)?;
        }
        std::fs::create_dir(&temp).with_context(|| format!("{}: cannot create", temp.display()))?;
        Ok(Staging { dest: dest_abs, temp, force, committed: false })
    }

    /// Where to write: a path inside the staging folder.
    pub fn path(&self, relative: &str) -> Result<PathBuf> {
        let p = self.temp.join(relative);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        Ok(p)
    }

    pub fn write(&self, relative: &str, contents: &[u8]) -> Result<()> {
        let p = self.path(relative)?;
        std::fs::write(&p, contents).with_context(|| format!("{}: cannot write", p.display()))
    }

    /// Moves the finished folder into place (replacing the old one only now, with --force).
    pub fn commit(mut self) -> Result<PathBuf> {
        if self.dest.exists() {
            if !self.force {
                bail!("{}: appeared while converting; not replaced", self.dest.display());
            }
            let old = self.temp.with_extension("old");
            std::fs::rename(&self.dest, &old)?;
            std::fs::rename(&self.temp, &self.dest)?;
            if old.is_dir() {
                std::fs::remove_dir_all(&old)?;
            } else {
                std::fs::remove_file(&old)?;
            }
        } else {
            std::fs::rename(&self.temp, &self.dest)?;
        }
        self.committed = true;
        Ok(self.dest.clone())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.temp);
        }
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(p).with_context(|| format!("{}: bad path", p.display()))?;
    Ok(abs.canonicalize().unwrap_or(abs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_left_when_dropped_and_existing_output_needs_force() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        {
            let s = Staging::new(&dest, false, &[]).unwrap();
            s.write("a/b.txt", b"x").unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "staging folder must be removed");
        std::fs::create_dir(&dest).unwrap();
        std::fs::write(dest.join("keep"), b"user data").unwrap();
        assert!(Staging::new(&dest, false, &[]).unwrap_err().to_string().contains("--force"));
        let s = Staging::new(&dest, true, &[]).unwrap();
        s.write("new", b"y").unwrap();
        s.commit().unwrap();
        assert!(dest.join("new").exists() && !dest.join("keep").exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn refuses_to_write_over_an_input() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("model");
        std::fs::create_dir(&input).unwrap();
        let err = Staging::new(&input, true, &[&input]).unwrap_err().to_string();
        assert!(err.contains("overwrite the input"), "{err}");
    }
}
