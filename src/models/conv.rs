//! 2-D convolution whose backward is built from forward convolutions. Candle differentiates conv2d
//! into `conv_transpose2d` for the input gradient, a naive kernel on CUDA (one thread per output,
//! no cuDNN) and a direct loop on the CPU. For stride 1 the input gradient is also a forward
//! convolution, of the output gradient with the spatially flipped, in/out-swapped kernel, so it
//! runs on cuDNN or im2col + GEMM like the forward pass. The weight gradient is one im2col GEMM.

use super::precomputed::Precomputed;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// `x.conv2d(w, padding, stride 1)` for `x` `(B, I, H, W)` and `w` `(O, I, k, k)`, with the
/// GEMM-based backward. Falls back to candle's own op when nothing needs a gradient.
pub fn conv2d_stride1(x: &Tensor, w: &Tensor, padding: usize) -> Result<Tensor> {
    let output = x.detach().conv2d(&w.detach(), padding, 1, 1, 1)?;
    if !x.track_op() && !w.track_op() {
        return Ok(output);
    }
    x.apply_op2_arc(w, Arc::new(Box::new(Conv2dStride1 { padding, output: Precomputed::new("conv2d", output)? })))
}

struct Conv2dStride1 {
    padding: usize,
    output: Precomputed,
}

impl CustomOp2 for Conv2dStride1 {
    fn name(&self) -> &'static str {
        "conv2d-gemm-backward"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.output.cpu()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.output.cuda()
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (need_x, need_w) = (x.track_op(), w.track_op());
        let (x, w, grad) = (x.detach(), w.detach(), grad.detach());
        let grad_x = if need_x { Some(input_gradient(&grad, &w, self.padding)?) } else { None };
        let grad_w = if need_w { Some(weight_gradient(&x, &grad, w.dim(2)?, self.padding)?) } else { None };
        Ok((grad_x, grad_w))
    }
}

/// `dX` of a stride-1 conv: the output gradient convolved with the spatially flipped,
/// in/out-swapped kernel.
pub fn input_gradient(grad: &Tensor, w: &Tensor, padding: usize) -> Result<Tensor> {
    grad.conv2d(&flipped_kernel(w)?, w.dim(2)? - 1 - padding, 1, 1, 1)
}

/// `w (O, I, k, k)` -> `(I, O, k, k)` with both spatial axes reversed. On the CPU one pass over
/// the kernel (two index-selects and a transposed copy were a tenth of a LoRA training step at
/// SD 1.5's shapes); elsewhere through index-selects.
fn flipped_kernel(w: &Tensor) -> Result<Tensor> {
    if w.device().is_cpu() {
        return w.contiguous()?.apply_op1_no_bwd(&FlipKernel);
    }
    let k = w.dim(2)?;
    let reversed = Tensor::new((0..k as u32).rev().collect::<Vec<_>>(), w.device())?;
    w.index_select(&reversed, 2)?.index_select(&reversed, 3)?.transpose(0, 1)?.contiguous()
}

struct FlipKernel;

impl candle_core::CustomOp1 for FlipKernel {
    fn name(&self) -> &'static str {
        "flip-conv-kernel"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (o, i, kh, kw) = layout.shape().dims4()?;
        let start = layout.start_offset();
        fn flip<T: Copy + Send + Sync>(src: &[T], (o, i, kh, kw): (usize, usize, usize, usize)) -> Vec<T> {
            use rayon::prelude::*;
            let plane = kh * kw;
            let mut out = vec![src[0]; o * i * plane];
            // out[ii][oo][a][b] = src[oo][ii][kh-1-a][kw-1-b]: each output (ii, oo) plane is one
            // input plane read backwards.
            out.par_chunks_mut(o * plane).enumerate().for_each(|(ii, row)| {
                for oo in 0..o {
                    let from = &src[(oo * i + ii) * plane..(oo * i + ii + 1) * plane];
                    for (dst, v) in row[oo * plane..(oo + 1) * plane].iter_mut().zip(from.iter().rev()) {
                        *dst = *v;
                    }
                }
            });
            out
        }
        let n = o * i * kh * kw;
        let dims = (o, i, kh, kw);
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(flip(&v[start..start + n], dims)),
            CpuStorage::F64(v) => CpuStorage::F64(flip(&v[start..start + n], dims)),
            CpuStorage::F16(v) => CpuStorage::F16(flip(&v[start..start + n], dims)),
            CpuStorage::BF16(v) => CpuStorage::BF16(flip(&v[start..start + n], dims)),
            _ => candle_core::bail!("flip-conv-kernel: unsupported dtype"),
        };
        Ok((out, Shape::from_dims(&[i, o, kh, kw])))
    }
}

