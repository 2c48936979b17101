//! Stability AI's SD3 single file <-> diffusers SD3 folders and KerasHub inputs: tiny SD3
//! folders of each variant, built here from the mapping tables with random (non-symmetric)
//! values, converted to a single file and back bit for bit; Stability's names, fused q/k/v and
//! swapped halves checked on the file; KerasHub -> single file equal to the way through diffusers;
//! bad inputs refused by name.

mod common;

use common::tiny::*;
use dreambridge::convert::kerashub;
use dreambridge::convert::sd3_to_diffusers::sd3_to_diffusers;
use dreambridge::convert::sd3_to_keras::sd3_to_keras;
use dreambridge::convert::to_diffusers::ToDiffusersOptions;
use dreambridge::diffusers::sd3::Variant;
use dreambridge::diffusers::st_read::StFile;
use dreambridge::single_file::convert::ExportOptions;
use dreambridge::single_file::sd3::{self, Sd3ToFolderOptions};
use dreambridge::tensor::{DType, RawTensor};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn export(folder: &Path, out: &Path) -> sd3::Sd3Exported {
    sd3::diffusers_to_single_file(folder, &ExportOptions { out: out.to_owned(), ..Default::default() }).unwrap()
}

fn import(file: &Path, out: &Path, base: Option<PathBuf>) -> Result<sd3::Sd3FolderWritten, anyhow::Error> {
    sd3::single_file_to_diffusers(file, &Sd3ToFolderOptions { base, out: out.to_owned(), ..Default::default() })
}

#[test]
fn every_variant_round_trips_through_a_single_file_bit_for_bit() {
    for (variant, t5) in [(Variant::Sd3Medium, true), (Variant::Sd35Medium, false), (Variant::Sd35Large, false)] {
        let dir = tempfile::tempdir().unwrap();
        let (folder, file, back) = (dir.path().join("sd3"), dir.path().join("sd3.safetensors"), dir.path().join("back"));
        make_sd3_folder(&folder, variant, t5);
        let done = export(&folder, &file);
        assert_eq!(done.variant, variant);
        let model = sd3::open_file(&file).unwrap();
        assert_eq!((model.variant, model.heads), (variant, if variant == Variant::Sd3Medium { 1 } else { 2 }), "{variant:?}: heads from the q/k norms, else width / 64");
        // T5's config and tokenizer are not in the file: a base gives them.
        let base = t5.then(|| folder.clone());
        let written = import(&file, &back, base).unwrap();
        assert_eq!(written.variant, variant);
        for part in PARTS {
            same_part(&folder, &back, part);
        }
        if t5 {
            // T5's tied embedding under both names in the file (diffusers' loader does not tie them).
            let f = StFile::open(&file).unwrap();
            let t5 = |k: &str| f.read(&format!("text_encoders.t5xxl.transformer.{k}")).unwrap();
            assert_eq!(t5("encoder.embed_tokens.weight"), t5("shared.weight"));
            same_part(&folder, &back, "text_encoder_3/model.safetensors");
            assert!(back.join("tokenizer_3/tokenizer_config.json").is_file());
        } else {
            assert!(!back.join("text_encoder_3").exists());
        }
        let index = read_json(&back.join("model_index.json"));
        assert_eq!(index["text_encoder_3"], if t5 { json!(["transformers", "T5EncoderModel"]) } else { json!([null, null]) });
        let t = read_json(&back.join("transformer/config.json"));
        assert_eq!((t["num_layers"].clone(), t["pos_embed_max_size"].clone(), t["in_channels"].clone()), (json!(3), json!(4), json!(16)), "{variant:?}");
        assert_eq!(t["qk_norm"], if variant == Variant::Sd3Medium { json!(null) } else { json!("rms_norm") });
        assert_eq!(t["dual_attention_layers"], if variant == Variant::Sd35Medium { json!([0]) } else { json!([]) });
        // With a base, its heads (2) where the weights cannot tell.
        assert_eq!(t["num_attention_heads"], json!(2));
        let vae = read_json(&back.join("vae/config.json"));
        assert_eq!((vae["latent_channels"].clone(), vae["use_quant_conv"].clone()), (json!(16), json!(false)));
        for tok in ["tokenizer/vocab.json", "tokenizer_2/merges.txt", "scheduler/scheduler_config.json"] {
            assert!(back.join(tok).is_file(), "{tok}");
        }
        // The file again from the folder written: the same tensors.
        let again = dir.path().join("again.safetensors");
        export(&back, &again);
        let n = same_file(&file, &again);
        assert!(n > 100, "{n} tensors");
    }
}

