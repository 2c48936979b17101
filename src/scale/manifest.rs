//! `--manifest jobs.jsonl`: one JSON object per line, each a set of command flags (any spelling:
//! `"instance_data_dir": "dog"`, `"max-train-steps": 400`, `"with_prior_preservation": true`),
//! run one row per job (the job array's index) or all rows in turn. Flags given on the command
//! line beside `--manifest` apply to every row; a row's own value wins.
//!
//! Retries are idempotent: a training row that finished leaves a completion marker in its output
//! folder and is skipped when run again (a different row finding that marker is refused); one that
//! stopped part-way resumes from its latest checkpoint. A conversion row whose output exists is
//! skipped (conversions write their output atomically, so it is complete).

use crate::failure::is_retryable;
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// The completion marker a finished training row leaves in its output folder.
pub const DONE_MARKER: &str = ".dreambridge-done.json";

/// What the rows run, and where each one's output is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowKind {
    /// `train`: `output_dir` (a folder that gets the marker; checkpoints resume).
    Train,
    /// `convert`: `out` (skipped when it exists).
    Convert,
}

impl RowKind {
    fn output_key(self) -> &'static str {
        match self {
            RowKind::Train => "output_dir",
            RowKind::Convert => "out",
        }
    }
}

pub struct Manifest {
    pub path: PathBuf,
    /// (line number, row).
    pub rows: Vec<(usize, Map<String, Value>)>,
}

/// `some-flag` for `some_flag`, `--some-flag`, `some-flag`.
fn flag_name(key: &str) -> String {
    key.trim_start_matches('-').replace('_', "-")
}

impl Manifest {
    /// Reads a JSON-lines manifest; blank lines and lines starting with `#` are skipped.
    pub fn read(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let row: Value = serde_json::from_str(line).with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
            let Value::Object(row) = row else { bail!("{} line {}: expected a JSON object of flags", path.display(), i + 1) };
            rows.push((i + 1, row));
        }
        anyhow::ensure!(!rows.is_empty(), "{}: no rows", path.display());
        Ok(Manifest { path: path.to_owned(), rows })
    }

    /// The row's flags as command-line words (`--name=value`; `true` gives `--name`, `false` and
    /// `null` nothing, a list one flag per element).
    pub fn flags(&self, row: usize) -> Result<Vec<String>> {
        let (line, map) = &self.rows[row];
        let mut out = Vec::new();
        for (key, value) in map {
            let name = flag_name(key);
            let word = |v: &Value| -> Result<String> {
                Ok(match v {
                    Value::String(s) => format!("--{name}={s}"),
                    Value::Number(n) => format!("--{name}={n}"),
                    other => bail!("{} line {line}: `{key}`: {other} is not a string, number or true/false", self.path.display()),
                })
            };
            match value {
                Value::Bool(true) => out.push(format!("--{name}")),
                Value::Bool(false) | Value::Null => {}
                Value::Array(items) => {
                    for v in items {
                        out.push(word(v)?);
                    }
                }
                v => out.push(word(v)?),
            }
        }
        Ok(out)
    }

    /// The row's output path (`output_dir` for training, `out` for conversions), as written.
    pub fn output(&self, row: usize, kind: RowKind) -> Result<PathBuf> {
        let (line, map) = &self.rows[row];
        let wanted = flag_name(kind.output_key());
        map.iter()
            .find(|(k, _)| flag_name(k) == wanted)
            .and_then(|(_, v)| v.as_str())
            .map(PathBuf::from)
            .with_context(|| format!("{} line {line}: every row needs its own `{}`", self.path.display(), kind.output_key()))
    }
}

/// What became of one row.
#[derive(Debug)]
pub enum Outcome {
    Done,
    AlreadyDone,
    Failed { retryable: bool, message: String },
}

