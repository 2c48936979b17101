//! The samplers behind one trait, one file per diffusers scheduler (named after it), each built
//! from a pipeline's `scheduler_config.json` the way diffusers' `Scheduler.from_config(
//! pipe.scheduler.config)` builds it: keys the config has (timestep spacing, steps offset,
//! prediction type, betas) are taken over, the rest are the scheduler's own defaults.

use super::ddim::Ddim;
use super::ddpm::Ddpm;
use super::dpm_solver_multistep::DpmSolverMultistep;
use super::euler_ancestral_discrete::EulerAncestralDiscrete;
use crate::pipeline::schedule::SchedulerConfig;
use anyhow::Result;
use candle_core::Tensor;

/// One sampler run: its timesteps, the model-input scaling, and one step at a time (in order).
pub trait Scheduler {
    /// The timesteps the UNet is called at, first to last (fractional for the Euler family).
    fn timesteps(&self) -> &[f64];
    /// The standard deviation of the initial noise.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// The UNet input at step `index` (Euler-family schedulers divide by √(σ² + 1)).
    fn scale_model_input(&self, sample: &Tensor, _index: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }
    /// True when a step adds fresh noise (ancestral samplers): `step` then needs `noise`.
    fn needs_noise(&self) -> bool {
        false
    }
    /// The sample after step `index` (steps must come in order); `noise` is standard normal,
    /// shaped like `sample`, for ancestral samplers.
    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor>;
}

/// The samplers, by diffusers' class names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SchedulerKind {
    /// DDIMScheduler, eta 0 (KerasCV's sampler).
    #[default]
    #[value(name = "DDIMScheduler", alias = "ddim")]
    Ddim,
    /// DPMSolverMultistepScheduler: DPM-Solver++ 2M (diffusers' DreamBooth validation default, 25 steps).
    #[value(name = "DPMSolverMultistepScheduler", alias = "dpm++", alias = "dpmsolver++")]
    DpmSolverMultistep,
    /// EulerAncestralDiscreteScheduler.
    #[value(name = "EulerAncestralDiscreteScheduler", alias = "euler_a", alias = "euler-ancestral")]
    EulerAncestralDiscrete,
    /// DDPMScheduler: ancestral DDPM sampling (diffusers' other DreamBooth validation choice).
    #[value(name = "DDPMScheduler", alias = "ddpm")]
    Ddpm,
}

impl SchedulerKind {
    /// A sampler for `steps` steps over the pipeline's schedule.
    pub fn build(self, c: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        Ok(match self {
            SchedulerKind::Ddim => Box::new(Ddim::new(c, steps)?),
            SchedulerKind::DpmSolverMultistep => Box::new(DpmSolverMultistep::new(c, steps)?),
            SchedulerKind::EulerAncestralDiscrete => Box::new(EulerAncestralDiscrete::new(c, steps)?),
            SchedulerKind::Ddpm => Box::new(Ddpm::new(c, steps)?),
        })
    }
}

/// σ_t = √((1 − ᾱ_t) / ᾱ_t) interpolated at (fractional) timesteps, as `np.interp` does.
pub fn sigmas_at(alphas_cumprod: &[f64], timesteps: &[f64]) -> Vec<f64> {
    let sigma = |i: usize| ((1.0 - alphas_cumprod[i]) / alphas_cumprod[i]).sqrt();
    timesteps
        .iter()
        .map(|&t| {
            let t = t.clamp(0.0, (alphas_cumprod.len() - 1) as f64);
            let (lo, frac) = (t.floor() as usize, t - t.floor());
            if frac == 0.0 {
                sigma(lo)
            } else {
                sigma(lo) * (1.0 - frac) + sigma(lo + 1) * frac
            }
        })
        .collect()
}
