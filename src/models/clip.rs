//! CLIP text transformer (transformers' `CLIPTextModel`, and `CLIPTextModelWithProjection` when
//! built with [`ClipTextModel::with_projection`]), differentiable end to end, with the
//! transformers key layout (`text_model.embeddings.token_embedding.weight`, ...,
//! `text_projection.weight`) and its config.

use super::layers::{softmax_last, LayerNorm, Linear};
use candle_core::{DType, Module, Result, Tensor};
use super::builder::Builder;
use candle_nn::Init;
use serde::Deserialize;

/// The fields of `text_encoder/config.json` the model needs.
#[derive(Clone, Debug, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Width of `text_projection` (`CLIPTextModelWithProjection`).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// The end-of-text id that marks the pooled position (transformers: 2 means "the largest id").
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
}

fn default_eos() -> u32 {
    2
}

fn default_act() -> String {
    "quick_gelu".into()
}

fn default_eps() -> f64 {
    1e-5
}

#[derive(Clone, Copy, Debug)]
enum Activation {
    QuickGelu,
    Gelu,
    GeluTanh,
}

impl Activation {
    fn parse(name: &str) -> Result<Activation> {
        Ok(match name {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            "gelu_pytorch_tanh" | "gelu_new" => Activation::GeluTanh,
            other => candle_core::bail!("unsupported hidden_act `{other}`"),
        })
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
        }
    }
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    act: Activation,
}

impl EncoderLayer {
    fn new(vb: Builder, c: &ClipTextConfig) -> Result<EncoderLayer> {
        let (d, attn) = (c.hidden_size, vb.pp("self_attn"));
        Ok(EncoderLayer {
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), d, c.layer_norm_eps)?,
            q_proj: Linear::new(attn.pp("q_proj"), d, d, true)?,
            k_proj: Linear::new(attn.pp("k_proj"), d, d, true)?,
            v_proj: Linear::new(attn.pp("v_proj"), d, d, true)?,
            out_proj: Linear::new(attn.pp("out_proj"), d, d, true)?,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), d, c.layer_norm_eps)?,
            fc1: Linear::new(vb.pp("mlp").pp("fc1"), d, c.intermediate_size, true)?,
            fc2: Linear::new(vb.pp("mlp").pp("fc2"), c.intermediate_size, d, true)?,
            heads: c.num_attention_heads,
            act: Activation::parse(&c.hidden_act)?,
        })
    }

    fn forward(&self, x: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let hd = d / self.heads;
        let h = self.layer_norm1.forward(x)?;
        let split = |t: Tensor| t.reshape((b, l, self.heads, hd))?.transpose(1, 2)?.contiguous();
        let q = split((self.q_proj.forward(&h)? * (hd as f64).powf(-0.5))?)?;
        let k = split(self.k_proj.forward(&h)?)?;
        let v = split(self.v_proj.forward(&h)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(causal_mask)?;
        let attn = softmax_last(&scores)?.matmul(&v)?;
        let attn = attn.transpose(1, 2)?.reshape((b, l, d))?;
        let x = (x + self.out_proj.forward(&attn)?)?;
        let h = self.layer_norm2.forward(&x)?;
        let h = self.fc2.forward(&self.act.apply(&self.fc1.forward(&h)?)?)?;
        x + h
    }
}

pub struct ClipTextModel {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    /// `CLIPTextModelWithProjection`'s `text_projection` (no bias).
    text_projection: Option<Linear>,
    eos_token_id: u32,
}

