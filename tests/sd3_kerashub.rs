//! KerasHub Stable Diffusion 3 <-> diffusers: tiny SD3 folders of each variant, built here from
//! the mapping tables with random (non-symmetric) values, converted to a KerasHub preset and to
//! an MMDiT-only file and back, bit for bit; the layout changes checked on the Keras side; bad
//! inputs refused by name.

mod common;

use common::tiny::*;
use dreambridge::convert::kerashub::{self, Form};
use dreambridge::convert::sd3_to_diffusers::sd3_to_diffusers;
use dreambridge::convert::sd3_to_keras::sd3_to_keras;
use dreambridge::convert::to_diffusers::ToDiffusersOptions;
use dreambridge::diffusers::sd3::Variant;
use dreambridge::diffusers::st_read::StFile;
use dreambridge::keras::KerasFile;
use dreambridge::mapping::table_for;
use dreambridge::tensor::{DType, RawTensor};
use serde_json::json;
use std::collections::BTreeMap;

#[test]
fn every_variant_round_trips_through_a_kerashub_preset_bit_for_bit() {
    for variant in [Variant::Sd3Medium, Variant::Sd35Medium, Variant::Sd35Large] {
        let dir = tempfile::tempdir().unwrap();
        let (folder, preset, back) = (dir.path().join("sd3"), dir.path().join("preset"), dir.path().join("back"));
        make_sd3_folder(&folder, variant, false);
        sd3_to_keras(&folder, &preset, false).unwrap();
        let keras = kerashub::open(&preset).unwrap();
        assert_eq!((keras.form, keras.variant, keras.heads), (Form::Preset, variant, 2), "{variant:?}");
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(preset.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["config"]["mmdit_num_heads"], 2);
        assert_eq!(config["config"]["mmdit_position_size"], 4);
        assert_eq!(config["config"]["mmdit_dual_attention_indices"], if variant == Variant::Sd35Medium { json!([0]) } else { json!(null) });
        let opts = ToDiffusersOptions { out: back.clone(), ..Default::default() };
        let done = sd3_to_diffusers(&keras, &opts).unwrap();
        assert!(done.complete_pipeline);
        for part in PARTS {
            same_part(&folder, &back, part);
        }
        let t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(back.join("transformer/config.json")).unwrap()).unwrap();
        assert_eq!((t["num_layers"].clone(), t["num_attention_heads"].clone(), t["pos_embed_max_size"].clone()), (json!(3), json!(2), json!(4)));
        assert_eq!(t["qk_norm"], if variant == Variant::Sd3Medium { json!(null) } else { json!("rms_norm") });
    }
}

