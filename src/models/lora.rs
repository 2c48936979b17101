//! LoRA adapters on Linear and Conv2d layers: `y = W x + b + scale · up(down(dropout(x)))` with
//! `scale = alpha / rank`. A Linear's `down` is `(r, in)` and `up` `(out, r)`; a conv's `down` is a
//! conv of the base's kernel, stride and padding `(r, in, k, k)`, and `up` a 1×1 conv `(out, r, 1,
//! 1)` (kohya's LoCon). Which layers get one ([`Targets`]) follows diffusers' DreamBooth LoRA script
//! (`attn`) and kohya's sd-scripts (`transformer`, `transformer+conv`).
//!
//! New adapters start as diffusers' script starts them (`init_lora_weights="gaussian"`): `down`
//! normal with standard deviation 1/r, `up` zero, so the adapted model equals the base until the first update. The
//! draws are seeded per module, so two runs with one seed start from the same adapters.

use super::conv::conv2d_stride1;
use crate::rng::TrainRng;
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Which layers get adapters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Targets {
    /// `to_q`, `to_k`, `to_v`, `to_out.0` of every transformer block (CLIP: `q/k/v/out_proj`):
    /// diffusers' `train_dreambooth_lora.py`.
    Attn,
    /// Every Linear and 1×1 conv inside the UNet's transformers (`proj_in`, `proj_out` and `ff`
    /// too; CLIP: `fc1`, `fc2` too): kohya's default.
    Transformer,
    /// `Transformer` plus the resnets' convs, `time_emb_proj`, `conv_shortcut` and the down- and
    /// upsamplers (kohya's LoCon).
    TransformerConv,
}

impl std::str::FromStr for Targets {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Targets> {
        Ok(match s {
            "attn" => Targets::Attn,
            "transformer" => Targets::Transformer,
            "transformer+conv" => Targets::TransformerConv,
            other => anyhow::bail!("--lora-targets `{other}`: expected attn, transformer or transformer+conv"),
        })
    }
}

impl Targets {
    pub fn name(self) -> &'static str {
        match self {
            Targets::Attn => "attn",
            Targets::Transformer => "transformer",
            Targets::TransformerConv => "transformer+conv",
        }
    }

    /// Whether the layer at `module` (diffusers / transformers key path, CLIP under `text_model.`)
    /// gets an adapter.
    pub fn covers(self, module: &str) -> bool {
        let ends = |names: &[&str]| names.iter().any(|n| module.ends_with(n));
        if module.starts_with("text_model.") {
            let attn = ends(&[".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj", ".self_attn.out_proj"]);
            return attn || (self != Targets::Attn && ends(&[".mlp.fc1", ".mlp.fc2"]));
        }
        let attn = module.contains(".transformer_blocks.") && ends(&[".to_q", ".to_k", ".to_v", ".to_out.0"]);
        match self {
            Targets::Attn => attn,
            Targets::Transformer => module.contains(".attentions."),
            Targets::TransformerConv => [".attentions.", ".resnets.", ".downsamplers.", ".upsamplers."].iter().any(|p| module.contains(p)),
        }
    }
}

/// How new adapters are made.
#[derive(Clone, Debug)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Targets,
    pub dropout: f64,
    pub seed: u64,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// The layer an adapter goes on.
#[derive(Clone, Copy, Debug)]
pub enum AdapterShape {
    Linear { in_dim: usize, out_dim: usize },
    Conv { cin: usize, cout: usize, k: usize, stride: usize, padding: usize },
}

/// Names of an adapter's tensors under its module path.
pub const DOWN: &str = "lora_down.weight";
pub const UP: &str = "lora_up.weight";

/// The adapters of one model.
pub struct AdapterPlan {
    source: Source,
    /// Micro-batch counter that seeds the dropout masks (the trainer sets it before each forward).
    draws: Arc<AtomicU64>,
}