/// What SDXL's pipelines take from a text encoder (`output_hidden_states=True`).
pub struct ClipHidden {
    /// `hidden_states[-2]`: the input of the last layer, before the final norm.
    pub penultimate: Tensor,
    /// The final-normed state at each sequence's end-of-text token `(B, D)`, through
    /// `text_projection` when the model has one (`text_embeds`), else `pooler_output`.
    pub pooled: Tensor,
}
impl ClipTextModel {
    /// Builds the model under `text_model.` in `vb` (the transformers key layout).
    pub fn new<'a>(vb: impl Into<Builder<'a>>, c: &ClipTextConfig) -> Result<ClipTextModel> {
        let vb: Builder = vb.into();
        let vb = vb.pp("text_model");
        let emb = vb.pp("embeddings");
        let init = Init::Randn { mean: 0.0, stdev: 0.02 };
        let token_embedding = emb.pp("token_embedding").get_with_hints((c.vocab_size, c.hidden_size), "weight", init)?;
        let position_embedding = emb.pp("position_embedding").get_with_hints((c.max_position_embeddings, c.hidden_size), "weight", init)?;
        let layers = (0..c.num_hidden_layers).map(|i| EncoderLayer::new(vb.pp("encoder").pp("layers").pp(i), c)).collect::<Result<_>>()?;
        let final_layer_norm = LayerNorm::new(vb.pp("final_layer_norm"), c.hidden_size, c.layer_norm_eps)?;
        Ok(ClipTextModel { token_embedding, position_embedding, layers, final_layer_norm, text_projection: None, eos_token_id: c.eos_token_id })
    }

    /// `CLIPTextModelWithProjection`: [`ClipTextModel::new`] plus `text_projection.weight` at the
    /// root of `vb` (width `projection_dim`, else `hidden_size`).
    pub fn with_projection<'a>(vb: impl Into<Builder<'a>>, c: &ClipTextConfig) -> Result<ClipTextModel> {
        let vb: Builder = vb.into();
        let mut model = ClipTextModel::new(vb.clone(), c)?;
        let width = c.projection_dim.unwrap_or(c.hidden_size);
        model.text_projection = Some(Linear::new(vb.pp("text_projection"), c.hidden_size, width, false)?);
        Ok(model)
    }

    /// The penultimate hidden states and the pooled output ([`ClipHidden`]) for token ids
    /// `(batch, len)`, computed in `dtype`. The pooled position is transformers': the first
    /// `eos_token_id`, or the largest id when that is 2 (older configs).
    pub fn forward_hidden(&self, input_ids: &Tensor, dtype: DType) -> Result<ClipHidden> {
        let (b, l) = input_ids.dims2()?;
        if self.layers.is_empty() {
            candle_core::bail!("the text encoder has no layers");
        }
        let mut x = self.embed(input_ids, dtype)?;
        let mask = causal_mask(l, dtype, input_ids.device())?;
        let last = self.layers.len() - 1;
        for layer in &self.layers[..last] {
            x = layer.forward(&x, &mask)?;
        }
        let penultimate = x.clone();
        let normed = self.final_layer_norm.forward(&self.layers[last].forward(&x, &mask)?)?;
        let ids: Vec<Vec<u32>> = input_ids.to_vec2()?;
        // Row i of the (b*l, d) states at i*l + position[i].
        let rows: Vec<u32> = ids.iter().enumerate().map(|(i, row)| (i * l + self.pooled_position(row)) as u32).collect();
        let pooled = normed.reshape((b * l, ()))?.index_select(&Tensor::from_vec(rows, b, input_ids.device())?, 0)?;
        let pooled = match &self.text_projection {
            Some(p) => p.forward(&pooled)?,
            None => pooled,
        };
        Ok(ClipHidden { penultimate, pooled })
    }

    fn pooled_position(&self, row: &[u32]) -> usize {
        if self.eos_token_id == 2 {
            // torch.argmax: the first of the largest.
            let max = row.iter().copied().max().unwrap_or(0);
            row.iter().position(|&t| t == max).unwrap_or(0)
        } else {
            row.iter().position(|&t| t == self.eos_token_id).unwrap_or(0)
        }
    }

    fn embed(&self, input_ids: &Tensor, dtype: DType) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        let tokens = self.token_embedding.to_dtype(dtype)?.embedding(&input_ids.flatten_all()?)?.reshape((b, l, ()))?;
        let positions = self.position_embedding.to_dtype(dtype)?.narrow(0, 0, l)?;
        tokens.broadcast_add(&positions)
    }

    /// `last_hidden_state` for token ids `(batch, len)` (u32), computed in `dtype`.
    pub fn forward(&self, input_ids: &Tensor, dtype: DType) -> Result<Tensor> {
        self.forward_masked(input_ids, None, dtype)
    }

    /// [`Self::forward`] with transformers' `attention_mask` `(batch, len)` (1 = token, 0 =
    /// padding): no position attends to a padding position, on top of the causal mask.
    pub fn forward_masked(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, dtype: DType) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        let mut x = self.embed(input_ids, dtype)?;
        let mut mask = causal_mask(l, dtype, input_ids.device())?;
        if let Some(keep) = attention_mask {
            // (1 - mask) x a large negative value over the keys, as transformers' _prepare_4d_attention_mask.
            let blocked = ((keep.to_dtype(DType::F32)?.affine(-1.0, 1.0)? * (f32::MIN / 2.0) as f64)?).to_dtype(dtype)?.reshape((b, 1, 1, l))?;
            mask = mask.broadcast_add(&blocked)?;
        }
        for layer in &self.layers {
            x = layer.forward(&x, &mask)?;
        }
        self.final_layer_norm.forward(&x)
    }
}

