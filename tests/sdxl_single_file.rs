//! Stability AI's SDXL base single file <-> diffusers `StableDiffusionXLPipeline` folders: a tiny
//! SDXL folder (`common::sdxl`: the UNet's tensors by SDXL's block structure, the CLIPs and VAE
//! from the mapping tables) with non-symmetric values, converted to a single file and back bit for bit
//! (f32 and fp16); Stability's names, the transposed OpenCLIP-G projection and its fused q/k/v
//! checked on the file; refiner and other families refused naming the file; nothing overwritten.

mod common;

use common::sdxl::{make_sdxl_folder, put, Tensors, CLIP_G, CLIP_L, POOLED, TIME};
use common::tiny::{read_json, write_json, write_st};
use dreambridge::diffusers::st_read::StFile;
use dreambridge::single_file::convert::ExportOptions;
use dreambridge::single_file::sdxl::{self, SdxlToFolderOptions};
use dreambridge::tensor::{DType, RawTensor};
use serde_json::json;
use std::path::Path;

const PARTS: [&str; 4] = [
    "unet/diffusion_pytorch_model",
    "text_encoder/model",
    "text_encoder_2/model",
    "vae/diffusion_pytorch_model",
];

/// Every tensor of `a` equal to `b`'s (same keys), `b` cast to fp16 first with `half`.
fn same_st(a: &Path, b: &Path, half: bool) -> usize {
    let (x, y) = (StFile::open(a).unwrap(), StFile::open(b).unwrap());
    let (mut kx, mut ky) = (x.keys(), y.keys());
    kx.sort();
    ky.sort();
    assert_eq!(kx, ky, "{}: different tensors", a.display());
    for k in &kx {
        let (p, q) = (x.read(k).unwrap(), y.read(k).unwrap());
        let q = if half { fp16(&q) } else { q };
        assert_eq!(p, q, "{}: tensor `{k}` differs", a.display());
    }
    kx.len()
}

fn fp16(t: &RawTensor) -> RawTensor {
    let data = t.to_f32_values().iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
    RawTensor { dtype: DType::F16, shape: t.shape.clone(), data }
}

fn export(folder: &Path, out: &Path, half: bool) -> Result<sdxl::SdxlExported, anyhow::Error> {
    sdxl::diffusers_to_single_file(folder, &ExportOptions { out: out.to_owned(), half, force: false })
}

fn import(file: &Path, out: &Path, half: bool) -> Result<sdxl::SdxlFolderWritten, anyhow::Error> {
    sdxl::single_file_to_diffusers(file, &SdxlToFolderOptions { base: None, out: out.to_owned(), half, force: false })
}

#[test]
fn folder_to_file_to_folder_is_bit_identical_in_f32_and_fp16() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("sdxl");
    make_sdxl_folder(&folder);
    for half in [false, true] {
        let (file, back) = (dir.path().join(format!("sdxl-{half}.safetensors")), dir.path().join(format!("back-{half}")));
        let done = export(&folder, &file, half).unwrap();
        assert_eq!(done.parts, ["UNet", "CLIP-L", "OpenCLIP-G", "VAE"]);
        let f = StFile::open(&file).unwrap();
        assert!(f.keys().iter().all(|k| f.info(k).unwrap().dtype == if half { DType::F16 } else { DType::F32 }));
        assert!(sdxl::is_sdxl_file(&file));
        let written = import(&file, &back, half).unwrap();
        assert_eq!(written.from_file, ["UNet", "CLIP-L", "OpenCLIP-G", "VAE"]);
        let suffix = if half { ".fp16.safetensors" } else { ".safetensors" };
        let n: usize = PARTS.iter().map(|p| same_st(&back.join(format!("{p}{suffix}")), &folder.join(format!("{p}.safetensors")), half)).sum();
        // Fused q/k/v: one file tensor per 3 diffusers tensors (OpenCLIP-G's 3 layers, weight and bias).
        let fused = f.keys().iter().filter(|k| k.contains(".attn.in_proj_")).count();
        assert_eq!((fused, n), (3 * 2, f.keys().len() + 2 * fused));
        // The file written back from the imported folder is the same file.
        let again = dir.path().join(format!("again-{half}.safetensors"));
        let mut index = read_json(&back.join("model_index.json"));
        assert_eq!(index["_class_name"], "StableDiffusionXLPipeline");
        if half {
            // diffusers' fp16 variant names: rename to plain ones to re-export.
            for p in PARTS {
                std::fs::rename(back.join(format!("{p}{suffix}")), back.join(format!("{p}.safetensors"))).unwrap();
            }
            index["_class_name"] = "StableDiffusionXLPipeline".into();
        }
        export(&back, &again, half).unwrap();
        let (a, b) = (StFile::open(&file).unwrap(), StFile::open(&again).unwrap());
        let mut keys = a.keys();
        keys.sort();
        let mut other = b.keys();
        other.sort();
        assert_eq!(keys, other);
        for k in keys {
            assert_eq!(a.read(&k).unwrap(), b.read(&k).unwrap(), "`{k}`");
        }
    }
}

