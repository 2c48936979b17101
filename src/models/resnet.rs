//! diffusers' `ResnetBlock2D`: GroupNorm, SiLU, conv, (+ time embedding), GroupNorm, SiLU, conv,
//! plus the input (through a 1x1 conv when the width changes). Shared by the UNet and the VAE.

use super::layers::{Conv2d, GroupNorm, Linear};
use candle_core::{Module, Result, Tensor};
use super::builder::Builder;

pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    /// `temb`: the time-embedding width (UNet), or `None` (VAE).
    pub fn new(vb: Builder, groups: usize, eps: f64, cin: usize, cout: usize, temb: Option<usize>) -> Result<ResnetBlock> {
        Ok(ResnetBlock {
            norm1: GroupNorm::new(vb.pp("norm1"), groups, cin, eps)?,
            conv1: Conv2d::new(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: temb.map(|t| Linear::new(vb.pp("time_emb_proj"), t, cout, true)).transpose()?,
            norm2: GroupNorm::new(vb.pp("norm2"), groups, cout, eps)?,
            conv2: Conv2d::new(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut: if cin != cout { Some(Conv2d::new(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?) } else { None },
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            h = h.broadcast_add(&proj.forward(&t.silu()?)?.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        let skip = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        skip + h
    }
}