#[test]
fn sd3_medium_without_base_takes_heads_from_the_width() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, file, back) = (dir.path().join("sd3"), dir.path().join("m.safetensors"), dir.path().join("back"));
    make_sd3_folder(&folder, Variant::Sd3Medium, false);
    export(&folder, &file);
    import(&file, &back, None).unwrap();
    assert_eq!(read_json(&back.join("transformer/config.json"))["num_attention_heads"], json!(1));
    let tok = read_json(&back.join("tokenizer_2/tokenizer_config.json"));
    assert_eq!(tok["pad_token"], json!("!"));
    for part in PARTS {
        same_part(&folder, &back, part);
    }
}

fn f32s(t: RawTensor) -> Vec<f32> {
    t.to_f32_values()
}

#[test]
fn the_file_holds_stabilitys_names_fused_qkv_and_shift_scale_order() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, file) = (dir.path().join("sd3"), dir.path().join("sd3.safetensors"));
    make_sd3_folder(&folder, Variant::Sd35Medium, false);
    export(&folder, &file);
    let sf = StFile::open(&file).unwrap();
    let st = StFile::open(&folder.join(PARTS[0])).unwrap();
    let m = |k: &str| format!("model.diffusion_model.{k}");
    // q, k, v rows one after the other, image and text halves, and the second attention.
    for (fused, parts) in [
        ("joint_blocks.1.x_block.attn.qkv.weight", ["attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight"]),
        ("joint_blocks.2.context_block.attn.qkv.bias", ["attn.add_q_proj.bias", "attn.add_k_proj.bias", "attn.add_v_proj.bias"]),
        ("joint_blocks.0.x_block.attn2.qkv.weight", ["attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight"]),
    ] {
        let block = fused.split('.').nth(1).unwrap();
        let want: Vec<f32> = parts.iter().flat_map(|p| f32s(st.read(&format!("transformer_blocks.{block}.{p}")).unwrap())).collect();
        assert_eq!(f32s(sf.read(&m(fused)).unwrap()), want, "{fused}");
    }
    assert_eq!(sf.info(&m("joint_blocks.1.x_block.attn.qkv.weight")).unwrap().shape, vec![192, 64]);
    // Swapped halves in the final layer's and the last block's context norm, nowhere else.
    for (key, diffusers) in [("final_layer.adaLN_modulation.1.bias", "norm_out.linear.bias"), ("joint_blocks.2.context_block.adaLN_modulation.1.weight", "transformer_blocks.2.norm1_context.linear.weight")] {
        let (s, d) = (f32s(sf.read(&m(key)).unwrap()), f32s(st.read(diffusers).unwrap()));
        let h = d.len() / 2;
        assert_ne!(s, d, "{key}");
        assert_eq!((&s[..h], &s[h..]), (&d[h..], &d[..h]), "{key}");
    }
    for (key, diffusers) in [("joint_blocks.1.context_block.adaLN_modulation.1.bias", "transformer_blocks.1.norm1_context.linear.bias"), ("joint_blocks.2.x_block.adaLN_modulation.1.bias", "transformer_blocks.2.norm1.linear.bias")] {
        assert_eq!(f32s(sf.read(&m(key)).unwrap()), f32s(st.read(diffusers).unwrap()), "{key}");
    }
    let keys = sf.keys();
    let has = |k: &str| keys.iter().any(|x| x == k);
    assert_eq!(sf.info(&m("pos_embed")).unwrap().shape, vec![1, 16, 64]);
    for k in ["x_embedder.proj.weight", "t_embedder.mlp.2.bias", "y_embedder.mlp.0.weight", "context_embedder.weight", "final_layer.linear.weight", "joint_blocks.0.x_block.attn2.ln_q.weight", "joint_blocks.2.context_block.attn.ln_k.weight"] {
        assert!(has(&m(k)), "{k}");
    }
    // The last block's text half has no output projection nor MLP; no second attention past block 0.
    assert!(!has(&m("joint_blocks.2.context_block.attn.proj.weight")) && !has(&m("joint_blocks.2.context_block.mlp.fc1.weight")));
    assert!(!has(&m("joint_blocks.1.x_block.attn2.qkv.weight")));
    assert!(has("text_encoders.clip_l.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight"));
    assert!(has("text_encoders.clip_g.transformer.text_projection.weight"));
    assert!(has("first_stage_model.decoder.up.3.block.2.conv1.weight") && has("first_stage_model.encoder.mid.attn_1.q.weight"));
    assert_eq!(sf.info("first_stage_model.encoder.mid.attn_1.q.weight").unwrap().shape, vec![16, 16, 1, 1]);
    assert!(!keys.iter().any(|k| k.contains("quant_conv")));
    assert!(keys.iter().all(|k| ["model.diffusion_model.", "text_encoders.clip_l.", "text_encoders.clip_g.", "first_stage_model."].iter().any(|p| k.starts_with(p))));
    assert_eq!(sf.metadata()["modelspec.architecture"], "stable-diffusion-v3.5-medium");
}

