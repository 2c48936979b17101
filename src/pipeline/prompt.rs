//! Prompts to CLIP token ids as transformers' `CLIPTokenizer` gives them to diffusers' pipelines
//! and train scripts (`padding="max_length"`, `truncation=True`): `<|startoftext|>`, the BPE
//! tokens (truncated), `<|endoftext|>`, then the pad token up to the maximum length.
//!
//! A pipeline's `tokenizer/` folder sets the vocabulary (`merges.txt`), the pad token (SD1 pads
//! with `<|endoftext|>`, SD2 with `!`), `model_max_length` and added tokens (textual inversion);
//! without one, the CLIP vocabulary and SD1's conventions apply.

use anyhow::{Context, Result};
use instant_clip_tokenizer::Tokenizer;
use serde_json::Value;
use std::path::Path;

pub const MAX_LENGTH: usize = 77;

pub struct PromptTokenizer {
    bpe: Tokenizer,
    /// The id that pads prompts to the maximum length.
    pub pad_id: u32,
    /// `model_max_length`, or `--tokenizer_max_length` when set.
    pub max_length: usize,
    /// Added tokens (beyond the vocabulary), longest first so the longest match wins.
    added: Vec<(String, u32)>,
}

impl Default for PromptTokenizer {
    fn default() -> Self {
        let bpe = Tokenizer::new();
        let pad_id = bpe.end_of_text().to_u16() as u32;
        PromptTokenizer { bpe, pad_id, max_length: MAX_LENGTH, added: Vec::new() }
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("{}: cannot read", path.display())),
    }
}

/// A special token as the tokenizer files write it: a string or `{"content": ...}`.
fn token_text(v: &Value) -> Option<String> {
    v.as_str().map(str::to_string).or_else(|| v.get("content").and_then(Value::as_str).map(str::to_string))
}

