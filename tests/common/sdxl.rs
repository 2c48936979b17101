//! A tiny SDXL `StableDiffusionXLPipeline` folder in diffusers' names: the UNet's tensors by SDXL's
//! block structure (3 levels, no attention at the first, transformer depths 0/1/2, the text-time
//! embedding), the CLIPs and the VAE from the mapping tables, with non-symmetric values. Shared by
//! the SDXL single-file and SDXL LoRA tests.

use super::tiny::{syms, values, write_json, write_st};
use dreambridge::mapping::{table_for, Symbols};
use dreambridge::tensor::{DType, RawTensor};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

pub type Tensors = BTreeMap<String, RawTensor>;

pub fn put(t: &mut Tensors, key: &str, shape: &[usize]) {
    let n = shape.iter().product();
    let seed = t.len() as u64 * 7919 + key.len() as u64;
    t.insert(key.to_string(), RawTensor { dtype: DType::F32, shape: shape.to_vec(), data: values(n, seed) });
}

fn table_tensors(kind: &str, repeats: usize, symbols: &Symbols, t: &mut Tensors) {
    let layout = table_for(kind).unwrap().expand(repeats).unwrap();
    for spec in &layout.tensors {
        let shape: Vec<usize> = spec.shape.iter().map(|e| e.eval(symbols).unwrap_or_else(|| panic!("{kind}: {} unbound", spec.key))).collect();
        put(t, &spec.key, &shape);
    }
}

fn resnet(t: &mut Tensors, p: &str, cin: usize, cout: usize, temb: usize) {
    for (k, s) in [
        ("norm1.weight", vec![cin]),
        ("norm1.bias", vec![cin]),
        ("conv1.weight", vec![cout, cin, 3, 3]),
        ("conv1.bias", vec![cout]),
        ("time_emb_proj.weight", vec![cout, temb]),
        ("time_emb_proj.bias", vec![cout]),
        ("norm2.weight", vec![cout]),
        ("norm2.bias", vec![cout]),
        ("conv2.weight", vec![cout, cout, 3, 3]),
        ("conv2.bias", vec![cout]),
    ] {
        put(t, &format!("{p}.{k}"), &s);
    }
    if cin != cout {
        put(t, &format!("{p}.conv_shortcut.weight"), &[cout, cin, 1, 1]);
        put(t, &format!("{p}.conv_shortcut.bias"), &[cout]);
    }
}

fn transformer(t: &mut Tensors, p: &str, c: usize, depth: usize, ctx: usize) {
    for (k, s) in [("norm.weight", vec![c]), ("norm.bias", vec![c]), ("proj_in.weight", vec![c, c]), ("proj_in.bias", vec![c]), ("proj_out.weight", vec![c, c]), ("proj_out.bias", vec![c])] {
        put(t, &format!("{p}.{k}"), &s);
    }
    for b in 0..depth {
        let q = format!("{p}.transformer_blocks.{b}");
        for n in ["norm1", "norm2", "norm3"] {
            put(t, &format!("{q}.{n}.weight"), &[c]);
            put(t, &format!("{q}.{n}.bias"), &[c]);
        }
        for (a, kv) in [("attn1", c), ("attn2", ctx)] {
            put(t, &format!("{q}.{a}.to_q.weight"), &[c, c]);
            put(t, &format!("{q}.{a}.to_k.weight"), &[c, kv]);
            put(t, &format!("{q}.{a}.to_v.weight"), &[c, kv]);
            put(t, &format!("{q}.{a}.to_out.0.weight"), &[c, c]);
            put(t, &format!("{q}.{a}.to_out.0.bias"), &[c]);
        }
        put(t, &format!("{q}.ff.net.0.proj.weight"), &[8 * c, c]);
        put(t, &format!("{q}.ff.net.0.proj.bias"), &[8 * c]);
        put(t, &format!("{q}.ff.net.2.weight"), &[c, 4 * c]);
        put(t, &format!("{q}.ff.net.2.bias"), &[c]);
    }
}

/// Widths, transformer depths per level (SDXL's 0/2/10 made small) and the conditioning widths.
pub const WIDTHS: [usize; 3] = [32, 64, 64];
pub const DEPTHS: [usize; 3] = [0, 1, 2];
pub const CLIP_L: usize = 16;
pub const CLIP_G: usize = 24;
pub const POOLED: usize = 20;
pub const TIME: usize = 8;