#[test]
fn a_file_without_clip_l_projection_reads_it_as_the_identity() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, file, cut, back) = (dir.path().join("sd3"), dir.path().join("a.safetensors"), dir.path().join("b.safetensors"), dir.path().join("back"));
    make_sd3_folder(&folder, Variant::Sd3Medium, false);
    export(&folder, &file);
    rewrite(&file, &cut, |k| k != "text_encoders.clip_l.transformer.text_projection.weight");
    import(&cut, &back, None).unwrap();
    let p = StFile::open(&back.join(PARTS[1])).unwrap().read("text_projection.weight").unwrap();
    let v = f32s(p);
    assert_eq!(v.len(), 16 * 16);
    assert!((0..16).all(|i| (0..16).all(|j| v[i * 16 + j] == if i == j { 1.0 } else { 0.0 })));
}

/// `from` rewritten into `to` with the tensors `keep` accepts (and `extra` added).
fn rewrite(from: &Path, to: &Path, keep: impl Fn(&str) -> bool) {
    rewrite_with(from, to, keep, &[]);
}

fn rewrite_with(from: &Path, to: &Path, keep: impl Fn(&str) -> bool, extra: &[(&str, RawTensor)]) {
    let f = StFile::open(from).unwrap();
    let mut t: BTreeMap<String, RawTensor> = f.keys().into_iter().filter(|k| keep(k)).map(|k| (k.clone(), f.read(&k).unwrap())).collect();
    for (k, v) in extra {
        t.insert(k.to_string(), v.clone());
    }
    write_st(to, &t);
}

