//! SDXL LoRA files on a tiny SDXL folder (`common::sdxl`): diffusers' PEFT keys (`unet.`,
//! `text_encoder.`, `text_encoder_2.`), kohya sd-scripts' LDM-numbered `lora_unet_input_blocks_*`
//! with `lora_te1_`/`lora_te2_`, and diffusers' `--output_kohya_format` (diffusers numbering)
//! converted into each other bit for bit; `lora merge` into the folder against `W + s·(α/r)·B·A`
//! computed here in f64; `inspect`; bad files and misfits refused in one line naming the file.

mod common;

use common::sdxl::make_sdxl_folder;
use common::tiny::{values, write_json, write_st};
use common::{cli, run};
use dreambridge::diffusers::st_read::StFile;
use dreambridge::lora::read::read;
use dreambridge::lora::{Format, Part};
use dreambridge::tensor::{DType, RawTensor};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

type Tensors = BTreeMap<String, RawTensor>;

fn tensor(shape: &[usize], seed: u64) -> RawTensor {
    RawTensor { dtype: DType::F32, shape: shape.to_vec(), data: values(shape.iter().product(), seed) }
}

fn scalar(v: f32) -> RawTensor {
    RawTensor { dtype: DType::F32, shape: vec![], data: v.to_le_bytes().to_vec() }
}

/// The modules a LoRA of the tiny folder adapts, by part: every attention projection of the UNet
/// (q/k/v/out of attn1 and attn2 in every transformer block), one resnet conv (LoCon), the
/// upsampler conv, CLIP-L's and OpenCLIP-G's q/k/v/out and OpenCLIP-G's projection; with the
/// weight shapes.
fn targets(folder: &Path) -> Vec<(Part, String, Vec<usize>)> {
    let mut out = Vec::new();
    for (part, file) in [(Part::Unet, "unet/diffusion_pytorch_model.safetensors"), (Part::TextEncoder, "text_encoder/model.safetensors"), (Part::TextEncoder2, "text_encoder_2/model.safetensors")] {
        let f = StFile::open(&folder.join(file)).unwrap();
        for key in f.keys() {
            let Some(module) = key.strip_suffix(".weight") else { continue };
            let wanted = [".to_q", ".to_k", ".to_v", ".to_out.0", ".q_proj", ".k_proj", ".v_proj", ".out_proj"].iter().any(|e| module.ends_with(e))
                || ["down_blocks.1.resnets.0.conv1", "up_blocks.0.upsamplers.0.conv", "text_projection", "mid_block.resnets.1.time_emb_proj"].contains(&module);
            if wanted {
                out.push((part, module.to_string(), f.info(&key).unwrap().shape));
            }
        }
    }
    out
}

/// Down `(r, in[, k, k])` and up `(out, r[, 1, 1])` fitting `shape`, with non-symmetric values.
fn factors(shape: &[usize], rank: usize, seed: u64) -> (RawTensor, RawTensor) {
    let mut down = vec![rank];
    down.extend_from_slice(&shape[1..]);
    let up = if shape.len() == 4 { vec![shape[0], rank, 1, 1] } else { vec![shape[0], rank] };
    (tensor(&down, seed), tensor(&up, seed + 1))
}

/// A diffusers SDXL LoRA as `StableDiffusionXLPipeline.save_lora_weights` writes it (PEFT keys,
/// alpha = rank, metadata `{"format": "pt"}`), rank 2 (the conv modules rank 3).
fn peft_file(folder: &Path, path: &Path) -> Tensors {
    let mut t = Tensors::new();
    for (i, (part, module, shape)) in targets(folder).iter().enumerate() {
        let (a, b) = factors(shape, if shape.len() == 4 { 3 } else { 2 }, 1000 + 2 * i as u64);
        t.insert(format!("{}.{module}.lora_A.weight", part.dir()), a);
        t.insert(format!("{}.{module}.lora_B.weight", part.dir()), b);
    }
    write_st(path, &t);
    t
}