/// `dW (O, I, k, k)` as one GEMM: `gᵀ (O, B·H·W) × im2col(x) (B·H·W, I·k·k)`. Candle's own
/// formulation (a convolution whose kernel is the whole gradient map) runs as thousands of skinny
/// products on the CPU (`conv2d_tiled`, half of a CPU backward step).
fn weight_gradient(x: &Tensor, grad: &Tensor, k: usize, padding: usize) -> Result<Tensor> {
    let (b, i, _, _) = x.dims4()?;
    let (_, o, h, w) = grad.dims4()?;
    let padded = x.pad_with_zeros(2, padding, padding)?.pad_with_zeros(3, padding, padding)?;
    let mut windows = Vec::with_capacity(k * k);
    for kh in 0..k {
        for kw in 0..k {
            windows.push(padded.narrow(2, kh, h)?.narrow(3, kw, w)?);
        }
    }
    // (B, I, H, W, k·k) -> (B, H, W, I, k·k): rows are output positions, columns (i, kh, kw).
    let cols = Tensor::stack(&windows, 4)?.permute((0, 2, 3, 1, 4))?.reshape((b * h * w, i * k * k))?;
    let g = grad.permute((1, 0, 2, 3))?.reshape((o, b * h * w))?;
    g.matmul(&cols)?.reshape((o, i, k, k))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn the_flipped_kernel_is_the_index_select_one() {
        let w = Tensor::arange(0f32, 5.0 * 3.0 * 9.0, &Device::Cpu).unwrap().reshape((5, 3, 3, 3)).unwrap();
        let reversed = Tensor::new(&[2u32, 1, 0], &Device::Cpu).unwrap();
        let slow = w.index_select(&reversed, 2).unwrap().index_select(&reversed, 3).unwrap().transpose(0, 1).unwrap().contiguous().unwrap();
        let fast = flipped_kernel(&w.narrow(0, 0, 5).unwrap()).unwrap();
        assert_eq!(fast.dims(), &[3, 5, 3, 3]);
        assert_eq!(fast.flatten_all().unwrap().to_vec1::<f32>().unwrap(), slow.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }

    #[test]
    fn gradients_equal_candles_conv2d_backward() {
        let dev = Device::Cpu;
        for (k, padding) in [(3, 1), (1, 0), (3, 0)] {
            let n = |shape: &[usize], seed: f64| {
                let count: usize = shape.iter().product();
                Tensor::from_vec((0..count).map(|i| ((i as f64 + seed) * 0.61).sin()).collect::<Vec<f64>>(), shape, &dev).unwrap()
            };
            let x = Var::from_tensor(&n(&[2, 3, 7, 6], 0.0)).unwrap();
            let w = Var::from_tensor(&n(&[5, 3, k, k], 1.0)).unwrap();
            let probe = |y: &Tensor| (y * n(y.dims(), 2.0)).unwrap().sum_all().unwrap();
            let ours = conv2d_stride1(x.as_tensor(), w.as_tensor(), padding).unwrap();
            let theirs = x.as_tensor().conv2d(w.as_tensor(), padding, 1, 1, 1).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let (g1, g2) = (probe(&ours).backward().unwrap(), probe(&theirs).backward().unwrap());
            for v in [&x, &w] {
                let a: Vec<f64> = g1.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let b: Vec<f64> = g2.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(a.len(), b.len());
                for (p, q) in a.iter().zip(&b) {
                    assert!((p - q).abs() < 1e-9 * (1.0 + q.abs()), "k {k} padding {padding}: {p} vs {q}");
                }
            }
        }
    }
}
