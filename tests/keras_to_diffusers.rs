//! keras -> diffusers on the tiny KerasCV-layout fixtures (fixtures/make_fixtures.py): detection,
//! layouts, the variants Keras writes, and the folder that comes out.

mod common;
use common::*;
use dreambridge::convert::plan::{detect, Plan};
use dreambridge::convert::to_diffusers::{keras_to_diffusers, open_keras, KerasInputs, ToDiffusersOptions};
use dreambridge::diffusers::st_read::StFile;
use dreambridge::keras::KerasFile;
use dreambridge::tensor::DType;

fn sd1_inputs() -> KerasInputs {
    KerasInputs {
        unet: Some(fixture("unet_sd1.h5")),
        text_encoder: Some(fixture("text_encoder_sd1.h5")),
        vae_encoder: Some(fixture("image_encoder.h5")),
        vae_decoder: Some(fixture("decoder.h5")),
    }
}

fn convert(inputs: &KerasInputs, out: &std::path::Path) {
    keras_to_diffusers(inputs, &ToDiffusersOptions { out: out.to_owned(), ..Default::default() }).unwrap();
}

fn convert_sd2(inputs: &KerasInputs, out: &std::path::Path) {
    keras_to_diffusers(inputs, &ToDiffusersOptions { out: out.to_owned(), sd_version: Some(2), ..Default::default() }).unwrap();
}

#[test]
fn every_fixture_is_detected_with_its_widths() {
    let cases = [
        ("unet_sd1.h5", "unet-sd1", vec![("c0", 8), ("c1", 16), ("c2", 24), ("c3", 24), ("ctx", 8), ("lat", 4)]),
        ("unet_sd2.h5", "unet-sd2", vec![("c0", 8), ("c3", 24), ("ctx", 12)]),
        ("text_encoder_sd1.h5", "text-encoder-sd1", vec![("vocab", 49408), ("d", 8), ("n", 2), ("ff", 32), ("positions", 77)]),
        ("image_encoder.h5", "vae-encoder", vec![("c0", 8), ("c1", 16), ("c2", 24), ("z", 4), ("img", 3)]),
        ("decoder.h5", "vae-decoder", vec![("c0", 8), ("c1", 16), ("c3", 24), ("z", 4), ("img", 3)]),
    ];
    for (name, kind, symbols) in cases {
        let file = KerasFile::open(&fixture(name)).unwrap();
        let plan = detect(|t| Plan::for_keras(&file, t), None, None).unwrap();
        assert_eq!(plan.table.kind, kind, "{name}");
        for (s, v) in symbols {
            assert_eq!(plan.symbols[s], v, "{name}: {s}");
        }
    }
    // SD2 text towers are told apart by --sd-version (or by the UNet beside them).
    let t2 = open_keras(&fixture("text_encoder_sd2.h5"), "text-encoder", Some(2)).unwrap();
    assert_eq!((t2.plan.table.kind.as_str(), t2.plan.symbols["n"], t2.plan.symbols["d"]), ("text-encoder-sd2", 3, 12));
}

