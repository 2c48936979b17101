//! Many subjects through job arrays: `train --manifest` rows chosen by `--index`,
//! `JOB_COMPLETION_INDEX` or `SLURM_ARRAY_TASK_ID`, idempotent retries (finished rows skipped,
//! interrupted rows resumed), shared class images generated once under a lock, and exit codes that
//! tell retryable failures from permanent ones.

mod common;
use common::hub::{Hub, TOKEN};
use common::*;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

/// One row per subject: both share the class folder `class`.
fn write_manifest(dir: &Path, rows: &[(&str, usize)]) -> std::path::PathBuf {
    let mut text = String::from("# one subject per line\n");
    for (name, steps) in rows {
        let row = serde_json::json!({
            "instance_data_dir": dir.join("instance"),
            "instance_prompt": format!("a photo of {name} dog"),
            "class_data_dir": dir.join("class"),
            "output_dir": dir.join("out").join(name),
            "max_train_steps": steps,
        });
        text += &format!("{row}\n");
    }
    let path = dir.join("jobs.jsonl");
    std::fs::write(&path, text).unwrap();
    path
}

/// `train --manifest` with the flags every row shares.
fn manifest_cmd(dir: &Path, manifest: &Path) -> Command {
    let mut c = cli();
    c.args(["train", "--manifest", manifest.to_str().unwrap(), "--pretrained_model_name_or_path", dir.join("sample").to_str().unwrap()]);
    c.args(["--with_prior_preservation", "--class_prompt=a photo of a dog", "--num_class_images=2", "--resolution=64", "--train_batch_size=1"]);
    c.args(["--sample_steps=2", "--checkpointing_steps=2", "--learning_rate=1e-3", "--report_to=none", "--device=cpu"]);
    c.env_remove("JOB_COMPLETION_INDEX").env_remove("SLURM_ARRAY_TASK_ID");
    c
}

fn output(c: &mut Command) -> (Option<i32>, String) {
    let out = c.output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
}

fn class_images(dir: &Path) -> usize {
    // Every entry counts: the folder holds the images and nothing of ours (diffusers leaves only images there).
    std::fs::read_dir(dir.join("class")).unwrap().count()
}

#[test]
fn every_row_in_turn_then_a_retry_skips_what_is_done() {
    let dir = tempfile::tempdir().unwrap();
    training_inputs(dir.path());
    let manifest = write_manifest(dir.path(), &[("sks", 2), ("zwx", 2)]);
    let (code, err) = output(&mut manifest_cmd(dir.path(), &manifest));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(class_images(dir.path()), 2, "the shared class images are generated once");
    assert_eq!(err.matches("generating 2 class images").count(), 1, "{err}");
    for name in ["sks", "zwx"] {
        let out = dir.path().join("out").join(name);
        assert!(out.join("model_index.json").is_file() && out.join(".dreambridge-done.json").is_file());
    }
    let card = std::fs::read_to_string(dir.path().join("out/zwx/README.md")).unwrap();
    assert!(card.contains("a photo of zwx dog"), "each row's own prompt");
    let weights = dir.path().join("out/sks/unet/diffusion_pytorch_model.safetensors");
    let before = std::fs::metadata(&weights).unwrap().modified().unwrap();
    let (code, err) = output(&mut manifest_cmd(dir.path(), &manifest));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(err.matches("already done, skipped").count(), 2, "{err}");
    assert_eq!(std::fs::metadata(&weights).unwrap().modified().unwrap(), before, "nothing retrained");
}

