//! Gradient checks shared by the model tests.

use crate::models::unet::UNet;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarMap;

/// Every Var of `varmap` has a finite gradient that is not all zeros; returns how many Vars.
pub fn assert_every_var_has_a_gradient(varmap: &VarMap, grads: &GradStore) -> usize {
    let vars = varmap.data().lock().unwrap();
    for (name, var) in vars.iter() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("`{name}` got no gradient (the graph is cut)"));
        let values: Vec<f64> = g.to_dtype(candle_core::DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(values.iter().all(|v| v.is_finite()), "`{name}`: non-finite gradient");
        assert!(values.iter().any(|v| *v != 0.0), "`{name}`: gradient is all zeros");
    }
    vars.len()
}

/// Central finite differences (f64 model) against backprop on three elements of each named Var.
pub fn finite_difference_check(varmap: &VarMap, names: &[&str], loss: impl Fn() -> Result<Tensor>) {
    let grads = loss().unwrap().backward().unwrap();
    let h = 1e-6;
    for name in names {
        let var = varmap.data().lock().unwrap().get(*name).unwrap_or_else(|| panic!("no Var `{name}`")).clone();
        let analytic: Vec<f64> = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let original: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let n = original.len();
        // The largest-gradient element plus two spread ones.
        let biggest = (0..n).max_by(|a, b| analytic[*a].abs().total_cmp(&analytic[*b].abs())).unwrap();
        for index in [biggest, n / 3, (2 * n) / 3] {
            let at = |delta: f64| {
                let mut v = original.clone();
                v[index] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), var.device()).unwrap()).unwrap();
                loss().unwrap().to_scalar::<f64>().unwrap()
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            var.set(&Tensor::from_vec(original.clone(), var.shape(), var.device()).unwrap()).unwrap();
            let a = analytic[index];
            assert!((a - numeric).abs() <= 1e-6 + 1e-4 * a.abs().max(numeric.abs()), "`{name}`[{index}]: backprop {a}, finite difference {numeric}");
        }
    }
}

/// A two-block UNet config small enough for CPU tests (cross-attention width 12).
pub fn tiny_unet_config() -> crate::models::unet::UNetConfig {
    serde_json::from_value(serde_json::json!({
        "in_channels": 4, "out_channels": 4, "block_out_channels": [8, 16], "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 12, "attention_head_dim": 2, "norm_num_groups": 4
    }))
    .unwrap()
}

/// Fixed inputs for a tiny UNet (cross-attention width 12): latents `(2, 4, 8, 8)`, per-sample
/// timesteps 10 and 900, context `(2, 5, 12)`.
pub fn unet_inputs(dtype: DType) -> (Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let n = |shape: &[usize], seed: f64| {
        let count: usize = shape.iter().product();
        let v: Vec<f64> = (0..count).map(|i| ((i as f64 + seed) * 0.7).sin()).collect();
        Tensor::from_vec(v, shape, &dev).unwrap().to_dtype(dtype).unwrap()
    };
    (n(&[2, 4, 8, 8], 0.0), Tensor::new(&[10f32, 900.0], &dev).unwrap(), n(&[2, 5, 12], 3.0))
}

/// A scalar of the UNet's output on [`unet_inputs`] that every output element feeds, unevenly.
pub fn unet_probe_loss(model: &UNet, dtype: DType) -> Result<Tensor> {
    let (x, t, ctx) = unet_inputs(dtype);
    let out = model.forward(&x, &t, &ctx)?;
    let w = Tensor::arange(0f32, out.elem_count() as f32, &Device::Cpu)?.reshape(out.shape())?.to_dtype(dtype)?;
    (&out * (w * 0.013)?.cos()?)?.sum_all()? + out.sqr()?.sum_all()?
}
