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

/// Every subcommand below `path` (leaves and the commands with options of their own).
fn commands(path: Vec<String>) -> Vec<Vec<String>> {
    let out = cli().args(&path).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout).to_string();
    let mut all = vec![path.clone()];
    if let Some(list) = help.split("Commands:").nth(1) {
        for line in list.split("Options:").next().unwrap().lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if line.starts_with("  ") && !line.starts_with("   ") && !name.is_empty() && name != "help" {
                all.extend(commands(path.iter().cloned().chain([name.to_string()]).collect()));
            }
        }
    }
    all
}

#[test]
fn every_flag_of_every_command_has_help_text() {
    let mut missing = Vec::new();
    let all = commands(Vec::new());
    assert!(all.iter().any(|c| c == &["train-lora"]) && all.iter().any(|c| c == &["convert", "single-file-to-keras"]), "{all:?}");
    for path in all {
        let out = cli().args(&path).arg("--help").output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout).to_string();
        let Some(options) = help.split("Options:").nth(1) else { continue };
        // One block per flag: its line, then its description lines.
        let mut blocks: Vec<Vec<&str>> = Vec::new();
        for line in options.lines() {
            let t = line.trim_start();
            if (t.starts_with("--") || (t.starts_with('-') && t.chars().nth(2) == Some(','))) && line.len() - t.len() <= 6 {
                blocks.push(vec![line]);
            } else if let Some(b) = blocks.last_mut() {
                b.push(line);
            }
        }
        for b in blocks {
            let head = b[0].trim();
            if head.contains("--help") || head.contains("--version") {
                continue;
            }
            // Text after the flag and its value name on the same line, or on the lines below.
            let inline = head.split("  ").skip(1).map(str::trim).find(|t| !t.is_empty() && !t.starts_with('['));
            let below = b[1..].iter().map(|l| l.trim()).find(|l| !l.is_empty() && !l.starts_with('[') && !l.starts_with("Possible values") && !l.starts_with("- "));
            if inline.is_none() && below.is_none() {
                missing.push(format!("{}: {head}", path.join(" ")));
            }
        }
    }
    assert!(missing.is_empty(), "flags without help text:\n{}", missing.join("\n"));
}