#[test]
fn the_file_has_stability_names_the_transposed_projection_and_fused_qkv() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, file) = (dir.path().join("sdxl"), dir.path().join("sdxl.safetensors"));
    make_sdxl_folder(&folder);
    export(&folder, &file, false).unwrap();
    let f = StFile::open(&file).unwrap();
    let unet = StFile::open(&folder.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let g = StFile::open(&folder.join("text_encoder_2/model.safetensors")).unwrap();
    for (file_key, folder_key) in [
        ("label_emb.0.0.weight", "add_embedding.linear_1.weight"),
        ("label_emb.0.2.bias", "add_embedding.linear_2.bias"),
        ("input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
        ("output_blocks.2.1.transformer_blocks.1.ff.net.2.weight", "up_blocks.0.attentions.2.transformer_blocks.1.ff.net.2.weight"),
        ("output_blocks.2.2.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
        ("output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias"),
        ("output_blocks.8.0.skip_connection.weight", "up_blocks.2.resnets.2.conv_shortcut.weight"),
        ("middle_block.1.transformer_blocks.1.attn1.to_q.weight", "mid_block.attentions.0.transformer_blocks.1.attn1.to_q.weight"),
    ] {
        assert_eq!(f.read(&format!("model.diffusion_model.{file_key}")).unwrap(), unet.read(folder_key).unwrap(), "{file_key}");
    }
    // OpenCLIP-G: `x @ text_projection`, so the file holds diffusers' [POOLED, CLIP_G] transposed.
    let p = g.read("text_projection.weight").unwrap();
    let t = f.read("conditioner.embedders.1.model.text_projection").unwrap();
    assert_eq!((p.shape.clone(), t.shape.clone()), (vec![POOLED, CLIP_G], vec![CLIP_G, POOLED]));
    let (pv, tv) = (p.to_f32_values(), t.to_f32_values());
    for r in 0..POOLED {
        for c in 0..CLIP_G {
            assert_eq!(pv[r * CLIP_G + c], tv[c * POOLED + r]);
        }
    }
    let fused = f.read("conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight").unwrap();
    let parts: Vec<u8> = ["q_proj", "k_proj", "v_proj"].iter().flat_map(|q| g.read(&format!("text_model.encoder.layers.1.self_attn.{q}.weight")).unwrap().data).collect();
    assert_eq!((fused.shape.clone(), fused.data), (vec![3 * CLIP_G, CLIP_G], parts));
    assert!(f.contains("conditioner.embedders.1.model.positional_embedding") && f.contains("conditioner.embedders.1.model.ln_final.weight"));
    assert!(f.contains("conditioner.embedders.1.model.token_embedding.weight"));
    assert!(f.contains("conditioner.embedders.0.transformer.text_model.encoder.layers.1.mlp.fc1.weight"));
    assert!(f.contains("first_stage_model.quant_conv.weight") && f.contains("first_stage_model.decoder.up.3.block.0.conv1.weight"));
    // The configs the import derives from these weights.
    let back = dir.path().join("back");
    import(&file, &back, false).unwrap();
    let u = read_json(&back.join("unet/config.json"));
    assert_eq!(u["transformer_layers_per_block"], json!([1, 1, 2]));
    assert_eq!(u["down_block_types"], json!(["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]));
    assert_eq!(u["up_block_types"], json!(["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]));
    assert_eq!((u["addition_time_embed_dim"].clone(), u["projection_class_embeddings_input_dim"].clone()), (json!(TIME), json!(POOLED + 6 * TIME)));
    assert_eq!((u["cross_attention_dim"].clone(), u["use_linear_projection"].clone()), (json!(CLIP_L + CLIP_G), json!(true)));
    let g2 = read_json(&back.join("text_encoder_2/config.json"));
    assert_eq!((g2["projection_dim"].clone(), g2["hidden_act"].clone(), g2["num_hidden_layers"].clone()), (json!(POOLED), json!("gelu"), json!(3)));
    assert_eq!(read_json(&back.join("tokenizer_2/special_tokens_map.json"))["pad_token"], "!");
    assert_eq!(read_json(&back.join("vae/config.json"))["scaling_factor"], json!(0.13025));
    assert_eq!(read_json(&back.join("scheduler/scheduler_config.json"))["_class_name"], "EulerDiscreteScheduler");
}

/// diffusers' `scripts/convert_diffusers_to_original_sdxl.py` writes what our export writes but
/// for the text encoders: CLIP-L's keys as the folder's file has them (transformers 5 saves
/// `CLIPTextModel` without `text_model.`), and keys its renames do not know passed through, such
/// as OpenCLIP-G's `text_model.embeddings.position_ids` from a folder transformers 4 saved (float16
/// after its `--half`); no metadata. Both forms import bit for bit.
#[test]
fn files_of_diffusers_sdxl_conversion_script_import_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, file) = (dir.path().join("sdxl"), dir.path().join("sdxl.safetensors"));
    make_sdxl_folder(&folder);
    export(&folder, &file, false).unwrap();
    let f = StFile::open(&file).unwrap();
    let ours: Tensors = f.keys().into_iter().map(|k| (k.clone(), f.read(&k).unwrap())).collect();
    const L: &str = "conditioner.embedders.0.transformer.";
    let bare: Tensors = ours.iter().map(|(k, t)| (k.replace(&format!("{L}text_model."), L), t.clone())).collect();
    assert!(bare.contains_key(&format!("{L}encoder.layers.1.mlp.fc1.weight")) && !bare.keys().any(|k| k.starts_with(&format!("{L}text_model."))));
    let mut half: Tensors = ours.iter().map(|(k, t)| (k.clone(), fp16(t))).collect();
    let ids = RawTensor { dtype: DType::F32, shape: vec![1, 77], data: (0..77).flat_map(|i| (i as f32).to_le_bytes()).collect() };
    for prefix in [L, "conditioner.embedders.1.model."] {
        half.insert(format!("{prefix}text_model.embeddings.position_ids"), fp16(&ids));
    }
    for (name, tensors, is_half) in [("bare-clip-l", bare, false), ("half-position-ids", half, true)] {
        let (path, back) = (dir.path().join(format!("{name}.safetensors")), dir.path().join(name));
        write_st(&path, &tensors);
        let done = import(&path, &back, false).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(done.from_file, ["UNet", "CLIP-L", "OpenCLIP-G", "VAE"], "{name}");
        let n: usize = PARTS.iter().map(|p| same_st(&back.join(format!("{p}.safetensors")), &folder.join(format!("{p}.safetensors")), is_half)).sum();
        assert!(n > ours.len(), "{name}: {n} tensors");
    }
}

/// A file of `keys` (tiny tensors).
fn keys_file(path: &Path, keys: &[&str]) {
    let mut t = Tensors::new();
    for k in keys {
        put(&mut t, k, &[2, 2]);
    }
    write_st(path, &t);
}

#[test]
fn refiners_and_other_families_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let refiner = dir.path().join("refiner.safetensors");
    keys_file(&refiner, &["model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight"]);
    let e = format!("{:#}", import(&refiner, &dir.path().join("out"), false).err().unwrap());
    assert!(e.contains("refiner.safetensors") && e.contains("SDXL refiner") && !e.contains('\n'), "{e}");
    assert!(!dir.path().join("out").exists());
    let e = format!("{:#}", dreambridge::single_file::SingleFile::open(&refiner, &Default::default()).err().unwrap());
    assert!(e.contains("refiner.safetensors") && e.contains("SDXL refiner"), "{e}");
    let sd1 = dir.path().join("sd1.safetensors");
    keys_file(&sd1, &["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.final_layer_norm.weight"]);
    assert!(!sdxl::is_sdxl_file(&sd1));
    let unclip = dir.path().join("unclip.safetensors");
    keys_file(&unclip, &["model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.input_blocks.9.0.in_layers.0.weight"]);
    assert!(!sdxl::is_sdxl_file(&unclip));
    let unet_only = dir.path().join("unet-only.safetensors");
    keys_file(&unet_only, &["model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.input_blocks.8.0.in_layers.0.weight"]);
    assert!(sdxl::is_sdxl_file(&unet_only));
    let e = format!("{:#}", import(&sd1, &dir.path().join("out"), false).err().unwrap());
    assert!(e.contains("sd1.safetensors") && e.contains("not an SDXL base single file"), "{e}");
    // An SDXL file is not read as SD1/SD2.
    let (folder, file) = (dir.path().join("sdxl"), dir.path().join("sdxl.safetensors"));
    make_sdxl_folder(&folder);
    export(&folder, &file, false).unwrap();
    let e = format!("{:#}", dreambridge::single_file::SingleFile::open(&file, &Default::default()).err().unwrap());
    assert!(e.contains("sdxl.safetensors") && e.contains("SDXL base"), "{e}");
    // A tensor SDXL does not have, in an otherwise whole file, is named.
    let f = StFile::open(&file).unwrap();
    let mut all: Tensors = f.keys().into_iter().map(|k| (k.clone(), f.read(&k).unwrap())).collect();
    put(&mut all, "conditioner.embedders.1.model.transformer.resblocks.0.attn.bogus", &[2]);
    let odd = dir.path().join("odd.safetensors");
    write_st(&odd, &all);
    let e = format!("{:#}", import(&odd, &dir.path().join("out"), false).err().unwrap());
    assert!(e.contains("odd.safetensors") && e.contains("resblocks.0.attn.bogus") && !e.contains('\n'), "{e}");
    all.remove("conditioner.embedders.1.model.transformer.resblocks.0.attn.bogus");
    all.remove("model.diffusion_model.label_emb.0.2.weight");
    let short = dir.path().join("short.safetensors");
    write_st(&short, &all);
    let e = format!("{:#}", import(&short, &dir.path().join("out"), false).err().unwrap());
    assert!(e.contains("short.safetensors") && e.contains("label_emb.0.2.weight"), "{e}");
}

#[test]
fn existing_outputs_are_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, file) = (dir.path().join("sdxl"), dir.path().join("sdxl.safetensors"));
    make_sdxl_folder(&folder);
    std::fs::write(&file, b"mine").unwrap();
    let e = format!("{:#}", export(&folder, &file, false).err().unwrap());
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"mine");
    std::fs::remove_file(&file).unwrap();
    export(&folder, &file, false).unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), b"mine").unwrap();
    assert!(import(&file, &out, false).is_err());
    assert_eq!(std::fs::read(out.join("keep.txt")).unwrap(), b"mine");
    // The input folder is not a valid output.
    assert!(import(&file, &folder, false).is_err());
    assert!(folder.join("unet/diffusion_pytorch_model.safetensors").is_file());
}

