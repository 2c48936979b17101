//! diffusers' `DDIMScheduler` (eta = 0) from `scheduler_config.json`: "leading" timestep spacing
//! with `steps_offset` (or the config's `linspace` / `trailing`), epsilon or v-prediction.

use super::scheduler::Scheduler;
use crate::pipeline::schedule::{NoiseSchedule, Prediction, SchedulerConfig};
use anyhow::{bail, Result};
use candle_core::Tensor;

pub struct Ddim {
    noise: NoiseSchedule,
    /// Clamp x₀ to ± this (`clip_sample`).
    clip: Option<f64>,
    final_alpha_cumprod: f64,
    pub timesteps: Vec<usize>,
    timesteps_f: Vec<f64>,
    step_ratio: usize,
}

impl Ddim {
    pub fn new(c: &SchedulerConfig, steps: usize) -> Result<Ddim> {
        let noise = NoiseSchedule::new(&c.schedule)?;
        let total = c.schedule.num_train_timesteps;
        let n = steps.max(1);
        let step_ratio = total / n;
        let timesteps: Vec<usize> = match c.timestep_spacing.as_deref().unwrap_or("leading") {
            "leading" => (0..n).rev().map(|i| (i * step_ratio + c.steps_offset).min(total - 1)).collect(),
            "linspace" => (0..n).rev().map(|i| ((total - 1) as f64 * i as f64 / (n - 1).max(1) as f64).round_ties_even() as usize).collect(),
            "trailing" => {
                let r = total as f64 / n as f64;
                (0..n).map(|i| ((total as f64 - i as f64 * r).round_ties_even() as usize).saturating_sub(1)).collect()
            }
            other => bail!("timestep_spacing `{other}` is not supported (linspace, leading, trailing)"),
        };
        let final_alpha_cumprod = if c.set_alpha_to_one { 1.0 } else { noise.alphas_cumprod[0] };
        let timesteps_f = timesteps.iter().map(|&t| t as f64).collect();
        let clip = c.clip_sample.then_some(c.clip_sample_range);
        Ok(Ddim { noise, clip, final_alpha_cumprod, timesteps, timesteps_f, step_ratio })
    }

    /// One deterministic DDIM step from timestep `t`.
    pub fn step(&self, model_output: &Tensor, t: usize, sample: &Tensor) -> Result<Tensor> {
        let a_t = self.noise.alphas_cumprod[t];
        let a_prev = t.checked_sub(self.step_ratio).map_or(self.final_alpha_cumprod, |p| self.noise.alphas_cumprod[p]);
        let b_t = 1.0 - a_t;
        let (pred_x0, pred_eps) = match self.noise.prediction {
            Prediction::Epsilon => (((sample - (model_output * b_t.sqrt())?)? / a_t.sqrt())?, model_output.clone()),
            Prediction::VPrediction => (
                ((sample * a_t.sqrt())? - (model_output * b_t.sqrt())?)?,
                ((model_output * a_t.sqrt())? + (sample * b_t.sqrt())?)?,
            ),
        };
        let pred_x0 = match self.clip {
            Some(r) => pred_x0.clamp(-r, r)?,
            None => pred_x0,
        };
        Ok(((pred_x0 * a_prev.sqrt())? + (pred_eps * (1.0 - a_prev).sqrt())?)?)
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps_f
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, _noise: Option<&Tensor>) -> Result<Tensor> {
        Ddim::step(self, model_output, self.timesteps[index], sample)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> SchedulerConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn timesteps_follow_leading_spacing_with_offset() {
        let d = Ddim::new(&config(r#"{"steps_offset": 1, "set_alpha_to_one": false}"#), 50).unwrap();
        assert_eq!(d.timesteps.len(), 50);
        assert_eq!((d.timesteps[0], d.timesteps[1], d.timesteps[49]), (981, 961, 1));
    }

    #[test]
    fn a_perfect_noise_prediction_recovers_the_clean_sample() {
        // x_t built from x0 and eps; predicting eps exactly must step to x_{t-1} built the same way.
        let d = Ddim::new(&config(r#"{"steps_offset": 1, "clip_sample": false}"#), 10).unwrap();
        let dev = candle_core::Device::Cpu;
        let x0 = Tensor::new(&[0.3f64, -0.7], &dev).unwrap();
        let eps = Tensor::new(&[1.1f64, 0.4], &dev).unwrap();
        let (t, prev) = (d.timesteps[3], d.timesteps[4]);
        let ac = &d.noise.alphas_cumprod;
        let xt = ((&x0 * ac[t].sqrt()).unwrap() + (&eps * (1.0 - ac[t]).sqrt()).unwrap()).unwrap();
        let expected = ((&x0 * ac[prev].sqrt()).unwrap() + (&eps * (1.0 - ac[prev]).sqrt()).unwrap()).unwrap();
        let got = d.step(&eps, t, &xt).unwrap();
        let diff: f64 = (got - expected).unwrap().abs().unwrap().max(0).unwrap().to_scalar().unwrap();
        assert!(diff < 1e-12, "{diff}");
    }
}
