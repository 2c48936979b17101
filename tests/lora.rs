//! LoRA DreamBooth end to end on CPU: a tiny run that lowers the loss and writes both formats, a
//! bit-exact resume, adapters against merged weights, and the `generate --lora`, `lora convert`,
//! `lora merge` and `inspect` commands with good and bad files.

mod common;
use common::*;
use dreambridge::lora::{read::read, Part};
use dreambridge::models::lora::{LoraConfig, Targets};
use dreambridge::pipeline::Pipeline;
use dreambridge::train::command::{train, LoraArgs, LoraFormat, TrainArgs};
use std::path::Path;

/// The shared tiny run with LoRA rank 4 (attn targets, both formats, no checkpoint pruning).
fn args(dir: &Path, out: &Path) -> TrainArgs {
    TrainArgs {
        learning_rate: 3e-2,
        checkpoints_total_limit: None,
        lora: Some(LoraArgs { rank: 4, alpha: None, dropout: 0.0, targets: Targets::Attn, format: LoraFormat::Both }),
        ..tiny_train_args(dir, out)
    }
}

#[test]
fn a_lora_run_lowers_the_loss_and_writes_both_formats() {
    let dir = tempfile::tempdir().unwrap();
    training_inputs(dir.path());
    let out = dir.path().join("sks-lora");
    // kohya's target set: the tiny model's 8-wide attention alone has too little to fit.
    let mut a = args(dir.path(), &out);
    a.lora.as_mut().unwrap().targets = Targets::Transformer;
    let done = train(&a).unwrap();
    let l = &done.losses;
    let (first, last) = (l[..10].iter().sum::<f32>() / 10.0, l[30..].iter().sum::<f32>() / 10.0);
    assert!(last < first, "loss did not fall: first 10 avg {first}, last 10 avg {last}: {l:?}");
    // The training losses draw new noise and timesteps every step; on one fixed set of them the
    // instance loss of the base with the LoRA folded in must be clearly below the base's.
    let (base, tuned) = (instance_loss(&dir.path().join("sample"), None), instance_loss(&dir.path().join("sample"), Some(&out.join("pytorch_lora_weights.safetensors"))));
    assert!(tuned < 0.9 * base, "instance loss {base} -> {tuned}");
    let (diffusers, kohya) = (out.join("pytorch_lora_weights.safetensors"), out.join("sks-lora.safetensors"));
    assert_eq!(done.lora_files, vec![diffusers.clone(), kohya.clone()]);
    assert!(!out.join("unet").exists() && !out.join("model_index.json").exists(), "a LoRA run writes no full weights");
    assert!(out.join("validation/step_40_0.png").exists(), "validation ran with the adapters");
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("- lora\n") && card.contains("base_model:") && card.contains("instance_prompt: \"a photo of sks dog\""), "{card}");

    // 16 transformers x (proj_in, proj_out, attn1 and attn2 q/k/v/out, ff in/out); every up factor trained.
    let (d, k) = (read(&diffusers).unwrap(), read(&kohya).unwrap());
    assert_eq!((d.count(Part::Unet), d.count(Part::TextEncoder)), (16 * 12, 0));
    let untrained: Vec<&String> = d.modules.iter().filter(|(_, m)| m.rank() != 4 || m.up.to_f32_values().iter().all(|v| *v == 0.0)).map(|((_, k), _)| k).collect();
    // At 64 px the mid block sees 1x1 latents: its self-attention softmax runs over one token, so
    // q and k get exactly zero gradient (as in torch). Every other adapter trained.
    let mid = "mid_block.attentions.0.transformer_blocks.0.attn1";
    assert_eq!(untrained, [&format!("{mid}.to_k"), &format!("{mid}.to_q")], "untrained adapters");
    assert_eq!(d.modules.keys().collect::<Vec<_>>(), k.modules.keys().collect::<Vec<_>>());
    for (key, value) in [("ss_network_dim", "4"), ("ss_network_alpha", "4.0"), ("ss_v2", "False"), ("ss_base_model_version", "sd_v1"), ("ss_output_name", "sks-lora")] {
        assert_eq!(k.metadata.get(key).map(String::as_str), Some(value), "{key}");
    }
    // The checkpoint holds only the adapters and their moments.
    let ckpt = candle_core::safetensors::load(out.join("checkpoint-40/weights.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(ckpt.len(), 16 * 12 * 2);
    assert!(ckpt.keys().all(|k| k.ends_with(".lora_down.weight") || k.ends_with(".lora_up.weight")));
}

/// The mean DreamBooth (instance) loss of `model` (with `lora` folded in) on the instance
/// images' centre crops, over 16 fixed draws of noise and timesteps.
fn instance_loss(model: &Path, lora: Option<&Path>) -> f32 {
    use dreambridge::train::data::{image_files, load_image, Crop};
    use dreambridge::train::loss::{dreambooth_loss, LossConfig};
    let dev = candle_core::Device::Cpu;
    let pipe = Pipeline::load(model, &dev).unwrap();
    let files: Vec<_> = lora.into_iter().map(Path::to_path_buf).collect();
    dreambridge::lora::merge::merge_files_into_vars(&files, &[], Some(&pipe.unet_vars), Some(&pipe.text_vars)).unwrap();
    let dir = model.parent().unwrap().join("instance");
    let images: Vec<_> = image_files(&dir).unwrap().iter().map(|f| load_image(f, 64, Crop::Center, false, &dev).unwrap()).collect();
    let (mean, _) = pipe.inference.vae.encode(&candle_core::Tensor::stack(&images, 0).unwrap()).unwrap();
    let latents = (mean * pipe.vae.config.scaling_factor).unwrap();
    let context = pipe.embed("a photo of sks dog").unwrap().repeat((latents.dim(0).unwrap(), 1, 1)).unwrap();
    let schedule = dreambridge::pipeline::schedule::NoiseSchedule::new(&pipe.scheduler.schedule).unwrap();
    let cfg = LossConfig { with_prior_preservation: false, prior_loss_weight: 1.0, snr_gamma: None };
    let mut rng = dreambridge::rng::TrainRng::new(11);
    let draws = 16;
    let total: f32 = (0..draws)
        .map(|_| {
            let noise = rng.normal(latents.dims(), &dev).unwrap();
            let t: Vec<usize> = (0..latents.dim(0).unwrap()).map(|_| rng.below(1000)).collect();
            dreambooth_loss(&pipe.inference.unet, &schedule, &latents, &context, &noise, &t, &cfg).unwrap().to_scalar::<f32>().unwrap()
        })
        .sum();
    total / draws as f32
}

#[test]
fn a_resumed_lora_run_writes_the_same_file_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    training_inputs(dir.path());
    let out = dir.path().join("out");
    // Text-encoder adapters, dropout, kohya's targets and gradient checkpointing all on.
    let a = TrainArgs {
        max_train_steps: Some(6),
        checkpointing_steps: 3,
        validation_prompt: None,
        train_text_encoder: true,
        gradient_checkpointing: true,
        lora: Some(LoraArgs { rank: 2, alpha: Some(3.0), dropout: 0.1, targets: Targets::Transformer, format: LoraFormat::Diffusers }),
        ..args(dir.path(), &out)
    };
    train(&a).unwrap();
    let whole = std::fs::read(out.join("pytorch_lora_weights.safetensors")).unwrap();
    std::fs::remove_dir_all(out.join("checkpoint-6")).unwrap();
    let resumed = train(&TrainArgs { resume_from_checkpoint: Some("latest".into()), ..a }).unwrap();
    assert_eq!(resumed.losses.len(), 3);
    assert!(std::fs::read(out.join("pytorch_lora_weights.safetensors")).unwrap() == whole, "the resumed run wrote other adapters");
    let set = read(&out.join("pytorch_lora_weights.safetensors")).unwrap();
    assert!(set.count(Part::TextEncoder) == 2 * 6 && set.count(Part::Unet) == 16 * 12, "{} / {}", set.count(Part::Unet), set.count(Part::TextEncoder));
}

