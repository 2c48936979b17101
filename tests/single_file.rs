//! Single-file checkpoints (the original LDM layout): diffusers and KerasCV round trips through
//! one file, bit for bit, for SD1 and SD2; torch-written `.ckpt` archives; refused pickles; bad
//! input named by file and key, with no output left behind.

mod common;
use common::*;
use dreambridge::convert::to_diffusers::{keras_to_diffusers, KerasInputs, ToDiffusersOptions};
use dreambridge::diffusers::st_read::StFile;
use dreambridge::diffusers::st_write::{PendingTensor, StWriter};
use dreambridge::single_file::ckpt::Checkpoint;
use dreambridge::single_file::convert::{
    diffusers_to_single_file, keras_to_single_file, single_file_to_diffusers, single_file_to_keras, ExportOptions, ToFolderOptions,
};
use dreambridge::single_file::detect::PredictionType;
use dreambridge::single_file::{ReadOptions, SingleFile};
use dreambridge::tensor::{DType, RawTensor, TensorSource};
use std::path::{Path, PathBuf};

const WEIGHTS: [&str; 3] = ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"];

fn keras_inputs(version: u8) -> KerasInputs {
    KerasInputs {
        unet: Some(fixture(&format!("unet_sd{version}.h5"))),
        text_encoder: Some(fixture(&format!("text_encoder_sd{version}.h5"))),
        vae_encoder: Some(fixture("image_encoder.h5")),
        vae_decoder: Some(fixture("decoder.h5")),
    }
}

/// A complete tiny diffusers pipeline of SD `version` from the KerasCV fixtures.
fn pipeline(dir: &Path, version: u8) -> PathBuf {
    let out = dir.join(format!("pipe{version}"));
    keras_to_diffusers(&keras_inputs(version), &ToDiffusersOptions { out: out.clone(), ..Default::default() }).unwrap();
    out
}

fn export(model: &Path, out: &Path, half: bool) {
    diffusers_to_single_file(model, &ExportOptions { out: out.to_owned(), half, force: false }).unwrap();
}