#[test]
fn keras_holds_fused_qkv_and_stabilitys_shift_scale_order() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, preset) = (dir.path().join("sd3"), dir.path().join("preset"));
    make_sd3_folder(&folder, Variant::Sd3Medium, false);
    sd3_to_keras(&folder, &preset, false).unwrap();
    let keras = KerasFile::open(&preset.join("model.weights.h5")).unwrap();
    let st = StFile::open(&folder.join(PARTS[0])).unwrap();
    let f32s = |t: RawTensor| t.to_f32_values();
    // q, k, v rows one after the other in Keras' fused bias.
    let qkv = f32s(keras.read("layers/mm_di_t/layers/mm_di_t_block_1/context_block/attention_qkv/vars/1").unwrap());
    let parts: Vec<f32> = ["add_q_proj", "add_k_proj", "add_v_proj"].iter().flat_map(|p| f32s(st.read(&format!("transformer_blocks.1.attn.{p}.bias")).unwrap())).collect();
    assert_eq!(qkv, parts);
    // diffusers' (scale, shift) is Keras' (shift, scale): halves swapped, in the output norm and
    // the last block's context norm, and nowhere else.
    for (keras_path, key) in [
        ("layers/mm_di_t/layers/adaptive_layer_normalization/dense/vars/1", "norm_out.linear.bias"),
        ("layers/mm_di_t/layers/mm_di_t_block_2/context_block/ada_layer_norm/dense/vars/1", "transformer_blocks.2.norm1_context.linear.bias"),
    ] {
        let (k, d) = (f32s(keras.read(keras_path).unwrap()), f32s(st.read(key).unwrap()));
        let h = d.len() / 2;
        assert_ne!(k, d, "{key}");
        assert_eq!(k[..h], d[h..], "{key}");
        assert_eq!(k[h..], d[..h], "{key}");
    }
    let kept = f32s(keras.read("layers/mm_di_t/layers/mm_di_t_block_1/context_block/ada_layer_norm/dense/vars/1").unwrap());
    assert_eq!(kept, f32s(st.read("transformer_blocks.1.norm1_context.linear.bias").unwrap()));
    // A Dense kernel is the transposed Linear weight; a per-head attention kernel is (D, heads, head_dim).
    let proj = keras.read("layers/mm_di_t/layers/dense_1/vars/0").unwrap();
    let w = st.read("proj_out.weight").unwrap();
    assert_eq!((proj.shape.clone(), w.shape.clone()), (vec![64, 64], vec![64, 64]));
    let (pk, pw) = (f32s(proj), f32s(w));
    assert!((0..64).all(|i| (0..64).all(|j| pk[i * 64 + j] == pw[j * 64 + i])));
    assert_eq!(keras.info("layers/clip_text_encoder_1/layers/clip_encoder_layer/attention/query_dense/vars/0").unwrap().shape, vec![24, 3, 8]);
    assert_eq!(keras.info("layers/clip_text_encoder_1/layers/clip_encoder_layer/attention/output_dense/vars/0").unwrap().shape, vec![3, 8, 24]);
}

#[test]
fn an_mmdit_alone_takes_the_rest_from_base() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, mmdit, out, lone) = (dir.path().join("sd3"), dir.path().join("dreambooth-unet.weights.h5"), dir.path().join("out"), dir.path().join("lone"));
    make_sd3_folder(&folder, Variant::Sd35Medium, false);
    sd3_to_keras(&folder, &mmdit, false).unwrap();
    let keras = kerashub::open(&mmdit).unwrap();
    assert_eq!((keras.form, keras.variant), (Form::Mmdit, Variant::Sd35Medium));
    assert!(keras.clip_l.is_none() && keras.vae.is_none());
    let done = sd3_to_diffusers(&keras, &ToDiffusersOptions { out: out.clone(), base: Some(folder.clone()), ..Default::default() }).unwrap();
    assert!(done.complete_pipeline);
    for part in PARTS {
        same_part(&folder, &out, part);
    }
    assert!(out.join("model_index.json").is_file() && out.join("scheduler/scheduler_config.json").is_file());
    let done = sd3_to_diffusers(&keras, &ToDiffusersOptions { out: lone.clone(), ..Default::default() }).unwrap();
    assert!(!done.complete_pipeline && lone.join("transformer/config.json").is_file() && !lone.join("model_index.json").exists());
    // A base of another model is refused by name, and nothing is written.
    let sd1 = dir.path().join("sd1");
    write_json(&sd1.join("model_index.json"), json!({"_class_name": "StableDiffusionPipeline"}));
    let err = sd3_to_diffusers(&keras, &ToDiffusersOptions { out: dir.path().join("x"), base: Some(sd1), ..Default::default() }).unwrap_err();
    assert!(format!("{err:#}").contains("StableDiffusionPipeline` folder, not a Stable Diffusion 3 one"), "{err:#}");
    assert!(!dir.path().join("x").exists());
}

