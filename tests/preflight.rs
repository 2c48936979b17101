//! `train` checks its command line before it loads, generates or writes anything, and treats
//! `--resume_from_checkpoint latest` with no checkpoint yet as diffusers does: a fresh run.

mod common;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use common::*;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Records the name and shape of every weight a model asks for, handing out a zero-sized view
/// (a broadcast scalar), so a full-size model's tensor list costs no memory.
type Named = Vec<(String, Vec<usize>)>;

#[derive(Clone, Default)]
struct Shapes(Arc<Mutex<Named>>);

impl SimpleBackend for Shapes {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.lock().unwrap().push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: no shape given")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// A safetensors file with these f32 tensors whose data is a hole: the full size on paper, no
/// bytes on disk.
fn sparse_safetensors(path: &Path, tensors: &[(String, Vec<usize>)]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, shape) in tensors {
        let len = 4 * shape.iter().product::<usize>() as u64;
        header.insert(name.clone(), serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len]}));
        offset += len;
    }
    let mut json = serde_json::to_string(&header).unwrap();
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json.as_bytes());
    std::fs::write(path, &bytes).unwrap();
    std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(bytes.len() as u64 + offset).unwrap();
}

/// A diffusers folder with Stable Diffusion 1.5's configs and weight files of its full size
/// (4.3 GB, sparse): the tiny sample's tokenizer and scheduler, SD 1.5's shapes everywhere else.
fn full_size_shaped(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("sd15-shaped");
    let (ok, err) = run(&["convert", "keras-to-diffusers", "--out", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    use dreambridge::bench::sd15;
    type Build = fn(candle_nn::VarBuilder) -> anyhow::Result<()>;
    let parts: [(&str, &str, &str, &str, Build); 3] = [
        ("unet", sd15::UNET, "diffusion_pytorch_model.safetensors", "", |vb| dreambridge::models::unet::UNet::new(vb, &sd15::unet()?).map(drop).map_err(Into::into)),
        ("text_encoder", sd15::TEXT_ENCODER, "model.safetensors", "text_model.", |vb| {
            dreambridge::models::clip::ClipTextModel::new(vb, &sd15::text_encoder()?).map(drop).map_err(Into::into)
        }),
        ("vae", sd15::VAE, "diffusion_pytorch_model.safetensors", "", |vb| dreambridge::models::vae::Vae::new(vb, &sd15::vae()?).map(drop).map_err(Into::into)),
    ];
    let mut total = 0;
    for (folder, config, file, prefix, build) in parts {
        let shapes = Shapes::default();
        build(candle_nn::VarBuilder::from_backend(Box::new(shapes.clone()), DType::F32, Device::Cpu)).unwrap();
        let mut tensors: Vec<(String, Vec<usize>)> = shapes.0.lock().unwrap().iter().map(|(n, s)| (format!("{prefix}{n}"), s.clone())).collect();
        tensors.sort();
        tensors.dedup();
        total += tensors.iter().map(|(_, s)| 4 * s.iter().product::<usize>()).sum::<usize>();
        std::fs::write(out.join(folder).join("config.json"), config).unwrap();
        sparse_safetensors(&out.join(folder).join(file), &tensors);
    }
    assert!(total > 4_000_000_000, "SD 1.5 holds over a billion f32 parameters, not {total} bytes");
    out
}

#[test]
fn a_bad_combination_fails_in_well_under_a_second_on_a_full_size_folder() {
    let dir = tempfile::tempdir().unwrap();
    let base = full_size_shaped(dir.path());
    instance_images(&dir.path().join("instance"));
    let (class, out) = (dir.path().join("class"), dir.path().join("out"));
    let bad: [(&[&str], &str); 4] = [
        // The reported case: bf16 on a CPU-only build, with class images still to generate.
        (&["--mixed_precision", "bf16"], "bf16 needs a CUDA build"),
        (&["--mixed_precision", "bf16", "--train_text_encoder", "--pre_compute_text_embeddings"], "--pre_compute_text_embeddings"),
        (&["--resume_from_checkpoint", "checkpoint-500"], "no such checkpoint"),
        (&["--lr_scheduler", "linear_warmdown"], "linear_warmdown"),
    ];
    for (flags, says) in bad {
        let mut args = vec![
            "train",
            "--pretrained_model_name_or_path",
            base.to_str().unwrap(),
            "--instance_data_dir",
            dir.path().join("instance").to_str().unwrap(),
            "--instance_prompt",
            "a photo of sks dog",
            "--with_prior_preservation",
            "--class_data_dir",
            class.to_str().unwrap(),
            "--class_prompt",
            "a photo of a dog",
            "--output_dir",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        args.extend(flags.iter().map(|f| f.to_string()));
        let started = std::time::Instant::now();
        let done = cli().args(&args).output().unwrap();
        let took = started.elapsed();
        let err = String::from_utf8_lossy(&done.stderr);
        let last = err.trim().lines().last().unwrap_or_default();
        assert!(!done.status.success() && last.starts_with("error: ") && last.contains(says), "{flags:?}: {err}");
        // Loading this folder alone takes seconds, generating a class image with it minutes.
        assert!(took.as_secs_f64() < 1.0, "{flags:?}: failed after {took:?}, not before the model was loaded");
        assert!(!class.exists() && !out.exists(), "{flags:?}: wrote before failing");
    }
}

#[test]
fn resume_from_latest_on_a_fresh_run_starts_training_as_diffusers_does() {
    let dir = tempfile::tempdir().unwrap();
    training_inputs(dir.path());
    let out = dir.path().join("out");
    let train = |steps: &str, resume: &str| {
        let done = cli()
            .args(["train", "--pretrained_model_name_or_path", dir.path().join("sample").to_str().unwrap()])
            .args(["--instance_data_dir", dir.path().join("instance").to_str().unwrap(), "--instance_prompt", "a photo of sks dog"])
            .args(["--resolution", "64", "--train_batch_size", "1", "--max_train_steps", steps, "--checkpointing_steps", "1", "--device", "cpu"])
            .args(["--output_dir", out.to_str().unwrap(), "--resume_from_checkpoint", resume])
            .output()
            .unwrap();
        (done.status.success(), String::from_utf8_lossy(&done.stderr).to_string())
    };
    // A named checkpoint that does not exist stays an error, and nothing is written.
    let (ok, err) = train("2", "checkpoint-1");
    assert!(!ok && err.contains("checkpoint-1") && !out.exists(), "{err}");
    // `latest` with none yet: a new run, with diffusers' words.
    let (ok, err) = train("2", "latest");
    assert!(ok && err.contains("Checkpoint 'latest' does not exist. Starting a new training run."), "{err}");
    assert!(out.join("checkpoint-2/state.json").is_file() && out.join("model_index.json").is_file(), "{err}");
    // The next start finds it, by `latest` and by diffusers' spelling of a name in the output folder.
    let (ok, err) = train("3", "latest");
    assert!(ok && err.contains("Resuming from checkpoint checkpoint-2") && err.contains("resumed at step 2"), "{err}");
    let (ok, err) = train("4", "checkpoint-3");
    assert!(ok && err.contains("resumed at step 3"), "{err}");
}