enum Source {
    /// New adapters for the targeted layers, kept as Vars (`<module>.lora_down.weight`, ...).
    Train { config: LoraConfig, vars: VarMap, dtype: DType },
    /// Given adapters: tensors by the same names, scales by module, no dropout.
    Fixed { tensors: HashMap<String, Tensor>, scales: HashMap<String, f64> },
}

impl AdapterPlan {
    /// New adapters, held in `dtype` (f32 master weights in training).
    pub fn train(config: LoraConfig, dtype: DType) -> AdapterPlan {
        AdapterPlan { source: Source::Train { config, vars: VarMap::new(), dtype }, draws: Arc::new(AtomicU64::new(0)) }
    }

    /// The trainable adapter Vars (training plans).
    pub fn vars(&self) -> Option<&VarMap> {
        match &self.source {
            Source::Train { vars, .. } => Some(vars),
            Source::Fixed { .. } => None,
        }
    }

    /// A plan serving the same adapters as detached views (storage shared, so updates show),
    /// without dropout: for inference models beside the trained ones.
    pub fn views(&self) -> AdapterPlan {
        let (tensors, scales) = match &self.source {
            Source::Train { config, vars, .. } => {
                let data = vars.data().lock().unwrap();
                let tensors: HashMap<String, Tensor> = data.iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect();
                let scales = tensors.keys().filter_map(|k| k.strip_suffix(&format!(".{DOWN}"))).map(|m| (m.to_string(), config.scale())).collect();
                (tensors, scales)
            }
            Source::Fixed { tensors, scales } => (tensors.iter().map(|(k, t)| (k.clone(), t.detach())).collect(), scales.clone()),
        };
        AdapterPlan { source: Source::Fixed { tensors, scales }, draws: Arc::new(AtomicU64::new(0)) }
    }

    /// Seeds the next forward pass's dropout masks (call before each micro-batch with a number
    /// that a resumed run reproduces, e.g. the micro-batch index).
    pub fn set_draw(&self, n: u64) {
        self.draws.store(n, Ordering::SeqCst);
    }

    /// The adapter for the layer at `module`, if this plan has one for it.
    pub fn adapter(&self, module: &str, shape: AdapterShape, device: &Device) -> Result<Option<Adapter>> {
        let (down_shape, up_shape, kind) = match shape {
            AdapterShape::Linear { in_dim, out_dim } => (vec![in_dim], vec![out_dim], Kind::Linear),
            AdapterShape::Conv { cin, cout, k, stride, padding } => (vec![cin, k, k], vec![cout], Kind::Conv { stride, padding }),
        };
        let (down_key, up_key) = (format!("{module}.{DOWN}"), format!("{module}.{UP}"));
        match &self.source {
            Source::Train { config, vars, dtype } => {
                if !config.targets.covers(module) {
                    return Ok(None);
                }
                let r = config.rank;
                let down_dims: Vec<usize> = std::iter::once(r).chain(down_shape).collect();
                let mut up_dims: Vec<usize> = up_shape.into_iter().chain(std::iter::once(r)).collect();
                if let Kind::Conv { .. } = kind {
                    up_dims.extend([1, 1]);
                }
                let mut data = vars.data().lock().unwrap();
                if !data.contains_key(&down_key) {
                    let mut rng = TrainRng::stream(config.seed, "lora init", module_hash(module));
                    let down = (rng.normal(&down_dims, device)?.to_dtype(*dtype)? * (1.0 / r as f64))?;
                    data.insert(down_key.clone(), Var::from_tensor(&down)?);
                    data.insert(up_key.clone(), Var::zeros(up_dims.as_slice(), *dtype, device)?);
                }
                let dropout = (config.dropout > 0.0).then(|| Dropout { p: config.dropout, seed: config.seed ^ module_hash(module), draws: self.draws.clone() });
                Ok(Some(Adapter { down: data[&down_key].as_tensor().clone(), up: data[&up_key].as_tensor().clone(), scale: config.scale(), kind, dropout }))
            }
            Source::Fixed { tensors, scales } => match (tensors.get(&down_key), tensors.get(&up_key)) {
                (Some(down), Some(up)) => Ok(Some(Adapter { down: down.clone(), up: up.clone(), scale: scales.get(module).copied().unwrap_or(1.0), kind, dropout: None })),
                _ => Ok(None),
            },
        }
    }
}