impl PromptTokenizer {
    /// The tokenizer of a transformers `CLIPTokenizer` folder (`vocab.json`, `merges.txt`,
    /// `tokenizer_config.json`, `special_tokens_map.json`, `added_tokens.json`).
    pub fn load(dir: &Path) -> Result<PromptTokenizer> {
        let vocab_path = dir.join("vocab.json");
        let fast_path = dir.join("tokenizer.json");
        // The slow tokenizer's files, or (transformers 5 saves only these) the fast tokenizer's
        // `tokenizer.json`, whose `model` holds the same vocabulary and merges.
        let (vocab, merges, fast_added, source) = match (read_json(&vocab_path)?, read_json(&fast_path)?) {
            (Some(Value::Object(v)), _) => {
                let merges_path = dir.join("merges.txt");
                let merges = std::fs::read_to_string(&merges_path).with_context(|| format!("{}: cannot read", merges_path.display()))?;
                (v, merges, Vec::new(), vocab_path.clone())
            }
            (Some(_), _) => anyhow::bail!("{}: not a token -> id object", vocab_path.display()),
            (None, Some(fast)) => {
                let bad = || anyhow::anyhow!("{}: no BPE `model.vocab` and `model.merges`", fast_path.display());
                let vocab = fast["model"]["vocab"].as_object().ok_or_else(bad)?.clone();
                let mut merges = String::from("#version: 0.2\n");
                for m in fast["model"]["merges"].as_array().ok_or_else(bad)? {
                    match (m.as_str(), m.as_array()) {
                        (Some(pair), _) => merges += pair,
                        (None, Some(pair)) => merges += &pair.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" "),
                        _ => return Err(bad()),
                    }
                    merges.push('\n');
                }
                let added = fast["added_tokens"].as_array().map_or(Vec::new(), |a| a.iter().filter_map(|t| Some((t["content"].as_str()?.to_string(), t["id"].as_u64()? as u32))).collect());
                (vocab, merges, added, fast_path.clone())
            }
            (None, None) => anyhow::bail!("{}: missing (a CLIP tokenizer folder holds vocab.json and merges.txt, or tokenizer.json)", vocab_path.display()),
        };
        let vocab_path = source;
        let merges_path = dir.join("merges.txt");
        let size = u16::try_from(vocab.len()).ok().filter(|n| *n > 514).with_context(|| format!("{}: {} tokens is not a CLIP vocabulary", vocab_path.display(), vocab.len()))?;
        let bpe = if merges == crate::diffusers::tokenizer::MERGES_TXT && size == 49408 {
            Tokenizer::new()
        } else {
            Tokenizer::with_vocabulary(std::io::Cursor::new(merges.as_bytes()), size).with_context(|| format!("{}: not CLIP merges", if merges_path.is_file() { merges_path.display() } else { vocab_path.display() }))?
        };
        for (name, id) in [("<|startoftext|>", bpe.start_of_text()), ("<|endoftext|>", bpe.end_of_text())] {
            let listed = vocab.get(name).and_then(Value::as_u64);
            anyhow::ensure!(listed == Some(id.to_u16() as u64), "{}: `{name}` has id {listed:?}, but merges.txt puts it at {}", vocab_path.display(), id.to_u16());
        }
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let special = read_json(&dir.join("special_tokens_map.json"))?.unwrap_or(Value::Null);
        let mut added: Vec<(String, u32)> = fast_added;
        if let Some(Value::Object(m)) = read_json(&dir.join("added_tokens.json"))? {
            added.extend(m.iter().filter_map(|(t, id)| Some((t.clone(), id.as_u64()? as u32))));
        }
        if let Some(Value::Object(m)) = config.get("added_tokens_decoder") {
            for (id, t) in m {
                if let (Ok(id), Some(text)) = (id.parse::<u32>(), token_text(t)) {
                    if id as usize >= vocab.len() && !added.iter().any(|(_, i)| *i == id) {
                        added.push((text, id));
                    }
                }
            }
        }
        added.retain(|(_, id)| *id as usize >= vocab.len());
        added.sort_by_key(|a| std::cmp::Reverse(a.0.len()));
        let lookup = |t: &str| vocab.get(t).and_then(Value::as_u64).map(|i| i as u32).or_else(|| added.iter().find(|(s, _)| s == t).map(|(_, i)| *i));
        let pad_token = config.get("pad_token").and_then(token_text).or_else(|| special.get("pad_token").and_then(token_text));
        let pad_id = match pad_token {
            Some(t) => lookup(&t).with_context(|| format!("{}: pad token `{t}` is not in the vocabulary", dir.display()))?,
            None => bpe.end_of_text().to_u16() as u32,
        };
        // transformers' "no limit" value (1e30) and absurd lengths fall back to CLIP's 77.
        let max_length = config.get("model_max_length").and_then(Value::as_u64).filter(|n| (3..=4096).contains(n)).map_or(MAX_LENGTH, |n| n as usize);
        Ok(PromptTokenizer { bpe, pad_id, max_length, added })
    }

    /// The tokenizer of a pipeline folder's `tokenizer/`, or the default when it has none.
    pub fn for_pipeline(dir: &Path) -> Result<PromptTokenizer> {
        let folder = dir.join("tokenizer");
        if folder.join("vocab.json").is_file() || folder.join("tokenizer.json").is_file() {
            PromptTokenizer::load(&folder)
        } else {
            Ok(PromptTokenizer::default())
        }
    }

    /// Ids padded (or truncated) to [`Self::max_length`].
    pub fn ids(&self, prompt: &str) -> Vec<u32> {
        self.encode(prompt).0
    }

    /// Ids and attention mask (1 for the prompt's tokens with the start and end tokens, 0 for padding).
    pub fn encode(&self, prompt: &str) -> (Vec<u32>, Vec<u32>) {
        self.encode_to(prompt, self.max_length)
    }

    /// [`Self::encode`] padded or truncated to `max_length` tokens.
    pub fn encode_to(&self, prompt: &str, max_length: usize) -> (Vec<u32>, Vec<u32>) {
        let mut body = Vec::new();
        let mut rest = prompt;
        while !rest.is_empty() {
            let next = self.added.iter().filter_map(|(t, id)| rest.find(t.as_str()).map(|at| (at, t.len(), *id))).min_by_key(|(at, len, _)| (*at, usize::MAX - len));
            let (text, added) = match next {
                Some((at, len, id)) => {
                    let text = &rest[..at];
                    rest = &rest[at + len..];
                    (text, Some(id))
                }
                None => (std::mem::take(&mut rest), None),
            };
            let mut tokens = Vec::new();
            self.bpe.encode(text, &mut tokens);
            body.extend(tokens.iter().map(|t| t.to_u16() as u32));
            body.extend(added);
        }
        let (bos, eos) = (self.bpe.start_of_text().to_u16() as u32, self.bpe.end_of_text().to_u16() as u32);
        let mut ids = vec![bos];
        ids.extend(body.into_iter().take(max_length.saturating_sub(2)));
        ids.push(eos);
        let mut mask = vec![1u32; ids.len()];
        ids.resize(max_length, self.pad_id);
        mask.resize(max_length, 0);
        (ids, mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_sd1_tokenizer_layout() {
        let ids = PromptTokenizer::default().ids("a photo of sks dog");
        assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 48136, 1929, 49407]);
        assert_eq!(ids.len(), 77);
        assert!(ids[7..].iter().all(|i| *i == 49407));
        let long = PromptTokenizer::default().ids(&"dog ".repeat(200));
        assert_eq!((long.len(), long[76]), (77, 49407));
    }

    #[test]
    fn a_folder_sets_pad_token_length_and_added_tokens() {
        let dir = tempfile::tempdir().unwrap();
        for (name, contents) in crate::diffusers::tokenizer::files() {
            std::fs::write(dir.path().join(name), contents).unwrap();
        }
        // SD2's tokenizer pads with "!" (id 0); a textual-inversion token sits after the vocabulary.
        let mut config = crate::diffusers::tokenizer::tokenizer_config();
        config["pad_token"] = "!".into();
        config["model_max_length"] = 10.into();
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        std::fs::write(dir.path().join("added_tokens.json"), r#"{"<cat-toy>": 49408}"#).unwrap();
        let tok = PromptTokenizer::load(dir.path()).unwrap();
        let (ids, mask) = tok.encode("a <cat-toy> dog");
        assert_eq!(ids, vec![49406, 320, 49408, 1929, 49407, 0, 0, 0, 0, 0]);
        assert_eq!(mask, vec![1, 1, 1, 1, 1, 0, 0, 0, 0, 0]);
        let long = tok.ids(&"dog ".repeat(20));
        assert_eq!((long.len(), long[8], long[9]), (10, 1929, 49407), "truncated, then the end token");
        std::fs::remove_file(dir.path().join("merges.txt")).unwrap();
        assert!(PromptTokenizer::load(dir.path()).err().unwrap().to_string().contains("merges.txt"));
        // transformers 5 writes only tokenizer.json: the same vocabulary and merges, added tokens listed.
        std::fs::remove_file(dir.path().join("vocab.json")).unwrap();
        std::fs::remove_file(dir.path().join("added_tokens.json")).unwrap();
        let vocab: Value = serde_json::from_str(crate::diffusers::tokenizer::VOCAB_JSON).unwrap();
        let merges: Vec<Value> = crate::diffusers::tokenizer::MERGES_TXT.lines().skip(1).map(|l| l.split(' ').collect::<Vec<_>>().into()).collect();
        let fast = serde_json::json!({"model": {"type": "BPE", "vocab": vocab, "merges": merges}, "added_tokens": [{"id": 49408, "content": "<cat-toy>"}]});
        std::fs::write(dir.path().join("tokenizer.json"), fast.to_string()).unwrap();
        assert_eq!(PromptTokenizer::load(dir.path()).unwrap().encode("a <cat-toy> dog"), (ids, mask));
    }
}
