//! Shared helpers for the integration tests: fixture paths and tensor comparisons.
#![allow(dead_code)]

use dreambridge::diffusers::st_read::StFile;
use dreambridge::keras::KerasFile;
use dreambridge::tensor::RawTensor;
use std::path::{Path, PathBuf};

pub mod hub;
pub mod sdxl;
pub mod tiny;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny").join(name)
}

/// Every tensor of a legacy Keras file, in layer_names / weight_names order.
pub fn keras_tensors(path: &Path) -> Vec<RawTensor> {
    let f = KerasFile::open(path).unwrap();
    f.layers.iter().flat_map(|l| l.weights.iter()).map(|w| f.read(w).unwrap()).collect()
}

/// Every tensor of a safetensors file, by key.
pub fn st_tensors(path: &Path) -> Vec<(String, RawTensor)> {
    let f = StFile::open(path).unwrap();
    f.keys().into_iter().map(|k| (k.clone(), f.read(&k).unwrap())).collect()
}

pub fn f32_at(t: &RawTensor, index: usize) -> f32 {
    f32::from_le_bytes(t.data[index * 4..index * 4 + 4].try_into().unwrap())
}

/// For tests that open HDF5 files in-process while other tests spawn CLI children: a child
/// inherits libhdf5's descriptors (opened without O_CLOEXEC) and with them the lock on a file this
/// process is writing, so a later open here would fail with EAGAIN. Locking is off for this
/// process too (libhdf5 reads the variable at every open); the files are private to each test.
pub fn no_hdf5_locks() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var("HDF5_USE_FILE_LOCKING", "FALSE"));
}

/// The CLI, as a command. libhdf5 opens files without O_CLOEXEC, so a child spawned by one test
/// can inherit (and keep locked) an HDF5 file another test thread is writing; HDF5's advisory
/// locking is therefore off for these children.
pub fn cli() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_dreambridge"));
    c.env("HDF5_USE_FILE_LOCKING", "FALSE");
    c
}

/// Runs the CLI; (success, stderr).
pub fn run(args: &[&str]) -> (bool, String) {
    let out = cli().args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
}

/// Two small instance images (80x64, tinted gradients) in `dir`.
pub fn instance_images(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (i, tint) in [[220u8, 120, 40], [40, 160, 220]].iter().enumerate() {
        let img = image::RgbImage::from_fn(80, 64, |x, y| image::Rgb([tint[0].saturating_sub((x / 2) as u8), tint[1], tint[2].saturating_sub(y as u8)]));
        img.save(dir.join(format!("dog_{i}.png"))).unwrap();
    }
}

/// The embedded tiny SD1 sample as a diffusers folder at `dir/sample`, and instance images at
/// `dir/instance`.
pub fn training_inputs(dir: &Path) {
    let (ok, err) = run(&["convert", "keras-to-diffusers", "--out", dir.join("sample").to_str().unwrap()]);
    assert!(ok, "{err}");
    instance_images(&dir.join("instance"));
}

/// The UNet weights of a trained pipeline folder, by key.
pub fn unet_weights(pipeline: &Path) -> Vec<(String, RawTensor)> {
    st_tensors(&pipeline.join("unet/diffusion_pytorch_model.safetensors"))
}

/// A tiny full-fine-tuning run of the sample (`dir/sample`) on `dir/instance`, with prior
/// preservation (class images generated into `dir/class`), 40 steps, checkpoints at 20.
pub fn tiny_train_args(dir: &Path, out: &Path) -> dreambridge::train::command::TrainArgs {
    dreambridge::train::command::TrainArgs {
        pretrained_model: dir.join("sample"),
        instance_data_dir: dir.join("instance"),
        instance_prompt: "a photo of sks dog".into(),
        class_data_dir: Some(dir.join("class")),
        class_prompt: Some("a photo of a dog".into()),
        with_prior_preservation: true,
        prior_loss_weight: 1.0,
        num_class_images: 2,
        resolution: 64,
        center_crop: false,
        random_flip: true,
        train_batch_size: 1,
        max_train_steps: Some(40),
        gradient_accumulation_steps: 1,
        learning_rate: 2e-3,
        lr_scheduler: "constant".into(),
        lr_warmup_steps: 0,
        max_grad_norm: 1.0,
        adam_weight_decay: 1e-2,
        snr_gamma: None,
        noise_offset: 0.0,
        seed: 3,
        checkpointing_steps: 20,
        checkpoints_total_limit: Some(1),
        resume_from_checkpoint: None,
        validation_prompt: Some("a photo of sks dog".into()),
        validation_steps: 40,
        num_validation_images: 1,
        sample_steps: 2,
        output_dir: out.to_owned(),
        force: false,
        mixed_precision: "no".into(),
        train_text_encoder: false,
        device: "cpu".into(),
        allow_tf32: false,
        gradient_checkpointing: false,
        stop: Default::default(),
        lora: None,
        save_single_file: false,
        validation_eval: None,
        validation_scheduler: Default::default(),
        ..Default::default()
    }
}
