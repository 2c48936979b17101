//! diffusers' `DDPMScheduler` from `scheduler_config.json`: ancestral sampling over "leading"
//! timesteps with `steps_offset` (or `linspace` / `trailing`), epsilon or v-prediction, x₀ clipped
//! as `clip_sample` says, and the `fixed_small` posterior variance (`fixed_large`: βₜ). A learned
//! variance type is read as `fixed_small`, as diffusers' DreamBooth validation does.

use super::scheduler::Scheduler;
use crate::pipeline::schedule::{NoiseSchedule, Prediction, SchedulerConfig};
use anyhow::{bail, Result};
use candle_core::Tensor;

pub struct Ddpm {
    noise: NoiseSchedule,
    clip: Option<f64>,
    /// The variance is βₜ (`fixed_large`) instead of the posterior's (`fixed_small`).
    large_variance: bool,
    pub timesteps: Vec<usize>,
    timesteps_f: Vec<f64>,
    step_ratio: usize,
}

impl Ddpm {
    pub fn new(c: &SchedulerConfig, steps: usize) -> Result<Ddpm> {
        let noise = NoiseSchedule::new(&c.schedule)?;
        let total = c.schedule.num_train_timesteps;
        let n = steps.clamp(1, total);
        let step_ratio = total / n;
        let timesteps: Vec<usize> = match c.timestep_spacing.as_deref().unwrap_or("leading") {
            "leading" => (0..n).rev().map(|i| i * step_ratio + c.steps_offset).collect(),
            "linspace" => (0..n).rev().map(|i| ((total - 1) as f64 * i as f64 / (n - 1).max(1) as f64).round_ties_even() as usize).collect(),
            "trailing" => {
                let r = total as f64 / n as f64;
                (0..n).map(|i| ((total as f64 - i as f64 * r).round_ties_even() as usize).saturating_sub(1)).collect()
            }
            other => bail!("timestep_spacing `{other}` is not supported (linspace, leading, trailing)"),
        };
        if let Some(&t) = timesteps.iter().find(|&&t| t >= total) {
            bail!("DDPMScheduler: timestep {t} is past num_train_timesteps {total} (steps_offset {})", c.steps_offset);
        }
        let large_variance = match c.variance_type.as_deref().unwrap_or("fixed_small") {
            "fixed_small" | "learned" | "learned_range" => false,
            "fixed_large" => true,
            other => bail!("DDPMScheduler variance_type `{other}` is not supported (fixed_small, fixed_large)"),
        };
        let timesteps_f = timesteps.iter().map(|&t| t as f64).collect();
        Ok(Ddpm { noise, clip: c.clip_sample.then_some(c.clip_sample_range), large_variance, timesteps, timesteps_f, step_ratio })
    }

    /// ᾱ at the timestep before `t` (1 before the first).
    fn alpha_prev(&self, t: usize) -> f64 {
        t.checked_sub(self.step_ratio).map_or(1.0, |p| self.noise.alphas_cumprod[p])
    }
}

impl Scheduler for Ddpm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps_f
    }

    fn needs_noise(&self) -> bool {
        true
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let t = self.timesteps[index];
        let (a_t, a_prev) = (self.noise.alphas_cumprod[t], self.alpha_prev(t));
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let (current_alpha, current_beta) = (a_t / a_prev, 1.0 - a_t / a_prev);
        let x0 = match self.noise.prediction {
            Prediction::Epsilon => ((sample - (model_output * b_t.sqrt())?)? / a_t.sqrt())?,
            Prediction::VPrediction => ((sample * a_t.sqrt())? - (model_output * b_t.sqrt())?)?,
        };
        let x0 = match self.clip {
            Some(r) => x0.clamp(-r, r)?,
            None => x0,
        };
        let mean = ((x0 * (a_prev.sqrt() * current_beta / b_t))? + (sample * (current_alpha.sqrt() * b_prev / b_t))?)?;
        if t == 0 {
            return Ok(mean);
        }
        let variance = if self.large_variance { current_beta } else { (b_prev / b_t * current_beta).max(1e-20) };
        let Some(z) = noise else { bail!("DDPMScheduler adds noise at every step but the last: none given") };
        Ok((mean + (z * variance.sqrt())?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_timesteps_and_a_noiseless_last_step() {
        let c: SchedulerConfig = serde_json::from_str(r#"{"steps_offset": 1, "clip_sample": false}"#).unwrap();
        let d = Ddpm::new(&c, 25).unwrap();
        assert_eq!((d.timesteps.len(), d.timesteps[0], d.timesteps[24]), (25, 961, 1));
        // From t = 1 the previous ᾱ is 1: the posterior variance is 0 (clamped to 1e-20).
        let bare: SchedulerConfig = serde_json::from_str(r#"{"clip_sample": false}"#).unwrap();
        let mut d = Ddpm::new(&bare, 10).unwrap();
        assert_eq!(*d.timesteps.last().unwrap(), 0);
        let dev = candle_core::Device::Cpu;
        let x = Tensor::new(&[0.5f32, -0.25], &dev).unwrap();
        let eps = Tensor::new(&[0.1f32, 0.2], &dev).unwrap();
        let last = d.step(&eps, 9, &x, None).unwrap();
        let a0 = d.noise.alphas_cumprod[0];
        let want: Vec<f32> = [0.5f64, -0.25].iter().zip([0.1f64, 0.2]).map(|(x, e)| ((x - (1.0 - a0).sqrt() * e) / a0.sqrt()) as f32).collect();
        let got: Vec<f32> = last.to_vec1().unwrap();
        assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-5), "{got:?} vs {want:?}");
    }
}
