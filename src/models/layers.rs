//! Differentiable building blocks. Candle's fused `layer_norm` and `softmax_last_dim` record no
//! backward and silently cut gradients (a gradient test shows it); these use primitives or our
//! own ops with analytic backward passes (normalize, attention, conv), each tested against autograd.
//! Weights stay in their Var's dtype (f32 master weights) and are cast to the input's dtype at use,
//! so the cast itself backpropagates to the master weight. Frozen weights (plain tensors, LoRA
//! training) get no gradient: their layers pass only the input's back (see `frozen`). Linear and
//! Conv2d carry the LoRA adapter their `Builder` gives them.

use super::builder::Builder;
use super::frozen::{self, input_only};
use super::lora::{Adapter, AdapterShape};
use super::normalize::normalize_rows;
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::Init;

/// `y = x W^T + b`, with W `(out, in)` as in torch.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    adapter: Option<Adapter>,
}

impl Linear {
    pub fn new(vb: Builder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", Init::Uniform { lo: -bound, up: bound })?;
        let bias = if bias { Some(vb.get_with_hints(out_dim, "bias", Init::Uniform { lo: -bound, up: bound })?) } else { None };
        Ok(Linear { weight, bias, adapter: vb.adapter(AdapterShape::Linear { in_dim, out_dim })? })
    }

    /// `x Wᵀ + b` without the adapter.
    fn base(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.to_dtype(x.dtype())?;
        let b = self.bias.as_ref().map(|b| b.to_dtype(x.dtype())).transpose()?;
        let affine = |x: &Tensor| -> Result<Tensor> {
            let y = x.broadcast_matmul(&w.t()?)?;
            match &b {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            }
        };
        if frozen::applies(x, &self.weight) {
            let out = affine(&x.detach())?;
            return input_only(x, out, Box::new(move |g| g.broadcast_matmul(&w)));
        }
        affine(x)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.base(x)?;
        match &self.adapter {
            Some(a) => y + a.delta(x)?,
            None => Ok(y),
        }
    }
}

/// LayerNorm over the last dimension, normalised in f32 (analytic backward).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(vb: Builder, dim: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm { weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?, bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let dims = x.dims().to_vec();
        let d = dims[dims.len() - 1];
        let normed = normalize_rows(&x.reshape(((), d))?, self.eps)?.reshape(dims.as_slice())?;
        scale_shift(&normed, &self.weight, &self.bias, &[d])?.to_dtype(dtype)
    }
}

/// `x · w + b` with `w`, `b` broadcast as `shape` (a norm's affine part).
fn scale_shift(x: &Tensor, weight: &Tensor, bias: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let w = weight.to_dtype(x.dtype())?.reshape(shape)?;
    let b = bias.to_dtype(x.dtype())?.reshape(shape)?;
    if frozen::applies(x, weight) {
        let out = x.detach().broadcast_mul(&w)?.broadcast_add(&b)?;
        return input_only(x, out, Box::new(move |g| g.broadcast_mul(&w)));
    }
    x.broadcast_mul(&w)?.broadcast_add(&b)
}

/// Softmax over the last dimension through the generic (differentiable) path, in f32.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    candle_nn::ops::softmax(&x.to_dtype(reduction_dtype(dtype))?, D::Minus1)?.to_dtype(dtype)
}

/// The dtype softmax and normalisation statistics are computed in: f32, or f64 for f64 (test) models.
pub fn reduction_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// GroupNorm over `(B, C, ...)`, normalised in f32 (analytic backward).
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(vb: Builder, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm> {
        if channels % groups != 0 {
            candle_core::bail!("GroupNorm: {channels} channels do not split into {groups} groups");
        }
        Ok(GroupNorm {
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
            groups,
            eps,
        })
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let normed = normalize_rows(&x.reshape((b * self.groups, ()))?, self.eps)?.reshape(dims.as_slice())?;
        let mut shape = vec![1, c];
        shape.resize(dims.len(), 1);
        scale_shift(&normed, &self.weight, &self.bias, &shape)?.to_dtype(dtype)
    }
}

/// 2-D convolution with torch's `(out, in, k, k)` weight.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
    adapter: Option<Adapter>,
}

impl Conv2d {
    pub fn new(vb: Builder, cin: usize, cout: usize, k: usize, stride: usize, padding: usize) -> Result<Conv2d> {
        let bound = 1.0 / ((cin * k * k) as f64).sqrt();
        let init = Init::Uniform { lo: -bound, up: bound };
        let adapter = vb.adapter(AdapterShape::Conv { cin, cout, k, stride, padding })?;
        Ok(Conv2d { weight: vb.get_with_hints((cout, cin, k, k), "weight", init)?, bias: vb.get_with_hints(cout, "bias", init)?, stride, padding, adapter })
    }

    /// The convolution plus bias, without the adapter.
    fn base(&self, x: &Tensor) -> Result<Tensor> {
        let (stride, padding) = (self.stride, self.padding);
        let w = self.weight.to_dtype(x.dtype())?;
        let b = self.bias.to_dtype(x.dtype())?.reshape((1, (), 1, 1))?;
        let conv = |x: &Tensor| -> Result<Tensor> {
            let y = if stride == 1 { super::conv::conv2d_stride1(x, &w, padding)? } else { x.conv2d(&w, padding, stride, 1, 1)? };
            y.broadcast_add(&b)
        };
        if frozen::applies(x, &self.weight) {
            let (out, input_size) = (conv(&x.detach())?, x.dim(2)?);
            return input_only(x, out, Box::new(move |g| conv_input_gradient(g, &w, stride, padding, input_size)));
        }
        conv(x)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.base(x)?;
        match &self.adapter {
            Some(a) => y + a.delta(x)?,
            None => Ok(y),
        }
    }
}

/// `dX` of a conv with kernel `w`: a forward conv for stride 1, otherwise the transposed conv
/// candle's own backward uses (with the output padding that restores the input's size).
fn conv_input_gradient(grad: &Tensor, w: &Tensor, stride: usize, padding: usize, input_size: usize) -> Result<Tensor> {
    if stride == 1 {
        return super::conv::input_gradient(grad, w, padding);
    }
    let k = w.dim(2)?;
    let covered = (grad.dim(2)? - 1) * stride + k - 2 * padding;
    grad.conv_transpose2d(w, padding, input_size - covered, stride, 1)
}

/// Nearest-neighbour 2x upsampling as reshape + broadcast: its backward is a sum, not the
/// per-channel grouped convolution candle's `upsample_nearest2d` backward runs.
pub fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h, 1, w, 1))?.broadcast_as((b, c, h, 2, w, 2))?.reshape((b, c, 2 * h, 2 * w))
}
