//! A sampler run on saved model outputs, for comparing with diffusers' schedulers step by step
//! (the hidden `sampler-steps` command the parity suite drives).

use super::scheduler::SchedulerKind;
use crate::diffusers::st_read::StFile;
use crate::diffusers::st_write::{PendingTensor, StWriter};
use crate::pipeline::schedule::SchedulerConfig;
use crate::tensor::{DType, RawTensor};
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::path::Path;

fn load(file: &StFile, key: &str) -> Result<Tensor> {
    let raw = file.read(key)?;
    Ok(Tensor::from_vec(raw.to_f32_values(), raw.shape.clone(), &Device::Cpu)?.to_dtype(candle_core::DType::F64)?)
}

fn raw(t: &Tensor) -> Result<RawTensor> {
    let v: Vec<f32> = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(RawTensor::from_f32(t.dims(), &v))
}

/// Runs `kind` for `steps` steps over `inputs`, writing every scaled input and sample to `out`
/// (plus `timesteps` and `init_noise_sigma`).
pub fn run(kind: SchedulerKind, config: &Path, steps: usize, inputs: &Path, out: &Path) -> Result<()> {
    let c: SchedulerConfig = serde_json::from_str(&std::fs::read_to_string(config).with_context(|| config.display().to_string())?)?;
    let mut s = kind.build(&c, steps)?;
    let file = StFile::open(inputs).with_context(|| inputs.display().to_string())?;
    let mut x = load(&file, "sample")?;
    let mut results: Vec<(String, RawTensor)> = Vec::new();
    let timesteps = s.timesteps().to_vec();
    for i in 0..timesteps.len() {
        let scaled = s.scale_model_input(&x, i)?;
        results.push((format!("scaled_{i}"), raw(&scaled)?));
        let noise = if s.needs_noise() { Some(load(&file, &format!("noise_{i}"))?) } else { None };
        x = s.step(&load(&file, &format!("model_output_{i}"))?, i, &x, noise.as_ref())?;
        results.push((format!("sample_{i}"), raw(&x)?));
    }
    let ts: Vec<f32> = timesteps.iter().map(|t| *t as f32).collect();
    results.push(("timesteps".into(), RawTensor::from_f32(&[ts.len()], &ts)));
    results.push(("init_noise_sigma".into(), RawTensor::from_f32(&[1], &[s.init_noise_sigma() as f32])));
    let pending = results.iter().map(|(k, t)| PendingTensor { key: k.clone(), dtype: DType::F32, shape: t.shape.clone() }).collect();
    let mut w = StWriter::create(out, pending)?;
    for (k, t) in &results {
        w.write_next(k, t)?;
    }
    w.finish()
}

/// A whole guided generation from given initial latents (the hidden `generate --init-latents
/// --trace` the parity suite drives against diffusers' pipelines): writes the prompt embeddings
/// (`context`, `pooled` and `negative_*`), the latents after every step (`latents_<i>`) and the
/// decoded images (`images`, `(n, 3, H, W)` in [0, 1]).
pub fn trace_generation(
    pipe: &crate::pipeline::Pipeline,
    prompt: &str,
    negative: &str,
    sampling: &super::text_to_image::Sampling,
    init_latents: &Path,
    out: &Path,
) -> Result<()> {
    use super::text_to_image::{decode, sample_latents};
    let file = StFile::open(init_latents).with_context(|| init_latents.display().to_string())?;
    let raw_init = file.read("latents").with_context(|| format!("{}: tensor `latents`", init_latents.display()))?;
    let init = Tensor::from_vec(raw_init.to_f32_values(), raw_init.shape.clone(), &pipe.device)?;
    let (cond, uncond) = (pipe.encode(prompt)?, pipe.encode_negative(negative)?);
    let mut results: Vec<(String, RawTensor)> = Vec::new();
    for (name, embeds) in [("", &cond), ("negative_", &uncond)] {
        results.push((format!("{name}context"), raw(&embeds.context)?));
        if let Some(p) = &embeds.pooled {
            results.push((format!("{name}pooled"), raw(p)?));
        }
    }
    let cast = pipe.sampling_models()?;
    let mut no_noise = |i: usize| -> Result<Tensor> { anyhow::bail!("step {i}: a traced generation takes deterministic samplers only (DDIM, DPM-Solver++)") };
    let latents = sample_latents(pipe, &cast, &cond, &uncond, sampling, init, &mut no_noise, &mut |i, x| {
        results.push((format!("latents_{i}"), raw(x)?));
        Ok(())
    })?;
    results.push(("images".into(), raw(&decode(pipe, &cast, &latents)?)?));
    let pending = results.iter().map(|(k, t)| PendingTensor { key: k.clone(), dtype: DType::F32, shape: t.shape.clone() }).collect();
    let mut w = StWriter::create(out, pending)?;
    for (k, t) in &results {
        w.write_next(k, t)?;
    }
    w.finish()
}
