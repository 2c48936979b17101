//! The DDPM training schedule from `scheduler/scheduler_config.json`: per-sample noising, the
//! epsilon / v-prediction target, and SNR (for min-SNR weighting).

use anyhow::{bail, Result};
use candle_core::{Tensor, D};
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
pub struct ScheduleConfig {
    #[serde(default = "default_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_start")]
    pub beta_start: f64,
    #[serde(default = "default_end")]
    pub beta_end: f64,
    #[serde(default = "default_kind")]
    pub beta_schedule: String,
    #[serde(default = "default_prediction")]
    pub prediction_type: String,
}

/// `scheduler/scheduler_config.json`: the training schedule plus what DDIM sampling reads.
#[derive(Clone, Debug, Deserialize)]
pub struct SchedulerConfig {
    #[serde(flatten)]
    pub schedule: ScheduleConfig,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "default_true")]
    pub set_alpha_to_one: bool,
    /// `linspace`, `leading` or `trailing`; absent: each sampler's own default.
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    /// DDIM clamps its x₀ prediction to ±`clip_sample_range` (diffusers' DDIM default: on, 1.0).
    #[serde(default = "default_true")]
    pub clip_sample: bool,
    #[serde(default = "default_clip_range")]
    pub clip_sample_range: f64,
    /// DDPM's variance: `fixed_small` (default), `fixed_large`, or a learned one (read as fixed_small).
    #[serde(default)]
    pub variance_type: Option<String>,
}

fn default_clip_range() -> f64 {
    1.0
}

fn default_true() -> bool {
    true
}

fn default_steps() -> usize {
    1000
}
fn default_start() -> f64 {
    0.00085
}
fn default_end() -> f64 {
    0.012
}
fn default_kind() -> String {
    "scaled_linear".into()
}
fn default_prediction() -> String {
    "epsilon".into()
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

pub struct NoiseSchedule {
    /// ᾱ_t for t = 0..num_train_timesteps.
    pub alphas_cumprod: Vec<f64>,
    pub prediction: Prediction,
}

impl NoiseSchedule {
    pub fn new(c: &ScheduleConfig) -> Result<NoiseSchedule> {
        let n = c.num_train_timesteps;
        let betas: Vec<f64> = match c.beta_schedule.as_str() {
            "linear" => (0..n).map(|i| c.beta_start + (c.beta_end - c.beta_start) * i as f64 / (n - 1) as f64).collect(),
            "scaled_linear" => (0..n)
                .map(|i| {
                    let (a, b) = (c.beta_start.sqrt(), c.beta_end.sqrt());
                    (a + (b - a) * i as f64 / (n - 1) as f64).powi(2)
                })
                .collect(),
            other => bail!("beta_schedule `{other}` is not supported (linear, scaled_linear)"),
        };
        let mut acc = 1.0;
        let alphas_cumprod = betas.iter().map(|b| {
            acc *= 1.0 - b;
            acc
        });
        let prediction = match c.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            other => bail!("prediction_type `{other}` is not supported (epsilon, v_prediction)"),
        };
        Ok(NoiseSchedule { alphas_cumprod: alphas_cumprod.collect(), prediction })
    }

    /// Per-sample coefficients `(B, 1, 1, 1)` gathered for integer timesteps.
    fn coefs(&self, timesteps: &[usize], like: &Tensor, f: impl Fn(f64) -> f64) -> Result<Tensor> {
        let v: Vec<f64> = timesteps.iter().map(|t| f(self.alphas_cumprod[*t])).collect();
        Ok(Tensor::from_vec(v, (timesteps.len(), 1, 1, 1), like.device())?.to_dtype(like.dtype())?)
    }

    /// x_t = √ᾱ_t · x_0 + √(1−ᾱ_t) · ε, one timestep per sample.
    pub fn add_noise(&self, latents: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let a = self.coefs(timesteps, latents, f64::sqrt)?;
        let s = self.coefs(timesteps, latents, |ac| (1.0 - ac).sqrt())?;
        Ok((latents.broadcast_mul(&a)? + noise.broadcast_mul(&s)?)?)
    }

    /// What the UNet should predict: ε, or v = √ᾱ_t · ε − √(1−ᾱ_t) · x_0.
    pub fn target(&self, latents: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        match self.prediction {
            Prediction::Epsilon => Ok(noise.clone()),
            Prediction::VPrediction => {
                let a = self.coefs(timesteps, latents, f64::sqrt)?;
                let s = self.coefs(timesteps, latents, |ac| (1.0 - ac).sqrt())?;
                Ok((noise.broadcast_mul(&a)? - latents.broadcast_mul(&s)?)?)
            }
        }
    }

    /// Min-SNR-γ loss weights per sample (Hang et al. 2023, as diffusers' train scripts).
    pub fn snr_weights(&self, timesteps: &[usize], gamma: f64) -> Vec<f64> {
        timesteps
            .iter()
            .map(|t| {
                let ac = self.alphas_cumprod[*t];
                let snr = ac / (1.0 - ac);
                let w = snr.min(gamma) / snr;
                if self.prediction == Prediction::VPrediction {
                    snr.min(gamma) / (snr + 1.0)
                } else {
                    w
                }
            })
            .collect()
    }
}

/// Mean squared error per sample `(B,)`.
pub fn mse_per_sample(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    let b = pred.dim(0)?;
    Ok((pred - target)?.sqr()?.reshape((b, ()))?.mean(D::Minus1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_linear_matches_sd_values() {
        let c: ScheduleConfig = serde_json::from_str("{}").unwrap();
        let s = NoiseSchedule::new(&c).unwrap();
        // KerasCV's hard-coded _ALPHAS_CUMPROD table: first 0.99915, last 0.0046601.
        assert!((s.alphas_cumprod[0] - 0.99915).abs() < 1e-6);
        assert!((s.alphas_cumprod[999] - 0.0046601).abs() < 1e-6);
    }

    #[test]
    fn noising_is_per_sample_and_v_target_is_consistent() {
        let dev = candle_core::Device::Cpu;
        let c: ScheduleConfig = serde_json::from_str(r#"{"prediction_type": "v_prediction"}"#).unwrap();
        let s = NoiseSchedule::new(&c).unwrap();
        let x0 = Tensor::ones((2, 1, 1, 1), candle_core::DType::F64, &dev).unwrap();
        let eps = (Tensor::ones((2, 1, 1, 1), candle_core::DType::F64, &dev).unwrap() * 2.0).unwrap();
        let xt: Vec<f64> = s.add_noise(&x0, &eps, &[0, 999]).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let (a0, a1) = (s.alphas_cumprod[0], s.alphas_cumprod[999]);
        assert!((xt[0] - (a0.sqrt() + 2.0 * (1.0 - a0).sqrt())).abs() < 1e-12);
        assert!((xt[1] - (a1.sqrt() + 2.0 * (1.0 - a1).sqrt())).abs() < 1e-12);
        // x0 = √ᾱ x_t − √(1−ᾱ) v recovers the clean latent.
        let v: Vec<f64> = s.target(&x0, &eps, &[0, 999]).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (i, ac) in [a0, a1].iter().enumerate() {
            assert!((ac.sqrt() * xt[i] - (1.0 - ac).sqrt() * v[i] - 1.0).abs() < 1e-12);
        }
        let w = s.snr_weights(&[0, 999], 5.0);
        assert!(w[0] < 0.01 && w[1] > 0.0 && w[1] <= 1.0);
    }
}