/// FNV-1a of a module path: the per-module part of the adapter seeds.
fn module_hash(module: &str) -> u64 {
    module.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3))
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Linear,
    Conv { stride: usize, padding: usize },
}

/// Inverted dropout on the adapter's input, its masks drawn from (seed, module, micro-batch):
/// the same in a recomputed (checkpointed) forward and in a resumed run.
#[derive(Clone, Debug)]
struct Dropout {
    p: f64,
    seed: u64,
    draws: Arc<AtomicU64>,
}

impl Dropout {
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let mut rng = TrainRng::stream(self.seed, "lora dropout", self.draws.load(Ordering::SeqCst));
        let keep = 1.0 / (1.0 - self.p);
        let mask: Vec<f32> = (0..x.elem_count()).map(|_| if rng.uniform() < self.p { 0.0 } else { keep as f32 }).collect();
        x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)
    }
}

/// One layer's adapter: its two factors (f32, trained or given) and scale.
#[derive(Clone, Debug)]
pub struct Adapter {
    down: Tensor,
    up: Tensor,
    scale: f64,
    kind: Kind,
    dropout: Option<Dropout>,
}

impl Adapter {
    /// `scale · up(down(dropout(x)))`, computed in x's dtype.
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let x = match &self.dropout {
            Some(d) => d.apply(x)?,
            None => x.clone(),
        };
        let (down, up) = (self.down.to_dtype(x.dtype())?, self.up.to_dtype(x.dtype())?);
        let h = match self.kind {
            Kind::Linear => x.broadcast_matmul(&down.t()?)?.broadcast_matmul(&up.t()?)?,
            Kind::Conv { stride, padding } => {
                let h = if stride == 1 { conv2d_stride1(&x, &down, padding)? } else { x.conv2d(&down, padding, stride, 1, 1)? };
                conv2d_stride1(&h, &up, 0)?
            }
        };
        h * self.scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::builder::Builder;
    use crate::models::testing::{assert_every_var_has_a_gradient, finite_difference_check, tiny_unet_config, unet_inputs as inputs, unet_probe_loss as loss};
    use crate::models::unet::UNet;
    use candle_nn::VarBuilder;

