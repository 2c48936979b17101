//! Layers over frozen weights (LoRA training): only the input needs a gradient. Candle's matmul,
//! conv and broadcast-multiply backward passes compute the gradient of both operands whatever
//! tracks, and keep the weight's in the `GradStore` until it is dropped, a full-size tensor per
//! frozen layer. [`input_only`] records one node whose backward computes the input's gradient
//! alone.

use super::precomputed::Precomputed;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// The input gradient of a layer, from the output gradient.
pub type InputGradient = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// `output` (computed from `x` outside the graph) as a node whose only parent is `x`, with
/// `backward` mapping the output gradient to x's.
pub fn input_only(x: &Tensor, output: Tensor, backward: InputGradient) -> Result<Tensor> {
    x.apply_op1(InputOnly { output: Precomputed::new("frozen layer", output)?, backward })
}

/// Whether `weight` is frozen while `x` needs a gradient: the case for [`input_only`].
pub fn applies(x: &Tensor, weight: &Tensor) -> bool {
    x.track_op() && !weight.track_op()
}

struct InputOnly {
    output: Precomputed,
    backward: InputGradient,
}

impl CustomOp1 for InputOnly {
    fn name(&self) -> &'static str {
        "frozen-weight-layer"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.output.cpu()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.output.cuda()
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.backward)(&grad.detach())?))
    }
}
