//! Textual-inversion text encoders: a CLIP token embedding with rows beyond CLIP's 49,408-token
//! vocabulary, one per learned placeholder token. The tokenizer written beside the weights gets the
//! tokens (as transformers' `add_tokens` records them: `added_tokens.json` and
//! `added_tokens_decoder` in `tokenizer_config.json`), and the rows can be written as the
//! learned-embeds files diffusers' `load_textual_inversion` reads (`{token: [dim]}`).

use crate::output::atomic_file;
use crate::tensor::RawTensor;
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The vocabulary of OpenAI's CLIP BPE tokenizer (SD1 and SD2 alike).
pub const CLIP_VOCAB: usize = 49408;

/// Checks that every extra row has a token, in row order; returns the first new id.
pub fn check_tokens(vocab: usize, tokens: &[String]) -> Result<usize> {
    let extra = vocab.saturating_sub(CLIP_VOCAB);
    if vocab < CLIP_VOCAB {
        ensure!(tokens.is_empty(), "--placeholder-token: this text encoder's vocabulary ({vocab} rows) is smaller than CLIP's, so it has no learned rows");
        return Ok(vocab);
    }
    if extra != tokens.len() {
        if tokens.is_empty() {
            bail!(
                "the text encoder has {extra} token-embedding row{} beyond CLIP's {CLIP_VOCAB} (a textual-inversion model): name {} with --placeholder-token TOKEN, once per row in row order",
                if extra == 1 { "" } else { "s" },
                if extra == 1 { "it" } else { "them" }
            );
        }
        bail!("--placeholder-token was given {} time(s) but the text encoder has {extra} row(s) beyond CLIP's {CLIP_VOCAB}", tokens.len());
    }
    let mut seen = std::collections::BTreeSet::new();
    for t in tokens {
        ensure!(!t.trim().is_empty() && !t.contains(char::is_whitespace), "--placeholder-token `{t}`: a token is one word without spaces");
        ensure!(seen.insert(t), "--placeholder-token `{t}` is given twice");
    }
    Ok(CLIP_VOCAB)
}

/// Adds `tokens` (ids from `first_id`) to the tokenizer folder `dir`.
pub fn add_tokens(dir: &Path, tokens: &[String], first_id: usize) -> Result<()> {
    if tokens.is_empty() {
        return Ok(());
    }
    let config_path = dir.join("tokenizer_config.json");
    let text = std::fs::read_to_string(&config_path).with_context(|| format!("{}: cannot read", config_path.display()))?;
    let mut config: Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", config_path.display()))?;
    let decoder = config
        .as_object_mut()
        .context("tokenizer_config.json is not an object")?
        .entry("added_tokens_decoder")
        .or_insert_with(|| Value::Object(Map::new()));
    let added_path = dir.join("added_tokens.json");
    let mut added: BTreeMap<String, usize> = match std::fs::read_to_string(&added_path) {
        Ok(t) => serde_json::from_str(&t).with_context(|| format!("{}: not JSON", added_path.display()))?,
        Err(_) => BTreeMap::new(),
    };
    let vocab: BTreeMap<String, usize> = serde_json::from_str(&std::fs::read_to_string(dir.join("vocab.json")).unwrap_or_else(|_| "{}".into()))?;
    for (i, token) in tokens.iter().enumerate() {
        ensure!(!vocab.contains_key(token) && !vocab.contains_key(&format!("{token}</w>")), "--placeholder-token `{token}` is already in the vocabulary");
        let id = first_id + i;
        decoder[id.to_string()] = json!({"content": token, "lstrip": false, "normalized": true, "rstrip": false, "single_word": false, "special": false});
        added.insert(token.clone(), id);
    }
    std::fs::write(&config_path, serde_json::to_string_pretty(&config)? + "\n").with_context(|| format!("{}: cannot write", config_path.display()))?;
    std::fs::write(&added_path, serde_json::to_string_pretty(&added)? + "\n").with_context(|| format!("{}: cannot write", added_path.display()))
}

/// Where the learned embedding of token `k` of `n` goes: `path` itself for one token, else
/// `<stem>-<k>.safetensors` beside it for the second and later ones.
pub fn learned_embeds_path(path: &Path, k: usize) -> PathBuf {
    if k == 0 {
        return path.to_owned();
    }
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!("{stem}-{k}.safetensors"))
}

/// Writes each token's row of `embedding` (`[vocab, d]`) as `{token: [d]}`.
pub fn write_learned_embeds(path: &Path, tokens: &[String], first_id: usize, embedding: &RawTensor) -> Result<Vec<PathBuf>> {
    ensure!(embedding.shape.len() == 2, "the token embedding is not a matrix");
    let d = embedding.shape[1];
    let row_bytes = d * embedding.dtype.size();
    let mut written = Vec::new();
    for (k, token) in tokens.iter().enumerate() {
        let id = first_id + k;
        let data = embedding.data[id * row_bytes..(id + 1) * row_bytes].to_vec();
        let row = RawTensor { dtype: embedding.dtype, shape: vec![d], data };
        let out = learned_embeds_path(path, k);
        atomic_file(&out, |temp| {
            let pending = vec![crate::diffusers::st_write::PendingTensor { key: token.clone(), dtype: row.dtype, shape: row.shape.clone() }];
            let mut w = crate::diffusers::st_write::StWriter::create(temp, pending)?;
            w.write_next(token, &row)?;
            w.finish()
        })?;
        written.push(out);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_extra_row_needs_one_token() {
        assert_eq!(check_tokens(49408, &[]).unwrap(), 49408);
        let err = check_tokens(49410, &[]).unwrap_err().to_string();
        assert!(err.contains("2 token-embedding rows beyond CLIP's 49408") && err.contains("--placeholder-token"), "{err}");
        assert!(check_tokens(49410, &["<a>".into()]).is_err());
        assert_eq!(check_tokens(49410, &["<a>".into(), "<b>".into()]).unwrap(), 49408);
        assert!(check_tokens(49410, &["<a>".into(), "<a>".into()]).is_err());
        assert!(check_tokens(1000, &["<a>".into()]).is_err());
        assert_eq!(learned_embeds_path(Path::new("x/e.safetensors"), 2), Path::new("x/e-2.safetensors"));
    }
}
