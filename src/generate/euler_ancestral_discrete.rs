//! diffusers' `EulerAncestralDiscreteScheduler`: Euler steps in σ with ancestral noise
//! (σ_down, σ_up), the UNet input scaled by 1/√(σ² + 1), fractional timesteps with
//! `timestep_spacing` linspace unless the pipeline's config says otherwise.

use super::scheduler::{sigmas_at, Scheduler};
use crate::pipeline::schedule::{NoiseSchedule, Prediction, SchedulerConfig};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;

pub struct EulerAncestralDiscrete {
    prediction: Prediction,
    timesteps: Vec<f64>,
    /// σ per step, plus a final 0.
    sigmas: Vec<f64>,
    spacing: String,
}

impl EulerAncestralDiscrete {
    pub fn new(c: &SchedulerConfig, steps: usize) -> Result<EulerAncestralDiscrete> {
        let noise = NoiseSchedule::new(&c.schedule)?;
        let total = c.schedule.num_train_timesteps;
        let n = steps.max(1);
        let spacing = c.timestep_spacing.clone().unwrap_or_else(|| "linspace".into());
        // float32 timesteps, as diffusers computes them.
        let timesteps: Vec<f64> = match spacing.as_str() {
            "linspace" => (0..n).rev().map(|i| ((total - 1) as f64 * i as f64 / (n - 1).max(1) as f64) as f32 as f64).collect(),
            "leading" => {
                let ratio = total / n;
                (0..n).rev().map(|i| (i * ratio + c.steps_offset) as f64).collect()
            }
            "trailing" => {
                let ratio = total as f64 / n as f64;
                (0..n).map(|i| (total as f64 - i as f64 * ratio).round_ties_even() - 1.0).collect()
            }
            other => bail!("timestep_spacing `{other}` is not supported (linspace, leading, trailing)"),
        };
        let mut sigmas = sigmas_at(&noise.alphas_cumprod, &timesteps);
        sigmas.iter_mut().for_each(|s| *s = *s as f32 as f64);
        sigmas.push(0.0);
        Ok(EulerAncestralDiscrete { prediction: noise.prediction, timesteps, sigmas, spacing })
    }
}

impl Scheduler for EulerAncestralDiscrete {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        let max = self.sigmas.iter().cloned().fold(0.0, f64::max);
        if matches!(self.spacing.as_str(), "linspace" | "trailing") {
            max
        } else {
            (max * max + 1.0).sqrt()
        }
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        let s = self.sigmas[index];
        Ok((sample / (s * s + 1.0).sqrt())?)
    }

    fn needs_noise(&self) -> bool {
        true
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let sigma = self.sigmas[index];
        let x0 = match self.prediction {
            Prediction::Epsilon => (sample - (model_output * sigma)?)?,
            Prediction::VPrediction => ((model_output * (-sigma / (sigma * sigma + 1.0).sqrt()))? + (sample / (sigma * sigma + 1.0))?)?,
        };
        let (from, to) = (sigma, self.sigmas[index + 1]);
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let down = (to * to - up * up).sqrt();
        let derivative = ((sample - &x0)? / sigma)?;
        let prev = (sample + (derivative * (down - sigma))?)?;
        let noise = noise.context("EulerAncestralDiscreteScheduler needs the step's noise")?;
        Ok((prev + (noise * up)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_scaling_and_the_noiseless_last_step() {
        let lin: SchedulerConfig = serde_json::from_str("{}").unwrap();
        let s = EulerAncestralDiscrete::new(&lin, 30).unwrap();
        assert_eq!((s.timesteps[0], s.timesteps[29]), (999.0, 0.0));
        assert!((s.timesteps[1] - 964.551_7).abs() < 1e-3, "{}", s.timesteps[1]);
        assert!((s.init_noise_sigma() - s.sigmas[0]).abs() < 1e-12);
        let lead: SchedulerConfig = serde_json::from_str(r#"{"timestep_spacing": "leading", "steps_offset": 1}"#).unwrap();
        let l = EulerAncestralDiscrete::new(&lead, 30).unwrap();
        assert_eq!((l.timesteps[0], l.timesteps[29]), (958.0, 1.0));
        assert!((l.init_noise_sigma() - (l.sigmas[0].powi(2) + 1.0).sqrt()).abs() < 1e-12);
        // The last step (σ → 0) adds no noise and returns the x₀ prediction.
        let mut s = s;
        let dev = Device::Cpu;
        let x = Tensor::new(&[[0.3f64, 0.4]], &dev).unwrap();
        let eps = Tensor::new(&[[1.0f64, -2.0]], &dev).unwrap();
        let noise = Tensor::new(&[[9.0f64, 9.0]], &dev).unwrap();
        let got = s.step(&eps, 29, &x, Some(&noise)).unwrap();
        let x0 = (&x - (&eps * s.sigmas[29]).unwrap()).unwrap();
        let d: f64 = (got - x0).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(d < 1e-12, "{d}");
    }
}