/// diffusers' `convert_state_dict_to_kohya` of PEFT keys: `lora_A` -> `lora_down`, `unet.` ->
/// `lora_unet_`, `text_encoder.` -> `lora_te1_`, `text_encoder_2.` -> `lora_te2_`, every `.` of
/// the module path -> `_`, `.alpha` = rank (what `--output_kohya_format` writes).
fn diffusers_kohya(peft: &Tensors) -> Tensors {
    let mut t = Tensors::new();
    for (key, v) in peft {
        let (module, factor) = key.rsplit_once(".lora_").unwrap();
        let (part, path) = module.split_once('.').unwrap();
        let prefix = match part {
            "unet" => "lora_unet",
            "text_encoder" => "lora_te1",
            _ => "lora_te2",
        };
        let name = format!("{prefix}_{}", path.replace('.', "_"));
        let factor = if factor == "A.weight" { "lora_down.weight" } else { "lora_up.weight" };
        if factor == "lora_down.weight" {
            t.insert(format!("{name}.alpha"), scalar(v.shape[0] as f32));
        }
        t.insert(format!("{name}.{factor}"), v.clone());
    }
    t
}

fn st(path: &Path) -> Tensors {
    let f = StFile::open(path).unwrap();
    f.keys().into_iter().map(|k| (k.clone(), f.read(&k).unwrap())).collect()
}

fn db(args: &[&str]) -> String {
    let out = cli().args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "dreambridge {}: {text}", args.join(" "));
    text
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    folder: PathBuf,
    peft_path: PathBuf,
    peft: Tensors,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let folder = root.join("sdxl");
    make_sdxl_folder(&folder);
    let peft_path = root.join("pytorch_lora_weights.safetensors");
    let peft = peft_file(&folder, &peft_path);
    Fixture { _dir: dir, root, folder, peft_path, peft }
}

#[test]
fn diffusers_to_kohya_ldm_and_back_is_bit_exact() {
    let f = fixture();
    let (kohya, back) = (f.root.join("sks.safetensors"), f.root.join("back.safetensors"));
    let text = db(&["lora", "convert", s(&f.peft_path), s(&kohya), "--to", "kohya"]);
    assert!(text.contains("SDXL modules in kohya sd-scripts' SDXL keys"), "{text}");
    let k = st(&kohya);
    // kohya sd-scripts' names: LDM numbering of the UNet, lora_te1_/lora_te2_.
    for key in [
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_input_blocks_7_1_transformer_blocks_1_attn2_to_k.lora_up.weight",
        "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_out_0.alpha",
        "lora_unet_output_blocks_2_1_transformer_blocks_0_attn1_to_v.lora_down.weight",
        "lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_output_blocks_2_2_conv.lora_down.weight",
        "lora_unet_input_blocks_4_0_in_layers_2.lora_down.weight",
        "lora_unet_middle_block_2_emb_layers_1.lora_down.weight",
        "lora_te1_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight",
        "lora_te2_text_model_encoder_layers_2_self_attn_q_proj.lora_down.weight",
        "lora_te2_text_projection.lora_up.weight",
    ] {
        assert!(k.contains_key(key), "no {key} in {:?}", k.keys().take(8).collect::<Vec<_>>());
    }
    assert!(k.keys().all(|key| !key.contains("down_blocks") && !key.contains("up_blocks") && !key.contains("mid_block") && !key.starts_with("lora_te_")));
    assert_eq!(k.len(), f.peft.len() / 2 * 3, "down, up and alpha per module");
    let meta = StFile::open(&kohya).unwrap().metadata();
    for (key, value) in [
        ("ss_base_model_version", "sdxl_base_v1-0"),
        ("modelspec.architecture", "stable-diffusion-xl-v1-base/lora"),
        ("modelspec.implementation", "https://github.com/Stability-AI/generative-models"),
        ("ss_v2", "False"),
        ("ss_output_name", "sks"),
    ] {
        assert_eq!(meta.get(key).map(String::as_str), Some(value), "{key}");
    }
    let text = db(&["lora", "convert", s(&kohya), s(&back), "--to", "diffusers"]);
    assert!(text.contains("diffusers' SDXL PEFT keys"), "{text}");
    assert_eq!(std::fs::read(&f.peft_path).unwrap(), std::fs::read(&back).unwrap(), "the same keys, values and metadata");
    let set = read(&back).unwrap();
    assert_eq!((set.format, set.count(Part::Unet), set.count(Part::TextEncoder), set.count(Part::TextEncoder2)), (Format::Peft, 139, 8, 13));
}

