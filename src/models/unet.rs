//! diffusers' `UNet2DConditionModel` (SD 1.x / 2.x and SDXL), differentiable, with per-sample
//! timesteps, built from `unet/config.json` and loading diffusers keys. SDXL adds
//! `transformer_layers_per_block` (several transformer blocks per attention) and
//! `addition_embed_type = "text_time"`: the pooled text embedding and six size/crop numbers
//! ([`AddedCond`]) go through `add_embedding` into the time embedding.

use super::checkpoint::{Checkpointer, Segment};
use super::attention::attention;
use super::layers::{upsample_nearest_2x, Conv2d, GroupNorm, LayerNorm, Linear};
use super::resnet::ResnetBlock;
use candle_core::backprop::GradStore;
use candle_core::{DType, Module, Result, Tensor, Var, D};
use super::builder::Builder;
use serde::Deserialize;
use std::sync::{Arc, RwLock};

/// The fields of `unet/config.json` the model needs.
#[derive(Clone, Debug, Deserialize)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub cross_attention_dim: usize,
    /// Heads per block (diffusers' historical name), one number or one per block.
    pub attention_head_dim: HeadCount,
    pub norm_num_groups: usize,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    /// Latent size the model was trained at (pipelines' default image size is this times 8).
    #[serde(default)]
    pub sample_size: Option<usize>,
    /// Transformer blocks per attention, one number or one per down block (SDXL: [1, 2, 10]).
    #[serde(default)]
    pub transformer_layers_per_block: Option<HeadCount>,
    /// Heads per block when set (newer configs); `attention_head_dim` otherwise, as diffusers.
    #[serde(default)]
    pub num_attention_heads: Option<HeadCount>,
    /// `"text_time"` (SDXL) or none.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of each time-id embedding of `text_time` (SDXL: 256).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of `add_embedding`: pooled text width + 6 x `addition_time_embed_dim`.
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum HeadCount {
    Same(usize),
    PerBlock(Vec<usize>),
}

fn default_norm_eps() -> f64 {
    1e-5
}

fn default_true() -> bool {
    true
}

impl HeadCount {
    fn at(&self, block: usize) -> usize {
        match self {
            HeadCount::Same(n) => *n,
            HeadCount::PerBlock(v) => v[block],
        }
    }
}

impl UNetConfig {
    fn heads(&self, block: usize) -> usize {
        self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim).at(block)
    }

    /// Transformer blocks in the attentions of down block `block` (1 unless configured).
    fn depth(&self, block: usize) -> usize {
        self.transformer_layers_per_block.as_ref().map_or(1, |d| d.at(block))
    }

    /// The `text_time` added conditioning's (time-id embedding width, `add_embedding` input width).
    fn text_time(&self) -> Result<Option<(usize, usize)>> {
        match self.addition_embed_type.as_deref() {
            None => Ok(None),
            Some("text_time") => match (self.addition_time_embed_dim, self.projection_class_embeddings_input_dim) {
                (Some(t), Some(p)) => Ok(Some((t, p))),
                _ => candle_core::bail!("unet config: addition_embed_type \"text_time\" needs addition_time_embed_dim and projection_class_embeddings_input_dim"),
            },
            Some(other) => candle_core::bail!("unet config: addition_embed_type \"{other}\" is not supported (only SDXL's \"text_time\")"),
        }
    }

    /// Whether the UNet takes SDXL's added conditioning ([`AddedCond`]).
    pub fn is_text_time(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }
}

/// SDXL's added conditioning (diffusers' `added_cond_kwargs`): the pooled text embedding `(B, P)`
/// and the time ids `(B, 6)`: original height and width, crop top and left, target height and width.
#[derive(Clone, Debug)]
pub struct AddedCond {
    pub text_embeds: Tensor,
    pub time_ids: Tensor,
}

impl AddedCond {
    /// Both parts of `self` then of `other`, along the batch.
    pub fn cat(&self, other: &AddedCond) -> Result<AddedCond> {
        Ok(AddedCond { text_embeds: Tensor::cat(&[&self.text_embeds, &other.text_embeds], 0)?, time_ids: Tensor::cat(&[&self.time_ids, &other.time_ids], 0)? })
    }

    /// Each part repeated `n` times along the batch.
    pub fn repeat(&self, n: usize) -> Result<AddedCond> {
        Ok(AddedCond { text_embeds: Tensor::cat(&vec![&self.text_embeds; n], 0)?, time_ids: Tensor::cat(&vec![&self.time_ids; n], 0)? })
    }
}

