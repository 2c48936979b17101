//! The GPU correctness check run before GPU benchmarks: the same small SD-shaped UNet, weights,
//! batch and timesteps on the CPU (f32, the reference) and on the target device and dtype; the
//! DreamBooth loss and every parameter's gradient must agree within the dtype's tolerance.

use crate::models::unet::UNet;
use crate::train::loss::{dreambooth_loss, LossConfig};
use crate::rng::TrainRng;
use crate::pipeline::schedule::{NoiseSchedule, ScheduleConfig};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

#[derive(Clone, Debug, serde::Serialize)]
pub struct GradCheck {
    pub device: String,
    pub compute_dtype: String,
    pub gradient_checkpointing: bool,
    pub reference_loss: f64,
    pub loss: f64,
    pub loss_rel_diff: f64,
    pub tensors: usize,
    /// The largest ‖g − g_ref‖ / ‖g_ref‖ over all parameters, and where.
    pub worst_grad_rel_l2: f64,
    pub worst_tensor: String,
    pub tolerance: f64,
    pub passed: bool,
}

impl GradCheck {
    pub fn summary(&self) -> String {
        format!(
            "gpu check   {} {}{} vs cpu f32: loss {:.6} vs {:.6} (rel {:.1e}); {} gradients, worst rel L2 {:.1e} ({}); tolerance {:.0e}: {}",
            self.device,
            self.compute_dtype,
            if self.gradient_checkpointing { " checkpointed" } else { "" },
            self.loss,
            self.reference_loss,
            self.loss_rel_diff,
            self.tensors,
            self.worst_grad_rel_l2,
            self.worst_tensor,
            self.tolerance,
            if self.passed { "PASS" } else { "FAIL" }
        )
    }
}

/// Relative tolerance for gradients (and the loss) computed in `dtype` on a GPU against CPU f32.
/// f32 leaves room for TF32 convolutions and reordered sums; bf16/f16 for their 8/11-bit mantissas.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 | DType::F64 => 1e-2,
        DType::F16 => 5e-2,
        _ => 1.5e-1,
    }
}

/// Loss and named gradients of one DreamBooth step on `dev` in `dtype`.
fn loss_and_grads(dev: &Device, dtype: DType, checkpointing: bool) -> Result<(f64, Vec<(String, Tensor)>)> {
    let varmap = VarMap::new();
    let config = super::sd15::small_unet()?;
    let unet = UNet::new(VarBuilder::from_varmap(&varmap, DType::F32, dev), &config)?;
    let mut vars: Vec<_> = varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut rng = TrainRng::new(1234);
    for (_, v) in &vars {
        v.set(&(rng.normal(v.dims(), &Device::Cpu)? * 0.1)?.to_device(dev)?)?;
    }
    if checkpointing {
        unet.enable_gradient_checkpointing(&varmap.all_vars());
    }
    let latents = rng.normal(&[2, 4, 16, 16], &Device::Cpu)?.to_device(dev)?.to_dtype(dtype)?;
    let noise = rng.normal(&[2, 4, 16, 16], &Device::Cpu)?.to_device(dev)?.to_dtype(dtype)?;
    let context = rng.normal(&[2, 7, config.cross_attention_dim], &Device::Cpu)?.to_device(dev)?.to_dtype(dtype)?;
    let schedule = NoiseSchedule::new(&serde_json::from_str::<ScheduleConfig>("{}")?)?;
    let cfg = LossConfig { with_prior_preservation: true, prior_loss_weight: 1.0, snr_gamma: None };
    let loss = dreambooth_loss(&unet, &schedule, &latents, &context, &noise, &[150, 800], &cfg)?;
    // f16 gradients underflow without loss scaling (as torch's GradScaler does, scale then unscale).
    let scale = if dtype == DType::F16 { 4096.0 } else { 1.0 };
    let grads = unet.backward(&(&loss * scale)?)?;
    let named = vars
        .iter()
        .map(|(name, v)| {
            let g = grads.get(v.as_tensor()).ok_or_else(|| anyhow::anyhow!("`{name}` got no gradient on {dev:?}"))?;
            Ok((name.clone(), (g.to_dtype(DType::F32)?.to_device(&Device::Cpu)? / scale)?))
        })
        .collect::<Result<_>>()?;
    Ok((loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, named))
}

/// Compares `dev` computing in `dtype` (optionally checkpointed) with the CPU in f32.
pub fn check(dev: &Device, dtype: DType, checkpointing: bool) -> Result<GradCheck> {
    let (ref_loss, ref_grads) = loss_and_grads(&Device::Cpu, DType::F32, false)?;
    let (loss, grads) = loss_and_grads(dev, dtype, checkpointing)?;
    let (mut worst, mut worst_name) = (0f64, String::new());
    for ((name, r), (_, g)) in ref_grads.iter().zip(&grads) {
        let norm = r.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?.sqrt();
        let diff = (g - r)?.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?.sqrt();
        let rel = diff / norm.max(1e-30);
        if !(rel <= worst) {
            (worst, worst_name) = (rel, name.clone());
        }
    }
    let loss_rel = (loss - ref_loss).abs() / ref_loss.abs().max(1e-30);
    let tol = tolerance(dtype);
    Ok(GradCheck {
        device: crate::device::describe(dev),
        compute_dtype: format!("{dtype:?}").to_lowercase(),
        gradient_checkpointing: checkpointing,
        reference_loss: ref_loss,
        loss,
        loss_rel_diff: loss_rel,
        tensors: grads.len(),
        worst_grad_rel_l2: worst,
        worst_tensor: worst_name,
        tolerance: tol,
        passed: loss_rel <= tol && worst <= tol,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_device_and_dtype_agree_exactly_and_checkpointing_too() {
        let c = check(&Device::Cpu, DType::F32, false).unwrap();
        assert!(c.passed && c.loss_rel_diff == 0.0 && c.worst_grad_rel_l2 == 0.0, "{}", c.summary());
        assert!(c.tensors > 100);
        let c = check(&Device::Cpu, DType::F32, true).unwrap();
        assert!(c.passed && c.worst_grad_rel_l2 < 1e-5, "{}", c.summary());
    }

    #[test]
    fn a_lower_precision_run_is_measured_not_waved_through() {
        // f16 compute differs from f32 by rounding: visible, and within the f16 tolerance.
        let c = check(&Device::Cpu, DType::F16, false).unwrap();
        assert!(c.worst_grad_rel_l2 > 1e-4, "{}", c.summary());
        assert!(c.passed, "{}", c.summary());
    }
}
