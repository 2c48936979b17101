//! The effect of each train_dreambooth.py flag dreambridge takes, beyond parsing: schedules,
//! epochs, optimiser settings, tokenization, class-image generation, what is saved and logged.

mod common;
use common::*;
use dreambridge::train::command::{steps_per_epoch, train, TrainArgs};
use dreambridge::train::tensorboard::read_events;
use std::path::{Path, PathBuf};

/// A short full fine-tuning run without prior preservation or validation.
fn quick(dir: &Path, name: &str) -> TrainArgs {
    TrainArgs { max_train_steps: Some(3), with_prior_preservation: false, validation_prompt: None, checkpointing_steps: 100, ..tiny_train_args(dir, &dir.join(name)) }
}

fn inputs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    training_inputs(dir.path());
    dir
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("logs/metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn epochs_set_the_step_count_when_max_train_steps_is_absent() {
    assert_eq!(steps_per_epoch(5, 0, 2, 1), 3);
    assert_eq!(steps_per_epoch(2, 7, 2, 2), 2, "prior preservation: max(instance, class) examples");
    let dir = inputs();
    let a = TrainArgs { max_train_steps: None, num_train_epochs: 3, ..quick(dir.path(), "epochs") };
    // Two instance images, batch 1: two steps an epoch.
    assert_eq!(train(&a).unwrap().losses.len(), 6);
}

#[test]
fn lr_schedules_follow_diffusers_step_by_step() {
    let dir = inputs();
    for (name, cycles, power) in [("cosine_with_restarts", 2.0, 1.0), ("polynomial", 1.0, 2.0)] {
        let a = TrainArgs {
            max_train_steps: Some(6),
            lr_scheduler: name.into(),
            lr_warmup_steps: 2,
            lr_num_cycles: cycles,
            lr_power: power,
            learning_rate: 1e-3,
            ..quick(dir.path(), name)
        };
        train(&a).unwrap();
        let lrs: Vec<f64> = metrics(&a.output_dir).iter().map(|r| r["lr"].as_f64().unwrap()).collect();
        // diffusers.optimization, evaluated by hand at optimiser steps 0..6 of 6 with 2 of warmup.
        let expected: Vec<f64> = (0..6)
            .map(|s: usize| {
                if s < 2 {
                    return 1e-3 * s as f64 / 2.0;
                }
                let progress = (s - 2) as f64 / 4.0;
                match name {
                    "cosine_with_restarts" => 1e-3 * 0.5 * (1.0 + (std::f64::consts::PI * ((2.0 * progress) % 1.0)).cos()),
                    _ => (1e-3 - 1e-7) * (1.0 - progress).powi(2) + 1e-7,
                }
            })
            .collect();
        for (got, want) in lrs.iter().zip(&expected) {
            assert!((got - want).abs() <= 1e-12 + 1e-9 * want, "{name}: {lrs:?} vs {expected:?}");
        }
    }
}

#[test]
fn offset_noise_is_noise_offset_point_one() {
    let dir = inputs();
    let weights = |name: &str, flag: Option<&str>| {
        let out = dir.path().join(name);
        let mut args = vec![
            "train".to_string(),
            format!("--pretrained_model_name_or_path={}", dir.path().join("sample").display()),
            format!("--instance_data_dir={}", dir.path().join("instance").display()),
            "--instance_prompt=a photo of sks dog".into(),
            "--resolution=64".into(),
            "--max_train_steps=2".into(),
            "--learning_rate=1e-3".into(),
            "--report_to=none".into(),
            "--device=cpu".into(),
            format!("--output_dir={}", out.display()),
        ];
        args.extend(flag.map(str::to_string));
        let (ok, err) = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(ok, "{err}");
        assert!(!out.join("logs/dreambooth").exists(), "--report_to none writes no event files");
        unet_weights(&out)
    };
    let switch = weights("switch", Some("--offset_noise"));
    assert_eq!(weights("value", Some("--noise_offset=0.1")), switch);
    assert_ne!(weights("plain", None), switch, "the offset changes the noise");
}

#[test]
fn adam_settings_reach_the_optimizer() {
    let dir = inputs();
    let moved = |a: TrainArgs| {
        let out = a.output_dir.clone();
        train(&a).unwrap();
        let base = unet_weights(&dir.path().join("sample"));
        let after = unet_weights(&out);
        base.iter().zip(&after).map(|((_, b), (_, t))| b.to_f32_values().iter().zip(t.to_f32_values()).map(|(x, y)| (x - y).abs() as f64).sum::<f64>()).sum::<f64>()
    };
    let usual = moved(TrainArgs { adam_weight_decay: 0.0, ..quick(dir.path(), "usual") });
    // An epsilon far above sqrt(v) shrinks every AdamW step by orders of magnitude.
    let damped = moved(TrainArgs { adam_weight_decay: 0.0, adam_epsilon: 1e3, ..quick(dir.path(), "eps") });
    assert!(damped < usual * 1e-2, "{damped} vs {usual}");
    let beta = moved(TrainArgs { adam_weight_decay: 0.0, adam_beta1: 0.0, adam_beta2: 0.5, ..quick(dir.path(), "betas") });
    assert!((beta - usual).abs() > 1e-6 * usual, "betas change the trajectory");
}

