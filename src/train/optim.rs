//! AdamW with f32 moments (decoupled weight decay, bias correction, as torch.optim.AdamW), whose
//! state can be saved and restored for checkpoints; global grad-norm clipping; diffusers' LR
//! schedules.

use super::inplace;
use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    /// diffusers' train_dreambooth.py defaults (adam_weight_decay 1e-2, eps 1e-8).
    fn default() -> Self {
        AdamWParams { lr: 5e-6, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

pub struct AdamW {
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    pub step: usize,
    pub params: AdamWParams,
}

impl AdamW {
    /// Optimises `vars` (name, Var), sorted by name so the state has a stable order.
    pub fn new(mut vars: Vec<(String, Var)>, params: AdamWParams) -> Result<AdamW> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let zeros = |v: &Var| v.as_tensor().zeros_like()?.to_dtype(DType::F32);
        let m = vars.iter().map(|(_, v)| zeros(v)).collect::<candle_core::Result<_>>()?;
        let v = vars.iter().map(|(_, v)| zeros(v)).collect::<candle_core::Result<_>>()?;
        Ok(AdamW { vars, m, v, step: 0, params })
    }

    /// One update with learning rate `lr`; Vars without a gradient are left alone (as torch).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, 1.0)
    }

    /// One update using `grad_scale` × each gradient (folds clipping and loss-scale division into
    /// the update instead of rewriting every gradient first).
    pub fn step_scaled(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let p = self.params;
        let (bc1, bc2) = (1.0 - p.beta1.powi(self.step as i32), 1.0 - p.beta2.powi(self.step as i32));
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            let g = g.to_dtype(DType::F32)?;
            let w = var.as_tensor();
            if [w, &g, &self.m[i], &self.v[i]].iter().all(|t| inplace::supported(t)) {
                // Fused CPU path: three passes over memory, no temporaries.
                // 1 - beta in f64 first: 1 - 0.999f32 is off by 1e-5 relative.
                let (b1, c1, b2, c2, s) = (p.beta1 as f32, (1.0 - p.beta1) as f32, p.beta2 as f32, (1.0 - p.beta2) as f32, grad_scale as f32);
                inplace::update2(&self.m[i], &g, |m, g| *m = b1 * *m + c1 * (g * s))?;
                inplace::update2(&self.v[i], &g, |v, g| *v = b2 * *v + c2 * (g * s) * (g * s))?;
                let (decay, step, bc1, bc2_sqrt, eps) = ((1.0 - lr * p.weight_decay) as f32, lr as f32, bc1 as f32, bc2.sqrt() as f32, p.eps as f32);
                inplace::update3(w, &self.m[i], &self.v[i], |w, m, v| *w = *w * decay - step * (m / bc1) / (v.sqrt() / bc2_sqrt + eps))?;
                continue;
            }
            let g = (g * grad_scale)?;
            self.m[i] = ((&self.m[i] * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            self.v[i] = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let update = ((&self.m[i] / bc1)? / ((&self.v[i] / bc2)?.sqrt()? + p.eps)?)?;
            let new = ((w.to_dtype(DType::F32)? * (1.0 - lr * p.weight_decay))? - (update * lr)?)?;
            var.set(&new.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// Moments as named tensors (`m.<name>`, `v.<name>`), for checkpoints.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        out
    }

    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for (i, (name, _)) in self.vars.iter().enumerate() {
            self.m[i] = state.get(&format!("m.{name}")).with_context(|| format!("checkpoint lacks m.{name}"))?.to_dtype(DType::F32)?;
            self.v[i] = state.get(&format!("v.{name}")).with_context(|| format!("checkpoint lacks v.{name}"))?.to_dtype(DType::F32)?;
        }
        self.step = step;
        Ok(())
    }
}

/// The global L2 norm of the gradients of `vars` (one transfer to the host).
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    let squares = vars.iter().filter_map(|v| grads.get(v.as_tensor())).map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_dtype(DType::F64)).collect::<candle_core::Result<Vec<_>>>()?;
    if squares.is_empty() {
        return Ok(0.0);
    }
    Ok(Tensor::stack(&squares, 0)?.sum_all()?.to_scalar::<f64>()?.sqrt())
}

/// The factor torch's `clip_grad_norm_` multiplies gradients by: at most 1.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// Scales every gradient so the global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads, vars)?;
    let scale = clip_factor(norm, max_norm);
    if scale < 1.0 {
        for v in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}

/// diffusers' `get_scheduler` learning-rate schedules.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LrSchedule {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
}