#[test]
fn bad_inputs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, preset) = (dir.path().join("sd3"), dir.path().join("preset"));
    make_sd3_folder(&folder, Variant::Sd3Medium, false);
    sd3_to_keras(&folder, &preset, false).unwrap();
    // A preset of another model.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(preset.join("model.weights.h5"), other.join("model.weights.h5")).unwrap();
    write_json(&other.join("config.json"), json!({"class_name": "GemmaBackbone", "config": {}}));
    let err = format!("{:#}", kerashub::open(&other).err().unwrap());
    assert!(err.contains("config.json: a preset of `GemmaBackbone`"), "{err}");
    // A tensor missing from the MMDiT: the file and the tensor are named.
    let h5 = preset.join("model.weights.h5");
    {
        let f = hdf5::File::open_rw(&h5).unwrap();
        f.unlink("layers/mm_di_t/layers/mm_di_t_block_1/x_block/attention_proj/vars/1").unwrap();
    }
    let err = format!("{:#}", kerashub::open(&preset).err().unwrap());
    assert!(err.contains("model.weights.h5") && err.contains("mm_di_t_block_1/x_block/attention_proj/vars/1") && err.contains("not found"), "{err}");
    // A tensor no table knows (a T5 encoder) is refused, not dropped.
    let (folder2, preset2) = (dir.path().join("sd3b"), dir.path().join("preset2"));
    make_sd3_folder(&folder2, Variant::Sd3Medium, false);
    sd3_to_keras(&folder2, &preset2, false).unwrap();
    {
        let w = hdf5::File::open_rw(preset2.join("model.weights.h5")).unwrap();
        let g = w.create_group("layers/t5_encoder").unwrap().create_group("vars").unwrap();
        g.new_dataset_builder().with_data(&ndarray::arr1(&[1.0f32, 2.0])).create("0").unwrap();
    }
    let err = format!("{:#}", kerashub::open(&preset2).err().unwrap());
    assert!(err.contains("layers/t5_encoder/vars/0") && err.contains("T5"), "{err}");
    // The output of a failed conversion is not left behind, and an existing one is kept.
    assert!(sd3_to_keras(&folder, &preset, false).unwrap_err().to_string().contains("already exists"));
    // A base whose pipeline asks for a T5 it does not have.
    let mmdit = dir.path().join("mmdit.weights.h5");
    sd3_to_keras(&folder2, &mmdit, false).unwrap();
    write_json(&folder2.join("model_index.json"), dreambridge::diffusers::sd3::model_index(true));
    let out = dir.path().join("no_t5");
    let opts = ToDiffusersOptions { out: out.clone(), base: Some(folder2.clone()), ..Default::default() };
    let err = format!("{:#}", sd3_to_diffusers(&kerashub::open(&mmdit).unwrap(), &opts).unwrap_err());
    assert!(err.contains("model_index.json names `text_encoder_3`") && err.contains("no T5 weights") && !out.exists(), "{err}");
}

/// The KerasHub MMDiT tables give the tensor counts of the real presets' `.weights.h5` files
/// (keras-hub 0.32: 491 for SD3 medium, 665 for SD3.5 medium, 923 for SD3.5 large).
#[test]
fn mmdit_table_counts_match_the_real_presets() {
    let table = table_for("mmdit-sd3").unwrap();
    for (blocks, qk, dual_blocks, expected) in [(24, false, 0, 491), (24, true, 13, 665), (38, true, 0, 923)] {
        let layout = table.expand(blocks - 1).unwrap();
        let mut paths = std::collections::BTreeSet::new();
        for layer in &layout.layers {
            let block = layer.repeat.unwrap_or(usize::MAX);
            for spec in &layout.tensors[layer.tensors.clone()] {
                let on = |f: &str| match f {
                    "qk_norm" => qk,
                    "dual" => block < dual_blocks,
                    "dual_qk_norm" => qk && block < dual_blocks,
                    _ => false,
                };
                if spec.when.as_ref().is_none_or(|w| on(&w.feature) == w.present) {
                    paths.insert((layer.keras3_key.clone(), spec.keras_path.clone()));
                }
            }
        }
        assert_eq!(paths.len(), expected, "{blocks} blocks, qk {qk}, {dual_blocks} dual");
    }
}

/// ΔW = B·A per module (the scale is folded into A), as f64 sums.
fn lora_deltas(adapters: &[dreambridge::lora::kerashub::Adapter]) -> BTreeMap<String, (usize, usize, Vec<f32>)> {
    adapters
        .iter()
        .map(|ad| {
            let mut w = vec![0f32; ad.d_out * ad.d_in];
            for o in 0..ad.d_out {
                for i in 0..ad.d_in {
                    w[o * ad.d_in + i] = (0..ad.rank).map(|k| ad.b[o * ad.rank + k] as f64 * ad.a[k * ad.d_in + i] as f64).sum::<f64>() as f32;
                }
            }
            (ad.key.clone(), (ad.d_out, ad.d_in, w))
        })
        .collect()
}