/// The largest elementwise difference relative to the largest value.
fn rel_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    diff / a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn adapters_and_merged_weights_give_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    training_inputs(dir.path());
    let dev = candle_core::Device::Cpu;
    let sample = dir.path().join("sample");
    let mut adapted = Pipeline::load(&sample, &dev).unwrap();
    let config = LoraConfig { rank: 3, alpha: 5.0, targets: Targets::TransformerConv, dropout: 0.0, seed: 9 };
    adapted.attach_lora(&config, true, candle_core::DType::F32).unwrap();
    // Seeded adapters of a size that changes the UNet's output by about a third. Larger ones
    // (0.3) saturated the up blocks: most adapters there no longer moved the output above the
    // float rounding, and the rounding itself grew 60x from this machine to CI's.
    let mut rng = dreambridge::rng::TrainRng::new(9);
    for (i, v) in adapted.unet_vars.all_vars().iter().chain(adapted.text_vars.all_vars().iter()).enumerate() {
        let noise = (rng.normal(v.dims(), &dev).unwrap() * (0.05 * (1.0 + i as f64 * 1e-3))).unwrap();
        v.set(&noise).unwrap();
    }
    let set = adapted.lora_set().unwrap();
    let merged = Pipeline::load(&sample, &dev).unwrap();
    dreambridge::lora::merge::merge_into_vars(&[(&set, 1.0)], &merged.unet_vars, &merged.text_vars).unwrap();

    let x = rng.normal(&[2, 4, 8, 8], &dev).unwrap();
    let t = candle_core::Tensor::new(&[10f32, 700.0], &dev).unwrap();
    let (ea, em) = (adapted.embed("a photo of sks dog").unwrap(), merged.embed("a photo of sks dog").unwrap());
    assert!(rel_diff(&ea, &em) < 1e-5, "text encoder: {}", rel_diff(&ea, &em));
    let ctx = em.repeat((2, 1, 1)).unwrap();
    let (ua, um) = (adapted.inference.unet.forward(&x, &t, &ctx).unwrap(), merged.inference.unet.forward(&x, &t, &ctx).unwrap());
    // (W + BA)x against Wx + BAx through the whole UNet in f32: rounding only, measured at
    // 1.5e-6 here. Leaving out any one of 253 of the 278 UNet adapters moves the output by more
    // than 1e-3 (the rest sit where the tiny model ignores them: time embeddings under one-channel
    // groups, query and key of a one-token attention).
    assert!(rel_diff(&ua, &um) < 1e-3, "unet: {}", rel_diff(&ua, &um));
    let base = Pipeline::load(&sample, &dev).unwrap();
    assert!(rel_diff(&base.inference.unet.forward(&x, &t, &ctx).unwrap(), &um) > 0.1, "the LoRA changes the model");
}

