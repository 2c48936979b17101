//! Text-to-image over a loaded pipeline: any sampler with classifier-free guidance, and PNG output.

use super::scheduler::SchedulerKind;
use crate::pipeline::Pipeline;
use crate::rng::TrainRng;
use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use std::path::Path;

/// One image `(3, H, W)` in [0, 1] from `pipe`: DDIM with classifier-free guidance (`guidance` > 1),
/// starting from noise drawn from `rng`.
pub fn generate(pipe: &Pipeline, prompt: &str, negative: &str, size: usize, steps: usize, guidance: f64, rng: &mut TrainRng) -> Result<Tensor> {
    generate_with(pipe, prompt, negative, size, steps, guidance, SchedulerKind::Ddim, rng)
}

/// [`generate`] with any of the samplers.
#[allow(clippy::too_many_arguments)]
pub fn generate_with(
    pipe: &Pipeline,
    prompt: &str,
    negative: &str,
    size: usize,
    steps: usize,
    guidance: f64,
    kind: SchedulerKind,
    rng: &mut TrainRng,
) -> Result<Tensor> {
    let (cond, uncond) = (pipe.embed(prompt)?, pipe.embed(negative)?);
    let context = Tensor::cat(&[&uncond, &cond], 0)?.to_dtype(pipe.compute_dtype)?;
    let mut scheduler = kind.build(&pipe.scheduler, steps)?;
    let z = pipe.vae.config.latent_channels;
    let shape = [1, z, size / 8, size / 8];
    let mut latents = (rng.normal(&shape, &pipe.device)? * scheduler.init_noise_sigma())?;
    let timesteps = scheduler.timesteps().to_vec();
    for (i, &t) in timesteps.iter().enumerate() {
        let scaled = scheduler.scale_model_input(&latents, i)?;
        let input = Tensor::cat(&[&scaled, &scaled], 0)?.to_dtype(pipe.compute_dtype)?;
        let ts = Tensor::new(&[t as f32, t as f32], &pipe.device)?;
        let out = pipe.inference.unet.forward(&input, &ts, &context)?.to_dtype(DType::F32)?;
        let (u, c) = (out.narrow(0, 0, 1)?, out.narrow(0, 1, 1)?);
        let guided = (&u + ((c - &u)? * guidance)?)?;
        let noise = if scheduler.needs_noise() { Some(rng.normal(&shape, &pipe.device)?) } else { None };
        latents = scheduler.step(&guided, i, &latents, noise.as_ref())?;
    }
    let z = (latents / pipe.vae.config.scaling_factor)?.to_dtype(pipe.compute_dtype)?;
    let image = pipe.inference.vae.decode(&z)?.to_dtype(DType::F32)?;
    Ok(((image / 2.0)? + 0.5)?.clamp(0f32, 1f32)?.squeeze(0)?)
}

/// Saves a `(3, H, W)` [0, 1] tensor as a PNG (atomically: temp file + rename).
pub fn save_png(image: &Tensor, path: &Path) -> Result<()> {
    let (_, h, w) = image.dims3()?;
    let data: Vec<f32> = image.permute((1, 2, 0))?.flatten_all()?.to_vec1()?;
    let bytes: Vec<u8> = data.iter().map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8).collect();
    let img = image::RgbImage::from_raw(w as u32, h as u32, bytes).context("image buffer size")?;
    crate::output::atomic_file(path, |temp| Ok(img.save_with_format(temp, image::ImageFormat::Png)?))
}

