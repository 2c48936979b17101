//! One model trained by several processes, as torchrun or srun launch them: ranks from the
//! launcher's variables, joined over the CPU (TCP) backend. Two ranks of batch 1 train the same
//! model as one process of batch 2; only rank 0 writes; a run resumed on a different number of
//! ranks continues the same stream of batches.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `train` as every rank of a launch runs it (the same flags), `steps` steps of `batch`.
fn train_cmd(dir: &Path, out: &Path, batch: usize, steps: usize) -> Command {
    let mut c = cli();
    c.args(["train", "--pretrained_model_name_or_path", dir.join("sample").to_str().unwrap(), "--instance_data_dir", dir.join("instance").to_str().unwrap()]);
    // Adam divides each gradient by its running size, so a weight whose gradient is at rounding
    // level (sums in another order differ there) moves by up to the learning rate either way; a
    // larger epsilon keeps such weights still, leaving the comparison to the gradients that matter.
    c.args(["--instance_prompt=a photo of sks dog", "--with_prior_preservation", "--class_prompt=a photo of a dog", "--class_data_dir", dir.join("class").to_str().unwrap()]);
    c.args(["--num_class_images=2", "--resolution=64", "--sample_steps=2", "--learning_rate=1e-3", "--lr_warmup_steps=0", "--adam_epsilon=1e-4", "--report_to=none", "--device=cpu", "--seed=5"]);
    c.args(["--checkpointing_steps=2", "--validation_prompt=a photo of sks dog", "--validation_steps=2", "--num_validation_images=1"]);
    c.arg(format!("--train_batch_size={batch}")).arg(format!("--max_train_steps={steps}")).arg("--output_dir").arg(out);
    for v in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"] {
        c.env_remove(v);
    }
    c
}

/// Runs `world` ranks at once (torchrun's variables), rank `r` writing to `outs[r]`; returns
/// each rank's stderr.
fn launch(dir: &Path, outs: &[PathBuf], batch: usize, steps: usize, extra: &[&str]) -> Vec<String> {
    let port = free_port();
    let children: Vec<_> = outs
        .iter()
        .enumerate()
        .map(|(rank, out)| {
            let mut c = train_cmd(dir, out, batch, steps);
            c.args(extra).env("RANK", rank.to_string()).env("LOCAL_RANK", rank.to_string()).env("WORLD_SIZE", outs.len().to_string());
            c.env("MASTER_ADDR", "127.0.0.1").arg(format!("--dist-port={port}"));
            c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap()
        })
        .collect();
    children
        .into_iter()
        .enumerate()
        .map(|(rank, child)| {
            let out = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "rank {rank}:\n{err}");
            err
        })
        .collect()
}

/// The largest difference between two UNets, relative to the largest weight change training made.
fn relative_difference(a: &Path, b: &Path, base: &Path) -> (f32, f32) {
    let (a, b, base) = (unet_weights(a), unet_weights(b), unet_weights(base));
    let (mut diff, mut moved) = (0f32, 0f32);
    for (((ka, ta), (kb, tb)), (_, t0)) in a.iter().zip(&b).zip(&base) {
        assert_eq!(ka, kb);
        for i in 0..ta.data.len() / 4 {
            diff = diff.max((f32_at(ta, i) - f32_at(tb, i)).abs());
            moved = moved.max((f32_at(ta, i) - f32_at(t0, i)).abs());
        }
    }
    (diff / moved, moved)
}

#[test]
fn two_ranks_of_batch_one_train_what_one_process_of_batch_two_does() {
    let dir = tempfile::tempdir().unwrap();
    training_inputs(dir.path());
    let d = dir.path();
    let (one, zero, other) = (d.join("one"), d.join("rank0"), d.join("rank1"));
    let out = train_cmd(d, &one, 2, 4).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let class_images = std::fs::read_dir(d.join("class")).unwrap().count();

    let logs = launch(d, &[zero.clone(), other.clone()], 1, 4, &[]);
    assert!(logs[0].contains("rank 0 of 2: joining through 127.0.0.1"), "{}", logs[0]);
    assert!(logs[1].contains("rank 1 trained 4 steps; rank 0 writes"), "{}", logs[1]);
    assert!(!other.exists(), "rank 1 wrote nothing (no model, checkpoint, log or validation image)");
    assert!(!logs[1].contains("generating"), "rank 0 alone generates class images");
    assert_eq!(std::fs::read_dir(d.join("class")).unwrap().count(), class_images);
    assert!(zero.join("validation").is_dir() && zero.join("checkpoint-4").is_dir());
    let single = String::from_utf8_lossy(&out.stderr).to_string();
    let losses = |log: &str| log.lines().filter(|l| l.starts_with("step ")).map(str::to_string).collect::<Vec<_>>();
    assert_eq!(losses(&single), losses(&logs[0]), "the same losses, step by step");
    assert_eq!(losses(&single).len(), 4);
    let (rel, moved) = relative_difference(&zero, &one, &d.join("sample"));
    eprintln!("2 ranks vs 1 process: largest weight difference {rel:e} of the largest change ({moved:e})");
    assert!(moved > 1e-4, "training moved the weights ({moved})");
    assert!(rel < 5e-4, "2 ranks x batch 1 against 1 process x batch 2: {rel:e} of the largest weight change");

    // Two steps on two ranks, then the rest in one process: the same batches as one process throughout.
    let half = d.join("half");
    launch(d, &[half.clone(), d.join("half-rank1")], 1, 2, &[]);
    let out = train_cmd(d, &half, 2, 4).arg("--resume_from_checkpoint=latest").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("resumed at step 2"), "{err}");
    let (rel, _) = relative_difference(&half, &one, &d.join("sample"));
    eprintln!("resumed on 1 rank after 2 steps on 2: {rel:e}");
    assert!(rel < 5e-4, "resumed on one rank after two: {rel:e}");
}

#[test]
fn a_launch_that_contradicts_itself_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = train_cmd(d, &d.join("o"), 1, 1);
    c.env("RANK", "0").env("WORLD_SIZE", "2").env("SLURM_PROCID", "1").env("SLURM_NTASKS", "2");
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("RANK says 0 but SLURM_PROCID says 1"), "{err}");
    let mut c = train_cmd(d, &d.join("o"), 1, 1);
    c.env("RANK", "0").env("WORLD_SIZE", "2").arg("--dist-backend=nccl");
    let err = String::from_utf8_lossy(&c.output().unwrap().stderr).to_string();
    if !dreambridge::scale::dist::NCCL_BUILT {
        assert!(err.contains("scripts/build-cuda.sh --nccl"), "{err}");
    }
    assert!(!d.join("o").exists());
}
