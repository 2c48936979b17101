//! The `dreambridge bench` subcommands: argument parsing, progress, printed and JSON reports.

use super::generate::{self, GenerateBenchOptions};
use super::gpu_check;
use super::train_step::{self, TrainBenchOptions};
use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time DreamBooth training steps (UNet, instance + class sample, AdamW) on SD 1.5 shapes.
    Train(TrainBench),
    /// Time text-to-image (DDIM with guidance, VAE decode) on SD 1.5 shapes.
    Generate(GenerateBench),
    /// Compare the device's loss and gradients with the CPU's on a small UNet.
    GpuCheck(GpuCheck),
}

#[derive(Args)]
pub struct Common {
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Compute precision: auto (bf16 on a GPU, no on the CPU), no, fp16 or bf16.
    #[arg(long, default_value = "auto")]
    mixed_precision: String,
    /// Let f32 matrix products use TF32 tensor cores (CUDA).
    #[arg(long)]
    allow_tf32: bool,
    /// Also write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Time a speed switch off and on in alternation in this one run and print both with their
    /// ratio (the switches are listed in src/switches.rs).
    #[arg(long, value_enum)]
    compare: Option<crate::switches::Switch>,
}

#[derive(Args)]
pub struct TrainBench {
    #[command(flatten)]
    common: Common,
    /// sd15 (860M-parameter UNet) or small (a 32/64-wide UNet of the same block types).
    #[arg(long, default_value = "sd15")]
    model: String,
    /// Image size in pixels (latents are 1/8 of it).
    #[arg(long, default_value_t = 512)]
    resolution: usize,
    /// Timed training steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first (allocation, kernel selection).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Recompute UNet blocks in backward instead of keeping their activations.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Train LoRA adapters of this rank (attention projections) over a frozen UNet.
    #[arg(long)]
    lora_rank: Option<usize>,
    /// AdamW with 8-bit block-wise moments (bitsandbytes' AdamW8bit); the report gives the state's size.
    #[arg(long)]
    use_8bit_adam: bool,
    /// Skip the GPU correctness check that runs first on a GPU.
    #[arg(long)]
    skip_check: bool,
}

#[derive(Args)]
pub struct GenerateBench {
    #[command(flatten)]
    common: Common,
    /// Image size in pixels.
    #[arg(long, default_value_t = 512)]
    resolution: usize,
    /// DDIM steps per image.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Timed images.
    #[arg(long, default_value_t = 2)]
    images: usize,
    /// Untimed images first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
}

#[derive(Args)]
pub struct GpuCheck {
    #[command(flatten)]
    common: Common,
    /// Check the gradient-checkpointed backward too.
    #[arg(long)]
    gradient_checkpointing: bool,
}

fn setup(c: &Common) -> Result<(Device, DType)> {
    let dev = crate::device::parse(&c.device)?;
    crate::device::allow_tf32(c.allow_tf32);
    let mixed = match c.mixed_precision.as_str() {
        "auto" if dev.is_cpu() => "no",
        "auto" => "bf16",
        other => other,
    };
    Ok((dev.clone(), crate::train::command::compute_dtype(mixed, &dev)?))
}

fn bar(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64).with_message(what.to_string());
    bar.set_style(ProgressStyle::with_template("{msg} {pos}/{len} [{bar:30}] {elapsed}").expect("template").progress_chars("=> "));
    bar
}

fn write_json<T: serde::Serialize>(path: &Option<PathBuf>, value: &T) -> Result<()> {
    if let Some(path) = path {
        let temp = path.with_extension("json.tmp");
        std::fs::write(&temp, serde_json::to_string_pretty(value)?).with_context(|| format!("{}: cannot write", temp.display()))?;
        std::fs::rename(&temp, path)?;
    }
    Ok(())
}

/// Runs the GPU check in f32 and in `dtype`; an f32 mismatch is an error (timings of a wrong
/// computation mean nothing), a low-precision one is reported.
fn gpu_checks(dev: &Device, dtype: DType, checkpointing: bool) -> Result<Vec<gpu_check::GradCheck>> {
    let mut out = vec![gpu_check::check(dev, DType::F32, checkpointing)?];
    if dtype != DType::F32 {
        out.push(gpu_check::check(dev, dtype, checkpointing)?);
    }
    for c in &out {
        println!("{}", c.summary());
    }
    anyhow::ensure!(out[0].passed, "{} disagrees with the CPU in f32: {}", out[0].device, out[0].summary());
    Ok(out)
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Train(a) => {
            let (dev, dtype) = setup(&a.common)?;
            let checks = if dev.is_cpu() || a.skip_check { Vec::new() } else { gpu_checks(&dev, dtype, a.gradient_checkpointing)? };
            let unet = match a.model.as_str() {
                "sd15" => super::sd15::unet()?,
                "small" => super::sd15::small_unet()?,
                other => anyhow::bail!("--model `{other}`: expected sd15 or small"),
            };
            let o = TrainBenchOptions { unet, resolution: a.resolution, tokens: 77, warmup_steps: a.warmup, steps: a.steps, compute_dtype: dtype, gradient_checkpointing: a.gradient_checkpointing, lora_rank: a.lora_rank, use_8bit_adam: a.use_8bit_adam, compare: a.common.compare };
            let pb = bar((a.warmup + a.steps) * if a.common.compare.is_some() { 2 } else { 1 }, "training steps");
            let report = train_step::run(&o, &dev, |i, _| pb.set_position(i as u64))?;
            pb.finish_and_clear();
            println!("{}", report.summary());
            write_json(&a.common.json, &serde_json::json!({ "model": a.model, "train": report, "gpu_check": checks }))?;
        }
        BenchCommand::Generate(a) => {
            let (dev, dtype) = setup(&a.common)?;
            let o = GenerateBenchOptions {
                unet: super::sd15::unet()?,
                text_encoder: super::sd15::text_encoder()?,
                vae: super::sd15::vae()?,
                resolution: a.resolution,
                steps: a.steps,
                warmup_images: a.warmup,
                images: a.images,
                compute_dtype: dtype,
                compare: a.common.compare,
            };
            let pb = bar((a.warmup + a.images) * if a.common.compare.is_some() { 2 } else { 1 }, "images");
            let report = generate::run(&o, &dev, |i, _| pb.set_position(i as u64))?;
            pb.finish_and_clear();
            println!("{}", report.summary());
            write_json(&a.common.json, &serde_json::json!({ "generate": report }))?;
        }
        BenchCommand::GpuCheck(a) => {
            let (dev, dtype) = setup(&a.common)?;
            let checks = gpu_checks(&dev, dtype, a.gradient_checkpointing)?;
            write_json(&a.common.json, &checks)?;
            anyhow::ensure!(checks.iter().all(|c| c.passed), "the GPU check failed");
        }
    }
    Ok(())
}