/// A tiny SDXL UNet in diffusers' names: 3 levels, 2 resnets down and 3 up per level.
pub fn unet_tensors() -> Tensors {
    let mut t = Tensors::new();
    let (c0, temb, ctx) = (WIDTHS[0], 4 * WIDTHS[0], CLIP_L + CLIP_G);
    put(&mut t, "conv_in.weight", &[c0, 4, 3, 3]);
    put(&mut t, "conv_in.bias", &[c0]);
    for (k, s) in [("time_embedding.linear_1", [temb, c0]), ("time_embedding.linear_2", [temb, temb]), ("add_embedding.linear_1", [temb, POOLED + 6 * TIME]), ("add_embedding.linear_2", [temb, temb])] {
        put(&mut t, &format!("{k}.weight"), &s);
        put(&mut t, &format!("{k}.bias"), &s[..1]);
    }
    let mut cin = c0;
    let mut skips = vec![c0];
    for (i, (&c, &d)) in WIDTHS.iter().zip(&DEPTHS).enumerate() {
        for j in 0..2 {
            resnet(&mut t, &format!("down_blocks.{i}.resnets.{j}"), if j == 0 { cin } else { c }, c, temb);
            if d > 0 {
                transformer(&mut t, &format!("down_blocks.{i}.attentions.{j}"), c, d, ctx);
            }
            skips.push(c);
        }
        cin = c;
        if i + 1 < WIDTHS.len() {
            put(&mut t, &format!("down_blocks.{i}.downsamplers.0.conv.weight"), &[c, c, 3, 3]);
            put(&mut t, &format!("down_blocks.{i}.downsamplers.0.conv.bias"), &[c]);
            skips.push(c);
        }
    }
    let cm = *WIDTHS.last().unwrap();
    resnet(&mut t, "mid_block.resnets.0", cm, cm, temb);
    transformer(&mut t, "mid_block.attentions.0", cm, *DEPTHS.last().unwrap(), ctx);
    resnet(&mut t, "mid_block.resnets.1", cm, cm, temb);
    let mut prev = cm;
    for (u, (&c, &d)) in WIDTHS.iter().rev().zip(DEPTHS.iter().rev()).enumerate() {
        for j in 0..3 {
            let skip = skips.pop().unwrap();
            resnet(&mut t, &format!("up_blocks.{u}.resnets.{j}"), prev + skip, c, temb);
            if d > 0 {
                transformer(&mut t, &format!("up_blocks.{u}.attentions.{j}"), c, d, ctx);
            }
            prev = c;
        }
        if u + 1 < WIDTHS.len() {
            put(&mut t, &format!("up_blocks.{u}.upsamplers.0.conv.weight"), &[c, c, 3, 3]);
            put(&mut t, &format!("up_blocks.{u}.upsamplers.0.conv.bias"), &[c]);
        }
    }
    put(&mut t, "conv_norm_out.weight", &[c0]);
    put(&mut t, "conv_norm_out.bias", &[c0]);
    put(&mut t, "conv_out.weight", &[4, c0, 3, 3]);
    put(&mut t, "conv_out.bias", &[4]);
    t
}

/// A tiny SDXL pipeline folder; OpenCLIP-G's projection `[POOLED, CLIP_G]` is not square.
pub fn make_sdxl_folder(dir: &Path) {
    write_st(&dir.join("unet/diffusion_pytorch_model.safetensors"), &unet_tensors());
    write_json(&dir.join("unet/config.json"), json!({"_class_name": "UNet2DConditionModel", "attention_head_dim": [5, 10, 20]}));
    for (name, d, layers) in [("text_encoder", CLIP_L, 2), ("text_encoder_2", CLIP_G, 3)] {
        let mut t = Tensors::new();
        let s = syms(&[("d", d), ("vocab", 100), ("pos", 77), ("ff", 2 * d), ("heads", 2), ("hd", d / 2), ("n", layers)]);
        table_tensors("clip-text-kerashub", layers, &s, &mut t);
        if name == "text_encoder_2" {
            put(&mut t, "text_projection.weight", &[POOLED, d]);
        }
        write_st(&dir.join(format!("{name}/model.safetensors")), &t);
        write_json(&dir.join(format!("{name}/config.json")), json!({"hidden_size": d, "num_attention_heads": 2}));
    }
    let mut t = Tensors::new();
    let vae = syms(&[("c0", 4), ("c1", 8), ("c2", 16), ("c3", 16), ("img", 3), ("z", 4)]);
    table_tensors("vae-encoder", 0, &vae, &mut t);
    table_tensors("vae-decoder", 0, &vae, &mut t);
    write_st(&dir.join("vae/diffusion_pytorch_model.safetensors"), &t);
    write_json(&dir.join("vae/config.json"), json!({"_class_name": "AutoencoderKL", "scaling_factor": 0.13025}));
    write_json(&dir.join("scheduler/scheduler_config.json"), dreambridge::diffusers::sdxl::scheduler_config());
    write_json(&dir.join("model_index.json"), dreambridge::diffusers::sdxl::model_index());
}

