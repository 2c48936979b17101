//! `dreambridge bench train`: DreamBooth training steps as the trainer runs them (instance + class
//! sample, per-sample timesteps, prior-preservation loss, backward, grad-norm clip 1.0, AdamW), on
//! an SD 1.5-size UNet with random weights and random latents/text embeddings.

use super::memory::PeakMemory;
use super::stats::{gib, Timing};
use crate::models::unet::{UNet, UNetConfig};
use crate::train::loss::{dreambooth_loss, LossConfig};
use crate::train::optim::{clip_factor, grad_norm, AdamWParams, Optimizer};
use crate::rng::TrainRng;
use crate::pipeline::schedule::{NoiseSchedule, ScheduleConfig};
use crate::models::builder::Builder;
use crate::models::lora::{AdapterPlan, LoraConfig, Targets};
use anyhow::Result;
use candle_core::{DType, Device, Var};
use candle_nn::{VarBuilder, VarMap};
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct TrainBenchOptions {
    pub unet: UNetConfig,
    /// Image side in pixels (latents are a eighth of it).
    pub resolution: usize,
    /// Text tokens per prompt (77 in SD).
    pub tokens: usize,
    pub warmup_steps: usize,
    pub steps: usize,
    pub compute_dtype: DType,
    pub gradient_checkpointing: bool,
    /// Train rank-r LoRA adapters on the attention projections (diffusers' LoRA script) over
    /// a frozen UNet held in the compute dtype, instead of the whole UNet.
    pub lora_rank: Option<usize>,
    /// AdamW with 8-bit block-wise moments (`--use_8bit_adam`).
    pub use_8bit_adam: bool,
    /// Alternate this speed switch off and on, step by step (warm-up steps once per state).
    pub compare: Option<crate::switches::Switch>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainBenchReport {
    pub device: String,
    pub compute_dtype: String,
    pub resolution: usize,
    /// Samples per step: one instance and one class image.
    pub batch: usize,
    /// Trained parameters (the adapters' with LoRA).
    pub parameters: usize,
    pub lora_rank: Option<usize>,
    pub gradient_checkpointing: bool,
    pub steps: usize,
    pub step: Timing,
    /// Medians of the step's phases: loss (forward), backward, clipping + AdamW.
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
    pub images_per_s: f64,
    pub peak_memory_bytes: u64,
    pub peak_memory_kind: &'static str,
    /// `AdamW` or `AdamW8bit`, and the bytes its state holds.
    pub optimizer: &'static str,
    pub optimizer_state_bytes: usize,
    pub first_loss: f32,
    pub last_loss: f32,
    /// The speed switches' states (`VAR=0|1 ...`) at the start.
    pub switches: String,
    /// With `compare`: the switch off and on (`step` and the phases are then the "off" steps).
    pub compare: Option<super::stats::Comparison>,
}

impl TrainBenchReport {
    pub fn summary(&self) -> String {
        format!(
            "train step  {} {} {}px batch {} ({}{} params{}): {:.1} ms/step median ({:.1} mean, {:.1} min; forward {:.1}, backward {:.1}, clip + AdamW {:.1}) over {} steps, {:.2} images/s, peak memory {:.2} GiB ({}), {} state {:.1} MiB; loss {:.4} -> {:.4}",
            self.device,
            self.compute_dtype,
            self.resolution,
            self.batch,
            self.lora_rank.map_or(String::new(), |r| format!("LoRA rank {r}, ")),
            self.parameters,
            if self.gradient_checkpointing { ", gradient checkpointing" } else { "" },
            self.step.median_ms,
            self.step.mean_ms,
            self.step.min_ms,
            self.forward_ms,
            self.backward_ms,
            self.optimizer_ms,
            self.steps,
            self.images_per_s,
            gib(self.peak_memory_bytes),
            self.peak_memory_kind,
            self.optimizer,
            self.optimizer_state_bytes as f64 / (1u64 << 20) as f64,
            self.first_loss,
            self.last_loss
        ) + &self.compare.as_ref().map_or(String::new(), |c| format!("\n{}", c.summary()))
    }
}

/// Runs `warmup_steps + steps` optimiser steps, timing the last `steps` (the device is
/// synchronised after each step). `progress(i, total)` is called after every step.
pub fn run(o: &TrainBenchOptions, dev: &Device, mut progress: impl FnMut(usize, usize)) -> Result<TrainBenchReport> {
    anyhow::ensure!(o.resolution % 8 == 0 && o.resolution >= 64, "resolution must be a multiple of 8, at least 64");
    anyhow::ensure!(o.steps > 0, "at least one timed step");
    let switches = crate::switches::state();
    let memory = PeakMemory::start(dev)?;
    let mut varmap = VarMap::new();
    let mut unet = UNet::new(VarBuilder::from_varmap(&varmap, DType::F32, dev), &o.unet)?;
    if let Some(rank) = o.lora_rank {
        let base = crate::models::weights::frozen(&varmap, o.compute_dtype)?;
        let config = LoraConfig { rank, alpha: rank as f64, targets: Targets::Attn, dropout: 0.0, seed: 0 };
        let plan = Arc::new(AdapterPlan::train(config, DType::F32));
        unet = UNet::new(Builder::with_adapters(VarBuilder::from_tensors(base, o.compute_dtype, dev), plan.clone()), &o.unet)?;
        varmap = plan.vars().expect("a training plan").clone();
    }
    let vars: Vec<(String, Var)> = varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let all: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    if o.gradient_checkpointing {
        unet.enable_gradient_checkpointing(&all);
    }
    let parameters = all.iter().map(|v| v.elem_count()).sum();
    let mut optimizer = Optimizer::new(vars, AdamWParams::default(), o.use_8bit_adam)?;
    let schedule = NoiseSchedule::new(&serde_json::from_str::<ScheduleConfig>("{}")?)?;
    let loss_cfg = LossConfig { with_prior_preservation: true, prior_loss_weight: 1.0, snr_gamma: None };

    let mut rng = TrainRng::new(0);
    let (b, c, side) = (2, o.unet.in_channels, o.resolution / 8);
    let dt = o.compute_dtype;
    let latents = rng.normal(&[b, c, side, side], dev)?.to_dtype(dt)?;
    let context = rng.normal(&[b, o.tokens, o.unet.cross_attention_dim], dev)?.to_dtype(dt)?;
    let states = if o.compare.is_some() { 2 } else { 1 };
    let total = (o.warmup_steps + o.steps) * states;
    let (mut times, mut losses, mut times_on) = (Vec::new(), Vec::new(), Vec::new());
    let mut phases: [Vec<f64>; 3] = Default::default();
    for i in 0..total {
        let on = super::stats::alternate(o.compare, i, dev)?;
        let noise = rng.normal(&[b, c, side, side], dev)?.to_dtype(dt)?;
        let timesteps: Vec<usize> = (0..b).map(|_| rng.below(schedule.alphas_cumprod.len())).collect();
        dev.synchronize()?;
        let start = Instant::now();
        let mut marks = [0f64; 3];
        let profiled = super::profile::region("train_step", dev);
        let mut mark = |i: usize| -> Result<()> {
            dev.synchronize()?;
            marks[i] = start.elapsed().as_secs_f64() * 1e3;
            Ok(())
        };
        let loss = dreambooth_loss(&unet, &schedule, &latents, &context, &noise, &timesteps, &loss_cfg)?;
        mark(0)?;
        let grads = unet.backward(&loss)?;
        mark(1)?;
        let factor = clip_factor(grad_norm(&grads, &all)?, 1.0);
        optimizer.step_scaled(&grads, 5e-6, factor)?;
        drop(grads);
        let loss = loss.to_scalar::<f32>()?;
        mark(2)?;
        drop(profiled);
        if i >= o.warmup_steps * states && on == Some(true) {
            times_on.push(marks[2]);
        } else if i >= o.warmup_steps * states {
            times.push(marks[2]);
            phases[0].push(marks[0]);
            phases[1].push(marks[1] - marks[0]);
            phases[2].push(marks[2] - marks[1]);
        }
        losses.push(loss);
        progress(i + 1, total);
    }
    let compare = o.compare.map(|s| super::stats::Comparison::of(s.var(), &times, &times_on));
    let step = Timing::of(&times);
    Ok(TrainBenchReport {
        device: crate::device::describe(dev),
        compute_dtype: format!("{dt:?}").to_lowercase(),
        resolution: o.resolution,
        batch: b,
        parameters,
        lora_rank: o.lora_rank,
        gradient_checkpointing: o.gradient_checkpointing,
        steps: o.steps,
        step,
        forward_ms: Timing::of(&phases[0]).median_ms,
        backward_ms: Timing::of(&phases[1]).median_ms,
        optimizer_ms: Timing::of(&phases[2]).median_ms,
        images_per_s: b as f64 / (step.median_ms / 1e3),
        peak_memory_bytes: memory.finish()?,
        peak_memory_kind: PeakMemory::label(dev),
        optimizer: optimizer.name(),
        optimizer_state_bytes: optimizer.state_bytes(),
        first_loss: losses[0],
        last_loss: *losses.last().expect("steps > 0"),
        switches,
        compare,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_unet_steps_are_timed_and_train() {
        let o = TrainBenchOptions {
            unet: crate::bench::sd15::small_unet().unwrap(),
            resolution: 64,
            tokens: 7,
            warmup_steps: 1,
            steps: 2,
            compute_dtype: DType::F32,
            gradient_checkpointing: false,
            lora_rank: None,
            use_8bit_adam: false,
            compare: None,
        };
        let mut calls = 0;
        let r = run(&o, &Device::Cpu, |_, _| calls += 1).unwrap();
        assert_eq!((calls, r.steps, r.batch), (3, 2, 2));
        assert!(r.step.median_ms > 0.0 && r.images_per_s > 0.0 && r.peak_memory_bytes > 0);
        assert!(r.first_loss.is_finite() && r.last_loss.is_finite());
        assert!(r.parameters > 100_000, "{}", r.parameters);
        let eight = run(&TrainBenchOptions { use_8bit_adam: true, ..o.clone() }, &Device::Cpu, |_, _| {}).unwrap();
        assert_eq!((r.optimizer, eight.optimizer), ("AdamW", "AdamW8bit"));
        assert_eq!(r.optimizer_state_bytes, 8 * r.parameters);
        assert!(eight.optimizer_state_bytes * 3 < r.optimizer_state_bytes, "{} vs {}", eight.optimizer_state_bytes, r.optimizer_state_bytes);
        let lora = run(&TrainBenchOptions { lora_rank: Some(4), ..o.clone() }, &Device::Cpu, |_, _| {}).unwrap();
        assert!(lora.parameters < r.parameters / 10 && lora.parameters > 0, "{} adapter parameters", lora.parameters);
        assert!(lora.summary().contains("LoRA rank 4"));
    }
}