#[test]
fn tokenizer_flags_change_what_the_unet_is_conditioned_on() {
    let dir = inputs();
    let losses = |a: TrainArgs| train(&a).unwrap().losses;
    let plain = losses(quick(dir.path(), "plain"));
    let short = losses(TrainArgs { tokenizer_max_length: Some(8), ..quick(dir.path(), "short") });
    let masked = losses(TrainArgs { text_encoder_use_attention_mask: true, ..quick(dir.path(), "masked") });
    assert_ne!(short, plain);
    assert_ne!(masked, plain);
    assert!(train(&TrainArgs { tokenizer_max_length: Some(78), ..quick(dir.path(), "long") }).err().unwrap().to_string().contains("positions"));
    // --tokenizer_name: SD2's convention pads with "!" (id 0) instead of the end token.
    let tok = dir.path().join("sd2-tokenizer");
    std::fs::create_dir_all(&tok).unwrap();
    for e in std::fs::read_dir(dir.path().join("sample/tokenizer")).unwrap().flatten() {
        std::fs::copy(e.path(), tok.join(e.file_name())).unwrap();
    }
    let config = tok.join("tokenizer_config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["pad_token"] = "!".into();
    std::fs::write(&config, c.to_string()).unwrap();
    let named = losses(TrainArgs { tokenizer_name: Some(tok.clone()), ..quick(dir.path(), "named") });
    assert_ne!(named, plain);
    std::fs::remove_file(tok.join("vocab.json")).unwrap();
    let err = train(&TrainArgs { tokenizer_name: Some(tok), ..quick(dir.path(), "broken") }).err().unwrap();
    assert!(format!("{err:#}").contains("vocab.json"), "{err:#}");
}

#[test]
fn precomputed_embeddings_train_the_same_and_free_the_text_encoder() {
    let dir = inputs();
    let with_validation = |name: &str| TrainArgs { validation_prompt: Some("a photo of sks dog".into()), validation_steps: 3, ..quick(dir.path(), name) };
    let plain = train(&with_validation("plain")).unwrap();
    let pre = train(&TrainArgs { pre_compute_text_embeddings: true, ..with_validation("pre") }).unwrap();
    assert_eq!(pre.losses, plain.losses);
    assert_eq!(unet_weights(&pre.output_dir), unet_weights(&plain.output_dir));
    let image = |out: &PathBuf| image::open(out.join("validation/step_3_0.png")).unwrap().to_rgb8().into_raw();
    assert_eq!(image(&pre.output_dir), image(&plain.output_dir), "validation from the precomputed embeddings");
    // The saved pipeline keeps the base's text encoder.
    assert!(pre.output_dir.join("text_encoder/model.safetensors").is_file());
    let err = train(&TrainArgs { train_text_encoder: true, pre_compute_text_embeddings: true, ..quick(dir.path(), "both") }).err().unwrap();
    assert!(err.to_string().contains("--train_text_encoder cannot be used with --pre_compute_text_embeddings"));
}

#[test]
fn skip_save_text_encoder_marks_it_absent() {
    let dir = inputs();
    let out = train(&TrainArgs { skip_save_text_encoder: true, ..quick(dir.path(), "no-text") }).unwrap().output_dir;
    assert!(!out.join("text_encoder").exists());
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("model_index.json")).unwrap()).unwrap();
    assert_eq!(index["text_encoder"], serde_json::json!([null, null]));
    assert!(out.join("unet/diffusion_pytorch_model.safetensors").is_file() && out.join("tokenizer/vocab.json").is_file());
}

#[test]
fn class_images_come_out_the_same_in_batches() {
    let dir = inputs();
    let make = |name: &str, batch: usize, precision: Option<&str>| {
        let class = dir.path().join(name);
        let a = TrainArgs {
            max_train_steps: Some(1),
            class_data_dir: Some(class.clone()),
            num_class_images: 3,
            sample_batch_size: batch,
            prior_generation_precision: precision.map(str::to_string),
            validation_prompt: None,
            ..tiny_train_args(dir.path(), &dir.path().join(format!("{name}-out")))
        };
        train(&a).unwrap();
        (0..3).map(|i| image::open(class.join(format!("class_{i}.png"))).unwrap().to_rgb8().into_raw()).collect::<Vec<_>>()
    };
    let one = make("one", 1, None);
    let three = make("three", 3, None);
    let worst = |a: &[Vec<u8>], b: &[Vec<u8>]| a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
    assert!(worst(&one, &three) <= 1, "batched generation matches one at a time (max diff {})", worst(&one, &three));
    assert_ne!(one[0], one[1]);
    let half = make("half", 3, Some("fp16"));
    assert!(half != three && worst(&half, &three) < 64, "fp16 generation is close to fp32 but not identical");
    let dir2 = dir.path().join("bf16");
    let err = train(&TrainArgs { class_data_dir: Some(dir2), prior_generation_precision: Some("bf16".into()), ..tiny_train_args(dir.path(), &dir.path().join("bf16-out")) }).err().unwrap();
    assert!(err.to_string().contains("bf16 needs a CUDA build"), "{err}");
}

