//! Nothing lost, ever: `dreambridge train` stopped by signals, a training run that diverges to NaN,
//! and conversions and training that run out of disk space.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

/// `dreambridge train` flags for a tiny prior-preservation run of `steps` steps into `out`
/// (the class folder `class` starts empty, so class images are generated).
fn train_flags(dir: &Path, out: &str, class: &str, steps: usize, checkpointing: usize) -> Vec<String> {
    let d = |p: &str| dir.join(p).to_string_lossy().to_string();
    #[rustfmt::skip]
    let flags = [
        "train", "--pretrained-model-name-or-path", &d("sample"), "--instance-data-dir", &d("instance"),
        "--instance-prompt", "a photo of sks dog", "--with-prior-preservation", "--class-data-dir", &d(class),
        "--class-prompt", "a photo of a dog", "--num-class-images", "2", "--resolution", "64", "--random-flip",
        "--max-train-steps", &steps.to_string(), "--learning-rate", "1e-3", "--checkpointing-steps", &checkpointing.to_string(),
        "--sample-steps", "2", "--seed", "5", "--output-dir", &d(out), "--device", "cpu",
    ];
    flags.iter().map(|s| s.to_string()).collect()
}

/// Starts `train`, reading its stderr; returns the child once a line starting with `wait_for` came.
fn start_until(args: &[String], wait_for: &str) -> (Child, Vec<String>, std::thread::JoinHandle<Vec<String>>) {
    let mut child = cli().args(args).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let hit = line.starts_with(wait_for);
        seen.push(line);
        if hit {
            let rest = std::thread::spawn(move || lines.map(|l| l.unwrap()).collect());
            return (child, seen, rest);
        }
    }
    panic!("train ended before `{wait_for}`: {seen:#?}");
}

fn signal(child: &Child, sig: i32) {
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

#[test]
fn sigterm_checkpoints_the_step_and_the_resumed_run_ends_where_an_uninterrupted_one_does() {
    let dir = tempfile::tempdir().unwrap();
    training_inputs(dir.path());
    // Checkpoints only at the end: what survives the signal is the checkpoint it makes.
    let (ok, err) = run(&train_flags(dir.path(), "whole", "class-whole", 12, 100).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");

    let flags = train_flags(dir.path(), "cut", "class-cut", 12, 100);
    let (mut child, _, rest) = start_until(&flags, "step 2/12");
    signal(&child, libc::SIGTERM);
    let status = child.wait().unwrap();
    let stderr = rest.join().unwrap().join("\n");
    assert_eq!(status.code(), Some(143), "exit 128 + SIGTERM: {stderr}");
    let saved: Vec<String> = std::fs::read_dir(dir.path().join("cut"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n != "logs") // the run's metrics log, kept as it goes
        .collect();
    assert_eq!(saved.len(), 1, "one checkpoint and nothing else: {saved:?}");
    let step: usize = saved[0].strip_prefix("checkpoint-").unwrap().parse().unwrap();
    assert!((2..12).contains(&step), "the signal came during step 2 or 3, not at the end: {step}");
    assert!(stderr.contains(&format!("interrupted by SIGTERM after step {step}")), "{stderr}");
    let resume_line = stderr.lines().find(|l| l.starts_with("resume with: ")).unwrap_or_else(|| panic!("no resume command: {stderr}"));
    assert!(resume_line.ends_with("--resume-from-checkpoint latest") && resume_line.contains("--max-train-steps 12"), "{resume_line}");

    let mut again = flags.clone();
    again.extend(["--resume-from-checkpoint".into(), "latest".into()]);
    let (ok, err) = run(&again.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    assert!(err.contains(&format!("resumed at step {step}")), "{err}");
    assert!(unet_weights(&dir.path().join("cut")) == unet_weights(&dir.path().join("whole")), "interrupted + resumed differs from uninterrupted");
}

#[test]
fn a_second_signal_exits_at_once_and_the_last_checkpoint_stays_good() {
    let dir = tempfile::tempdir().unwrap();
    training_inputs(dir.path());
    let (mut child, _, rest) = start_until(&train_flags(dir.path(), "out", "class", 400, 1), "step 3/400");
    signal(&child, libc::SIGINT);
    std::thread::sleep(Duration::from_millis(30)); // two signals at once would merge into one
    signal(&child, libc::SIGINT);
    let since = Instant::now();
    let status = child.wait().unwrap();
    let stderr = rest.join().unwrap().join("\n");
    assert_eq!(status.code(), Some(130), "exit 128 + SIGINT: {stderr}");
    assert!(since.elapsed() < Duration::from_secs(5), "the second signal did not end the process at once");
    let latest = dreambridge::train::checkpoint::load(&dir.path().join("out"), "latest").expect("the last good checkpoint loads");
    // "step 3/400" is printed before step 3's checkpoint is written; the second signal may land
    // while it is: then step 2's is the last good one, and it must load.
    assert!(latest.2.step >= 2, "{:?}", latest.2);
    assert!(!dir.path().join("out/model_index.json").exists());
}

#[test]
fn a_diverging_run_stops_with_the_step_named_and_writes_no_weights() {
    let dir = tempfile::tempdir().unwrap();
    training_inputs(dir.path());
    let mut flags = train_flags(dir.path(), "out", "class", 10, 1);
    // A learning rate this large moves every weight by ~1e30 in step 1; step 2 overflows to NaN.
    let lr = flags.iter().position(|f| f == "--learning-rate").unwrap();
    flags[lr + 1] = "1e30".into();
    let out = cli().args(&flags).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let error = stderr.lines().find(|l| l.starts_with("error: ")).unwrap();
    assert!(error.starts_with("error: step 2: the loss is NaN") && error.contains("checkpoint-1"), "{error}");
    let kept = dreambridge::train::checkpoint::list(&dir.path().join("out")).unwrap();
    assert_eq!(kept.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![1], "the last good checkpoint is kept, none after it");
    assert!(!dir.path().join("out/model_index.json").exists() && !dir.path().join("out/unet").exists(), "no weights in the output");
}

/// Runs the CLI with `target` on a disk of `bytes`: a tmpfs mounted in a private mount namespace
/// when `unshare` can make one, else a file-size limit (RLIMIT_FSIZE), which fails writes the
/// same way with EFBIG. Returns the output, what `target` holds afterwards, and the expected
/// OS error text.
fn on_small_disk(target: &Path, bytes: u64, args: &[&str]) -> (Output, Vec<String>, &'static str) {
    std::fs::create_dir_all(target).unwrap();
    let script = r#"mount -t tmpfs -o size=$1 tmpfs "$2" || exit 97; t=$2; shift 2; "$@"; rc=$?; echo "--- listing"; find "$t" -mindepth 1; exit $rc"#;
    let mounted = std::process::Command::new("unshare")
        .args(["-rm", "sh", "-c", script, "sh", &bytes.to_string(), target.to_str().unwrap(), env!("CARGO_BIN_EXE_dreambridge")])
        .args(args)
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .output();
    if let Some(out) = mounted.ok().filter(|o| o.status.code() != Some(97) && String::from_utf8_lossy(&o.stdout).contains("--- listing")) {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let listing = stdout.split("--- listing\n").nth(1).unwrap().lines().map(str::to_string).collect();
        return (out, listing, "No space left on device");
    }
    eprintln!("no tmpfs could be mounted here; limiting the file size instead");
    let mut c = cli();
    c.args(args);
    unsafe {
        c.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
        });
    }
    let out = c.output().unwrap();
    let listing = walk(target);
    (out, listing, "File too large")
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        out.push(e.path().to_string_lossy().to_string());
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        }
    }
    out
}