/// Runs the rows `index` selects (all when `None`) with `run(row, flags)`, skipping finished
/// ones and adding `--resume-from-checkpoint=latest` to training rows that stopped part-way.
/// Rows after a failed one still run; each outcome is returned in row order.
pub fn run_rows(m: &Manifest, index: Option<usize>, kind: RowKind, mut run: impl FnMut(usize, Vec<String>) -> Result<()>) -> Result<Vec<(usize, Outcome)>> {
    let rows: Vec<usize> = match index {
        Some(i) => {
            anyhow::ensure!(i < m.rows.len(), "{}: row index {i}, but the manifest has {} rows (0 to {})", m.path.display(), m.rows.len(), m.rows.len() - 1);
            vec![i]
        }
        None => (0..m.rows.len()).collect(),
    };
    let mut outcomes = Vec::new();
    for i in rows {
        let line = m.rows[i].0;
        let outcome = match run_row(m, i, kind, &mut run) {
            Ok(o) => o,
            // A stop request (SIGTERM from a scheduler preempting the job) ends the whole run.
            Err(e) if e.downcast_ref::<crate::train::interrupt::Interrupted>().is_some() => return Err(e),
            Err(e) => Outcome::Failed { retryable: is_retryable(&e), message: format!("{} line {line}: {}", m.path.display(), crate::output::one_line(&e)) },
        };
        match &outcome {
            Outcome::Done => eprintln!("row {i} (line {line}): done"),
            Outcome::AlreadyDone => eprintln!("row {i} (line {line}): already done, skipped"),
            Outcome::Failed { retryable, message } => eprintln!("row {i}: failed ({}): {message}", if *retryable { "retryable" } else { "permanent" }),
        }
        outcomes.push((i, outcome));
    }
    Ok(outcomes)
}

fn run_row(m: &Manifest, i: usize, kind: RowKind, run: &mut impl FnMut(usize, Vec<String>) -> Result<()>) -> Result<Outcome> {
    let out = m.output(i, kind)?;
    let mut flags = m.flags(i)?;
    let row_json = Value::Object(m.rows[i].1.clone());
    match kind {
        RowKind::Convert if out.exists() => return Ok(Outcome::AlreadyDone),
        RowKind::Convert => {}
        RowKind::Train => {
            let marker = out.join(DONE_MARKER);
            if let Ok(text) = std::fs::read_to_string(&marker) {
                let done: Value = serde_json::from_str(&text).with_context(|| format!("{}: unreadable completion marker", marker.display()))?;
                if done["row"] == row_json {
                    return Ok(Outcome::AlreadyDone);
                }
                bail!("{}: finished by another row ({}); give this row its own output_dir", out.display(), done["row"]);
            }
            let resuming = m.rows[i].1.keys().any(|k| flag_name(k) == "resume-from-checkpoint");
            if !resuming && !crate::train::checkpoint::list(&out).unwrap_or_default().is_empty() {
                eprintln!("row {i}: {} holds checkpoints of an unfinished run: resuming from the latest", out.display());
                flags.push("--resume-from-checkpoint=latest".into());
            }
        }
    }
    run(i, flags)?;
    if kind == RowKind::Train {
        std::fs::create_dir_all(&out).with_context(|| format!("{}: cannot create", out.display()))?;
        let marker = serde_json::json!({"manifest": m.path.display().to_string(), "line": m.rows[i].0, "row": row_json});
        crate::output::atomic_file(&out.join(DONE_MARKER), |temp| Ok(std::fs::write(temp, serde_json::to_string_pretty(&marker)?)?))?;
    }
    Ok(Outcome::Done)
}

