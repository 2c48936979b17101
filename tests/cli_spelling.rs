//! Flags in diffusers' spelling (`--pretrained_model_name_or_path=X`) work as written.

mod common;
use common::*;

#[test]
fn underscore_flags_and_equals_values_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    training_inputs(dir.path());
    let out = dir.path().join("run");
    let (ok, err) = run(&[
        "train",
        &format!("--pretrained_model_name_or_path={}", dir.path().join("sample").display()),
        &format!("--instance_data_dir={}", dir.path().join("instance").display()),
        "--instance_prompt=a photo of sks dog",
        "--resolution=64",
        "--train_batch_size=1",
        "--max_train_steps=2",
        "--learning_rate=5e-6",
        "--lr_scheduler=constant",
        "--lr_warmup_steps=0",
        "--sample_steps=1",
        "--enable_xformers_memory_efficient_attention",
        "--validation_prompt=a photo of sks dog",
        "--validation_steps=2",
        "--validation_scheduler=DPMSolverMultistepScheduler",
        "--output_dir",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.join("model_index.json").is_file() && out.join("validation/step_2_0.png").is_file());
    assert!(err.contains("note: --enable_xformers_memory_efficient_attention: not needed"), "{err}");
    // DeepFloyd IF's flags are refused by name.
    let (ok, err) = run(&["train", "--pretrained_model_name_or_path=x", "--instance_data_dir=y", "--instance_prompt=z", "--output_dir=o", "--class_labels_conditioning=timesteps"]);
    assert!(!ok && err.contains("not supported for Stable Diffusion"), "{err}");
    // Only names are rewritten: a value with underscores stays as given.
    let images = dir.path().join("images_with_underscores");
    let (ok, err) = run(&[
        "generate", "--model", dir.path().join("sample").to_str().unwrap(), "--prompt=a_b c", "--height=64", "--width=64", "--num_inference_steps=1",
        "--num_images_per_prompt=2", "--negative_prompt=blurry", &format!("--out={}", images.display()),
    ]);
    assert!(ok, "{err}");
    assert!(images.join("image_1.png").is_file());
    assert_eq!(image::open(images.join("image_0.png")).unwrap().width(), 64);
    let (ok, err) = run(&["generate", "--model", "m", "--prompt", "p", "--height=64", "--width=128", "--out", images.to_str().unwrap()]);
    assert!(!ok && err.contains("only square"), "{err}");
}