#[test]
fn tensors_land_at_their_keys_in_torch_layout() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pipe");
    convert(&sd1_inputs(), &out);
    let unet = KerasFile::open(&fixture("unet_sd1.h5")).unwrap();
    let st = StFile::open(&out.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    // Layer #8 is down_blocks.1.resnets.0: its 11th weight is the build()-time 1x1 shortcut,
    // Keras (1, 1, c0=8, c1=16) -> torch (16, 8, 1, 1).
    let keras = unet.read(&unet.layers[8].weights[10]).unwrap();
    assert_eq!(keras.shape, vec![1, 1, 8, 16]);
    let torch = st.read("down_blocks.1.resnets.0.conv_shortcut.weight").unwrap();
    assert_eq!(torch.shape, vec![16, 8, 1, 1]);
    for (o, i) in [(0, 0), (5, 7), (15, 3)] {
        assert_eq!(f32_at(&torch, o * 8 + i), f32_at(&keras, i * 16 + o));
    }
    // A 3x3 conv: conv_in, Keras (3, 3, 4, 8) -> torch (8, 4, 3, 3).
    let keras = unet.read(&unet.layers[1].weights[0]).unwrap();
    let torch = st.read("conv_in.weight").unwrap();
    let (o, i, y, x) = (5, 3, 2, 1);
    assert_eq!(f32_at(&torch, ((o * 4 + i) * 3 + y) * 3 + x), f32_at(&keras, ((y * 3 + x) * 4 + i) * 8 + o));
    // GEGLU projection: Keras (c, 8c) -> torch (8c, c), value half first on both sides.
    let keras = unet.read(&unet.layers[4].weights[20]).unwrap();
    assert_eq!(keras.shape, vec![8, 64]);
    let geglu = st.read("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight").unwrap();
    assert_eq!(geglu.shape, vec![64, 8]);
    assert_eq!(f32_at(&geglu, 40 * 8 + 3), f32_at(&keras, 3 * 64 + 40));
    // The VAE attention 1x1 convs become Linear weights.
    let vae = StFile::open(&out.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    assert_eq!(vae.info("encoder.mid_block.attentions.0.to_q.weight").unwrap().shape, vec![24, 24]);
    assert_eq!(vae.keys().len(), 108 + 140);
    let text = StFile::open(&out.join("text_encoder/model.safetensors")).unwrap();
    assert!(text.keys().iter().all(|k| k.starts_with("text_model.")));
    assert_eq!(text.keys().len(), 2 + 2 * 16 + 2);
}

#[test]
fn writes_a_complete_pipeline_folder_with_matching_configs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pipe");
    convert(&sd1_inputs(), &out);
    for f in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
        "unet/config.json",
        "text_encoder/config.json",
        "vae/config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let read = |f: &str| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(out.join(f)).unwrap()).unwrap() };
    let unet = read("unet/config.json");
    assert_eq!(unet["block_out_channels"], serde_json::json!([8, 16, 24, 24]));
    assert_eq!(unet["cross_attention_dim"], 8);
    assert_eq!(unet["attention_head_dim"], 8);
    assert_eq!(unet["use_linear_projection"], false);
    assert_eq!(unet["norm_num_groups"], 8, "the fixtures were built with 8 groups; real KerasCV models get 32");
    let text = read("text_encoder/config.json");
    assert_eq!((text["hidden_size"].as_u64(), text["num_hidden_layers"].as_u64(), text["vocab_size"].as_u64()), (Some(8), Some(2), Some(49408)));
    assert_eq!(text["hidden_act"], "quick_gelu");
    let vae = read("vae/config.json");
    assert_eq!(vae["block_out_channels"], serde_json::json!([8, 16, 24, 24]));
    assert_eq!(vae["latent_channels"], 4);
    assert_eq!(read("model_index.json")["unet"], serde_json::json!(["diffusers", "UNet2DConditionModel"]));
}

#[test]
fn sd2_unet_gets_linear_projections_and_per_block_heads() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pipe");
    let inputs = KerasInputs { unet: Some(fixture("unet_sd2.h5")), text_encoder: Some(fixture("text_encoder_sd2.h5")), ..Default::default() };
    convert(&inputs, &out);
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("unet/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["use_linear_projection"], true);
    assert_eq!(cfg["attention_head_dim"], serde_json::json!([1, 2, 3, 3]));
    let text: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("text_encoder/config.json")).unwrap()).unwrap();
    assert_eq!(text["hidden_act"], "gelu", "the text encoder must follow the UNet's SD version");
    let st = StFile::open(&out.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    assert_eq!(st.info("mid_block.attentions.0.proj_in.weight").unwrap().shape, vec![24, 24]);
    assert!(!out.join("model_index.json").exists(), "no VAE given and no base: not a pipeline");
}

#[test]
fn session_dependent_names_chunked_attributes_and_f16_do_not_change_the_result() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    convert(&KerasInputs { unet: Some(fixture("unet_sd1.h5")), vae_encoder: Some(fixture("image_encoder.h5")), vae_decoder: Some(fixture("decoder.h5")), ..Default::default() }, &a);
    convert(
        &KerasInputs {
            unet: Some(fixture("unet_sd1_shifted.h5")),
            vae_encoder: Some(fixture("image_encoder_chunked.h5")),
            vae_decoder: Some(fixture("decoder.h5")),
            ..Default::default()
        },
        &b,
    );
    for f in ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"] {
        assert_eq!(st_tensors(&a.join(f)), st_tensors(&b.join(f)), "{f}");
    }
    // float16 datasets stay float16, with the same values as the float32 file rounded.
    let c = dir.path().join("c");
    let d = dir.path().join("d");
    convert_sd2(&KerasInputs { text_encoder: Some(fixture("text_encoder_sd2_f16.h5")), ..Default::default() }, &c);
    convert_sd2(&KerasInputs { text_encoder: Some(fixture("text_encoder_sd2.h5")), ..Default::default() }, &d);
    let half = st_tensors(&c.join("text_encoder/model.safetensors"));
    let full = st_tensors(&d.join("text_encoder/model.safetensors"));
    assert!(half.iter().all(|(_, t)| t.dtype == DType::F16));
    for ((k1, h), (k2, f)) in half.iter().zip(&full) {
        assert_eq!(k1, k2);
        assert_eq!(h, &f.clone().cast(DType::F16), "{k1}");
    }
}

