//! diffusers' `DPMSolverMultistepScheduler` with its defaults: DPM-Solver++ (data prediction),
//! order 2, midpoint solver, first order at the last step (`final_sigmas_type = "zero"`),
//! `timestep_spacing` linspace unless the pipeline's config says otherwise.

use super::scheduler::{sigmas_at, Scheduler};
use crate::pipeline::schedule::{NoiseSchedule, Prediction, SchedulerConfig};
use anyhow::{bail, Result};
use candle_core::Tensor;

pub struct DpmSolverMultistep {
    prediction: Prediction,
    timesteps: Vec<f64>,
    /// σ per step, plus a final 0.
    sigmas: Vec<f64>,
    /// The last data predictions (x₀), newest last.
    outputs: Vec<Tensor>,
}

/// (α_t, σ_t) of the variance-preserving process at Karras σ.
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

fn lambda(sigma: f64) -> f64 {
    let (a, s) = alpha_sigma(sigma);
    a.ln() - s.ln()
}

/// Integer timesteps by diffusers' `timestep_spacing` for this scheduler.
pub fn timesteps(spacing: &str, total: usize, steps: usize, offset: usize) -> Result<Vec<usize>> {
    Ok(match spacing {
        "linspace" => {
            let last = (total - 1) as f64;
            let mut t: Vec<usize> = (0..=steps).map(|i| (last * i as f64 / steps as f64).round_ties_even() as usize).collect();
            t.reverse();
            t.truncate(steps);
            t
        }
        "leading" => {
            let ratio = total / (steps + 1);
            let mut t: Vec<usize> = (0..=steps).map(|i| i * ratio + offset).collect();
            t.reverse();
            t.truncate(steps);
            t
        }
        "trailing" => {
            let ratio = total as f64 / steps as f64;
            (0..steps).map(|i| ((total as f64 - i as f64 * ratio).round_ties_even() as usize).saturating_sub(1)).collect()
        }
        other => bail!("timestep_spacing `{other}` is not supported (linspace, leading, trailing)"),
    })
}

impl DpmSolverMultistep {
    pub fn new(c: &SchedulerConfig, steps: usize) -> Result<DpmSolverMultistep> {
        let noise = NoiseSchedule::new(&c.schedule)?;
        let spacing = c.timestep_spacing.as_deref().unwrap_or("linspace");
        let t = timesteps(spacing, c.schedule.num_train_timesteps, steps.max(1), c.steps_offset)?;
        let timesteps: Vec<f64> = t.iter().map(|&t| t as f64).collect();
        let mut sigmas = sigmas_at(&noise.alphas_cumprod, &timesteps);
        // diffusers keeps the sigmas in float32.
        sigmas.iter_mut().for_each(|s| *s = *s as f32 as f64);
        sigmas.push(0.0);
        Ok(DpmSolverMultistep { prediction: noise.prediction, timesteps, sigmas, outputs: Vec::new() })
    }
}

impl Scheduler for DpmSolverMultistep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, _noise: Option<&Tensor>) -> Result<Tensor> {
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[index]);
        // The data prediction x₀.
        let x0 = match self.prediction {
            Prediction::Epsilon => ((sample - (model_output * sigma_s)?)? / alpha_s)?,
            Prediction::VPrediction => ((sample * alpha_s)? - (model_output * sigma_s)?)?,
        };
        self.outputs.push(x0.clone());
        if self.outputs.len() > 2 {
            self.outputs.remove(0);
        }
        let last = index + 1 == self.timesteps.len();
        let (sigma_t_k, sigma_s0) = (self.sigmas[index + 1], self.sigmas[index]);
        let (alpha_t, sigma_t) = alpha_sigma(sigma_t_k);
        // exp(-h) with h = λ_t − λ_s; at the final σ = 0, λ_t = ∞ and the step returns x₀.
        let ratio = if sigma_t_k == 0.0 { 0.0 } else { sigma_t / sigma_s };
        let exp_neg_h = if sigma_t_k == 0.0 { 0.0 } else { (-(lambda(sigma_t_k) - lambda(sigma_s0))).exp() };
        let first_order = self.outputs.len() < 2 || last;
        let out = if first_order {
            ((sample * ratio)? - (&x0 * (alpha_t * (exp_neg_h - 1.0)))?)?
        } else {
            let (m0, m1) = (&self.outputs[1], &self.outputs[0]);
            let sigma_s1 = self.sigmas[index - 1];
            let h = lambda(sigma_t_k) - lambda(sigma_s0);
            let h0 = lambda(sigma_s0) - lambda(sigma_s1);
            let r0 = h0 / h;
            let d1 = ((m0 - m1)? * (1.0 / r0))?;
            let a = alpha_t * (exp_neg_h - 1.0);
            (((sample * ratio)? - (m0 * a)?)? - (d1 * (0.5 * a))?)?
        };
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn timesteps_follow_diffusers_spacings() {
        let lin = timesteps("linspace", 1000, 25, 0).unwrap();
        assert_eq!((lin.len(), lin[0], lin[1], lin[24]), (25, 999, 959, 40));
        let lead = timesteps("leading", 1000, 25, 1).unwrap();
        assert_eq!((lead[0], lead[24]), (951, 39));
        let trail = timesteps("trailing", 1000, 25, 0).unwrap();
        assert_eq!((trail[0], trail[1], trail[24]), (999, 959, 39));
        assert!(timesteps("karras", 1000, 25, 0).is_err());
    }

    #[test]
    fn the_last_step_lands_on_the_data_prediction() {
        let c: SchedulerConfig = serde_json::from_str("{}").unwrap();
        let mut s = DpmSolverMultistep::new(&c, 3).unwrap();
        let dev = Device::Cpu;
        let mut x = Tensor::new(&[[0.5f64, -1.0]], &dev).unwrap();
        let eps = Tensor::new(&[[0.2f64, 0.1]], &dev).unwrap();
        for i in 0..3 {
            let (alpha, sigma) = alpha_sigma(s.sigmas[i]);
            let x0 = ((&x - (&eps * sigma).unwrap()).unwrap() / alpha).unwrap();
            x = s.step(&eps, i, &x, None).unwrap();
            if i == 2 {
                let d: f64 = (&x - &x0).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                assert!(d < 1e-12, "{d}");
            }
        }
    }
}
