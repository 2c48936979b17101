//! The CLIP tokenizer folder of a pipeline (`tokenizer/`), from the vocabulary derived at build time.

use serde_json::{json, Value};

pub const VOCAB_JSON: &str = include_str!(concat!(env!("OUT_DIR"), "/vocab.json"));
pub const MERGES_TXT: &str = include_str!(concat!(env!("OUT_DIR"), "/merges.txt"));

/// `tokenizer_config.json` for transformers' `CLIPTokenizer`. Padding uses `<|endoftext|>`, as
/// KerasCV pads prompts for both SD versions.
pub fn tokenizer_config() -> Value {
    json!({
        "add_prefix_space": false,
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": true,
        "do_lower_case": true,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": "<|endoftext|>"
    })
}

pub fn special_tokens_map() -> Value {
    json!({
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"
    })
}

/// The files of `tokenizer/`, as (name, contents).
pub fn files() -> Vec<(&'static str, String)> {
    vec![
        ("vocab.json", VOCAB_JSON.to_string()),
        ("merges.txt", MERGES_TXT.to_string()),
        ("tokenizer_config.json", serde_json::to_string_pretty(&tokenizer_config()).unwrap()),
        ("special_tokens_map.json", serde_json::to_string_pretty(&special_tokens_map()).unwrap()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn vocabulary_has_clip_size_and_special_ids() {
        let vocab: HashMap<String, u32> = serde_json::from_str(VOCAB_JSON).unwrap();
        assert_eq!(vocab.len(), 49408);
        assert_eq!(vocab["<|startoftext|>"], 49406);
        assert_eq!(vocab["<|endoftext|>"], 49407);
        assert_eq!(MERGES_TXT.lines().count(), 1 + 48894);
        assert_eq!(MERGES_TXT.lines().nth(1), Some("i n"));
    }

    #[test]
    fn ids_agree_with_an_independent_clip_tokenizer() {
        // instant-clip-tokenizer builds its own id table from the same file; encoding a prompt with
        // it must give the ids our vocab.json assigns to the same BPE pieces.
        let vocab: HashMap<String, u32> = serde_json::from_str(VOCAB_JSON).unwrap();
        let tok = instant_clip_tokenizer::Tokenizer::new();
        let mut ids = Vec::new();
        tok.encode("a photo of sks dog", &mut ids);
        let ids: Vec<u32> = ids.iter().map(|t| t.to_u16() as u32).collect();
        // Reference ids measured with transformers' CLIPTokenizer on files built this way.
        assert_eq!(ids, vec![320, 1125, 539, 48136, 1929]);
        for (piece, id) in [("a</w>", 320), ("photo</w>", 1125), ("of</w>", 539), ("dog</w>", 1929)] {
            assert_eq!(vocab[piece], id, "{piece}");
        }
    }
}