impl std::str::FromStr for LrSchedule {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<LrSchedule> {
        Ok(match s {
            "constant" => LrSchedule::Constant,
            "constant_with_warmup" => LrSchedule::ConstantWithWarmup,
            "linear" => LrSchedule::Linear,
            "cosine" => LrSchedule::Cosine,
            other => anyhow::bail!("unknown lr scheduler `{other}` (constant, constant_with_warmup, linear, cosine)"),
        })
    }
}

impl LrSchedule {
    /// The learning-rate multiplier at optimiser step `step` (0-based) of `total`.
    pub fn factor(self, step: usize, warmup: usize, total: usize) -> f64 {
        if self != LrSchedule::Constant && step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup.min(step)) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
        match self {
            LrSchedule::Constant | LrSchedule::ConstantWithWarmup => 1.0,
            LrSchedule::Linear => (1.0 - progress).max(0.0),
            LrSchedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_the_torch_update_rule() {
        // One parameter, two steps, hand-computed like torch.optim.AdamW.
        let var = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let p = AdamWParams { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], p).unwrap();
        let mut expect = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for step in 1..=2 {
            let loss = var.as_tensor().sqr().unwrap().sum_all().unwrap(); // grad = 2w
            opt.step(&loss.backward().unwrap(), 0.1).unwrap();
            for i in 0..2 {
                let g = 2.0 * expect[i];
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let (mh, vh) = (m[i] / (1.0 - 0.9f64.powi(step)), v[i] / (1.0 - 0.999f64.powi(step)));
                expect[i] = expect[i] * (1.0 - 0.1 * 0.01) - 0.1 * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        for i in 0..2 {
            assert!((got[i] as f64 - expect[i]).abs() < 1e-6, "{got:?} vs {expect:?}");
        }
        assert!(opt.state().contains_key("m.w") && opt.step == 2);
    }

    #[test]
    fn fused_and_tensor_op_updates_agree() {
        // f32 CPU Vars take the fused in-place path; f64 ones the tensor-op path.
        let values = [0.5f64, -1.5, 2.0, 0.25];
        let fused = Var::new(&values.map(|v| v as f32), &Device::Cpu).unwrap();
        let ops = Var::new(&values, &Device::Cpu).unwrap();
        let p = AdamWParams { lr: 0.05, weight_decay: 0.1, ..Default::default() };
        let (mut a, mut b) = (AdamW::new(vec![("w".into(), fused.clone())], p).unwrap(), AdamW::new(vec![("w".into(), ops.clone())], p).unwrap());
        for _ in 0..3 {
            let ga = fused.as_tensor().powf(3.0).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = ops.as_tensor().powf(3.0).unwrap().sum_all().unwrap().backward().unwrap();
            a.step_scaled(&ga, 0.05, 0.5).unwrap();
            b.step_scaled(&gb, 0.05, 0.5).unwrap();
        }
        let (x, y): (Vec<f32>, Vec<f64>) = (fused.as_tensor().to_vec1().unwrap(), ops.as_tensor().to_vec1().unwrap());
        for (x, y) in x.iter().zip(&y) {
            assert!((*x as f64 - y).abs() < 1e-5, "{x} vs {y}");
        }
        assert_ne!(x[0] as f64, values[0]);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let a = Var::new(&[3.0f32], &Device::Cpu).unwrap();
        let b = Var::new(&[4.0f32], &Device::Cpu).unwrap();
        let loss = ((a.as_tensor() * 1.0).unwrap() + (b.as_tensor() * 1.0).unwrap()).unwrap().sum_all().unwrap();
        let mut grads = (loss.clone() * 5.0).unwrap().backward().unwrap(); // grads (5, 5): norm 7.07
        let norm = clip_grad_norm(&mut grads, &[a.clone(), b.clone()], 1.0).unwrap();
        assert!((norm - 50f64.sqrt()).abs() < 1e-5);
        let ga: f32 = grads.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0];
        assert!((ga as f64 - 5.0 / 50f64.sqrt()).abs() < 1e-5);
    }

    #[test]
    fn lr_schedules_follow_diffusers() {
        assert_eq!(LrSchedule::Constant.factor(3, 10, 100), 1.0);
        assert_eq!(LrSchedule::ConstantWithWarmup.factor(5, 10, 100), 0.5);
        assert!((LrSchedule::Linear.factor(55, 10, 100) - 0.5).abs() < 1e-12);
        assert!((LrSchedule::Cosine.factor(55, 10, 100) - 0.5).abs() < 1e-12);
        assert!(LrSchedule::Cosine.factor(100, 10, 100).abs() < 1e-12);
    }
}