/// Sinusoidal embedding of per-sample timesteps `(B,)` -> `(B, dim)`, as diffusers' `Timesteps`.
pub fn timestep_embedding(t: &Tensor, dim: usize, flip_sin_to_cos: bool, shift: f64) -> Result<Tensor> {
    let half = dim / 2;
    let exponent: Vec<f32> = (0..half).map(|i| (-(10000f64.ln()) * i as f64 / (half as f64 - shift)).exp() as f32).collect();
    let freqs = Tensor::from_vec(exponent, (1, half), t.device())?;
    let args = t.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)
    } else {
        Tensor::cat(&[sin, cos], 1)
    }
}

struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    fn new(vb: Builder, dim: usize, context_dim: usize, heads: usize) -> Result<Attention> {
        Ok(Attention {
            to_q: Linear::new(vb.pp("to_q"), dim, dim, false)?,
            to_k: Linear::new(vb.pp("to_k"), context_dim, dim, false)?,
            to_v: Linear::new(vb.pp("to_v"), context_dim, dim, false)?,
            to_out: Linear::new(vb.pp("to_out").pp(0), dim, dim, true)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let hd = d / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            let len = t.dim(1)?;
            t.reshape((b, len, self.heads, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = split(self.to_q.forward(x)?)?;
        let k = split(self.to_k.forward(context)?)?;
        let v = split(self.to_v.forward(context)?)?;
        let out = attention(&q, &k, &v, (hd as f64).powf(-0.5))?.transpose(1, 2)?.reshape((b, n, d))?;
        self.to_out.forward(&out)
    }
}

struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_proj: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn new(vb: Builder, dim: usize, ctx: usize, heads: usize) -> Result<TransformerBlock> {
        Ok(TransformerBlock {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads)?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(vb.pp("attn2"), dim, ctx, heads)?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, 1e-5)?,
            ff_proj: Linear::new(vb.pp("ff").pp("net").pp(0).pp("proj"), dim, dim * 8, true)?,
            ff_out: Linear::new(vb.pp("ff").pp("net").pp(2), dim * 4, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let x = (x + self.attn1.forward(&h, &h)?)?;
        let x = (&x + self.attn2.forward(&self.norm2.forward(&x)?, context)?)?;
        let proj = self.ff_proj.forward(&self.norm3.forward(&x)?)?;
        let half = proj.dim(D::Minus1)? / 2;
        // GEGLU as diffusers: value * gelu(gate), exact (erf) GELU.
        let gated = (proj.narrow(D::Minus1, 0, half)? * proj.narrow(D::Minus1, half, half)?.gelu_erf()?)?;
        x + self.ff_out.forward(&gated)?
    }
}

/// `Transformer2DModel`: GroupNorm, projection in, transformer blocks, projection out, residual.
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl SpatialTransformer {
    fn new(vb: Builder, c: &UNetConfig, dim: usize, heads: usize, depth: usize) -> Result<SpatialTransformer> {
        let proj = |name: &str| -> Result<Projection> {
            Ok(if c.use_linear_projection {
                Projection::Linear(Linear::new(vb.pp(name), dim, dim, true)?)
            } else {
                Projection::Conv(Conv2d::new(vb.pp(name), dim, dim, 1, 1, 0)?)
            })
        };
        Ok(SpatialTransformer {
            norm: GroupNorm::new(vb.pp("norm"), c.norm_num_groups, dim, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks: (0..depth).map(|i| TransformerBlock::new(vb.pp("transformer_blocks").pp(i), dim, c.cross_attention_dim, heads)).collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let to_tokens = |t: Tensor| t.reshape((b, c, h * w))?.transpose(1, 2);
        let to_map = |t: Tensor| t.transpose(1, 2)?.reshape((b, c, h, w));
        let n = self.norm.forward(x)?;
        let tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(&n)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(n)?)?,
        };
        let mut tokens = tokens;
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_map(tokens)?)?,
            Projection::Linear(lin) => to_map(lin.forward(&tokens)?)?,
        };
        out + x
    }
}

/// One down or up block: resnets, optional cross-attention after each, optional resampler.
struct Block {
    resnets: Vec<Segment>,
    attentions: Vec<Segment>,
    resample: Option<Conv2d>,
}

pub struct UNet {
    config: UNetConfig,
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    /// SDXL's `add_embedding` (`linear_1`, `linear_2`) and its time-id embedding width.
    add_embedding: Option<(Linear, Linear, usize)>,
    down: Vec<Block>,
    mid_resnets: Vec<Segment>,
    mid_attention: Segment,
    up: Vec<Block>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    /// Set by [`UNet::enable_gradient_checkpointing`].
    checkpointer: RwLock<Option<Arc<Checkpointer>>>,
}

fn resnet_segment(r: ResnetBlock) -> Segment {
    Arc::new(move |x: &Tensor, temb: &Tensor, _: &Tensor| r.forward(x, Some(temb)))
}

fn attention_segment(a: SpatialTransformer) -> Segment {
    Arc::new(move |x: &Tensor, _: &Tensor, context: &Tensor| a.forward(x, context))
}

impl UNet {
    pub fn new<'a>(vb: impl Into<Builder<'a>>, c: &UNetConfig) -> Result<UNet> {
        let vb: Builder = vb.into();
        let ch = &c.block_out_channels;
        let n = ch.len();
        let cross = |t: &str| t.starts_with("CrossAttn");
        let mut down = Vec::new();
        let mut cin = ch[0];
        for (i, kind) in c.down_block_types.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(i);
            let mut block = Block { resnets: Vec::new(), attentions: Vec::new(), resample: None };
            for j in 0..c.layers_per_block {
                block.resnets.push(resnet_segment(ResnetBlock::new(vb.pp("resnets").pp(j), c.norm_num_groups, c.norm_eps, if j == 0 { cin } else { ch[i] }, ch[i], Some(ch[0] * 4))?));
                if cross(kind) {
                    block.attentions.push(attention_segment(SpatialTransformer::new(vb.pp("attentions").pp(j), c, ch[i], c.heads(i), c.depth(i))?));
                }
            }
            if i + 1 < n {
                block.resample = Some(Conv2d::new(vb.pp("downsamplers").pp(0).pp("conv"), ch[i], ch[i], 3, 2, 1)?);
            }
            down.push(block);
            cin = ch[i];
        }
        let mid = vb.pp("mid_block");
        let mid_res = |j: usize| ResnetBlock::new(mid.pp("resnets").pp(j), c.norm_num_groups, c.norm_eps, ch[n - 1], ch[n - 1], Some(ch[0] * 4)).map(resnet_segment);
        let mid_resnets = vec![mid_res(0)?, mid_res(1)?];
        let mid_attention = attention_segment(SpatialTransformer::new(mid.pp("attentions").pp(0), c, ch[n - 1], c.heads(n - 1), c.depth(n - 1))?);
        let mut up = Vec::new();
        let mut out_ch = ch[n - 1];
        for (i, kind) in c.up_block_types.iter().enumerate() {
            let vb = vb.pp("up_blocks").pp(i);
            let prev = out_ch;
            out_ch = ch[n - 1 - i];
            let input = ch[n - 1 - (i + 1).min(n - 1)];
            let mut block = Block { resnets: Vec::new(), attentions: Vec::new(), resample: None };
            let layers = c.layers_per_block + 1;
            for j in 0..layers {
                let skip = if j == layers - 1 { input } else { out_ch };
                let rin = if j == 0 { prev } else { out_ch };
                block.resnets.push(resnet_segment(ResnetBlock::new(vb.pp("resnets").pp(j), c.norm_num_groups, c.norm_eps, rin + skip, out_ch, Some(ch[0] * 4))?));
                if cross(kind) {
                    block.attentions.push(attention_segment(SpatialTransformer::new(vb.pp("attentions").pp(j), c, out_ch, c.heads(n - 1 - i), c.depth(n - 1 - i))?));
                }
            }
            if i + 1 < n {
                block.resample = Some(Conv2d::new(vb.pp("upsamplers").pp(0).pp("conv"), out_ch, out_ch, 3, 1, 1)?);
            }
            up.push(block);
        }
        let temb_dim = ch[0] * 4;
        let add_embedding = match c.text_time()? {
            Some((time_dim, input)) => {
                let add = vb.pp("add_embedding");
                Some((Linear::new(add.pp("linear_1"), input, temb_dim, true)?, Linear::new(add.pp("linear_2"), temb_dim, temb_dim, true)?, time_dim))
            }
            None => None,
        };
        Ok(UNet {
            add_embedding,
            conv_in: Conv2d::new(vb.pp("conv_in"), c.in_channels, ch[0], 3, 1, 1)?,
            time_linear_1: Linear::new(vb.pp("time_embedding").pp("linear_1"), ch[0], ch[0] * 4, true)?,
            time_linear_2: Linear::new(vb.pp("time_embedding").pp("linear_2"), ch[0] * 4, ch[0] * 4, true)?,
            down,
            mid_resnets,
            mid_attention,
            up,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), c.norm_num_groups, ch[0], c.norm_eps)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), ch[0], c.out_channels, 3, 1, 1)?,
            config: c.clone(),
            checkpointer: RwLock::new(None),
        })
    }

    /// Recomputes each resnet and transformer during backward instead of keeping their
    /// activations (diffusers' `enable_gradient_checkpointing`). `params`: the UNet's Vars. Losses
    /// must then be differentiated with [`UNet::backward`].
    pub fn enable_gradient_checkpointing(&self, params: &[Var]) {
        *self.checkpointer.write().unwrap() = Some(Arc::new(Checkpointer::new(params)));
    }

    /// `loss.backward()`, plus the parameter gradients of checkpointed segments.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        if let Some(cp) = self.checkpointer.read().unwrap().as_ref() {
            cp.merge_into(&mut grads)?;
        }
        Ok(grads)
    }

    fn run(&self, segment: &Segment, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        match self.checkpointer.read().unwrap().as_ref() {
            Some(cp) if x.track_op() => cp.apply(segment, x, temb, context),
            _ => segment(x, temb, context),
        }
    }

    /// Predicts noise (or v) for latents `(B, C, H, W)` at per-sample `timesteps` `(B,)`, with text
    /// context `(B, L, ctx)`, computing in `sample`'s dtype. SD 1.x / 2.x; SDXL needs
    /// [`UNet::forward_added`].
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.forward_added(sample, timesteps, context, None)
    }

    /// Whether [`UNet::forward_added`] needs the added conditioning (SDXL).
    pub fn needs_added_cond(&self) -> bool {
        self.add_embedding.is_some()
    }

    /// [`UNet::forward`] with SDXL's added conditioning, which a `text_time` UNet requires and
    /// any other refuses.
    pub fn forward_added(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor, added: Option<&AddedCond>) -> Result<Tensor> {
        let dtype = sample.dtype();
        let c = &self.config;
        let t = timestep_embedding(timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)?.to_dtype(dtype)?;
        let mut temb = self.time_linear_2.forward(&self.time_linear_1.forward(&t)?.silu()?)?;
        match (&self.add_embedding, added) {
            (Some((linear_1, linear_2, time_dim)), Some(added)) => {
                // diffusers' get_aug_embed for "text_time": every time id embedded as a timestep,
                // flattened per sample, after the pooled text embedding.
                let b = added.time_ids.dim(0)?;
                let ids = added.time_ids.to_dtype(DType::F32)?.flatten_all()?;
                let time_embeds = timestep_embedding(&ids, *time_dim, c.flip_sin_to_cos, c.freq_shift)?.reshape((b, ()))?;
                let add = Tensor::cat(&[&added.text_embeds.to_dtype(DType::F32)?, &time_embeds], 1)?.to_dtype(dtype)?;
                temb = (temb + linear_2.forward(&linear_1.forward(&add)?.silu()?)?)?;
            }
            (Some(_), None) => candle_core::bail!("this UNet (addition_embed_type \"text_time\", SDXL) needs the pooled text embeds and time ids"),
            (None, Some(_)) => candle_core::bail!("this UNet takes no added conditioning (it is not SDXL's)"),
            (None, None) => {}
        }
        let context = context.to_dtype(dtype)?;
        let mut x = self.conv_in.forward(sample)?;
        let mut skips = vec![x.clone()];
        for block in &self.down {
            for (j, resnet) in block.resnets.iter().enumerate() {
                x = self.run(resnet, &x, &temb, &context)?;
                if let Some(attn) = block.attentions.get(j) {
                    x = self.run(attn, &x, &temb, &context)?;
                }
                skips.push(x.clone());
            }
            if let Some(conv) = &block.resample {
                x = conv.forward(&x)?;
                skips.push(x.clone());
            }
        }
        x = self.run(&self.mid_resnets[0], &x, &temb, &context)?;
        x = self.run(&self.mid_attention, &x, &temb, &context)?;
        x = self.run(&self.mid_resnets[1], &x, &temb, &context)?;
        for block in &self.up {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up resnet");
                x = self.run(resnet, &Tensor::cat(&[&x, &skip], 1)?, &temb, &context)?;
                if let Some(attn) = block.attentions.get(j) {
                    x = self.run(attn, &x, &temb, &context)?;
                }
            }
            if let Some(conv) = &block.resample {
                x = conv.forward(&upsample_nearest_2x(&x)?)?;
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward(&x)?.silu()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarBuilder;
    use crate::models::testing::{assert_every_var_has_a_gradient, finite_difference_check, unet_inputs as inputs, unet_probe_loss as loss};
    use candle_core::Device;
    use candle_nn::VarMap;

    pub(crate) fn tiny(linear: bool) -> UNetConfig {
        serde_json::from_value(serde_json::json!({
            "in_channels": 4, "out_channels": 4, "block_out_channels": [8, 16], "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 12, "attention_head_dim": 2, "norm_num_groups": 4, "use_linear_projection": linear
        }))
        .unwrap()
    }

    /// SDXL-shaped: no attention at the first level, two transformer blocks after it, text_time
    /// conditioning (pooled width 5, time-id embeddings 4 wide).
    pub(crate) fn tiny_sdxl() -> UNetConfig {
        serde_json::from_value(serde_json::json!({
            "in_channels": 4, "out_channels": 4, "block_out_channels": [8, 16], "layers_per_block": 1,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "cross_attention_dim": 12, "attention_head_dim": [1, 2], "norm_num_groups": 4, "use_linear_projection": true,
            "transformer_layers_per_block": [1, 2], "addition_embed_type": "text_time", "addition_time_embed_dim": 4,
            "projection_class_embeddings_input_dim": 5 + 6 * 4
        }))
        .unwrap()
    }

    fn sdxl_added(dtype: DType) -> AddedCond {
        let dev = Device::Cpu;
        let pooled: Vec<f64> = (0..10).map(|i| (i as f64 * 0.9).cos()).collect();
        AddedCond {
            text_embeds: Tensor::from_vec(pooled, (2, 5), &dev).unwrap().to_dtype(dtype).unwrap(),
            time_ids: Tensor::new(&[[1024f32, 768., 12., 40., 1024., 1024.], [64., 64., 0., 0., 64., 64.]], &dev).unwrap(),
        }
    }

    fn sdxl_loss(model: &UNet, dtype: DType) -> Result<Tensor> {
        let (x, t, ctx) = inputs(dtype);
        let out = model.forward_added(&x, &t, &ctx, Some(&sdxl_added(dtype)))?;
        let w = Tensor::arange(0f32, out.elem_count() as f32, &Device::Cpu)?.reshape(out.shape())?.to_dtype(dtype)?;
        (&out * (w * 0.013)?.cos()?)?.sum_all()? + out.sqr()?.sum_all()?
    }

    #[test]
    fn sdxl_unet_builds_diffusers_names_and_trains_every_parameter() {
        let varmap = VarMap::new();
        let model = UNet::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &tiny_sdxl()).unwrap();
        let names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
        for key in [
            "add_embedding.linear_1.weight",
            "add_embedding.linear_2.bias",
            "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight",
            "mid_block.attentions.0.transformer_blocks.1.ff.net.2.weight",
            "up_blocks.0.attentions.1.transformer_blocks.1.norm3.weight",
        ] {
            assert!(names.iter().any(|n| n == key), "{key} missing");
        }
        assert!(!names.iter().any(|n| n.starts_with("down_blocks.0.attentions") || n.starts_with("up_blocks.1.attentions")));
        assert!(!names.iter().any(|n| n.contains("transformer_blocks.2")));
        let grads = sdxl_loss(&model, DType::F32).unwrap().backward().unwrap();
        assert_eq!(assert_every_var_has_a_gradient(&varmap, &grads), names.len());
        // The added conditioning is required, and other time ids change the output.
        let (x, t, ctx) = inputs(DType::F32);
        assert!(model.forward(&x, &t, &ctx).unwrap_err().to_string().contains("time ids"));
        let a = model.forward_added(&x, &t, &ctx, Some(&sdxl_added(DType::F32))).unwrap();
        let mut swapped = sdxl_added(DType::F32);
        swapped.time_ids = Tensor::cat(&[swapped.time_ids.narrow(0, 1, 1).unwrap(), swapped.time_ids.narrow(0, 0, 1).unwrap()], 0).unwrap();
        let b = model.forward_added(&x, &t, &ctx, Some(&swapped)).unwrap();
        assert!((a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 1e-4);
    }

    #[test]
    fn sdxl_gradients_match_finite_differences() {
        let varmap = VarMap::new();
        let model = UNet::new(VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu), &tiny_sdxl()).unwrap();
        let names = [
            "add_embedding.linear_1.weight",
            "add_embedding.linear_2.bias",
            "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_v.weight",
            "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
        ];
        finite_difference_check(&varmap, &names, || sdxl_loss(&model, DType::F64));
    }

    #[test]
    fn added_conditioning_is_refused_by_an_sd1_unet_and_bad_configs_are_named() {
        let varmap = VarMap::new();
        let model = UNet::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &tiny(true)).unwrap();
        let (x, t, _) = inputs(DType::F32);
        let ctx = Tensor::zeros((2, 5, 12), DType::F32, &Device::Cpu).unwrap();
        assert!(model.forward_added(&x, &t, &ctx, Some(&sdxl_added(DType::F32))).is_err());
        let mut c = tiny_sdxl();
        c.addition_embed_type = Some("image".into());
        let err = UNet::new(VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu), &c).err().unwrap().to_string();
        assert!(err.contains("addition_embed_type \"image\""), "{err}");
    }

    #[test]
    fn every_parameter_gets_a_gradient() {
        for linear in [false, true] {
            let varmap = VarMap::new();
            let model = UNet::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &tiny(linear)).unwrap();
            let grads = loss(&model, DType::F32).unwrap().backward().unwrap();
            assert!(assert_every_var_has_a_gradient(&varmap, &grads) > 100);
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let varmap = VarMap::new();
        let model = UNet::new(VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu), &tiny(false)).unwrap();
        let names = [
            "conv_in.weight",
            "time_embedding.linear_1.weight",
            "down_blocks.0.resnets.0.norm1.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.norm3.bias",
            "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
            "mid_block.attentions.0.proj_in.weight",
            "up_blocks.0.upsamplers.0.conv.weight",
            "up_blocks.1.resnets.1.conv_shortcut.weight",
            "conv_out.bias",
        ];
        finite_difference_check(&varmap, &names, || loss(&model, DType::F64));
    }

    #[test]
    fn timesteps_are_per_sample() {
        let varmap = VarMap::new();
        let model = UNet::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &tiny(true)).unwrap();
        let (x, t, ctx) = inputs(DType::F32);
        let both = model.forward(&x, &t, &ctx).unwrap();
        for i in 0..2 {
            let one = model.forward(&x.narrow(0, i, 1).unwrap(), &t.narrow(0, i, 1).unwrap(), &ctx.narrow(0, i, 1).unwrap()).unwrap();
            let diff = (both.narrow(0, i, 1).unwrap() - one).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "sample {i}: {diff}");
        }
    }

    #[test]
    fn gradient_checkpointing_gives_the_same_gradients() {
        let grads_of = |checkpointing: bool| {
            let varmap = VarMap::new();
            let model = UNet::new(VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu), &tiny(false)).unwrap();
            let mut vars: Vec<(String, Var)> = varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            for (i, (_, v)) in vars.iter().enumerate() {
                let n = v.elem_count();
                let values: Vec<f64> = (0..n).map(|j| ((i * 31 + j) as f64 * 0.37).sin() * 0.3).collect();
                v.set(&Tensor::from_vec(values, v.shape(), &Device::Cpu).unwrap()).unwrap();
            }
            if checkpointing {
                model.enable_gradient_checkpointing(&vars.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>());
            }
            let (x, t, ctx) = inputs(DType::F64);
            let ctx = Var::from_tensor(&ctx).unwrap(); // the text encoder's output, when it trains
            let out = model.forward(&x, &t, ctx.as_tensor()).unwrap();
            let grads = model.backward(&out.sqr().unwrap().sum_all().unwrap()).unwrap();
            let mut all: Vec<Vec<f64>> = vars.iter().map(|(name, v)| grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient")).flatten_all().unwrap().to_vec1().unwrap()).collect();
            all.push(grads.get(ctx.as_tensor()).expect("context gradient").flatten_all().unwrap().to_vec1().unwrap());
            all
        };
        let (plain, recomputed) = (grads_of(false), grads_of(true));
        assert_eq!(plain.len(), recomputed.len());
        for (i, (a, b)) in plain.iter().zip(&recomputed).enumerate() {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-9 * (1.0 + x.abs()), "tensor {i}: {x} vs {y}");
            }
        }
    }
}
