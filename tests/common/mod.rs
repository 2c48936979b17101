//! Shared helpers for the integration tests: fixture paths and tensor comparisons.
#![allow(dead_code)]

use dreambridge::diffusers::st_read::StFile;
use dreambridge::keras::KerasFile;
use dreambridge::tensor::RawTensor;
use std::path::{Path, PathBuf};

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
