//! Scaled dot-product attention that stores no attention matrix for backward. The forward pass
//! runs candle's fused softmax on `q kᵀ` (outside the graph) and keeps only q, k, v and the output;
//! backward recomputes the probabilities from q and k, as FlashAttention's backward does:
//! `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ∘ (dP − rowsum(dP ∘ P))`, `dQ = s·dS K`, `dK = s·dSᵀ Q`.
//! At SD 1.5's 64×64 latents an attention matrix is 8 heads × 4096² per sample; the primitive-op
//! softmax would keep several of those per layer until backward.

use super::layers::reduction_dtype;
use super::precomputed::Precomputed;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use std::sync::Arc;

/// `softmax(q kᵀ · scale) v` for `(B, H, N, d)` / `(B, H, M, d)` tensors, the softmax in f32.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attention_within(q, k, v, scale, PROBABILITY_BUDGET)
}

fn attention_within(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, budget: usize) -> Result<Tensor> {
    let output = forward(&q.detach(), &k.detach(), &v.detach(), scale, budget)?;
    if !q.track_op() && !k.track_op() && !v.track_op() {
        return Ok(output);
    }
    q.apply_op3_arc(k, v, Arc::new(Box::new(Attention { scale, budget, output: Precomputed::new("attention", output)? })))
}

/// Attention probabilities `(B, H, N, M)` in f32 (f64 for f64 inputs).
fn probabilities(q: &Tensor, k: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = (q.matmul(&k.t()?)?.to_dtype(reduction_dtype(q.dtype()))? * scale)?;
    candle_nn::ops::softmax_last_dim(&scores)
}

/// Bytes of f32 attention probabilities materialised at a time: (batch × head) slices are
/// processed in groups this size, bounding the transient memory of long sequences.
const PROBABILITY_BUDGET: usize = 256 << 20;

/// Runs `f` on groups of (batch × head) slices of `(B, H, N, d)` tensors and concatenates the results.
fn in_groups(q: &Tensor, k: &Tensor, budget: usize, mut f: impl FnMut(usize, usize) -> Result<Vec<Tensor>>) -> Result<Vec<Tensor>> {
    let (b, h, n, _) = q.dims4()?;
    let m = k.dim(2)?;
    let slices = b * h;
    let per_group = (budget / (n * m * 4).max(1)).clamp(1, slices);
    if per_group == slices {
        return f(0, slices);
    }
    let mut parts: Vec<Vec<Tensor>> = Vec::new();
    for start in (0..slices).step_by(per_group) {
        parts.push(f(start, per_group.min(slices - start))?);
    }
    (0..parts[0].len()).map(|i| Tensor::cat(&parts.iter().map(|p| p[i].clone()).collect::<Vec<_>>(), 0)).collect()
}

/// `(B, H, N, d)` -> `(B·H, N, d)`.
fn flat(t: &Tensor) -> Result<Tensor> {
    let (b, h, n, d) = t.dims4()?;
    t.reshape((b * h, n, d))
}

fn forward(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, budget: usize) -> Result<Tensor> {
    let (fq, fk, fv) = (flat(q)?, flat(k)?, flat(v)?);
    let out = in_groups(q, k, budget, |start, len| {
        let (q, k, v) = (fq.narrow(0, start, len)?, fk.narrow(0, start, len)?, fv.narrow(0, start, len)?);
        Ok(vec![probabilities(&q, &k, scale)?.to_dtype(v.dtype())?.matmul(&v)?])
    })?;
    out[0].reshape(q.shape())
}

struct Attention {
    scale: f64,
    budget: usize,
    output: Precomputed,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention-recompute"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.output.cpu()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.output.cuda()
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (fq, fk, fv, fg) = (flat(&q.detach())?, flat(&k.detach())?, flat(&v.detach())?, flat(&grad.detach())?);
        let scale = self.scale;
        let grads = in_groups(q, k, self.budget, |start, len| {
            let (q, k, v, grad) = (fq.narrow(0, start, len)?, fk.narrow(0, start, len)?, fv.narrow(0, start, len)?, fg.narrow(0, start, len)?);
            let dtype = v.dtype();
            let p = probabilities(&q, &k, scale)?; // f32 (f64 for f64 inputs)
            let grad_v = p.to_dtype(dtype)?.t()?.matmul(&grad)?;
            let dp = grad.matmul(&v.t()?)?.to_dtype(p.dtype())?;
            let row = (&dp * &p)?.sum_keepdim(D::Minus1)?;
            let ds = ((p * dp.broadcast_sub(&row)?)? * scale)?.to_dtype(dtype)?;
            Ok(vec![ds.matmul(&k)?, ds.t()?.matmul(&q)?, grad_v])
        })?;
        let (grad_q, grad_k, grad_v) = (grads[0].reshape(q.shape())?, grads[1].reshape(k.shape())?, grads[2].reshape(v.shape())?);
        Ok((Some(grad_q), Some(grad_k), Some(grad_v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn gradients_equal_the_primitive_attention() {
        let dev = Device::Cpu;
        let n = |shape: &[usize], seed: f64| {
            let count: usize = shape.iter().product();
            Tensor::from_vec((0..count).map(|i| ((i as f64 + seed) * 0.73).sin()).collect::<Vec<f64>>(), shape, &dev).unwrap()
        };
        // The last budget makes forward and backward run two (batch × head) slices at a time.
        for (len_q, len_k, budget) in [(6, 6, PROBABILITY_BUDGET), (6, 4, PROBABILITY_BUDGET), (6, 4, 2 * 6 * 4 * 4)] {
            let q = Var::from_tensor(&n(&[2, 3, len_q, 5], 0.0)).unwrap();
            let k = Var::from_tensor(&n(&[2, 3, len_k, 5], 1.0)).unwrap();
            let v = Var::from_tensor(&n(&[2, 3, len_k, 5], 2.0)).unwrap();
            let probe = |y: &Tensor| (y * n(y.dims(), 3.0)).unwrap().sum_all().unwrap();
            let ours = attention_within(q.as_tensor(), k.as_tensor(), v.as_tensor(), 0.4, budget).unwrap();
            let scores = (q.as_tensor().matmul(&k.as_tensor().t().unwrap()).unwrap() * 0.4).unwrap();
            let plain = candle_nn::ops::softmax(&scores, D::Minus1).unwrap().matmul(v.as_tensor()).unwrap();
            let (g1, g2) = (probe(&ours).backward().unwrap(), probe(&plain).backward().unwrap());
            for var in [&q, &k, &v] {
                let a: Vec<f64> = g1.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let b: Vec<f64> = g2.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() < 1e-6 * (1.0 + y.abs()), "{x} vs {y}");
                }
            }
        }
    }
}