fn to_folder(checkpoint: &Path, out: &Path) {
    single_file_to_diffusers(checkpoint, &ToFolderOptions { out: out.to_owned(), ..Default::default() }).unwrap();
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn assert_same_folder(a: &Path, b: &Path) {
    for w in WEIGHTS {
        assert_eq!(st_tensors(&a.join(w)), st_tensors(&b.join(w)), "{w}");
    }
    for c in ["unet/config.json", "text_encoder/config.json", "vae/config.json", "scheduler/scheduler_config.json", "model_index.json"] {
        assert_eq!(json(&a.join(c)), json(&b.join(c)), "{c}");
    }
    for t in ["vocab.json", "merges.txt"] {
        assert_eq!(std::fs::read(a.join("tokenizer").join(t)).unwrap(), std::fs::read(b.join("tokenizer").join(t)).unwrap(), "{t}");
    }
}

#[test]
fn diffusers_to_single_file_and_back_is_bit_exact_for_sd1_and_sd2() {
    no_hdf5_locks();
    let dir = tempfile::tempdir().unwrap();
    for version in [1u8, 2] {
        let pipe = pipeline(dir.path(), version);
        let file = dir.path().join(format!("sd{version}.safetensors"));
        export(&pipe, &file, false);
        let st = StFile::open(&file).unwrap();
        let keys = st.keys();
        let te = if version == 1 { "cond_stage_model.transformer." } else { "cond_stage_model.model." };
        for prefix in ["model.diffusion_model.", "first_stage_model.", te] {
            assert!(keys.iter().any(|k| k.starts_with(prefix)), "SD{version}: no `{prefix}` keys");
        }
        assert!(keys.iter().all(|k| ["model.diffusion_model.", "first_stage_model.", te].iter().any(|p| k.starts_with(p))));
        // The layout's own shapes: VAE attention as 1x1 convs, SD2 q/k/v fused.
        assert_eq!(st.info("first_stage_model.decoder.mid.attn_1.q.weight").unwrap().shape, vec![24, 24, 1, 1]);
        if version == 2 {
            assert_eq!(st.info("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight").unwrap().shape, vec![36, 12]);
            assert!(!keys.iter().any(|k| k.contains("text_projection")));
        }
        assert_eq!(st.metadata()["modelspec.architecture"], if version == 1 { "stable-diffusion-v1" } else { "stable-diffusion-v2-512" });
        // The bytes a view lends in place (split from fused tensors, reshaped) are those it reads.
        let single = SingleFile::open(&file, &ReadOptions::default()).unwrap();
        for (component, part) in single.parts() {
            for key in part.view.keys() {
                let read = part.view.read(&key).unwrap();
                part.view
                    .with_bytes(&key, &mut |dtype, shape, data| {
                        assert!(dtype == read.dtype && shape == read.shape && data == read.data, "{component} `{key}`");
                        Ok(())
                    })
                    .unwrap();
            }
        }
        let back = dir.path().join(format!("back{version}"));
        to_folder(&file, &back);
        assert_same_folder(&pipe, &back);
    }
}

#[test]
fn keras_to_single_file_and_back_is_bit_exact_for_sd1_and_sd2() {
    no_hdf5_locks();
    let dir = tempfile::tempdir().unwrap();
    for version in [1u8, 2] {
        let file = dir.path().join(format!("sd{version}.safetensors"));
        let inputs = keras_inputs(version);
        keras_to_single_file(&inputs, None, None, None, &ExportOptions { out: file.clone(), ..Default::default() }).unwrap();
        // Directly from KerasCV: the same file as through a diffusers folder.
        let via = dir.path().join(format!("via{version}.safetensors"));
        export(&pipeline(dir.path(), version), &via, false);
        assert_eq!(st_tensors(&file), st_tensors(&via), "SD{version}");
        let back = dir.path().join(format!("keras{version}"));
        single_file_to_keras(&file, &ReadOptions::default(), &back, false).unwrap();
        for (given, written) in [
            (inputs.unet.unwrap(), "diffusion_model.h5"),
            (inputs.text_encoder.unwrap(), "text_encoder.h5"),
            (inputs.vae_encoder.unwrap(), "image_encoder.h5"),
            (inputs.vae_decoder.unwrap(), "decoder.h5"),
        ] {
            let (a, b) = (keras_tensors(&given), keras_tensors(&back.join(written)));
            assert_eq!(a.len(), b.len(), "{written}");
            assert!(a == b, "SD{version} {written}: tensors differ after the round trip");
        }
    }
}

#[test]
fn half_writes_fp16_casts_and_parts_not_given_come_from_the_base() {
    no_hdf5_locks();
    let dir = tempfile::tempdir().unwrap();
    let pipe = pipeline(dir.path(), 1);
    let full = dir.path().join("full.safetensors");
    export(&pipe, &full, false);
    let half = dir.path().join("half.safetensors");
    export(&pipe, &half, true);
    let (a, b) = (st_tensors(&full), st_tensors(&half));
    assert_eq!(a.len(), b.len());
    for ((ka, ta), (kb, tb)) in a.into_iter().zip(b) {
        assert_eq!(ka, kb);
        assert_eq!(tb.dtype, DType::F16, "{kb}");
        assert_eq!(ta.cast(DType::F16), tb, "{kb}");
    }
    // Only a fine-tuned UNet from KerasCV; the rest from the diffusers base or from a single file.
    let unet_only = KerasInputs { unet: Some(fixture("unet_sd1.h5")), ..Default::default() };
    for (i, base) in [pipe.clone(), full.clone()].iter().enumerate() {
        let out = dir.path().join(format!("based{i}.safetensors"));
        keras_to_single_file(&unet_only, Some(base), None, None, &ExportOptions { out: out.clone(), ..Default::default() }).unwrap();
        assert_eq!(st_tensors(&out), st_tensors(&full));
    }
    let err = keras_to_single_file(&unet_only, None, None, None, &ExportOptions { out: dir.path().join("x.safetensors"), ..Default::default() }).unwrap_err();
    assert!(format!("{err:#}").contains("--text-encoder or --base"), "{err:#}");
    assert!(!dir.path().join("x.safetensors").exists());
}

#[test]
fn v_prediction_travels_as_a_sidecar_yaml() {
    no_hdf5_locks();
    let dir = tempfile::tempdir().unwrap();
    let pipe = pipeline(dir.path(), 2);
    let sched = pipe.join("scheduler/scheduler_config.json");
    let mut s = json(&sched);
    s["prediction_type"] = "v_prediction".into();
    std::fs::write(&sched, serde_json::to_string_pretty(&s).unwrap()).unwrap();
    let file = dir.path().join("v.safetensors");
    export(&pipe, &file, false);
    let yaml = std::fs::read_to_string(dir.path().join("v.yaml")).unwrap();
    assert!(yaml.contains("parameterization: \"v\"") && yaml.contains("context_dim: 12") && yaml.contains("channel_mult: [ 1, 2, 3, 3 ]"), "{yaml}");
    assert_eq!(StFile::open(&file).unwrap().metadata()["modelspec.architecture"], "stable-diffusion-v2-768-v");
    let opened = SingleFile::open(&file, &ReadOptions::default()).unwrap();
    assert_eq!((opened.prediction.kind, opened.prediction.reason.as_str()), (PredictionType::V, "sidecar v.yaml"));
    let back = dir.path().join("back");
    to_folder(&file, &back);
    assert_eq!(json(&back.join("scheduler/scheduler_config.json"))["prediction_type"], "v_prediction");
    // The flag wins over everything.
    let eps = ReadOptions { prediction: Some(PredictionType::Epsilon), ..Default::default() };
    assert_eq!(SingleFile::open(&file, &eps).unwrap().prediction.kind, PredictionType::Epsilon);
}

#[test]
fn torch_checkpoints_are_read_without_running_them() {
    no_hdf5_locks();
    // Values written by fixtures/make_ckpt_fixtures.py.
    let ckpt = Checkpoint::open(&fixture("tensors.ckpt")).unwrap();
    let f32s = |t: RawTensor| t.to_f32_values();
    assert_eq!(f32s(ckpt.read("f32").unwrap()), vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.25]);
    assert_eq!(ckpt.info("f32").unwrap().shape, vec![2, 3]);
    let h = ckpt.read("f16").unwrap();
    assert_eq!((h.dtype, f32s(h)), (DType::F16, vec![-1.5, -0.5, 0.5, 1.5]));
    let b = ckpt.read("bf16").unwrap();
    assert_eq!((b.dtype, f32s(b)), (DType::BF16, vec![0.0, 0.5, 1.0]));
    // Two views of one storage, the second at an offset.
    assert_eq!(f32s(ckpt.read("view_a").unwrap()), (0..8).map(|v| v as f32).collect::<Vec<_>>());
    assert_eq!(f32s(ckpt.read("view_b").unwrap()), (8..20).map(|v| v as f32).collect::<Vec<_>>());
    assert_eq!(ckpt.info("view_b").unwrap().shape, vec![3, 4]);
    // What cannot be read is named when asked for, not when the file opens.
    assert!(ckpt.read("i64").unwrap_err().to_string().contains("unsupported dtype"));
    assert!(ckpt.read("transposed").unwrap_err().to_string().contains("strides"));

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (ok, err) = run(&["convert", "single-file-to-diffusers", "--checkpoint", fixture("evil.ckpt").to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("evil.ckpt") && err.contains("`posix.system`") && err.lines().count() == 1, "{err}");
    assert!(!out.exists());
}

#[test]
fn an_original_sd2_checkpoint_imports_what_diffusers_loads() {
    no_hdf5_locks();
    // torch.save({"state_dict": ...}) of the tiny SD2 UNet (fp16) and OpenCLIP text tower with the
    // whole tower's extra last block, text_projection, logit_scale and schedule buffers.
    let ckpt = fixture("sd2_single_file.ckpt");
    let f = SingleFile::open(&ckpt, &ReadOptions::default()).unwrap();
    assert_eq!(f.sd_version, 2);
    assert!(f.vae.is_none());
    let text = f.text_encoder.as_ref().unwrap();
    assert_eq!(text.plans[0].symbols["n"], 3, "the last of the 4 blocks is the unused one");
    assert!(text.view.ignored.iter().any(|k| k.ends_with("resblocks.3.ln_1.weight")));
    let dir = tempfile::tempdir().unwrap();
    let back = dir.path().join("keras");
    single_file_to_keras(&ckpt, &ReadOptions::default(), &back, false).unwrap();
    assert_eq!(keras_tensors(&fixture("text_encoder_sd2.h5")), keras_tensors(&back.join("text_encoder.h5")));
    let unet: Vec<RawTensor> = keras_tensors(&fixture("unet_sd2.h5")).into_iter().map(|t| t.cast(DType::F16)).collect();
    assert!(unet == keras_tensors(&back.join("diffusion_model.h5")), "UNet differs from the fp16 cast of the fixture");
    // A pipeline folder needs a VAE: from --base.
    let base = pipeline(dir.path(), 2);
    let out = dir.path().join("pipe");
    single_file_to_diffusers(&ckpt, &ToFolderOptions { base: Some(base.clone()), out: out.clone(), ..Default::default() }).unwrap();
    assert_eq!(st_tensors(&out.join(WEIGHTS[1])), st_tensors(&base.join(WEIGHTS[1])));
    assert_eq!(st_tensors(&out.join(WEIGHTS[2])), st_tensors(&base.join(WEIGHTS[2])));
    // --half: the file's parts and the base's VAE alike under the fp16 variant names.
    let half = dir.path().join("half");
    single_file_to_diffusers(&ckpt, &ToFolderOptions { base: Some(base.clone()), out: half.clone(), half: true, ..Default::default() }).unwrap();
    let vae: Vec<(String, RawTensor)> = st_tensors(&base.join(WEIGHTS[2])).into_iter().map(|(k, t)| (k, t.cast(DType::F16))).collect();
    assert_eq!(st_tensors(&half.join("vae/diffusion_pytorch_model.fp16.safetensors")), vae);
    assert!(half.join("vae/config.json").is_file() && half.join("unet/diffusion_pytorch_model.fp16.safetensors").is_file());
    let err = single_file_to_diffusers(&ckpt, &ToFolderOptions { out: dir.path().join("nobase"), ..Default::default() }).unwrap_err();
    assert!(format!("{err:#}").contains("has no VAE (`first_stage_model.*`)"), "{err:#}");
    assert!(!dir.path().join("nobase").exists());
}

/// Rewrites a safetensors file through `edit` (on the (key, tensor) list).
fn rewrite(from: &Path, to: &Path, edit: impl Fn(&mut Vec<(String, RawTensor)>)) {
    let mut tensors = st_tensors(from);
    edit(&mut tensors);
    let pending = tensors.iter().map(|(k, t)| PendingTensor { key: k.clone(), dtype: t.dtype, shape: t.shape.clone() }).collect();
    let mut w = StWriter::create(to, pending).unwrap();
    for (k, t) in &tensors {
        w.write_next(k, t).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn ema_weights_are_used_on_request() {
    no_hdf5_locks();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sd1.safetensors");
    export(&pipeline(dir.path(), 1), &file, false);
    let with_ema = dir.path().join("ema.safetensors");
    rewrite(&file, &with_ema, |ts| {
        let ema: Vec<(String, RawTensor)> = ts
            .iter()
            .filter(|(k, _)| k.starts_with("model.diffusion_model."))
            .map(|(k, t)| {
                let values: Vec<f32> = t.to_f32_values().iter().map(|v| v * 0.5 + 1.0).collect();
                (format!("model_ema.{}", k["model.".len()..].replace('.', "")), RawTensor::from_f32(&t.shape, &values))
            })
            .collect();
        ts.extend(ema);
        ts.push(("model_ema.decay".into(), RawTensor::from_f32(&[], &[0.9999])));
    });
    let (live, ema) = (dir.path().join("live"), dir.path().join("ema"));
    to_folder(&with_ema, &live);
    single_file_to_diffusers(&with_ema, &ToFolderOptions { read: ReadOptions { ema: true, ..Default::default() }, out: ema.clone(), ..Default::default() }).unwrap();
    let original = StFile::open(&file).unwrap();
    let (live_unet, ema_unet) = (StFile::open(&live.join(WEIGHTS[0])).unwrap(), StFile::open(&ema.join(WEIGHTS[0])).unwrap());
    let (d, l) = ("conv_in.weight", "model.diffusion_model.input_blocks.0.0.weight");
    assert_eq!(live_unet.read(d).unwrap(), original.read(l).unwrap());
    let expected: Vec<f32> = original.read(l).unwrap().to_f32_values().iter().map(|v| v * 0.5 + 1.0).collect();
    assert_eq!(ema_unet.read(d).unwrap().to_f32_values(), expected);
    assert_eq!(st_tensors(&live.join(WEIGHTS[2])), st_tensors(&ema.join(WEIGHTS[2])), "EMA is the UNet's only");
    let err = SingleFile::open(&file, &ReadOptions { ema: true, ..Default::default() }).err().unwrap();
    assert!(format!("{err:#}").contains("holds no EMA weights"), "{err:#}");
}

#[test]
fn bad_single_files_are_named_by_file_and_key_and_leave_nothing() {
    no_hdf5_locks();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sd1.safetensors");
    export(&pipeline(dir.path(), 1), &file, false);
    let out = dir.path().join("out");
    let convert = |checkpoint: &Path| {
        let (ok, err) = run(&["convert", "single-file-to-diffusers", "--checkpoint", checkpoint.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        assert!(!ok && !out.exists(), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        err
    };
    // A missing key.
    let missing = dir.path().join("missing.safetensors");
    rewrite(&file, &missing, |ts| ts.retain(|(k, _)| k != "model.diffusion_model.input_blocks.4.0.skip_connection.weight"));
    let err = convert(&missing);
    assert!(err.contains("missing.safetensors") && err.contains("`model.diffusion_model.input_blocks.4.0.skip_connection.weight`") && err.contains("missing"), "{err}");
    // A misshapen key.
    let misshapen = dir.path().join("misshapen.safetensors");
    rewrite(&file, &misshapen, |ts| {
        let t = ts.iter_mut().find(|(k, _)| k == "first_stage_model.encoder.conv_in.bias").unwrap();
        t.1 = RawTensor::from_f32(&[7], &[0.0; 7]);
    });
    let err = convert(&misshapen);
    assert!(err.contains("`first_stage_model.encoder.conv_in.bias`") && err.contains("shape [7]"), "{err}");
    // Truncated.
    let truncated = dir.path().join("truncated.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert!(convert(&truncated).contains("truncated.safetensors"));
    let truncated_ckpt = dir.path().join("truncated.ckpt");
    let bytes = std::fs::read(fixture("sd2_single_file.ckpt")).unwrap();
    std::fs::write(&truncated_ckpt, &bytes[..bytes.len() - 100]).unwrap();
    assert!(convert(&truncated_ckpt).contains("truncated.ckpt"));
    // Not a Stable Diffusion checkpoint: a diffusers UNet file, and a text file.
    let err = convert(&dir.path().join("pipe1").join(WEIGHTS[0]));
    assert!(err.contains("not a Stable Diffusion single-file checkpoint"), "{err}");
    let text = dir.path().join("notes.safetensors");
    std::fs::write(&text, "hello").unwrap();
    assert!(convert(&text).contains("notes.safetensors"));
    // An existing output file is kept.
    let again = run(&["convert", "diffusers-to-single-file", "--model", dir.path().join("pipe1").to_str().unwrap(), "--out", file.to_str().unwrap()]);
    assert!(!again.0 && again.1.contains("already exists"), "{}", again.1);
}

#[test]
fn inspect_names_the_layout_and_version() {
    no_hdf5_locks();
    let (ok, _) = run(&["inspect", fixture("sd2_single_file.ckpt").to_str().unwrap()]);
    assert!(ok);
    let out = cli().args(["inspect", fixture("sd2_single_file.ckpt").to_str().unwrap()]).output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("torch checkpoint archive") && report.contains("original LDM layout") && report.contains("SD 2.x"), "{report}");
    assert!(report.contains("unet-sd2") && report.contains("text-encoder-sd2") && report.contains("no VAE"), "{report}");
}

#[test]
fn train_and_generate_take_a_single_file_base_and_train_saves_one() {
    no_hdf5_locks();
    let dir = tempfile::tempdir().unwrap();
    training_inputs(dir.path());
    let file = dir.path().join("base.safetensors");
    export(&dir.path().join("sample"), &file, false);
    std::env::set_var("DREAMBRIDGE_CACHE", dir.path().join("cache"));
    let out = dir.path().join("run");
    let mut args = tiny_train_args(dir.path(), &out);
    args.pretrained_model = file.clone();
    (args.max_train_steps, args.with_prior_preservation, args.validation_prompt) = (Some(2), false, None);
    args.save_single_file = true;
    let done = dreambridge::train::command::train(&args).unwrap();
    // The base's diffusers form is cached once and reused.
    let cached: Vec<_> = std::fs::read_dir(dir.path().join("cache/single-file")).unwrap().collect();
    assert_eq!(cached.len(), 1);
    let single = done.single_file.unwrap();
    assert_eq!(single, out.join("run.safetensors"));
    // The saved file is the trained pipeline: back to diffusers, its UNet is the output's.
    let back = dir.path().join("back");
    to_folder(&single, &back);
    assert_eq!(st_tensors(&back.join(WEIGHTS[0])), st_tensors(&out.join(WEIGHTS[0])));
    assert_ne!(st_tensors(&back.join(WEIGHTS[0])), st_tensors(&dir.path().join("sample").join(WEIGHTS[0])), "trained");
    // LoRA runs write the kohya file for A1111/ComfyUI.
    let lora_out = dir.path().join("lora-run");
    let mut args = tiny_train_args(dir.path(), &lora_out);
    args.pretrained_model = file.clone();
    (args.max_train_steps, args.with_prior_preservation, args.validation_prompt) = (Some(1), false, None);
    args.save_single_file = true;
    args.lora = Some(dreambridge::train::command::LoraArgs {
        rank: 2,
        alpha: None,
        dropout: 0.0,
        targets: "attn".parse().unwrap(),
        format: dreambridge::train::command::LoraFormat::Diffusers,
    });
    let done = dreambridge::train::command::train(&args).unwrap();
    assert!(done.lora_files.contains(&lora_out.join("lora-run.safetensors")), "{:?}", done.lora_files);
    // generate reads the single file too.
    let images = dir.path().join("images");
    let (ok, err) = run(&[
        "generate", "--model", file.to_str().unwrap(), "--prompt", "a dog", "--size", "64", "--steps", "2", "--out", images.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(images.join("image_0.png").is_file());
}
