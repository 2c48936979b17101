//! Tiny models for the integration tests, built from the mapping tables with deterministic,
//! non-symmetric values: an SD3 diffusers folder of each variant, and the file helpers the SD3
//! and SDXL tests share.

use dreambridge::diffusers::sd3::Variant;
use dreambridge::diffusers::st_read::StFile;
use dreambridge::diffusers::st_write::{PendingTensor, StWriter};
use dreambridge::mapping::{table_for, Symbols};
use dreambridge::tensor::{DType, RawTensor};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// A deterministic, non-symmetric fill: every value differs from its neighbours.
pub fn values(n: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .flat_map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5).to_le_bytes()
        })
        .collect()
}

/// Writes the tensors of `kind`'s table (with `repeats` and `symbols`) into `tensors`; a
/// `when=` tensor is kept when `has(feature, layer's first key)` says its feature is there.
pub fn table_tensors(kind: &str, repeats: usize, symbols: &Symbols, has: &dyn Fn(&str, &str) -> bool, tensors: &mut BTreeMap<String, RawTensor>) {
    let layout = table_for(kind).unwrap().expand(repeats).unwrap();
    for layer in &layout.layers {
        let specs = &layout.tensors[layer.tensors.clone()];
        for spec in specs {
            if let Some(w) = &spec.when {
                if has(&w.feature, &specs[0].key) != w.present {
                    continue;
                }
            }
            let shape: Vec<usize> = spec.shape.iter().map(|e| e.eval(symbols).unwrap_or_else(|| panic!("{kind}: {} unbound", spec.key))).collect();
            let n = shape.iter().product();
            let seed = tensors.len() as u64 + 17 + 1000 * kind.len() as u64;
            tensors.insert(spec.key.clone(), RawTensor { dtype: DType::F32, shape, data: values(n, seed) });
        }
    }
}

pub fn write_st(path: &Path, tensors: &BTreeMap<String, RawTensor>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let pending = tensors.iter().map(|(k, t)| PendingTensor { key: k.clone(), dtype: t.dtype, shape: t.shape.clone() }).collect();
    let mut w = StWriter::create(path, pending).unwrap();
    for (k, t) in tensors {
        w.write_next(k, t).unwrap();
    }
    w.finish().unwrap();
}

pub fn write_json(path: &Path, value: Value) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
}

pub fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn syms(pairs: &[(&str, usize)]) -> Symbols {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// A tiny SD3 pipeline folder: 3 MMDiT blocks of width 64 (2 heads of 32), two small CLIPs, a
/// small VAE, and with `t5` a tiny T5 encoder (its tokenizer a placeholder file).
pub fn make_sd3_folder(dir: &Path, variant: Variant, t5: bool) {
    let qk = variant != Variant::Sd3Medium;
    let dual = variant == Variant::Sd35Medium;
    let mut t = BTreeMap::new();
    let mmdit = syms(&[("h", 64), ("hd", 32), ("lat", 16), ("p", 2), ("po", 64), ("pp", 16), ("ctx", 4096), ("pooled", 40), ("n", 2)]);
    let has = |feature: &str, first: &str| match feature {
        "qk_norm" => qk,
        "dual" => dual && first.starts_with("transformer_blocks.0."),
        "dual_qk_norm" => qk && dual && first.starts_with("transformer_blocks.0."),
        _ => false,
    };
    table_tensors("mmdit-sd3", 2, &mmdit, &has, &mut t);
    write_st(&dir.join("transformer/diffusion_pytorch_model.safetensors"), &t);
    write_json(&dir.join("transformer/config.json"), json!({"_class_name": "SD3Transformer2DModel", "num_attention_heads": 2, "sample_size": 8}));
    for (name, d, heads, layers, act) in [("text_encoder", 16, 2, 2, "quick_gelu"), ("text_encoder_2", 24, 3, 3, "gelu")] {
        let mut t = BTreeMap::new();
        let s = syms(&[("d", d), ("vocab", 100), ("pos", 77), ("ff", 2 * d), ("heads", heads), ("hd", d / heads), ("n", layers)]);
        table_tensors("clip-text-kerashub", layers, &s, &|_, _| false, &mut t);
        table_tensors("clip-projection-kerashub", 0, &s, &|_, _| false, &mut t);
        write_st(&dir.join(format!("{name}/model.safetensors")), &t);
        write_json(&dir.join(format!("{name}/config.json")), json!({"hidden_size": d, "num_attention_heads": heads, "hidden_act": act}));
    }
    let mut t = BTreeMap::new();
    let enc = syms(&[("c0", 4), ("c1", 8), ("c2", 16), ("c3", 16), ("img", 3), ("lat", 16)]);
    let dec = syms(&[("d0", 16), ("d1", 16), ("d2", 8), ("d3", 4), ("img", 3), ("lat", 16)]);
    table_tensors("vae-encoder-kerashub", 0, &enc, &|_, _| false, &mut t);
    table_tensors("vae-decoder-kerashub", 0, &dec, &|_, _| false, &mut t);
    write_st(&dir.join("vae/diffusion_pytorch_model.safetensors"), &t);
    write_json(&dir.join("vae/config.json"), json!({"_class_name": "AutoencoderKL", "scaling_factor": 1.5305, "shift_factor": 0.0609}));
    if t5 {
        let mut t = BTreeMap::new();
        for (i, (key, shape)) in [
            ("shared.weight", vec![50, 8]),
            ("encoder.block.0.layer.0.SelfAttention.q.weight", vec![8, 8]),
            ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", vec![32, 2]),
            ("encoder.block.0.layer.1.DenseReluDense.wi_0.weight", vec![16, 8]),
            ("encoder.final_layer_norm.weight", vec![8]),
        ]
        .into_iter()
        .enumerate()
        {
            let n = shape.iter().product();
            t.insert(key.to_string(), RawTensor { dtype: DType::F32, shape, data: values(n, 900 + i as u64) });
        }
        write_st(&dir.join("text_encoder_3/model.safetensors"), &t);
        write_json(&dir.join("text_encoder_3/config.json"), json!({"architectures": ["T5EncoderModel"], "d_model": 8}));
        write_json(&dir.join("tokenizer_3/tokenizer_config.json"), json!({"tokenizer_class": "T5Tokenizer"}));
    }
    write_json(&dir.join("scheduler/scheduler_config.json"), json!({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}));
    write_json(&dir.join("model_index.json"), dreambridge::diffusers::sd3::model_index(t5));
}

pub fn same_part(a: &Path, b: &Path, file: &str) {
    let (x, y) = (StFile::open(&a.join(file)).unwrap(), StFile::open(&b.join(file)).unwrap());
    let (mut kx, mut ky) = (x.keys(), y.keys());
    kx.sort();
    ky.sort();
    assert_eq!(kx, ky, "{file}: different tensors");
    for k in kx {
        assert_eq!(x.read(&k).unwrap(), y.read(&k).unwrap(), "{file}: tensor `{k}` differs");
    }
}

/// Every tensor of two single files equal, byte for byte.
pub fn same_file(a: &Path, b: &Path) -> usize {
    let (x, y) = (StFile::open(a).unwrap(), StFile::open(b).unwrap());
    let (mut kx, mut ky) = (x.keys(), y.keys());
    kx.sort();
    ky.sort();
    assert_eq!(kx, ky, "different tensors");
    for k in &kx {
        assert_eq!(x.read(k).unwrap(), y.read(k).unwrap(), "tensor `{k}` differs");
    }
    kx.len()
}

pub const PARTS: [&str; 4] = [
    "transformer/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder_2/model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
];

