//! The DreamBooth objective of diffusers' train_dreambooth.py: MSE between the UNet's prediction
//! and the target on noised latents; with prior preservation the batch's second half holds class
//! images and adds `prior_loss_weight` × their MSE; min-SNR-γ weights the instance half.

use crate::pipeline::schedule::{mse_per_sample, NoiseSchedule};
use crate::models::unet::UNet;
use anyhow::{ensure, Result};
use candle_core::Tensor;

#[derive(Clone, Copy, Debug)]
pub struct LossConfig {
    pub with_prior_preservation: bool,
    pub prior_loss_weight: f64,
    pub snr_gamma: Option<f64>,
}

/// Loss for `latents` `(B, C, H, W)` (instance images first, then class images when prior
/// preservation is on), text `context`, `noise` and one timestep per sample.
pub fn dreambooth_loss(unet: &UNet, schedule: &NoiseSchedule, latents: &Tensor, context: &Tensor, noise: &Tensor, timesteps: &[usize], cfg: &LossConfig) -> Result<Tensor> {
    let b = latents.dim(0)?;
    ensure!(timesteps.len() == b, "{} timesteps for a batch of {b}", timesteps.len());
    let noisy = schedule.add_noise(latents, noise, timesteps)?;
    let t = Tensor::from_vec(timesteps.iter().map(|t| *t as f32).collect::<Vec<_>>(), b, latents.device())?;
    let pred = unet.forward(&noisy, &t, context)?;
    let target = schedule.target(latents, noise, timesteps)?;
    let per_sample = mse_per_sample(&pred.to_dtype(candle_core::DType::F32)?, &target.to_dtype(candle_core::DType::F32)?)?;
    let instance_count = if cfg.with_prior_preservation {
        ensure!(b % 2 == 0, "prior preservation needs an even batch (instance + class halves), got {b}");
        b / 2
    } else {
        b
    };
    let instance = per_sample.narrow(0, 0, instance_count)?;
    let instance_loss = match cfg.snr_gamma {
        Some(gamma) => {
            let w = schedule.snr_weights(&timesteps[..instance_count], gamma);
            let w = Tensor::from_vec(w.iter().map(|v| *v as f32).collect::<Vec<_>>(), instance_count, latents.device())?;
            (instance * w)?.mean_all()?
        }
        None => instance.mean_all()?,
    };
    if !cfg.with_prior_preservation {
        return Ok(instance_loss);
    }
    let prior_loss = per_sample.narrow(0, instance_count, b - instance_count)?.mean_all()?;
    Ok((instance_loss + (prior_loss * cfg.prior_loss_weight)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::testing::assert_every_var_has_a_gradient;
    use crate::models::unet::{UNet, UNetConfig};
    use crate::train::optim::{AdamW, AdamWParams};
    use crate::pipeline::schedule::ScheduleConfig;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    fn setup() -> (VarMap, UNet, NoiseSchedule, Tensor, Tensor, Tensor) {
        let cfg: UNetConfig = crate::models::testing::tiny_unet_config();
        let varmap = VarMap::new();
        let unet = UNet::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &cfg).unwrap();
        let schedule = NoiseSchedule::new(&serde_json::from_str::<ScheduleConfig>("{}").unwrap()).unwrap();
        let dev = Device::Cpu;
        let latents = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &dev).unwrap();
        let context = Tensor::randn(0f32, 1.0, (2, 5, 12), &dev).unwrap();
        let noise = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &dev).unwrap();
        (varmap, unet, schedule, latents, context, noise)
    }

    #[test]
    fn prior_half_is_weighted_and_instance_half_alone_without_prior() {
        let (_, unet, schedule, latents, context, noise) = setup();
        let t = [100, 700];
        let cfg = |prior: bool, w: f64| LossConfig { with_prior_preservation: prior, prior_loss_weight: w, snr_gamma: None };
        let scalar = |c: LossConfig| dreambooth_loss(&unet, &schedule, &latents, &context, &noise, &t, &c).unwrap().to_scalar::<f32>().unwrap();
        let mean = scalar(cfg(false, 0.0));
        let w0 = scalar(cfg(true, 0.0));
        let w1 = scalar(cfg(true, 1.0));
        let w3 = scalar(cfg(true, 3.0));
        let prior = w1 - w0;
        assert!(prior > 0.0);
        assert!((w3 - (w0 + 3.0 * prior)).abs() < 1e-4 * w3.abs());
        assert!((mean - (w0 + prior) / 2.0).abs() < 1e-4 * mean.abs(), "batch mean = mean of the two halves");
    }

    #[test]
    fn loss_falls_when_training_on_a_fixed_batch() {
        let (varmap, unet, schedule, latents, context, noise) = setup();
        let vars: Vec<_> = varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut opt = AdamW::new(vars, AdamWParams { lr: 2e-3, weight_decay: 0.0, ..Default::default() }).unwrap();
        let cfg = LossConfig { with_prior_preservation: true, prior_loss_weight: 1.0, snr_gamma: None };
        let t = [300, 600];
        let mut losses = Vec::new();
        for _ in 0..40 {
            let loss = dreambooth_loss(&unet, &schedule, &latents, &context, &noise, &t, &cfg).unwrap();
            losses.push(loss.to_scalar::<f32>().unwrap());
            opt.step(&loss.backward().unwrap(), 2e-3).unwrap();
        }
        assert!(losses[39] < 0.5 * losses[0], "loss did not fall: {losses:?}");
    }

    #[test]
    fn half_precision_compute_trains_f32_master_weights() {
        let (varmap, unet, schedule, latents, context, noise) = setup();
        let cfg = LossConfig { with_prior_preservation: true, prior_loss_weight: 1.0, snr_gamma: None };
        let full = dreambooth_loss(&unet, &schedule, &latents, &context, &noise, &[10, 500], &cfg).unwrap().to_scalar::<f32>().unwrap();
        // Candle's CPU backend has no bf16 matmul: bf16 is for CUDA (verified there, issue 5).
        for dtype in [DType::F16] {
            let cast = |t: &Tensor| t.to_dtype(dtype).unwrap();
            let loss = dreambooth_loss(&unet, &schedule, &cast(&latents), &cast(&context), &cast(&noise), &[10, 500], &cfg).unwrap();
            assert_eq!(loss.dtype(), DType::F32, "the loss is reduced in f32");
            let half = loss.to_scalar::<f32>().unwrap();
            assert!((half - full).abs() < 0.05 * full, "{dtype:?}: {half} vs f32 {full}");
            let grads = loss.backward().unwrap();
            assert!(assert_every_var_has_a_gradient(&varmap, &grads) > 100, "{dtype:?}");
            let g = grads.get(varmap.data().lock().unwrap()["conv_in.weight"].as_tensor()).unwrap().dtype();
            assert_eq!(g, DType::F32, "gradients reach the f32 master weights");
        }
    }
}