/// A diffusers SD3 LoRA (PEFT names) over fused q/k/v (two of three, different ranks), a second
/// attention, both swapped-halves norms, per-head CLIP kernels (rank heads·r below and above
/// head_dim), a CLIP output kernel and a projection goes to a KerasHub `.lora.h5` and back with
/// the same update ΔW = scale·B·A on every diffusers weight; the layers that share an adapted
/// layer's name (so `enable_lora` picks them) carry zeros.
#[test]
fn sd3_lora_goes_to_kerashub_and_back_with_the_same_updates() {
    use dreambridge::lora::kerashub::{convert_to_diffusers, convert_to_keras, read_peft_sd3};
    let dir = tempfile::tempdir().unwrap();
    let pipe = dir.path().join("pipe");
    make_sd3_folder(&pipe, Variant::Sd35Medium, false);
    let weight_shape = |module: &str| {
        let (part, rest) = module.split_once('.').unwrap();
        let file = if part == "transformer" { "transformer/diffusion_pytorch_model.safetensors".to_string() } else { format!("{part}/model.safetensors") };
        StFile::open(&pipe.join(file)).unwrap().read(&format!("{rest}.weight")).unwrap().shape
    };
    let modules = [
        ("transformer.transformer_blocks.0.attn.to_q", 2, Some(4.0f32)),
        ("transformer.transformer_blocks.0.attn.to_v", 3, None),
        ("transformer.transformer_blocks.0.attn2.to_k", 2, None),
        ("transformer.transformer_blocks.2.norm1_context.linear", 2, None),
        ("transformer.norm_out.linear", 2, None),
        ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 1, None),
        ("text_encoder.text_projection", 2, None),
        ("text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj", 4, None),
        ("text_encoder_2.text_model.encoder.layers.2.self_attn.out_proj", 2, None),
    ];
    let mut t = BTreeMap::new();
    for (i, (m, r, alpha)) in modules.iter().enumerate() {
        let shape = weight_shape(m);
        let f = |shape: Vec<usize>, seed| RawTensor { dtype: DType::F32, data: values(shape.iter().product(), seed), shape };
        t.insert(format!("{m}.lora_A.weight"), f(vec![*r, shape[1]], 100 + i as u64));
        t.insert(format!("{m}.lora_B.weight"), f(vec![shape[0], *r], 200 + i as u64));
        if let Some(a) = alpha {
            t.insert(format!("{m}.alpha"), RawTensor { dtype: DType::F32, shape: vec![], data: a.to_le_bytes().to_vec() });
        }
    }
    let peft = dir.path().join("peft.safetensors");
    write_st(&peft, &t);
    let original = read_peft_sd3(&peft).unwrap();
    // Scales as diffusers loads them: the `.alpha` (4 / 2), else the model's most common rank
    // (transformer: 2, so to_v is 2/3; text_encoder_2: ranks 4 and 2 once each, the lower wins).
    let scale_of = |key: &str| {
        let ad = original.iter().find(|a| a.key == key).unwrap();
        let raw = t[&format!("{key}.lora_A.weight")].to_f32_values();
        ad.a[0] / raw[0]
    };
    assert!((scale_of("transformer.transformer_blocks.0.attn.to_q") - 2.0).abs() < 1e-6);
    assert!((scale_of("transformer.transformer_blocks.0.attn.to_v") - 2.0 / 3.0).abs() < 1e-6);
    assert!((scale_of("text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj") - 0.5).abs() < 1e-6);

    let back = dir.path().join("back.lora.h5");
    let done = convert_to_keras(&peft, &back, &pipe, false).unwrap();
    // fused q/k/v: 2 + 3; v_proj of CLIP-G: 3 heads · 4 > head_dim 8, so 8 with b the identity.
    assert_eq!(done.rank, 8);
    assert_eq!(done.target_layer_names, ["attention_output", "attention_qkv", "attention_qkv2", "dense", "query", "value"]);
    assert!(done.enable_lora_call().starts_with("backbone.enable_lora(8, target_layer_names=[\"attention_output\", "));
    let again = dir.path().join("again.safetensors");
    convert_to_diffusers(&back, &again, &pipe, false).unwrap();
    let (before, after) = (lora_deltas(&original), lora_deltas(&read_peft_sd3(&again).unwrap()));
    for (key, (o, i, w)) in &after {
        match before.get(key) {
            Some((o2, i2, w2)) => {
                assert_eq!((o, i), (o2, i2), "{key}");
                let max = w2.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = w.iter().zip(w2).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(diff <= 1e-5 * max, "{key}: |ΔW - ΔW'| {diff} of {max}");
            }
            None => assert!(w.iter().all(|v| *v == 0.0), "{key}: not adapted before, not zero after"),
        }
    }
    for key in before.keys() {
        assert!(after.contains_key(key), "{key}: lost");
    }
    // Every layer of an adapted name is in the file: e.g. every adaptive norm's `dense`.
    assert!(after.contains_key("transformer.transformer_blocks.1.norm1.linear") && after.contains_key("text_encoder_2.text_projection"));

    // Refused, by file and tensor or module, writing nothing.
    let e = convert_to_keras(&peft, &back, &pipe, false).unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");
    let e = convert_to_keras(&peft, &dir.path().join("x.h5"), &pipe, false).unwrap_err().to_string();
    assert!(e.contains("*.lora.h5"), "{e}");
    let mut conv = BTreeMap::new();
    conv.insert("transformer.pos_embed.proj.lora_A.weight".to_string(), RawTensor { dtype: DType::F32, shape: vec![2, 16 * 4], data: values(128, 1) });
    conv.insert("transformer.pos_embed.proj.lora_B.weight".to_string(), RawTensor { dtype: DType::F32, shape: vec![64, 2], data: values(128, 2) });
    let bad = dir.path().join("conv.safetensors");
    write_st(&bad, &conv);
    let out = dir.path().join("conv.lora.h5");
    let e = format!("{:#}", convert_to_keras(&bad, &out, &pipe, false).unwrap_err());
    assert!(e.contains("conv.safetensors") && e.contains("transformer.pos_embed.proj") && !out.exists(), "{e}");
    let mut other = BTreeMap::new();
    other.insert("unet.down_blocks.0.attn.to_q.lora_A.weight".to_string(), RawTensor { dtype: DType::F32, shape: vec![1, 4], data: values(4, 3) });
    write_st(&bad, &other);
    let e = format!("{:#}", convert_to_keras(&bad, &out, &pipe, false).unwrap_err());
    assert!(e.contains("conv.safetensors") && e.contains("`unet.down_blocks.0.attn.to_q.lora_A.weight`") && !e.contains('\n'), "{e}");
}