/// The one `error:` line of a failed run.
fn error_line(out: &Output) -> String {
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
    assert!(stderr.trim_end().ends_with(errors[0]), "the error is the last thing said: {stderr}");
    eprintln!("{}", errors[0]);
    errors[0].to_string()
}

#[test]
fn a_full_disk_names_the_file_and_the_output_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    // keras -> diffusers: the 1.4 MB UNet does not fit in 1 MiB.
    let out = disk.join("pipe");
    let (unet, text) = (fixture("unet_sd1.h5"), fixture("text_encoder_sd1.h5"));
    let args = ["convert", "keras-to-diffusers", "--unet", unet.to_str().unwrap(), "--text-encoder", text.to_str().unwrap(), "--out", out.to_str().unwrap()];
    let (result, left, reason) = on_small_disk(&disk, 1 << 20, &args);
    let error = error_line(&result);
    let file = out.join("unet/diffusion_pytorch_model.safetensors");
    assert!(error.contains(&format!("{}: cannot write: {reason}", file.display())), "{error}");
    assert!(error.contains(&format!("output {} not created", out.display())), "{error}");
    assert!(left.is_empty(), "nothing is left behind: {left:?}");

    // diffusers -> keras: HDF5 reports the failure in several lines, naming the staging file.
    let model = dir.path().join("model");
    assert!(run(&["convert", "keras-to-diffusers", "--out", model.to_str().unwrap()]).0);
    let out = disk.join("keras");
    let args = ["convert", "diffusers-to-keras", "--model", model.to_str().unwrap(), "--out", out.to_str().unwrap()];
    let (result, left, reason) = on_small_disk(&disk, 1 << 20, &args);
    let error = error_line(&result);
    assert!(error.contains(&format!("{}: writing from", out.join("diffusion_model.h5").display())) && error.contains(reason), "{error}");
    assert!(!error.contains("dreambridge-tmp"), "the staging name is not shown: {error}");
    assert!(left.is_empty(), "nothing is left behind: {left:?}");
}

#[test]
fn a_full_disk_during_training_keeps_the_checkpoints_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    training_inputs(dir.path());
    let disk = dir.path().join("disk");
    let flags = train_flags(dir.path(), "disk/out", "class", 4, 2);
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    // The checkpoint's weights (1.4 MB) do not fit.
    let (result, left, reason) = on_small_disk(&disk, 1 << 20, &args);
    let error = error_line(&result);
    let weights = disk.join("out/checkpoint-2/weights.safetensors");
    assert!(error.contains(&format!("checkpoint-2 not saved: {}: cannot write", weights.display())) && error.contains(reason), "{error}");
    assert!(left.iter().all(|p| !p.contains("checkpoint")), "no half-written checkpoint: {left:?}");

    // No checkpoint due: the trained pipeline is what does not fit.
    let flags = train_flags(dir.path(), "disk/out", "class", 2, 100);
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (result, left, reason) = on_small_disk(&disk, 1 << 20, &args);
    let error = error_line(&result);
    let out = disk.join("out");
    assert!(error.contains(&format!("{}/", out.display())) && error.contains(reason), "{error}");
    assert!(error.ends_with(&format!("the trained pipeline was not written to {} (its checkpoints are kept)", out.display())), "{error}");
    assert!(!error.contains(".pipeline-tmp"), "{error}");
    assert!(left.iter().all(|p| !p.contains(".pipeline-tmp") && !p.ends_with("model_index.json")), "{left:?}");
}