#[test]
fn array_jobs_pick_their_row_and_share_class_images_safely() {
    let dir = tempfile::tempdir().unwrap();
    training_inputs(dir.path());
    let manifest = write_manifest(dir.path(), &[("sks", 2), ("zwx", 2)]);
    // Two jobs of one array at once: a Kubernetes Indexed Job pod and a Slurm array task.
    let a = manifest_cmd(dir.path(), &manifest).env("JOB_COMPLETION_INDEX", "0").stderr(Stdio::piped()).spawn().unwrap();
    let b = manifest_cmd(dir.path(), &manifest).env("SLURM_ARRAY_TASK_ID", "1").stderr(Stdio::piped()).spawn().unwrap();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let (ea, eb) = (String::from_utf8_lossy(&a.stderr), String::from_utf8_lossy(&b.stderr));
    assert!(a.status.success() && b.status.success(), "{ea}\n{eb}");
    assert!(ea.contains("row 0 (JOB_COMPLETION_INDEX)") && eb.contains("row 1 (SLURM_ARRAY_TASK_ID)"), "{ea}\n{eb}");
    assert_eq!(class_images(dir.path()), 2, "one job generated the class images, the other used them");
    assert!(dir.path().join("out/sks/model_index.json").is_file() && dir.path().join("out/zwx/model_index.json").is_file());
    // Contradicting indexes are refused.
    let (code, err) = output(manifest_cmd(dir.path(), &manifest).args(["--index", "0"]).env("JOB_COMPLETION_INDEX", "1"));
    assert_eq!(code, Some(1));
    assert!(err.contains("--index says 0 but JOB_COMPLETION_INDEX says 1"), "{err}");
    let (code, err) = output(manifest_cmd(dir.path(), &manifest).args(["--index", "5"]));
    assert!(code == Some(1) && err.contains("has 2 rows"), "{err}");
}

#[test]
fn a_preempted_row_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    training_inputs(dir.path());
    let manifest = write_manifest(dir.path(), &[("sks", 8)]);
    let mut child = manifest_cmd(dir.path(), &manifest).arg("--index=0").stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().starts_with("step 3/8") {
            break;
        }
    }
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert_eq!(child.wait().unwrap().code(), Some(143), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("rerun the same command")), "{rest:?}");
    assert!(!dir.path().join("out/sks/.dreambridge-done.json").exists());
    let (code, err) = output(manifest_cmd(dir.path(), &manifest).arg("--index=0"));
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("resuming from the latest") && err.contains("resumed at step"), "{err}");
    assert!(!err.contains("step 1/8"), "the resumed run starts after the checkpoint: {err}");
    assert!(dir.path().join("out/sks/.dreambridge-done.json").is_file());
}

#[test]
fn exit_codes_tell_retryable_failures_from_permanent_ones() {
    let dir = tempfile::tempdir().unwrap();
    training_inputs(dir.path());
    // A row whose instance folder does not exist: bad input, exit 1, the line named.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, format!("{}\n", serde_json::json!({"instance_data_dir": dir.path().join("nowhere"), "instance_prompt": "a", "class_data_dir": dir.path().join("class"), "output_dir": dir.path().join("o1")}))).unwrap();
    let (code, err) = output(&mut manifest_cmd(dir.path(), &bad));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("failed (permanent)") && err.contains("bad.jsonl line 1") && err.contains("nowhere"), "{err}");
    // The Hub answering 503 to every try: retryable, exit 75.
    let hub = Hub::start();
    hub.faults(serde_json::json!({"rules": [{"path_contains": "/api/repos/create", "action": "status", "status": 503, "count": 100}]}));
    let hubbed = dir.path().join("hub.jsonl");
    let row = serde_json::json!({"instance_data_dir": dir.path().join("instance"), "instance_prompt": "a", "class_data_dir": dir.path().join("class"), "output_dir": dir.path().join("o2"), "push_to_hub": true, "max_train_steps": 1});
    std::fs::write(&hubbed, format!("{row}\n")).unwrap();
    let (code, err) = output(manifest_cmd(dir.path(), &hubbed).env("HF_ENDPOINT", &hub.url).env("HF_TOKEN", TOKEN));
    assert_eq!(code, Some(75), "{err}");
    assert!(err.contains("failed (retryable)"), "{err}");
}

#[test]
fn conversions_run_from_a_manifest_and_skip_what_exists() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("convert.jsonl");
    let rows: Vec<String> = ["a", "b"]
        .iter()
        .map(|n| serde_json::json!({"command": "keras-to-diffusers", "unet": fixture("unet_sd1.h5"), "text_encoder": fixture("text_encoder_sd1.h5"), "out": dir.path().join(n)}).to_string())
        .collect();
    std::fs::write(&manifest, rows.join("\n")).unwrap();
    let (ok, err) = run(&["convert", "--manifest", manifest.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(dir.path().join("a/unet/diffusion_pytorch_model.safetensors").is_file() && dir.path().join("b/text_encoder/model.safetensors").is_file());
    let (ok, err) = run(&["convert", "--manifest", manifest.to_str().unwrap(), "--index", "1"]);
    assert!(ok && err.contains("row 1 (line 2): already done"), "{err}");
}