#[test]
fn diffusers_output_kohya_format_reads_as_the_original_and_rewrites_in_ldm_numbering() {
    let f = fixture();
    let theirs = f.root.join("pytorch_lora_weights_kohya.safetensors");
    write_st(&theirs, &diffusers_kohya(&f.peft));
    let (a, b) = (read(&f.peft_path).unwrap(), read(&theirs).unwrap());
    assert_eq!(b.format, Format::Kohya);
    assert_eq!(a.modules, b.modules, "diffusers-numbered kohya names, alpha = rank");
    // Rewritten by dreambridge: kohya sd-scripts' LDM numbering; read back, the same modules.
    let (ours, back) = (f.root.join("ours.safetensors"), f.root.join("back.safetensors"));
    db(&["lora", "convert", s(&theirs), s(&ours), "--to", "kohya"]);
    assert!(st(&ours).keys().any(|k| k.starts_with("lora_unet_input_blocks_")));
    assert_eq!(read(&ours).unwrap().modules, a.modules);
    db(&["lora", "convert", s(&ours), s(&back), "--to", "diffusers"]);
    assert_eq!(std::fs::read(&f.peft_path).unwrap(), std::fs::read(&back).unwrap());
}

#[test]
fn kohya_alphas_round_trip_through_diffusers_adapter_metadata() {
    let f = fixture();
    // An sd-scripts file: LDM names, alpha 1 on rank 2 (scale 0.5), the convs alpha 3 on rank 3.
    let ldm = f.root.join("ldm.safetensors");
    db(&["lora", "convert", s(&f.peft_path), s(&ldm), "--to", "kohya"]);
    let mut t = st(&ldm);
    for (k, v) in t.iter_mut() {
        if k.ends_with(".alpha") && !k.contains("in_layers") && !k.contains("_conv.") {
            *v = scalar(1.0);
        }
    }
    let first = f.root.join("a").join("sks.safetensors");
    write_st(&first, &t);
    let set = read(&first).unwrap();
    assert!(set.modules.values().any(|m| m.scale() == 0.5) && set.modules.values().any(|m| m.scale() == 1.0));
    let (d, second) = (f.root.join("d.safetensors"), f.root.join("b").join("sks.safetensors"));
    db(&["lora", "convert", s(&first), s(&d), "--to", "diffusers"]);
    // Factors as they were; the alphas in diffusers' `lora_adapter_metadata` (PEFT LoraConfig).
    let meta: serde_json::Value = serde_json::from_str(&StFile::open(&d).unwrap().metadata()["lora_adapter_metadata"]).unwrap();
    assert_eq!((meta["unet.r"].clone(), meta["unet.lora_alpha"].clone()), (json!(2), json!(1.0)));
    assert_eq!(meta["unet.rank_pattern"]["down_blocks.1.resnets.0.conv1"], json!(3));
    assert_eq!(meta["unet.alpha_pattern"]["up_blocks.0.upsamplers.0.conv"], json!(3.0));
    assert_eq!(meta["text_encoder_2.target_modules"].as_array().unwrap().len(), 13);
    let back = read(&d).unwrap();
    assert_eq!(back.modules, set.modules);
    std::fs::create_dir_all(second.parent().unwrap()).unwrap();
    db(&["lora", "convert", s(&d), s(&second), "--to", "kohya"]);
    let (x, y) = (st(&first), st(&second));
    assert_eq!(x, y, "every tensor bit for bit");
}

