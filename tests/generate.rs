//! `dreambridge generate`: text-to-image with our Candle models on a converted pipeline.

mod common;
use common::*;

#[test]
fn generate_renders_pngs_from_a_converted_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = dir.path().join("sample");
    let (ok, err) = run(&["convert", "keras-to-diffusers", "--out", pipe.to_str().unwrap()]);
    assert!(ok, "{err}");
    let out = dir.path().join("images");
    let (ok, err) = run(&["generate", "--model", pipe.to_str().unwrap(), "--prompt", "a photo of sks dog", "--size", "64", "--steps", "3", "--num-images", "2", "--out", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    for i in 0..2 {
        let img = image::open(out.join(format!("image_{i}.png"))).unwrap();
        assert_eq!((img.width(), img.height()), (64, 64));
    }
    let a = std::fs::read(out.join("image_0.png")).unwrap();
    let b = std::fs::read(out.join("image_1.png")).unwrap();
    assert_ne!(a, b, "two draws from the seeded noise differ");
    let (ok, err) = run(&["generate", "--model", pipe.to_str().unwrap(), "--prompt", "x", "--size", "64", "--steps", "1", "--out", out.to_str().unwrap()]);
    assert!(!ok && err.contains("already exists"), "{err}");
}

#[test]
fn every_sampler_renders_and_they_differ() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = dir.path().join("sample");
    let (ok, err) = run(&["convert", "keras-to-diffusers", "--out", pipe.to_str().unwrap()]);
    assert!(ok, "{err}");
    let mut images = Vec::new();
    for (i, scheduler) in ["DDIMScheduler", "DPMSolverMultistepScheduler", "euler_a"].iter().enumerate() {
        let out = dir.path().join(format!("images{i}"));
        let (ok, err) = run(&[
            "generate", "--model", pipe.to_str().unwrap(), "--prompt", "a photo of sks dog", "--size", "64", "--steps", "4", "--scheduler", scheduler,
            "--out", out.to_str().unwrap(),
        ]);
        assert!(ok, "{scheduler}: {err}");
        images.push(image::open(out.join("image_0.png")).unwrap().to_rgb8().into_raw());
    }
    assert!(images[0] != images[1] && images[1] != images[2], "the samplers take different paths");
    let (ok, err) = run(&["generate", "--model", pipe.to_str().unwrap(), "--prompt", "x", "--scheduler", "PNDM", "--out", dir.path().join("x").to_str().unwrap()]);
    assert!(!ok && err.contains("DPMSolverMultistepScheduler"), "{err}");
}