#[test]
fn the_cli_converts_and_inspect_says_sdxl() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, file, back) = (dir.path().join("sdxl"), dir.path().join("sdxl.safetensors"), dir.path().join("back"));
    make_sdxl_folder(&folder);
    let run = |args: &[&Path]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dreambridge")).args(args).output().unwrap();
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let p = Path::new;
    let (ok, text) = run(&[p("convert"), p("diffusers-to-single-file"), p("--model"), &folder, p("--out"), &file]);
    assert!(ok && text.contains("SDXL base"), "{text}");
    let (ok, text) = run(&[p("inspect"), &file]);
    assert!(ok && text.contains("SDXL single file") && text.contains("SDXL base") && text.contains("OpenCLIP-G"), "{text}");
    let (ok, text) = run(&[p("convert"), p("single-file-to-diffusers"), p("--checkpoint"), &file, p("--out"), &back]);
    assert!(ok && text.contains("SDXL base"), "{text}");
    assert!(back.join("text_encoder_2/model.safetensors").is_file());
    let (ok, text) = run(&[p("convert"), p("single-file-to-diffusers"), p("--checkpoint"), &file, p("--out"), &back]);
    assert!(!ok && text.contains("already exists"), "{text}");
    let (ok, text) = run(&[p("convert"), p("single-file-to-diffusers"), p("--checkpoint"), &file, p("--out"), &dir.path().join("x"), p("--sd-version"), p("2")]);
    assert!(!ok && text.contains("sdxl.safetensors") && text.lines().count() == 1, "{text}");
}