/// A bf16 SD3 folder (as SD3.5 ships) becomes a bf16 KerasHub preset stored as Keras 3 stores
/// bfloat16 (2-byte opaque data tagged `dtype` = "bfloat16"), half the size of f32, and comes back
/// bit for bit; `--half` on the way back gives diffusers' fp16 variant files.
#[test]
fn bf16_stays_bf16_through_a_kerashub_preset() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, preset, back, half) = (dir.path().join("sd3"), dir.path().join("preset"), dir.path().join("back"), dir.path().join("half"));
    make_sd3_folder(&folder, Variant::Sd35Medium, false);
    for part in PARTS {
        let file = StFile::open(&folder.join(part)).unwrap();
        let tensors: BTreeMap<String, RawTensor> = file.keys().into_iter().map(|k| (k.clone(), file.read(&k).unwrap().cast(DType::BF16))).collect();
        drop(file);
        write_st(&folder.join(part), &tensors);
    }
    sd3_to_keras(&folder, &preset, false).unwrap();
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(preset.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["config"]["dtype"]["config"]["name"], "bfloat16");
    let weights = KerasFile::open(&preset.join("model.weights.h5")).unwrap();
    let datasets = weights.keras3_datasets().unwrap();
    assert!(datasets.len() > 100 && datasets.iter().all(|(_, info)| info.dtype == DType::BF16), "every variable bf16");
    let keras = kerashub::open(&preset).unwrap();
    sd3_to_diffusers(&keras, &ToDiffusersOptions { out: back.clone(), ..Default::default() }).unwrap();
    for part in PARTS {
        same_part(&folder, &back, part);
    }
    sd3_to_diffusers(&keras, &ToDiffusersOptions { out: half.clone(), half: true, ..Default::default() }).unwrap();
    let t = StFile::open(&half.join("transformer/diffusion_pytorch_model.fp16.safetensors")).unwrap();
    assert!(t.keys().iter().all(|k| t.read(k).unwrap().dtype == DType::F16));
}