    /// Random base weights of the tiny UNet as plain (frozen) tensors.
    fn frozen_base(dtype: DType) -> HashMap<String, Tensor> {
        let varmap = VarMap::new();
        UNet::new(VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu), &tiny_unet_config()).unwrap();
        let data = varmap.data().lock().unwrap();
        data.iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect()
    }

    fn adapted(base: &HashMap<String, Tensor>, dtype: DType, targets: Targets) -> (UNet, Arc<AdapterPlan>) {
        let plan = Arc::new(AdapterPlan::train(LoraConfig { rank: 2, alpha: 3.0, targets, dropout: 0.0, seed: 1 }, dtype));
        let vb = VarBuilder::from_tensors(base.clone(), dtype, &Device::Cpu);
        (UNet::new(Builder::with_adapters(vb, plan.clone()), &tiny_unet_config()).unwrap(), plan)
    }

    /// Gives every adapter factor small non-zero values (a trained state).
    fn perturb(plan: &AdapterPlan) {
        let mut vars: Vec<(String, Var)> = plan.vars().unwrap().data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (i, (_, v)) in vars.iter().enumerate() {
            let values: Vec<f64> = (0..v.elem_count()).map(|j| ((i * 17 + j) as f64 * 0.31).sin() * 0.2).collect();
            v.set(&Tensor::from_vec(values, v.shape(), &Device::Cpu).unwrap().to_dtype(v.dtype()).unwrap()).unwrap();
        }
    }

    #[test]
    fn fresh_adapters_leave_the_model_exactly_as_the_base() {
        let base = frozen_base(DType::F32);
        let plain = UNet::new(VarBuilder::from_tensors(base.clone(), DType::F32, &Device::Cpu), &tiny_unet_config()).unwrap();
        let (model, plan) = adapted(&base, DType::F32, Targets::TransformerConv);
        let (x, t, ctx) = inputs(DType::F32);
        let (a, b) = (plain.forward(&x, &t, &ctx).unwrap(), model.forward(&x, &t, &ctx).unwrap());
        let (a, b): (Vec<f32>, Vec<f32>) = (a.flatten_all().unwrap().to_vec1().unwrap(), b.flatten_all().unwrap().to_vec1().unwrap());
        assert_eq!(a, b, "up = 0: the adapted model is the base, bit for bit");
        // 4 transformers x (proj_in, proj_out, 8 attention projections, 2 ff), plus the resnets'
        // convs, time projections and shortcuts, and the samplers.
        let modules = plan.vars().unwrap().all_vars().len() / 2;
        assert!(modules > 4 * 12, "{modules} adapters");
    }

    #[test]
    fn only_the_adapters_get_gradients() {
        let base = frozen_base(DType::F32);
        for targets in [Targets::Attn, Targets::TransformerConv] {
            let (model, plan) = adapted(&base, DType::F32, targets);
            perturb(&plan);
            let grads = loss(&model, DType::F32).unwrap().backward().unwrap();
            for (name, t) in &base {
                assert!(grads.get(t).is_none(), "{targets:?}: the frozen `{name}` got a gradient");
            }
            let n = assert_every_var_has_a_gradient(plan.vars().unwrap(), &grads);
            if targets == Targets::Attn {
                assert_eq!(n, 4 * 8 * 2, "4 transformers (down, mid, 2 up) x 8 projections x (down, up)");
            }
        }
    }

    #[test]
    fn adapter_gradients_match_finite_differences() {
        let base = frozen_base(DType::F64);
        let (model, plan) = adapted(&base, DType::F64, Targets::TransformerConv);
        perturb(&plan);
        let names = [
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_down.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_up.weight",
            "down_blocks.0.attentions.0.proj_in.lora_down.weight",
            "down_blocks.0.resnets.0.conv1.lora_up.weight",
            "down_blocks.0.downsamplers.0.conv.lora_down.weight",
            "up_blocks.1.resnets.1.conv_shortcut.lora_down.weight",
            "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2.lora_up.weight",
        ];
        finite_difference_check(plan.vars().unwrap(), &names, || loss(&model, DType::F64));
    }

    #[test]
    fn targets_follow_diffusers_and_kohya() {
        let unet_attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
        let out = "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0";
        let ff = "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj";
        let proj = "down_blocks.1.attentions.1.proj_in";
        let conv = "down_blocks.1.resnets.0.conv1";
        let sampler = "up_blocks.0.upsamplers.0.conv";
        let (q, fc) = ("text_model.encoder.layers.3.self_attn.q_proj", "text_model.encoder.layers.3.mlp.fc2");
        let covered = |t: Targets| [unet_attn, out, ff, proj, conv, sampler, q, fc, "conv_in", "time_embedding.linear_1"].map(|m| t.covers(m));
        assert_eq!(covered(Targets::Attn), [true, true, false, false, false, false, true, false, false, false]);
        assert_eq!(covered(Targets::Transformer), [true, true, true, true, false, false, true, true, false, false]);
        assert_eq!(covered(Targets::TransformerConv), [true, true, true, true, true, true, true, true, false, false]);
        assert!("attn+conv".parse::<Targets>().is_err());
    }
}