#[test]
fn keras_conversions_refuse_sdxl_in_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, file) = (dir.path().join("sdxl"), dir.path().join("sdxl.safetensors"));
    make_sdxl_folder(&folder);
    export(&folder, &file, false).unwrap();
    let refiner = dir.path().join("refiner.safetensors");
    keys_file(&refiner, &["model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight"]);
    let out = dir.path().join("out");
    let (o, os) = (out.as_os_str(), out.with_extension("safetensors"));
    let cases: Vec<(Vec<&std::ffi::OsStr>, &Path)> = vec![
        (vec!["single-file-to-keras".as_ref(), "--checkpoint".as_ref(), file.as_ref(), "--out".as_ref(), o], &file),
        (vec!["single-file-to-keras".as_ref(), "--checkpoint".as_ref(), refiner.as_ref(), "--out".as_ref(), o], &refiner),
        (vec!["diffusers-to-keras".as_ref(), "--model".as_ref(), folder.as_ref(), "--out".as_ref(), o], &folder),
        (vec!["keras-to-single-file".as_ref(), "--base".as_ref(), folder.as_ref(), "--out".as_ref(), os.as_ref()], &folder),
        (vec!["keras-to-single-file".as_ref(), "--base".as_ref(), file.as_ref(), "--out".as_ref(), os.as_ref()], &file),
        (vec!["keras-to-diffusers".as_ref(), "--base".as_ref(), folder.as_ref(), "--out".as_ref(), o], &folder),
    ];
    for (args, named) in cases {
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_dreambridge")).arg("convert").args(&args).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
        let what = if named.is_dir() { "an SDXL diffusers folder" } else { "an SDXL single file" };
        assert!(!run.status.success(), "{args:?}: {text}");
        assert!(text.trim().lines().count() == 1 && text.contains(&*named.display().to_string()) && text.contains(what), "{args:?}: {text}");
        assert!(text.contains("SDXL has no KerasCV or KerasHub layout (KerasCV has Stable Diffusion 1.x/2.x, KerasHub has SD3)"), "{args:?}: {text}");
        assert!(!out.exists() && !os.exists(), "{args:?}: wrote an output");
    }
}

#[test]
fn a_base_folder_gives_its_configs_where_they_agree_with_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, file) = (dir.path().join("sdxl"), dir.path().join("sdxl.safetensors"));
    make_sdxl_folder(&folder);
    export(&folder, &file, false).unwrap();
    let base_import = |base: &Path, out: &Path| sdxl::single_file_to_diffusers(&file, &SdxlToFolderOptions { base: Some(base.to_owned()), out: out.to_owned(), half: false, force: false });
    let back = dir.path().join("back");
    let done = base_import(&folder, &back).unwrap();
    assert_eq!(done.from_base, ["scheduler"]);
    // The base's heads (SDXL's 5/10/20) over the derived width / 64.
    assert_eq!(read_json(&back.join("unet/config.json"))["attention_head_dim"], json!([5, 10, 20]));
    // A base whose config disagrees with the weights is refused, naming its config and the field.
    write_json(&folder.join("text_encoder_2/config.json"), json!({"hidden_size": 1280}));
    let e = format!("{:#}", base_import(&folder, &dir.path().join("other")).err().unwrap());
    assert!(e.contains("text_encoder_2/config.json") && e.contains("hidden_size"), "{e}");
    assert!(!dir.path().join("other").exists());
}