/// Above the shard size, a preset's weights and an MMDiT alone are written in Keras' sharded form
/// (the map and numbered shards, a `vars` group split over two listed in order) and read back
/// from it bit for bit.
#[test]
fn large_weights_are_written_and_read_as_keras_shards() {
    use dreambridge::convert::sd3_to_keras::sd3_to_keras_sharded;
    let dir = tempfile::tempdir().unwrap();
    let (folder, preset, back) = (dir.path().join("sd3"), dir.path().join("preset"), dir.path().join("back"));
    make_sd3_folder(&folder, Variant::Sd35Medium, false);
    let shard_gb = 64.0 * 1024.0 / (1u64 << 30) as f64; // 64 KiB
    sd3_to_keras_sharded(&folder, &preset, false, shard_gb).unwrap();
    assert!(!preset.join("model.weights.h5").exists());
    let map: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(preset.join("model.weights.json")).unwrap()).unwrap();
    let shards: std::collections::BTreeSet<String> = map["weight_map"].as_object().unwrap().values().flat_map(|v| match v {
        serde_json::Value::Array(list) => list.iter().map(|s| s.as_str().unwrap().to_string()).collect(),
        s => vec![s.as_str().unwrap().to_string()],
    }).collect();
    assert!(shards.len() > 3 && shards.contains("model_00000.weights.h5"), "{shards:?}");
    for s in &shards {
        // Data within the shard size, or one variable larger than it alone.
        let datasets = KerasFile::open(&preset.join(s)).unwrap().keras3_datasets().unwrap();
        let bytes: usize = datasets.iter().map(|(_, i)| i.shape.iter().product::<usize>() * i.dtype.size()).sum();
        assert!(bytes <= 64 * 1024 || datasets.len() == 1, "{s}: {bytes} bytes in {} variables", datasets.len());
    }
    assert!(map["weight_map"].as_object().unwrap().values().any(|v| v.is_array()), "some group split over two shards");
    let keras = kerashub::open(&preset).unwrap();
    sd3_to_diffusers(&keras, &ToDiffusersOptions { out: back.clone(), ..Default::default() }).unwrap();
    for part in PARTS {
        same_part(&folder, &back, part);
    }
    // The MMDiT alone: `x.weights.h5` asked for, `x.weights.json` + `x_NNNNN.weights.h5` written.
    let mmdit = dir.path().join("mmdit.weights.h5");
    let done = sd3_to_keras_sharded(&folder, &mmdit, false, shard_gb).unwrap();
    assert_eq!(done.out, dir.path().join("mmdit.weights.json"));
    assert!(!mmdit.exists() && dir.path().join("mmdit_00001.weights.h5").exists());
    let again = dir.path().join("again");
    let keras = kerashub::open(&done.out).unwrap();
    assert_eq!(keras.form, Form::Mmdit);
    sd3_to_diffusers(&keras, &ToDiffusersOptions { out: again.clone(), base: Some(folder.clone()), ..Default::default() }).unwrap();
    same_part(&folder, &again, PARTS[0]);
    let e = sd3_to_keras_sharded(&folder, &mmdit, false, shard_gb).unwrap_err().to_string();
    assert!(e.contains("mmdit.weights.json: already exists") || e.contains("already exists"), "{e}");
}
