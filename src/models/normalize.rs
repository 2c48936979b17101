//! Row normalisation `(x − mean) / sqrt(var + eps)` over the last dimension of `(R, M)`, the core
//! of GroupNorm (rows = batch × group) and LayerNorm (rows = tokens), with an analytic backward.
//! Built from primitives, autograd would keep about six full-size f32 intermediates per norm until
//! backward and replay each of their backward ops; this keeps only the input and the output and
//! computes `dx = rstd · (g − mean(g) − x̂ · mean(g · x̂))` with a handful of tensor ops.

use super::layers::reduction_dtype;
use super::precomputed::Precomputed;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Result, Shape, Tensor, D};

/// Normalised rows of `x` `(R, M)`, in f32 (f64 for f64 input).
pub fn normalize_rows(x: &Tensor, eps: f64) -> Result<Tensor> {
    let output = forward(&x.detach(), eps)?;
    if !x.track_op() {
        return Ok(output);
    }
    x.apply_op1(Normalize { eps, output: Precomputed::new("normalize", output)? })
}

/// `(x̂, rstd)` of the rows.
fn statistics(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let x = x.to_dtype(reduction_dtype(x.dtype()))?;
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let rstd = (centered.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    Ok((centered.broadcast_mul(&rstd)?, rstd))
}

fn forward(x: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(statistics(x, eps)?.0)
}

struct Normalize {
    eps: f64,
    output: Precomputed,
}

impl CustomOp1 for Normalize {
    fn name(&self) -> &'static str {
        "normalize-rows"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.output.cpu()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.output.cuda()
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let x = x.detach();
        let (_, rstd) = statistics(&x, self.eps)?;
        let xhat = res.detach();
        let g = grad.detach().to_dtype(xhat.dtype())?;
        let inner = g.broadcast_sub(&g.mean_keepdim(D::Minus1)?)?.sub(&xhat.broadcast_mul(&(&g * &xhat)?.mean_keepdim(D::Minus1)?)?)?;
        Ok(Some(inner.broadcast_mul(&rstd)?.to_dtype(x.dtype())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn gradient_equals_the_primitive_normalisation() {
        let dev = Device::Cpu;
        let count = 3 * 10;
        let x = Var::from_tensor(&Tensor::from_vec((0..count).map(|i| ((i as f64) * 0.77).sin() * 2.0 + 0.3).collect::<Vec<f64>>(), (3, 10), &dev).unwrap()).unwrap();
        let probe = Tensor::from_vec((0..count).map(|i| ((i as f64) * 1.3).cos()).collect::<Vec<f64>>(), (3, 10), &dev).unwrap();
        let ours = normalize_rows(x.as_tensor(), 1e-5).unwrap();
        let t = x.as_tensor();
        let centered = t.broadcast_sub(&t.mean_keepdim(D::Minus1).unwrap()).unwrap();
        let plain = centered.broadcast_div(&(centered.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-5).unwrap().sqrt().unwrap()).unwrap();
        let diff = (&ours - &plain).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(diff < 1e-12, "forward differs by {diff}");
        let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (plain * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let a: Vec<f64> = g1.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f64> = g2.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-10 * (1.0 + q.abs()), "{p} vs {q}");
        }
    }
}