#[test]
fn the_command_line_logs_to_tensorboard_and_scales_the_learning_rate() {
    let dir = inputs();
    let out = dir.path().join("tb");
    let (ok, err) = run(&[
        "train",
        &format!("--pretrained_model_name_or_path={}", dir.path().join("sample").display()),
        &format!("--instance_data_dir={}", dir.path().join("instance").display()),
        "--instance_prompt=a photo of sks dog",
        "--resolution=64",
        "--train_batch_size=2",
        "--gradient_accumulation_steps=2",
        "--learning_rate=1e-6",
        "--scale_lr",
        "--max_train_steps=2",
        "--validation_prompt=a photo of sks dog",
        "--validation_steps=2",
        "--num_validation_images=2",
        "--dataloader_num_workers=2",
        "--local_rank=0",
        "--report_to=wandb",
        "--image_interpolation_mode=lanczos",
        "--offset_noise",
        "--device=cpu",
        &format!("--output_dir={}", out.display()),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("note: --local_rank 0") && err.contains("note: --report_to wandb"), "{err}");
    let lr: Vec<f64> = metrics(&out).iter().map(|r| r["lr"].as_f64().unwrap()).collect();
    assert_eq!(lr, vec![4e-6, 4e-6], "1e-6 x batch 2 x accumulation 2");
    let dir_tb = out.join("logs/dreambooth");
    let files: Vec<PathBuf> = std::fs::read_dir(&dir_tb).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let events = read_events(&files[0]).unwrap();
    let scalars: Vec<(i64, String, f32)> = events
        .iter()
        .flat_map(|e| e.summary.iter().flat_map(move |s| s.value.iter().filter_map(move |v| v.simple_value.map(|x| (e.step, v.tag.clone(), x)))))
        .collect();
    assert_eq!(scalars.iter().filter(|(_, t, _)| t == "loss").map(|(s, _, _)| *s).collect::<Vec<_>>(), vec![1, 2]);
    assert!(scalars.iter().any(|(s, t, x)| *s == 2 && t == "lr" && (*x - 4e-6).abs() < 1e-12));
    let image = events.iter().flat_map(|e| e.summary.iter().flat_map(|s| s.value.iter())).find_map(|v| v.image.clone()).expect("a validation image grid");
    assert_eq!((image.width, image.height), (128, 64), "two 64 px images side by side");
    // Refused: wandb with a token on the command line (diffusers' rule), a filter torchvision has but we do not.
    let (ok, err) = run(&["train", "--pretrained_model_name_or_path=x", "--instance_data_dir=y", "--instance_prompt=z", "--report_to=wandb", "--hub_token=hf_x"]);
    assert!(!ok && err.contains("security risk"), "{err}");
    let (ok, err) = run(&[
        "train",
        &format!("--pretrained_model_name_or_path={}", dir.path().join("sample").display()),
        &format!("--instance_data_dir={}", dir.path().join("instance").display()),
        "--instance_prompt=a",
        "--image_interpolation_mode=box",
        &format!("--output_dir={}", dir.path().join("box").display()),
    ]);
    assert!(!ok && err.contains("--image_interpolation_mode box"), "{err}");
}

#[test]
fn a_variant_base_trains_and_saves_plain_f32_files() {
    let dir = inputs();
    let half = dir.path().join("half");
    let (ok, err) = run(&["convert", "keras-to-diffusers", "--half", "--out", half.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(half.join("unet/diffusion_pytorch_model.fp16.safetensors").is_file());
    let a = TrainArgs { pretrained_model: half.clone(), variant: Some("fp16".into()), ..quick(dir.path(), "from-half") };
    let out = train(&a).unwrap().output_dir;
    for f in ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"] {
        let tensors = st_tensors(&out.join(f));
        assert!(tensors.iter().all(|(_, t)| t.dtype == dreambridge::tensor::DType::F32), "{f}");
    }
    assert!(!out.join("unet/diffusion_pytorch_model.fp16.safetensors").exists());
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("text_encoder/config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "float32", "transformers would load the f32 weights as the config's dtype");
    let err = train(&TrainArgs { pretrained_model: half, variant: Some("ema".into()), ..quick(dir.path(), "no-variant") }).err().unwrap();
    assert!(format!("{err:#}").contains("diffusion_pytorch_model.ema.safetensors"), "{err:#}");
}