/// HDF5 locks the files it opens, and a child process started meanwhile inherits the lock: the
/// KerasHub test and the CLI test do not run side by side.
static HDF5_AND_CHILDREN: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn keras_to_single_file_equals_the_way_through_diffusers() {
    let _one = HDF5_AND_CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    for variant in [Variant::Sd3Medium, Variant::Sd35Medium, Variant::Sd35Large] {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        make_sd3_folder(&p("sd3"), variant, false);
        sd3_to_keras(&p("sd3"), &p("preset"), false).unwrap();
        let keras = kerashub::open(&p("preset")).unwrap();
        let direct = sd3::keras_to_single_file(&keras, None, &ExportOptions { out: p("direct.safetensors"), ..Default::default() }).unwrap();
        assert_eq!(direct.variant, variant);
        sd3_to_diffusers(&keras, &ToDiffusersOptions { out: p("via"), ..Default::default() }).unwrap();
        export(&p("via"), &p("via.safetensors"));
        let n = same_file(&p("direct.safetensors"), &p("via.safetensors"));
        // And the same as the original folder's file.
        export(&p("sd3"), &p("orig.safetensors"));
        assert_eq!(same_file(&p("direct.safetensors"), &p("orig.safetensors")), n);
        // The MMDiT alone, the rest from a base folder or a base single file: the same file.
        sd3_to_keras(&p("sd3"), &p("dreambooth.weights.h5"), false).unwrap();
        let mmdit = kerashub::open(&p("dreambooth.weights.h5")).unwrap();
        for (base, out) in [(p("sd3"), "from_folder.safetensors"), (p("orig.safetensors"), "from_file.safetensors")] {
            sd3::keras_to_single_file(&mmdit, Some(&base), &ExportOptions { out: p(out), ..Default::default() }).unwrap();
            assert_eq!(same_file(&p(out), &p("orig.safetensors")), n, "{out}");
        }
        // fp16 on the way.
        sd3::keras_to_single_file(&keras, None, &ExportOptions { out: p("half.safetensors"), half: true, ..Default::default() }).unwrap();
        let half = StFile::open(&p("half.safetensors")).unwrap();
        assert!(half.keys().iter().all(|k| half.info(k).unwrap().dtype == DType::F16));
    }
}