/// `(1, 1, L, L)` with a large negative value above the diagonal.
fn causal_mask(l: usize, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..l).flat_map(|i| (0..l).map(move |j| if j > i { f32::MIN / 2.0 } else { 0.0 })).collect();
    Tensor::from_vec(values, (1, 1, l, l), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarBuilder;
    use crate::models::testing::{assert_every_var_has_a_gradient, finite_difference_check};
    use candle_core::Device;
    use candle_nn::VarMap;

    fn tiny(act: &str) -> ClipTextConfig {
        ClipTextConfig {
            vocab_size: 50,
            hidden_size: 16,
            intermediate_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            max_position_embeddings: 12,
            hidden_act: act.into(),
            layer_norm_eps: 1e-5,
            projection_dim: None,
            eos_token_id: 2,
        }
    }

    fn loss(model: &ClipTextModel, dtype: DType) -> Result<Tensor> {
        let ids = Tensor::new(&[[3u32, 7, 1, 9, 2, 2], [4, 4, 8, 0, 1, 5]], &Device::Cpu)?;
        // A loss that depends on every position and feature, unevenly.
        let out = model.forward(&ids, dtype)?;
        let w = Tensor::arange(0f32, out.elem_count() as f32, &Device::Cpu)?.reshape(out.shape())?.to_dtype(dtype)?;
        (&out * (w * 0.01)?.sin()?)?.sum_all()? + out.sqr()?.sum_all()?
    }

    #[test]
    fn every_parameter_gets_a_gradient() {
        for act in ["quick_gelu", "gelu", "gelu_pytorch_tanh"] {
            let varmap = VarMap::new();
            let model = ClipTextModel::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &tiny(act)).unwrap();
            let grads = loss(&model, DType::F32).unwrap().backward().unwrap();
            // 2 embeddings + 2 layers x 16 + final norm 2
            assert_eq!(assert_every_var_has_a_gradient(&varmap, &grads), 36, "{act}");
        }
    }

    #[test]
    fn hidden_states_and_pooled_output_as_transformers() {
        let varmap = VarMap::new();
        let mut c = tiny("gelu");
        c.projection_dim = Some(5);
        let model = ClipTextModel::with_projection(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &c).unwrap();
        assert_eq!(varmap.data().lock().unwrap()["text_projection.weight"].dims(), &[5, 16]);
        // Legacy eos id 2: the pooled position is the first largest id.
        let ids = Tensor::new(&[[0u32, 7, 49, 3, 49, 1], [0, 49, 2, 2, 2, 2]], &Device::Cpu).unwrap();
        let out = model.forward_hidden(&ids, DType::F32).unwrap();
        assert_eq!(out.pooled.dims(), &[2, 5]);
        // The penultimate state is the output of all layers but the last: a one-layer model of the same weights.
        let one_layer = ClipTextModel::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &ClipTextConfig { num_hidden_layers: 1, ..c.clone() }).unwrap();
        let mut x = one_layer.embed(&ids, DType::F32).unwrap();
        x = one_layer.layers[0].forward(&x, &causal_mask(6, DType::F32, &Device::Cpu).unwrap()).unwrap();
        let diff = (&out.penultimate - &x).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0);
        // The pooled rows are the final states at positions 2 and 1, projected.
        let last = model.forward(&ids, DType::F32).unwrap();
        let w = varmap.data().lock().unwrap()["text_projection.weight"].as_tensor().clone();
        for (row, pos) in [(0usize, 2usize), (1, 1)] {
            let want = last.get(row).unwrap().get(pos).unwrap().unsqueeze(0).unwrap().matmul(&w.t().unwrap()).unwrap().squeeze(0).unwrap();
            let diff = (out.pooled.get(row).unwrap() - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-6, "row {row}: {diff}");
        }
        // A set eos id: its first occurrence.
        let model = ClipTextModel { eos_token_id: 3, ..ClipTextModel::new(VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu), &tiny("gelu")).unwrap() };
        assert_eq!(model.pooled_position(&[0, 9, 3, 3, 49]), 2);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let varmap = VarMap::new();
        let model = ClipTextModel::new(VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu), &tiny("quick_gelu")).unwrap();
        let names = [
            "text_model.encoder.layers.0.layer_norm1.weight",
            "text_model.encoder.layers.0.self_attn.q_proj.weight",
            "text_model.encoder.layers.1.self_attn.k_proj.bias",
            "text_model.encoder.layers.1.mlp.fc1.weight",
            "text_model.final_layer_norm.bias",
            "text_model.embeddings.token_embedding.weight",
        ];
        finite_difference_check(&varmap, &names, || loss(&model, DType::F64));
    }
}
