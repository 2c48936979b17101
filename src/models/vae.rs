//! diffusers' `AutoencoderKL` (encoder to latent moments, decoder back to images), from
//! `vae/config.json` with diffusers keys. Training uses it frozen (latents are cached); the
//! decoder renders validation and generated images.

use super::layers::{softmax_last, upsample_nearest_2x, Conv2d, GroupNorm, Linear};
use super::resnet::ResnetBlock;
use candle_core::{Module, Result, Tensor};
use super::builder::Builder;
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    /// diffusers' `force_upcast` (default true): SDXL's pipelines decode in f32 when the rest
    /// runs in f16 (SDXL's VAE overflows f16).
    #[serde(default = "default_force_upcast")]
    pub force_upcast: bool,
}

fn default_force_upcast() -> bool {
    true
}

fn default_scaling() -> f64 {
    0.18215
}

const EPS: f64 = 1e-6; // diffusers' VAE hard-codes 1e-6 in its GroupNorms

/// The single-head mid-block attention.
struct Attention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl Attention {
    fn new(vb: Builder, groups: usize, c: usize) -> Result<Attention> {
        Ok(Attention {
            group_norm: GroupNorm::new(vb.pp("group_norm"), groups, c, EPS)?,
            to_q: Linear::new(vb.pp("to_q"), c, c, true)?,
            to_k: Linear::new(vb.pp("to_k"), c, c, true)?,
            to_v: Linear::new(vb.pp("to_v"), c, c, true)?,
            to_out: Linear::new(vb.pp("to_out").pp(0), c, c, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self.group_norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?;
        let (q, k, v) = (self.to_q.forward(&t)?, self.to_k.forward(&t)?, self.to_v.forward(&t)?);
        let scores = (q.matmul(&k.t()?)? * (c as f64).powf(-0.5))?;
        let out = self.to_out.forward(&softmax_last(&scores)?.matmul(&v)?)?;
        out.transpose(1, 2)?.reshape((b, c, h, w))? + x
    }
}

struct Mid {
    resnets: [ResnetBlock; 2],
    attention: Attention,
}

impl Mid {
    fn new(vb: Builder, groups: usize, c: usize) -> Result<Mid> {
        let res = |j: usize| ResnetBlock::new(vb.pp("resnets").pp(j), groups, EPS, c, c, None);
        Ok(Mid { resnets: [res(0)?, res(1)?], attention: Attention::new(vb.pp("attentions").pp(0), groups, c)? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.resnets[0].forward(x, None)?;
        self.resnets[1].forward(&self.attention.forward(&x)?, None)
    }
}

pub struct Vae {
    pub config: VaeConfig,
    enc_conv_in: Conv2d,
    enc_blocks: Vec<(Vec<ResnetBlock>, Option<Conv2d>)>,
    enc_mid: Mid,
    enc_norm_out: GroupNorm,
    enc_conv_out: Conv2d,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
    dec_conv_in: Conv2d,
    dec_mid: Mid,
    dec_blocks: Vec<(Vec<ResnetBlock>, Option<Conv2d>)>,
    dec_norm_out: GroupNorm,
    dec_conv_out: Conv2d,
}

impl Vae {
    pub fn new<'a>(vb: impl Into<Builder<'a>>, c: &VaeConfig) -> Result<Vae> {
        let vb: Builder = vb.into();
        let (ch, g, n, z) = (&c.block_out_channels, c.norm_num_groups, c.block_out_channels.len(), c.latent_channels);
        let enc = vb.pp("encoder");
        let mut enc_blocks = Vec::new();
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let vb = enc.pp("down_blocks").pp(i);
            let resnets = (0..c.layers_per_block)
                .map(|j| ResnetBlock::new(vb.pp("resnets").pp(j), g, EPS, if j == 0 { cin } else { cout }, cout, None))
                .collect::<Result<_>>()?;
            let down = if i + 1 < n { Some(Conv2d::new(vb.pp("downsamplers").pp(0).pp("conv"), cout, cout, 3, 2, 0)?) } else { None };
            enc_blocks.push((resnets, down));
            cin = cout;
        }
        let dec = vb.pp("decoder");
        let mut dec_blocks = Vec::new();
        let mut prev = ch[n - 1];
        for i in 0..n {
            let vb = dec.pp("up_blocks").pp(i);
            let cout = ch[n - 1 - i];
            let resnets = (0..c.layers_per_block + 1)
                .map(|j| ResnetBlock::new(vb.pp("resnets").pp(j), g, EPS, if j == 0 { prev } else { cout }, cout, None))
                .collect::<Result<_>>()?;
            let up = if i + 1 < n { Some(Conv2d::new(vb.pp("upsamplers").pp(0).pp("conv"), cout, cout, 3, 1, 1)?) } else { None };
            dec_blocks.push((resnets, up));
            prev = cout;
        }
        Ok(Vae {
            enc_conv_in: Conv2d::new(enc.pp("conv_in"), c.in_channels, ch[0], 3, 1, 1)?,
            enc_blocks,
            enc_mid: Mid::new(enc.pp("mid_block"), g, ch[n - 1])?,
            enc_norm_out: GroupNorm::new(enc.pp("conv_norm_out"), g, ch[n - 1], EPS)?,
            enc_conv_out: Conv2d::new(enc.pp("conv_out"), ch[n - 1], 2 * z, 3, 1, 1)?,
            quant_conv: Conv2d::new(vb.pp("quant_conv"), 2 * z, 2 * z, 1, 1, 0)?,
            post_quant_conv: Conv2d::new(vb.pp("post_quant_conv"), z, z, 1, 1, 0)?,
            dec_conv_in: Conv2d::new(dec.pp("conv_in"), z, ch[n - 1], 3, 1, 1)?,
            dec_mid: Mid::new(dec.pp("mid_block"), g, ch[n - 1])?,
            dec_blocks,
            dec_norm_out: GroupNorm::new(dec.pp("conv_norm_out"), g, ch[0], EPS)?,
            dec_conv_out: Conv2d::new(dec.pp("conv_out"), ch[0], c.out_channels, 3, 1, 1)?,
            config: c.clone(),
        })
    }

    /// Images in [-1, 1] `(B, 3, H, W)` -> (mean, logvar) of the latent distribution, logvar
    /// clamped to [-30, 20] as diffusers' `DiagonalGaussianDistribution`.
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut h = self.enc_conv_in.forward(x)?;
        for (resnets, down) in &self.enc_blocks {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(conv) = down {
                h = conv.forward(&h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)?; // diffusers pads (0,1,0,1)
            }
        }
        let h = self.enc_conv_out.forward(&self.enc_norm_out.forward(&self.enc_mid.forward(&h)?)?.silu()?)?;
        let moments = self.quant_conv.forward(&h)?;
        let z = self.config.latent_channels;
        Ok((moments.narrow(1, 0, z)?, moments.narrow(1, z, z)?.clamp(-30f32, 20f32)?))
    }

    /// Latents (unscaled, i.e. already divided by the scaling factor) -> images in about [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.dec_mid.forward(&self.dec_conv_in.forward(&self.post_quant_conv.forward(z)?)?)?;
        for (resnets, up) in &self.dec_blocks {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(conv) = up {
                h = conv.forward(&upsample_nearest_2x(&h)?)?;
            }
        }
        self.dec_conv_out.forward(&self.dec_norm_out.forward(&h)?.silu()?)
    }
}