#[test]
fn bad_inputs_are_named_and_outputs_kept() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    make_sd3_folder(&p("sd3"), Variant::Sd35Large, true);
    export(&p("sd3"), &p("sd3.safetensors"));
    // A single file of another model.
    let mut t = BTreeMap::new();
    t.insert("model.diffusion_model.input_blocks.0.0.weight".to_string(), RawTensor { dtype: DType::F32, shape: vec![2], data: values(2, 1) });
    write_st(&p("sd1.safetensors"), &t);
    let err = format!("{:#}", import(&p("sd1.safetensors"), &p("x"), None).unwrap_err());
    assert!(err.contains("sd1.safetensors: not a Stable Diffusion 3 single file"), "{err}");
    // An SD3 file given to the SD1/SD2 reader says what it is.
    let err = format!("{:#}", dreambridge::single_file::SingleFile::open(&p("sd3.safetensors"), &Default::default()).err().unwrap());
    assert!(err.contains("a Stable Diffusion 3 single file"), "{err}");
    // A missing tensor: one line naming the file and the tensor (and its diffusers name).
    let gone = "model.diffusion_model.joint_blocks.1.x_block.attn.proj.bias";
    rewrite(&p("sd3.safetensors"), &p("cut.safetensors"), |k| k != gone);
    let err = format!("{:#}", import(&p("cut.safetensors"), &p("x"), Some(p("sd3"))).unwrap_err());
    assert!(err.contains("cut.safetensors") && err.contains(gone) && err.contains("transformer_blocks.1.attn.to_out.0.bias") && err.contains("missing"), "{err}");
    assert!(!err.contains('\n'), "{err}");
    // A fused tensor of the wrong size.
    let bad = RawTensor { dtype: DType::F32, shape: vec![10, 64], data: values(640, 3) };
    rewrite_with(&p("sd3.safetensors"), &p("bad.safetensors"), |k| !k.ends_with("joint_blocks.0.x_block.attn.qkv.weight"), &[("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", bad)]);
    let err = format!("{:#}", import(&p("bad.safetensors"), &p("x"), Some(p("sd3"))).unwrap_err());
    assert!(err.contains("bad.safetensors") && err.contains("joint_blocks.0.x_block.attn.qkv.weight"), "{err}");
    // A tensor that no part has is named, not dropped.
    let stray = RawTensor { dtype: DType::F32, shape: vec![2], data: values(2, 4) };
    rewrite_with(&p("sd3.safetensors"), &p("stray.safetensors"), |_| true, &[("model.diffusion_model.joint_blocks.1.x_block.extra.weight", stray.clone())]);
    let err = format!("{:#}", import(&p("stray.safetensors"), &p("x"), Some(p("sd3"))).unwrap_err());
    assert!(err.contains("stray.safetensors") && err.contains("joint_blocks.1.x_block.extra.weight"), "{err}");
    rewrite_with(&p("sd3.safetensors"), &p("stray2.safetensors"), |_| true, &[("conditioner.embedders.0.foo", stray)]);
    let err = format!("{:#}", import(&p("stray2.safetensors"), &p("x"), Some(p("sd3"))).unwrap_err());
    assert!(err.contains("tensor `conditioner.embedders.0.foo`: not part of an SD3"), "{err}");
    // T5 in the file and no base for its config and tokenizer.
    let err = format!("{:#}", import(&p("sd3.safetensors"), &p("x"), None).unwrap_err());
    assert!(err.contains("sd3.safetensors: holds a T5 encoder") && err.contains("--base"), "{err}");
    // A base of another model.
    write_json(&p("sd1/model_index.json"), json!({"_class_name": "StableDiffusionPipeline"}));
    let err = format!("{:#}", import(&p("sd3.safetensors"), &p("x"), Some(p("sd1"))).unwrap_err());
    assert!(err.contains("not a Stable Diffusion 3 diffusers folder"), "{err}");
    assert!(!p("x").exists(), "a failed conversion leaves nothing");
    // An existing output is not replaced, file or folder.
    let before = std::fs::read(p("sd3.safetensors")).unwrap();
    let err = sd3::diffusers_to_single_file(&p("sd3"), &ExportOptions { out: p("sd3.safetensors"), ..Default::default() }).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(std::fs::read(p("sd3.safetensors")).unwrap(), before);
    std::fs::create_dir_all(p("taken")).unwrap();
    std::fs::write(p("taken/keep.txt"), "mine").unwrap();
    let err = import(&p("sd3.safetensors"), &p("taken"), Some(p("sd3"))).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(std::fs::read_to_string(p("taken/keep.txt")).unwrap(), "mine");
}