/// The exit status of a manifest run: 0 when every row is done, [`crate::failure::RETRYABLE_EXIT`]
/// when every failure is retryable, else 1.
pub fn exit_status(outcomes: &[(usize, Outcome)]) -> u8 {
    let failures: Vec<bool> = outcomes.iter().filter_map(|(_, o)| match o {
        Outcome::Failed { retryable, .. } => Some(*retryable),
        _ => None,
    }).collect();
    match (failures.is_empty(), failures.iter().all(|r| *r)) {
        (true, _) => 0,
        (false, true) => crate::failure::RETRYABLE_EXIT,
        (false, false) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(dir: &Path, text: &str) -> Manifest {
        let path = dir.join("jobs.jsonl");
        std::fs::write(&path, text).unwrap();
        Manifest::read(&path).unwrap()
    }

    #[test]
    fn rows_become_flags_in_either_spelling() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest(dir.path(), "# subjects\n{\"instance_data_dir\": \"dog\", \"max-train-steps\": 400, \"with_prior_preservation\": true, \"center_crop\": false, \"lora_scale\": [0.5, 1], \"output_dir\": \"out/dog\"}\n\n");
        assert_eq!(m.rows.len(), 1);
        assert_eq!(m.flags(0).unwrap(), ["--instance-data-dir=dog", "--max-train-steps=400", "--with-prior-preservation", "--lora-scale=0.5", "--lora-scale=1", "--output-dir=out/dog"]);
        assert_eq!(m.output(0, RowKind::Train).unwrap(), PathBuf::from("out/dog"));
        let m = manifest(dir.path(), "{\"instance_data_dir\": \"dog\"}\n");
        assert!(m.output(0, RowKind::Train).unwrap_err().to_string().contains("line 1: every row needs its own `output_dir`"));
        std::fs::write(dir.path().join("bad.jsonl"), "{\"a\": 1}\n[1]\n").unwrap();
        assert!(Manifest::read(&dir.path().join("bad.jsonl")).err().unwrap().to_string().contains("line 2: expected a JSON object"));
    }

    #[test]
    fn finished_rows_are_skipped_and_failures_classified() {
        let dir = tempfile::tempdir().unwrap();
        let out = |n: &str| dir.path().join(n).display().to_string();
        let text = format!("{{\"output_dir\": \"{}\"}}\n{{\"output_dir\": \"{}\"}}\n{{\"output_dir\": \"{}\"}}\n", out("a"), out("b"), out("c"));
        let m = manifest(dir.path(), &text);
        let mut runs = Vec::new();
        let outcomes = run_rows(&m, None, RowKind::Train, |i, _| {
            runs.push(i);
            match i {
                1 => bail!("dog/: no images"),
                2 => Err(crate::failure::Retryable("HTTP 503".into()).into()),
                _ => Ok(()),
            }
        })
        .unwrap();
        assert!(matches!(outcomes[0].1, Outcome::Done) && matches!(outcomes[1].1, Outcome::Failed { retryable: false, .. }));
        assert!(matches!(outcomes[2].1, Outcome::Failed { retryable: true, .. }));
        assert_eq!(exit_status(&outcomes), 1);
        assert_eq!(exit_status(&outcomes[2..]), crate::failure::RETRYABLE_EXIT);
        assert!(dir.path().join("a").join(DONE_MARKER).is_file() && !dir.path().join("b").join(DONE_MARKER).exists());
        // The retry runs only what is not done.
        runs.clear();
        let again = run_rows(&m, None, RowKind::Train, |i, _| {
            runs.push(i);
            Ok(())
        })
        .unwrap();
        assert_eq!(runs, [1, 2]);
        assert!(matches!(again[0].1, Outcome::AlreadyDone) && exit_status(&again) == 0);
        // Another row pointed at a finished folder is refused, not skipped.
        let other = manifest(dir.path(), &format!("{{\"output_dir\": \"{}\", \"seed\": 1}}\n", out("a")));
        let refused = run_rows(&other, Some(0), RowKind::Train, |_, _| Ok(())).unwrap();
        assert!(matches!(&refused[0].1, Outcome::Failed { retryable: false, message } if message.contains("finished by another row")));
        assert!(run_rows(&m, Some(3), RowKind::Train, |_, _| Ok(())).unwrap_err().to_string().contains("has 3 rows"));
    }
}