#[test]
fn keras3_weights_files_convert_like_the_legacy_ones() {
    let dir = tempfile::tempdir().unwrap();
    let legacy = dir.path().join("legacy");
    let k3 = dir.path().join("k3");
    let legacy_inputs = KerasInputs {
        unet: Some(fixture("unet_sd1.h5")),
        vae_encoder: Some(fixture("image_encoder.h5")),
        vae_decoder: Some(fixture("decoder.h5")),
        ..Default::default()
    };
    convert(&legacy_inputs, &legacy);
    let k3_inputs = KerasInputs {
        unet: Some(fixture("unet_sd1.weights.h5")),
        vae_encoder: Some(fixture("image_encoder.weights.h5")),
        vae_decoder: Some(fixture("decoder.weights.h5")),
        ..Default::default()
    };
    convert(&k3_inputs, &k3);
    for f in ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"] {
        assert_eq!(st_tensors(&legacy.join(f)), st_tensors(&k3.join(f)), "{f}");
    }
    let text_legacy = dir.path().join("text_legacy");
    let text_k3 = dir.path().join("text_k3");
    convert_sd2(&KerasInputs { text_encoder: Some(fixture("text_encoder_sd2.h5")), ..Default::default() }, &text_legacy);
    convert_sd2(&KerasInputs { text_encoder: Some(fixture("text_encoder_sd2.weights.h5")), ..Default::default() }, &text_k3);
    let f = "text_encoder/model.safetensors";
    assert_eq!(st_tensors(&text_legacy.join(f)), st_tensors(&text_k3.join(f)));
}

#[test]
fn half_writes_fp16_variant_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pipe");
    keras_to_diffusers(&sd1_inputs(), &ToDiffusersOptions { out: out.clone(), half: true, ..Default::default() }).unwrap();
    for f in ["unet/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"] {
        let tensors = st_tensors(&out.join(f));
        assert!(!tensors.is_empty() && tensors.iter().all(|(_, t)| t.dtype == DType::F16), "{f}");
    }
    assert!(!out.join("unet/diffusion_pytorch_model.safetensors").exists());
}

#[test]
fn base_folder_supplies_the_missing_parts() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    convert(&sd1_inputs(), &base);
    // Only the UNet (a DreamBooth result) plus the base: a full pipeline with the base's other parts.
    let out = dir.path().join("out");
    keras_to_diffusers(
        &KerasInputs { unet: Some(fixture("unet_sd1_shifted.h5")), ..Default::default() },
        &ToDiffusersOptions { out: out.clone(), base: Some(base.clone()), ..Default::default() },
    )
    .unwrap();
    for f in ["model_index.json", "tokenizer/vocab.json", "text_encoder/model.safetensors", "vae/config.json"] {
        assert_eq!(std::fs::read(base.join(f)).unwrap(), std::fs::read(out.join(f)).unwrap(), "{f}");
    }
    // Half a VAE is completed from the base VAE.
    let out2 = dir.path().join("out2");
    keras_to_diffusers(
        &KerasInputs { vae_decoder: Some(fixture("decoder.h5")), ..Default::default() },
        &ToDiffusersOptions { out: out2.clone(), base: Some(base.clone()), ..Default::default() },
    )
    .unwrap();
    assert_eq!(st_tensors(&base.join("vae/diffusion_pytorch_model.safetensors")), st_tensors(&out2.join("vae/diffusion_pytorch_model.safetensors")));
    // Without a base, half a VAE is refused and nothing is written.
    let out3 = dir.path().join("out3");
    let err = keras_to_diffusers(&KerasInputs { vae_decoder: Some(fixture("decoder.h5")), ..Default::default() }, &ToDiffusersOptions { out: out3.clone(), ..Default::default() })
        .unwrap_err();
    assert!(format!("{err:#}").contains("--base"), "{err:#}");
    assert!(!out3.exists());
}
