//! Derives the CLIP tokenizer files (`vocab.json`, `merges.txt`) that a diffusers pipeline folder
//! needs from OpenAI's BPE vocabulary, which the `instant-clip-tokenizer` crate ships as
//! `bpe_simple_vocab_16e6.txt`. Same derivation as OpenAI's `simple_tokenizer.py`.

use std::path::PathBuf;
use std::process::Command;

/// OpenAI keeps lines 1..=48894 of the file as merges (49152 - 256 - 2 entries).
const MERGES: usize = 49152 - 256 - 2;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let bpe = locate_bpe_file();
    println!("cargo:rerun-if-changed={}", bpe.display());
    let text = std::fs::read_to_string(&bpe).expect("read bpe_simple_vocab_16e6.txt");
    let merges: Vec<&str> = text.split('\n').skip(1).take(MERGES).collect();
    assert_eq!(merges.len(), MERGES, "unexpected BPE file length");

    let byte_chars = bytes_to_unicode();
    let mut vocab: Vec<String> = byte_chars.iter().map(|c| c.to_string()).collect();
    vocab.extend(byte_chars.iter().map(|c| format!("{c}</w>")));
    vocab.extend(merges.iter().map(|m| m.replace(' ', "")));
    vocab.push("<|startoftext|>".into());
    vocab.push("<|endoftext|>".into());

    let mut json = serde_json::Map::new();
    for (id, token) in vocab.iter().enumerate() {
        json.insert(token.clone(), id.into());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    std::fs::write(out.join("vocab.json"), serde_json::to_string(&json).unwrap()).unwrap();
    let mut merges_txt = String::from("#version: 0.2\n");
    for m in &merges {
        merges_txt.push_str(m);
        merges_txt.push('\n');
    }
    std::fs::write(out.join("merges.txt"), merges_txt).unwrap();
}

/// GPT-2's reversible byte -> printable character table, in its insertion order.
fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (u32::from('!')..=u32::from('~')).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    cs.into_iter().map(|c| char::from_u32(c).unwrap()).collect()
}

/// Finds the crate's copy of the file through `cargo metadata` (offline: it is already fetched).
fn locate_bpe_file() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("Cargo.toml");
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline", "--filter-platform"])
        .arg(std::env::var("TARGET").unwrap())
        .arg("--manifest-path")
        .arg(&manifest)
        .output()
        .expect("run cargo metadata");
    assert!(output.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&output.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&output.stdout).expect("cargo metadata JSON");
    let package = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "instant-clip-tokenizer")
        .expect("instant-clip-tokenizer is a dependency");
    let dir = PathBuf::from(package["manifest_path"].as_str().unwrap()).parent().unwrap().to_owned();
    dir.join("bpe_simple_vocab_16e6.txt")
}
