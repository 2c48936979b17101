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

/// The optimiser of a run: AdamW with f32 moments, or with 8-bit block-wise moments
/// (`--use_8bit_adam`, bitsandbytes' AdamW8bit).
pub enum Optimizer {
    AdamW(AdamW),
    AdamW8bit(super::adamw8bit::AdamW8bit),
}

impl Optimizer {
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams, eight_bit: bool) -> Result<Optimizer> {
        Ok(match eight_bit {
            false => Optimizer::AdamW(AdamW::new(vars, params)?),
            true => Optimizer::AdamW8bit(super::adamw8bit::AdamW8bit::new(vars, params)?),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Optimizer::AdamW(_) => "AdamW",
            Optimizer::AdamW8bit(_) => "AdamW8bit",
        }
    }

    pub fn step_scaled(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        match self {
            Optimizer::AdamW(o) => o.step_scaled(grads, lr, grad_scale),
            Optimizer::AdamW8bit(o) => o.step_scaled(grads, lr, grad_scale),
        }
    }

    pub fn state(&self) -> HashMap<String, Tensor> {
        match self {
            Optimizer::AdamW(o) => o.state(),
            Optimizer::AdamW8bit(o) => o.state(),
        }
    }

    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        match self {
            Optimizer::AdamW(o) => o.load_state(state, step),
            Optimizer::AdamW8bit(o) => o.load_state(state, step),
        }
    }

    /// Bytes of optimiser state (the moments; 8 per parameter for f32 AdamW).
    pub fn state_bytes(&self) -> usize {
        match self {
            Optimizer::AdamW(o) => o.m.iter().chain(&o.v).map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum(),
            Optimizer::AdamW8bit(o) => o.state_bytes(),
        }
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

/// diffusers' `get_scheduler` learning-rate schedules (`diffusers.optimization`), as multipliers
/// of the base learning rate per optimiser step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LrSchedule {
    Constant,
    ConstantWithWarmup,
    Linear,
    /// Half a cosine wave from 1 to 0 after warmup.
    Cosine,
    /// `cycles` cosine waves, each restarting at 1 (`--lr_num_cycles`).
    CosineWithRestarts { cycles: f64 },
    /// `(1 - progress)^power` from the base rate down to `lr_end` (1e-7, as diffusers), given as
    /// `end_ratio` = lr_end / base rate.
    Polynomial { power: f64, end_ratio: f64 },
}

/// diffusers' names of the schedules, as `--lr_scheduler` takes them.
pub const LR_SCHEDULES: &str = "linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup";

impl std::str::FromStr for LrSchedule {
    type Err = anyhow::Error;
    /// A schedule by name with diffusers' defaults (1 cycle, power 1, base rate 5e-6).
    fn from_str(s: &str) -> Result<LrSchedule> {
        LrSchedule::from_args(s, 1.0, 1.0, 5e-6)
    }
}

impl LrSchedule {
    /// The schedule `--lr_scheduler name` names, with `--lr_num_cycles`, `--lr_power` and the
    /// base learning rate (for polynomial decay's end point).
    pub fn from_args(name: &str, num_cycles: f64, power: f64, lr: f64) -> Result<LrSchedule> {
        const LR_END: f64 = 1e-7;
        Ok(match name {
            "constant" => LrSchedule::Constant,
            "constant_with_warmup" => LrSchedule::ConstantWithWarmup,
            "linear" => LrSchedule::Linear,
            "cosine" => LrSchedule::Cosine,
            "cosine_with_restarts" => LrSchedule::CosineWithRestarts { cycles: num_cycles },
            "polynomial" => {
                anyhow::ensure!(lr > LR_END, "--lr_scheduler polynomial: the learning rate ({lr}) must be above lr_end ({LR_END})");
                LrSchedule::Polynomial { power, end_ratio: LR_END / lr }
            }
            "piecewise_constant" => anyhow::bail!("--lr_scheduler piecewise_constant needs step rules, which train_dreambooth.py does not take; use one of {LR_SCHEDULES}"),
            other => anyhow::bail!("unknown --lr_scheduler `{other}` (one of {LR_SCHEDULES})"),
        })
    }

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
            LrSchedule::CosineWithRestarts { cycles } => match progress >= 1.0 {
                true => 0.0,
                false => (0.5 * (1.0 + (std::f64::consts::PI * ((cycles * progress) % 1.0)).cos())).max(0.0),
            },
            LrSchedule::Polynomial { power, end_ratio } => match step > total {
                true => end_ratio,
                false => {
                    let remaining = 1.0 - (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
                    (1.0 - end_ratio) * remaining.powf(power) + end_ratio
                }
            },
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
        // Two restarts: progress 0.25 is a quarter wave into the first cycle, 0.5 restarts at 1.
        let restarts = LrSchedule::from_args("cosine_with_restarts", 2.0, 1.0, 5e-6).unwrap();
        assert!((restarts.factor(35, 10, 110) - 0.5).abs() < 1e-12);
        assert!((restarts.factor(60, 10, 110) - 1.0).abs() < 1e-12);
        assert_eq!(restarts.factor(110, 10, 110), 0.0);
        // Quadratic decay from 1e-4 to 1e-7: half way, a quarter of the range is left.
        let poly = LrSchedule::from_args("polynomial", 1.0, 2.0, 1e-4).unwrap();
        assert!((poly.factor(60, 10, 110) * 1e-4 - (0.25 * (1e-4 - 1e-7) + 1e-7)).abs() < 1e-15);
        assert!((poly.factor(200, 10, 110) * 1e-4 - 1e-7).abs() < 1e-18);
        assert!(LrSchedule::from_args("polynomial", 1.0, 1.0, 1e-8).is_err());
        assert!("piecewise_constant".parse::<LrSchedule>().unwrap_err().to_string().contains("step rules"));
    }
}