/// `W + scale · (α/r) · up · down` in f64 loops.
fn expected(w: &RawTensor, down: &RawTensor, up: &RawTensor, s: f64) -> Vec<f32> {
    let (r, out) = (down.shape[0], w.shape[0]);
    let cols: usize = down.shape[1..].iter().product();
    let (wv, dv, uv) = (w.to_f32_values(), down.to_f32_values(), up.to_f32_values());
    (0..out * cols)
        .map(|i| {
            let (o, c) = (i / cols, i % cols);
            let d: f64 = (0..r).map(|k| uv[o * r + k] as f64 * dv[k * cols + c] as f64).sum();
            (wv[i] as f64 + s * d) as f32
        })
        .collect()
}

#[test]
fn merge_into_an_sdxl_folder_adds_every_delta_to_all_three_models() {
    let f = fixture();
    // The kohya LDM file with alpha 1 (scale 0.5 on rank 2).
    let kohya = f.root.join("k.safetensors");
    db(&["lora", "convert", s(&f.peft_path), s(&kohya), "--to", "kohya"]);
    let mut t = st(&kohya);
    t.iter_mut().filter(|(k, _)| k.ends_with(".alpha")).for_each(|(_, v)| *v = scalar(1.0));
    write_st(&kohya, &t);
    let out = f.root.join("merged");
    let text = db(&["lora", "merge", "--base", s(&f.folder), "--lora", s(&kohya), "--scale", "0.7", "--out", s(&out)]);
    assert!(text.contains("160 modules fused"), "{text}");
    let mut checked = 0;
    for (part, file) in [(Part::Unet, "unet/diffusion_pytorch_model.safetensors"), (Part::TextEncoder, "text_encoder/model.safetensors"), (Part::TextEncoder2, "text_encoder_2/model.safetensors")] {
        let (base, merged) = (st(&f.folder.join(file)), st(&out.join(file)));
        assert_eq!(base.keys().collect::<Vec<_>>(), merged.keys().collect::<Vec<_>>());
        for (key, w) in &base {
            let module = key.strip_suffix(".weight").unwrap_or("");
            let a = f.peft.get(&format!("{}.{module}.lora_A.weight", part.dir()));
            match a {
                None => assert_eq!(&merged[key], w, "{key} untouched"),
                Some(a) => {
                    let b = &f.peft[&format!("{}.{module}.lora_B.weight", part.dir())];
                    let want = expected(w, a, b, 0.7 / a.shape[0] as f64);
                    let got = merged[key].to_f32_values();
                    for (g, e) in got.iter().zip(&want) {
                        assert!((g - e).abs() <= 2e-6 * (1.0 + e.abs()), "{key}: {g} vs {e}");
                    }
                    assert_ne!(&merged[key], w);
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 160);
    assert_eq!(std::fs::read(f.folder.join("vae/diffusion_pytorch_model.safetensors")).unwrap(), std::fs::read(out.join("vae/diffusion_pytorch_model.safetensors")).unwrap());
    assert_eq!(std::fs::read(f.folder.join("model_index.json")).unwrap(), std::fs::read(out.join("model_index.json")).unwrap());
}

#[test]
fn merge_into_a_transformers_5_text_encoder_without_text_model() {
    // transformers 5 saves `CLIPTextModel` without its `text_model.` level.
    let f = fixture();
    let te = f.folder.join("text_encoder/model.safetensors");
    let bare: Tensors = st(&te).into_iter().map(|(k, v)| (k.strip_prefix("text_model.").unwrap().to_string(), v)).collect();
    write_st(&te, &bare);
    let out = f.root.join("merged");
    db(&["lora", "merge", "--base", s(&f.folder), "--lora", s(&f.peft_path), "--out", s(&out)]);
    let merged = st(&out.join("text_encoder/model.safetensors"));
    assert_eq!(merged.keys().collect::<Vec<_>>(), bare.keys().collect::<Vec<_>>());
    let key = "encoder.layers.1.self_attn.v_proj.weight";
    let (a, b) = (&f.peft["text_encoder.text_model.encoder.layers.1.self_attn.v_proj.lora_A.weight"], &f.peft["text_encoder.text_model.encoder.layers.1.self_attn.v_proj.lora_B.weight"]);
    let want = expected(&bare[key], a, b, 1.0);
    for (g, e) in merged[key].to_f32_values().iter().zip(&want) {
        assert!((g - e).abs() <= 2e-6 * (1.0 + e.abs()), "{key}: {g} vs {e}");
    }
}

#[test]
fn inspect_says_sdxl_and_the_numbering() {
    let f = fixture();
    let kohya = f.root.join("k.safetensors");
    db(&["lora", "convert", s(&f.peft_path), s(&kohya), "--to", "kohya"]);
    let theirs = f.root.join("theirs.safetensors");
    write_st(&theirs, &diffusers_kohya(&f.peft));
    let report = db(&["inspect", s(&f.peft_path)]);
    for line in ["LoRA: PEFT format, 139 UNet modules, 8 text-encoder modules, 13 text-encoder-2 modules", "family: SDXL (text_encoder_2 modules)", "base model: SDXL"] {
        assert!(report.contains(line), "{line}\n{report}");
    }
    let report = db(&["inspect", s(&kohya)]);
    assert!(report.contains("LoRA: kohya format") && report.contains("kohya UNet names: LDM numbering") && report.contains("ss_base_model_version: sdxl_base_v1-0"), "{report}");
    let report = db(&["inspect", s(&theirs)]);
    assert!(report.contains("kohya UNet names: diffusers numbering") && report.contains("family: SDXL"), "{report}");
    // UNet modules alone: the block structure tells (attention at up_blocks.0, depth 2).
    let unet_only: Tensors = f.peft.iter().filter(|(k, _)| k.starts_with("unet.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    let path = f.root.join("unet_only.safetensors");
    write_st(&path, &unet_only);
    assert!(db(&["inspect", s(&path)]).contains("family: SDXL (UNet block structure)"));
}

#[test]
fn a_base_decides_and_checks() {
    let f = fixture();
    // Attention in the mid block's first transformer alone: nothing in the file tells SDXL.
    let mid: Tensors = f.peft.iter().filter(|(k, _)| k.starts_with("unet.mid_block.attentions.0.transformer_blocks.0.attn1.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    let path = f.root.join("mid.safetensors");
    write_st(&path, &mid);
    let (plain, based) = (f.root.join("plain.safetensors"), f.root.join("based.safetensors"));
    db(&["lora", "convert", s(&path), s(&plain), "--to", "kohya"]);
    assert!(st(&plain).keys().all(|k| k.starts_with("lora_unet_mid_block_attentions_0_")), "SD 1.x/2.x names when nothing tells");
    db(&["lora", "convert", s(&path), s(&based), "--to", "kohya", "--base", s(&f.folder)]);
    assert!(st(&based).keys().all(|k| k.starts_with("lora_unet_middle_block_1_transformer_blocks_0_attn1_")), "SDXL names by --base");
    assert_eq!(StFile::open(&based).unwrap().metadata()["ss_base_model_version"], "sdxl_base_v1-0");
    // An SDXL LoRA against an SD 1.x/2.x base is refused, naming both.
    let sd = f.root.join("sd");
    write_json(&sd.join("model_index.json"), json!({"_class_name": "StableDiffusionPipeline"}));
    let (ok, err) = run(&["lora", "convert", s(&f.peft_path), s(&f.root.join("x.safetensors")), "--to", "kohya", "--base", s(&sd)]);
    assert!(!ok && err.contains("pytorch_lora_weights.safetensors") && err.contains("SDXL LoRA (text_encoder_2 modules)") && err.contains("SD 1.x/2.x"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // A module the base lacks is named.
    let mut extra = f.peft.clone();
    extra.insert("text_encoder_2.text_model.encoder.layers.7.self_attn.q_proj.lora_A.weight".into(), tensor(&[2, 24], 5));
    extra.insert("text_encoder_2.text_model.encoder.layers.7.self_attn.q_proj.lora_B.weight".into(), tensor(&[24, 2], 6));
    let bad = f.root.join("bad.safetensors");
    write_st(&bad, &extra);
    let (ok, err) = run(&["lora", "convert", s(&bad), s(&f.root.join("y.safetensors")), "--to", "kohya", "--base", s(&f.folder)]);
    assert!(!ok && err.contains("layers.7.self_attn.q_proj") && err.contains("text encoder 2") && err.contains("bad.safetensors"), "{err}");
    let (ok, err) = run(&["lora", "merge", "--base", s(&f.folder), "--lora", s(&bad), "--out", s(&f.root.join("m"))]);
    assert!(!ok && err.contains("layers.7.self_attn.q_proj") && !f.root.join("m").exists(), "{err}");
    // Merging an SDXL LoRA into a folder without text_encoder_2.
    let (ok, err) = run(&["lora", "merge", "--base", s(&sd), "--lora", s(&f.peft_path), "--out", s(&f.root.join("m2"))]);
    assert!(!ok && !f.root.join("m2").exists() && err.trim().lines().count() == 1, "{err}");
}

#[test]
fn bad_sdxl_files_are_refused_naming_the_file_and_key() {
    let f = fixture();
    type Case = (Vec<(&'static str, RawTensor)>, &'static str, &'static str);
    let cases: Vec<Case> = vec![
        // A block kohya's SDXL UNet has no slot 7 in.
        (vec![("lora_unet_input_blocks_4_7_proj_in.lora_down.weight", tensor(&[2, 4], 1)), ("lora_unet_input_blocks_4_7_proj_in.lora_up.weight", tensor(&[4, 2], 2))], "lora_unet_input_blocks_4_7_proj_in.lora_", "LDM numbering"),
        (vec![("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", tensor(&[2, 4], 1))], "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "no matching up"),
        (vec![("lora_te2_text_projection.lora_down.weight", tensor(&[2, 4], 1)), ("lora_te2_text_projection.dora_scale", tensor(&[1, 4], 2))], "lora_te2_text_projection.dora_scale", "DoRA"),
        (vec![("text_encoder_2.text_projection.lora_A.weight", tensor(&[2, 4], 1)), ("text_encoder_2.text_projection.lora_B.weight", tensor(&[4, 3], 2))], "text_encoder_2.text_projection.lora_B.weight", "rank 3 differs"),
        (vec![("lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight", tensor(&[2, 4], 1))], "lora_te3_", "not a LoRA tensor"),
    ];
    for (i, (tensors, key, why)) in cases.into_iter().enumerate() {
        let path = f.root.join(format!("bad{i}.safetensors"));
        write_st(&path, &tensors.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
        let out = f.root.join(format!("out{i}.safetensors"));
        let (ok, err) = run(&["lora", "convert", s(&path), s(&out), "--to", "diffusers"]);
        assert!(!ok && err.contains(&format!("bad{i}.safetensors")) && err.contains(key) && err.contains(why), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(!out.exists());
    }
    // Never over the input; an existing output only with --force.
    let (ok, err) = run(&["lora", "convert", s(&f.peft_path), s(&f.peft_path), "--to", "kohya", "--force"]);
    assert!(!ok && err.contains("overwrite the input"), "{err}");
    let out = f.root.join("k.safetensors");
    std::fs::write(&out, b"old").unwrap();
    let (ok, err) = run(&["lora", "convert", s(&f.peft_path), s(&out), "--to", "kohya"]);
    assert!(!ok && err.contains("--force") && std::fs::read(&out).unwrap() == b"old", "{err}");
    // SD 1.x/2.x diffusers keys have no second text encoder.
    let set = read(&f.peft_path).unwrap();
    let err = dreambridge::lora::write::write_diffusers_as(&set, &f.root.join("sd.safetensors"), dreambridge::lora::Family::Sd).unwrap_err().to_string();
    assert!(err.contains("text encoder 2") && err.contains("sd.safetensors"), "{err}");
}
