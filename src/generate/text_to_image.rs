//! Text-to-image over a loaded pipeline: any sampler with classifier-free guidance, and PNG output.

use super::scheduler::SchedulerKind;
use crate::pipeline::{added_cond, Pipeline, PromptEmbeds, SamplingModels};
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
    let (cond, uncond) = (pipe.encode(prompt)?, pipe.encode_negative(negative)?);
    let mut images = generate_batch(pipe, &cond, &uncond, size, steps, guidance, kind, std::slice::from_mut(rng))?;
    Ok(images.remove(0))
}

/// One image per stream in `rngs`, all in one batch, from prompt embeddings (the prompt's and the
/// negative one's). Image `i` draws its initial and ancestral noise from `rngs[i]` alone, so a
/// batch makes the images one-at-a-time runs make (up to float rounding).
#[allow(clippy::too_many_arguments)]
pub fn generate_batch(
    pipe: &Pipeline,
    cond: &PromptEmbeds,
    uncond: &PromptEmbeds,
    size: usize,
    steps: usize,
    guidance: f64,
    kind: SchedulerKind,
    rngs: &mut [TrainRng],
) -> Result<Vec<Tensor>> {
    let n = rngs.len();
    anyhow::ensure!(n > 0, "no images to generate");
    let z = pipe.vae.config.latent_channels;
    let f = pipe.vae_scale_factor();
    anyhow::ensure!(size % f == 0, "image size {size}: must be a multiple of the VAE's downscale factor {f}");
    let shape = [1, z, size / f, size / f];
    let mut noise = |_: usize| -> Result<Tensor> {
        let draws = rngs.iter_mut().map(|r| r.normal(&shape, &pipe.device)).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&draws, 0)?)
    };
    let init = noise(0)?;
    let cast = pipe.sampling_models()?;
    let latents = sample_latents(pipe, &cast, cond, uncond, &Sampling { size, steps, guidance, kind }, init, &mut noise, &mut |_, _| Ok(()))?;
    let images = decode(pipe, &cast, &latents)?;
    (0..n).map(|i| Ok(images.get(i)?)).collect()
}

/// How [`sample_latents`] samples.
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    /// Image size in pixels (square).
    pub size: usize,
    pub steps: usize,
    pub guidance: f64,
    pub kind: SchedulerKind,
}

/// The guided sampling loop from initial noise `init` `(n, C, H/8, W/8)` (not yet scaled by the
/// sampler's initial sigma) to the final latents. `step_noise(i)` gives ancestral samplers' noise
/// of step `i`; `on_step(i, latents)` sees the latents after each step. `cast`: from
/// [`Pipeline::sampling_models`].
#[allow(clippy::too_many_arguments)]
pub fn sample_latents(
    pipe: &Pipeline,
    cast: &SamplingModels,
    cond: &PromptEmbeds,
    uncond: &PromptEmbeds,
    s: &Sampling,
    init: Tensor,
    step_noise: &mut dyn FnMut(usize) -> Result<Tensor>,
    on_step: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
) -> Result<Tensor> {
    let n = init.dim(0)?;
    let repeat = |t: &Tensor| Tensor::cat(&vec![t; n], 0);
    let context = Tensor::cat(&[repeat(&uncond.context)?, repeat(&cond.context)?], 0)?.to_dtype(pipe.compute_dtype)?;
    let added = added_cond(&[uncond, cond], n, s.size, &pipe.device)?;
    let mut scheduler = s.kind.build(&pipe.scheduler, s.steps)?;
    let unet = cast.unet.as_ref().unwrap_or(&pipe.inference.unet);
    let mut latents = (init * scheduler.init_noise_sigma())?;
    let timesteps = scheduler.timesteps().to_vec();
    for (i, &t) in timesteps.iter().enumerate() {
        let scaled = scheduler.scale_model_input(&latents, i)?;
        let input = Tensor::cat(&[&scaled, &scaled], 0)?.to_dtype(pipe.compute_dtype)?;
        let ts = Tensor::new(vec![t as f32; 2 * n].as_slice(), &pipe.device)?;
        let out = {
            let _profiled = crate::bench::profile::region("unet_step", &pipe.device);
            unet.forward_added(&input, &ts, &context, added.as_ref())?.to_dtype(DType::F32)?
        };
        let (u, c) = (out.narrow(0, 0, n)?, out.narrow(0, n, n)?);
        let guided = (&u + ((c - &u)? * s.guidance)?)?;
        let noise = if scheduler.needs_noise() { Some(step_noise(i)?) } else { None };
        latents = scheduler.step(&guided, i, &latents, noise.as_ref())?;
        on_step(i, &latents)?;
    }
    Ok(latents)
}

/// Final latents to images `(n, 3, H, W)` in [0, 1], through the VAE in [`Pipeline::vae_dtype`].
pub fn decode(pipe: &Pipeline, cast: &SamplingModels, latents: &Tensor) -> Result<Tensor> {
    let dtype = pipe.vae_dtype();
    let vae = cast.vae.as_ref().unwrap_or(&pipe.inference.vae);
    let z = (latents / pipe.vae.config.scaling_factor)?.to_dtype(dtype)?;
    let images = vae.decode(&z)?.to_dtype(DType::F32)?;
    Ok(((images / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
}

/// Saves a `(3, H, W)` [0, 1] tensor as a PNG (atomically: temp file + rename).
pub fn save_png(image: &Tensor, path: &Path) -> Result<()> {
    let (_, h, w) = image.dims3()?;
    let data: Vec<f32> = image.permute((1, 2, 0))?.flatten_all()?.to_vec1()?;
    let bytes: Vec<u8> = data.iter().map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8).collect();
    let img = image::RgbImage::from_raw(w as u32, h as u32, bytes).context("image buffer size")?;
    crate::output::atomic_file(path, |temp| Ok(img.save_with_format(temp, image::ImageFormat::Png)?))
}