#[test]
fn the_cli_converts_sd3_both_ways() {
    let _one = HDF5_AND_CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    make_sd3_folder(&p("sd3"), Variant::Sd35Medium, false);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dreambridge")).args(args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let s = |q: PathBuf| q.to_string_lossy().to_string();
    let (ok, text) = run(&["convert", "diffusers-to-single-file", "--model", &s(p("sd3")), "--out", &s(p("f.safetensors")), "--half"]);
    assert!(ok && text.contains("SD3.5 medium"), "{text}");
    let (ok, text) = run(&["convert", "single-file-to-diffusers", "--checkpoint", &s(p("f.safetensors")), "--out", &s(p("back"))]);
    assert!(ok && text.contains("SD3.5 medium single file"), "{text}");
    let back = StFile::open(&p("back").join(PARTS[0])).unwrap();
    let orig = StFile::open(&p("sd3").join(PARTS[0])).unwrap();
    let k = "transformer_blocks.2.norm1_context.linear.bias";
    let want: Vec<f32> = f32s(orig.read(k).unwrap()).iter().map(|v| half::f16::from_f32(*v).to_f32()).collect();
    assert_eq!(f32s(back.read(k).unwrap()), want);
    // KerasHub's MMDiT alone (the DreamBooth file) + the file as base -> one file, through the CLI.
    sd3_to_keras(&p("sd3"), &p("dreambooth.weights.h5"), false).unwrap();
    let (ok, text) = run(&["convert", "keras-to-single-file", "--unet", &s(p("dreambooth.weights.h5")), "--base", &s(p("f.safetensors")), "--out", &s(p("k.safetensors"))]);
    assert!(ok && text.contains("SD3.5 medium: MMDiT, CLIP-L, CLIP-G, VAE"), "{text}");
    let (k, f) = (StFile::open(&p("k.safetensors")).unwrap(), StFile::open(&p("f.safetensors")).unwrap());
    let key = "model.diffusion_model.final_layer.adaLN_modulation.1.weight";
    let from_keras: Vec<f32> = f32s(k.read(key).unwrap()).iter().map(|v| half::f16::from_f32(*v).to_f32()).collect();
    assert!(from_keras == f32s(f.read(key).unwrap()), "the f32 MMDiT from Keras is the fp16 file's, before rounding");
    assert_eq!(k.read("text_encoders.clip_g.transformer.text_projection.weight").unwrap(), f.read("text_encoders.clip_g.transformer.text_projection.weight").unwrap());
    let (ok, text) = run(&["convert", "keras-to-single-file", "--unet", &s(p("dreambooth.weights.h5")), "--base", &s(p("f.safetensors")), "--out", &s(p("k.safetensors"))]);
    assert!(!ok && text.contains("k.safetensors: already exists"), "{text}");
    let (ok, text) = run(&["inspect", &s(p("f.safetensors"))]);
    assert!(ok && text.contains("Stable Diffusion 3 single file, SD3.5 medium (3 blocks, width 64, 2 heads; MMDiT, CLIP-L, CLIP-G, VAE)"), "{text}");
    let (ok, text) = run(&["convert", "single-file-to-diffusers", "--checkpoint", &s(p("f.safetensors")), "--out", &s(p("other")), "--sd-version", "2"]);
    assert!(!ok && text.contains("a Stable Diffusion 3 single file"), "{text}");
}

/// Stability's file straight into a KerasHub preset and an MMDiT-only file: the same Keras
/// weights as the way through diffusers (the KerasHub -> diffusers conversion gives back the
/// original folder's tensors bit for bit).
#[test]
fn a_single_file_goes_to_kerashub() {
    use dreambridge::convert::sd3_to_keras::{single_file_to_keras, DEFAULT_MAX_SHARD_GB};
    let _one = HDF5_AND_CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    for variant in [Variant::Sd3Medium, Variant::Sd35Medium] {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        make_sd3_folder(&p("sd3"), variant, false);
        export(&p("sd3"), &p("sd3.safetensors"));
        let done = single_file_to_keras(&p("sd3.safetensors"), &p("preset"), false, DEFAULT_MAX_SHARD_GB).unwrap();
        assert_eq!(done.parts.len(), 4, "{:?}", done.parts);
        let keras = kerashub::open(&p("preset")).unwrap();
        assert_eq!(keras.variant, variant);
        sd3_to_diffusers(&keras, &ToDiffusersOptions { out: p("back"), ..Default::default() }).unwrap();
        for part in PARTS {
            same_part(&p("sd3"), &p("back"), part);
        }
        single_file_to_keras(&p("sd3.safetensors"), &p("mmdit.weights.h5"), false, DEFAULT_MAX_SHARD_GB).unwrap();
        let mmdit = kerashub::open(&p("mmdit.weights.h5")).unwrap();
        sd3_to_diffusers(&mmdit, &ToDiffusersOptions { out: p("again"), base: Some(p("sd3")), ..Default::default() }).unwrap();
        same_part(&p("sd3"), &p("again"), PARTS[0]);
        // Nothing the user gave is replaced.
        assert!(single_file_to_keras(&p("sd3.safetensors"), &p("preset"), false, DEFAULT_MAX_SHARD_GB).unwrap_err().to_string().contains("already exists"));
    }
}