#[test]
fn generate_convert_merge_and_inspect_take_lora_files_and_refuse_misfits() {
    let dir = tempfile::tempdir().unwrap();
    training_inputs(dir.path());
    let out = dir.path().join("lora");
    train(&TrainArgs { max_train_steps: Some(2), validation_prompt: None, ..args(dir.path(), &out) }).unwrap();
    let (diffusers, kohya) = (out.join("pytorch_lora_weights.safetensors"), out.join("lora.safetensors"));
    let p = |p: &Path| p.to_str().unwrap().to_string();
    let cli_ok = |a: &[String]| {
        let (ok, err) = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(ok, "{a:?}: {err}");
    };
    let s = |x: &str| x.to_string();

    // Conversions round trip bit for bit.
    let (k2, d2) = (dir.path().join("k2.safetensors"), dir.path().join("d2.safetensors"));
    cli_ok(&[s("lora"), s("convert"), p(&diffusers), p(&k2), s("--to"), s("kohya")]);
    cli_ok(&[s("lora"), s("convert"), p(&k2), p(&d2), s("--to"), s("diffusers")]);
    assert!(std::fs::read(&d2).unwrap() == std::fs::read(&diffusers).unwrap(), "diffusers -> kohya -> diffusers changed the file");
    assert_eq!(read(&k2).unwrap().modules, read(&kohya).unwrap().modules);

    let report = String::from_utf8(cli().args(["inspect", &p(&kohya)]).output().unwrap().stdout).unwrap();
    assert!(report.contains("kohya") && report.contains("rank 4") && report.contains("SD1"), "{report}");

    // generate with the LoRA, and a merged pipeline.
    let images = dir.path().join("images");
    cli_ok(&[s("generate"), s("--model"), p(&dir.path().join("sample")), s("--lora"), p(&kohya), s("--lora-scale"), s("0.8"), s("--prompt"), s("a photo of sks dog"), s("--size"), s("64"), s("--steps"), s("2"), s("--out"), p(&images), s("--device"), s("cpu")]);
    assert!(images.join("image_0.png").exists());
    let merged = dir.path().join("merged");
    cli_ok(&[s("lora"), s("merge"), s("--base"), p(&dir.path().join("sample")), s("--lora"), p(&diffusers), s("--out"), p(&merged)]);
    assert!(Pipeline::load(&merged, &candle_core::Device::Cpu).is_ok());

    // A LoRA whose shapes do not fit this base (made for a model twice as wide): refused, naming
    // the first offending key, with nothing written.
    let mut wide = read(&diffusers).unwrap();
    for m in wide.modules.values_mut() {
        let values: Vec<f32> = m.down.to_f32_values().into_iter().chain(m.down.to_f32_values()).collect();
        m.down.shape[1] *= 2;
        m.down.data = bytemuck::cast_slice(&values).to_vec();
    }
    let misfit = dir.path().join("wide.safetensors");
    dreambridge::lora::write::write_diffusers(&wide, &misfit).unwrap();
    let first = wide.modules.keys().next().unwrap().1.clone();
    let (ok, err) = run(&["generate", "--model", &p(&dir.path().join("sample")), "--lora", &p(&misfit), "--prompt", "x", "--size", "64", "--steps", "1", "--out", &p(&dir.path().join("none")), "--device", "cpu"]);
    assert!(!ok && err.contains(&first) && err.contains("wide.safetensors"), "{err}");
    assert!(!dir.path().join("none").join("image_0.png").exists());
    let (ok, err) = run(&["lora", "merge", "--base", &p(&dir.path().join("sample")), "--lora", &p(&misfit), "--out", &p(&dir.path().join("merged2"))]);
    assert!(!ok && err.contains(&first), "{err}");
    assert!(!dir.path().join("merged2").exists(), "nothing half-merged is written");
}

#[test]
fn fp16_lora_trains_with_accumulation_and_a_schedule() {
    let dir = tempfile::tempdir().unwrap();
    training_inputs(dir.path());
    let out = dir.path().join("fp16");
    let a = TrainArgs { mixed_precision: "fp16".into(), max_train_steps: Some(3), validation_prompt: None, gradient_accumulation_steps: 2, lr_scheduler: "cosine".into(), ..args(dir.path(), &out) };
    let done = train(&a).unwrap();
    assert!(done.losses.iter().all(|l| l.is_finite()), "{:?}", done.losses);
    let set = read(&out.join("pytorch_lora_weights.safetensors")).unwrap();
    assert!(set.modules.values().any(|m| m.up.to_f32_values().iter().any(|v| *v != 0.0)), "the adapters moved");
}
