//! A loaded Stable Diffusion pipeline: our Candle models on a diffusers folder's weights, its
//! tokenizer and scheduler config. Training, generation and the benchmarks all build on it.

pub mod adapters;
pub mod prompt;
pub mod schedule;

use crate::diffusers::layout::{find_variant_weights, find_weights, find_weights_of, Component};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{AddedCond, UNet, UNetConfig};
use crate::models::vae::{Vae, VaeConfig};
use crate::models::weights::load_into;
use prompt::PromptTokenizer;
use schedule::SchedulerConfig;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use std::path::Path;

/// The three models over detached views of the weights. They share storage with the trainable
/// Vars (training updates show), but record no graph: inference keeps no activations and runs no
/// custom-op bookkeeping.
pub struct InferenceModels {
    pub unet: UNet,
    pub text: ClipTextModel,
    pub vae: Vae,
}

fn detached(vars: &VarMap, device: &Device) -> VarBuilder<'static> {
    let tensors = vars.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect();
    VarBuilder::from_tensors(tensors, DType::F32, device)
}

/// SDXL's second text encoder: `text_encoder_2` (`CLIPTextModelWithProjection`, OpenCLIP-G) and
/// `tokenizer_2`.
pub struct TextEncoder2 {
    pub model: ClipTextModel,
    pub vars: VarMap,
    /// Over detached views of `vars`, as [`InferenceModels`].
    pub inference: ClipTextModel,
    pub config: ClipTextConfig,
    pub tokenizer: PromptTokenizer,
}

/// A prompt's embeddings as the UNet takes them: the context `(1, L, D)` and, for SDXL, the
/// pooled embedding `(1, P)` of the second text encoder.
#[derive(Clone, Debug)]
pub struct PromptEmbeds {
    pub context: Tensor,
    pub pooled: Option<Tensor>,
}

impl PromptEmbeds {
    fn zeros_like(&self) -> Result<PromptEmbeds> {
        Ok(PromptEmbeds { context: self.context.zeros_like()?, pooled: self.pooled.as_ref().map(Tensor::zeros_like).transpose()? })
    }
}

/// SDXL's time ids for square images of `size` pixels (diffusers' `_get_add_time_ids` with its
/// defaults: original size = target size, crop at the top left): `(n, 6)`.
pub fn time_ids(size: usize, n: usize, device: &Device) -> Result<Tensor> {
    let s = size as f32;
    let one = [s, s, 0.0, 0.0, s, s];
    Ok(Tensor::new(&one, device)?.unsqueeze(0)?.repeat((n, 1))?)
}

/// SDXL's added conditioning for the UNet: the pooled embeddings of `embeds` (each repeated `n`
/// times, in order) with the time ids of `size`; `None` when they carry no pooled embedding (SD 1/2).
pub fn added_cond(embeds: &[&PromptEmbeds], n: usize, size: usize, device: &Device) -> Result<Option<AddedCond>> {
    let pooled: Option<Vec<&Tensor>> = embeds.iter().map(|e| e.pooled.as_ref()).collect();
    let Some(pooled) = pooled else { return Ok(None) };
    let repeated: Vec<Tensor> = pooled.iter().map(|p| Tensor::cat(&vec![*p; n], 0)).collect::<candle_core::Result<_>>()?;
    Ok(Some(AddedCond { text_embeds: Tensor::cat(&repeated, 0)?, time_ids: time_ids(size, n * embeds.len(), device)? }))
}

pub struct Pipeline {
    pub unet: UNet,
    pub unet_vars: VarMap,
    pub text: ClipTextModel,
    pub text_vars: VarMap,
    pub vae: Vae,
    pub vae_vars: VarMap,
    pub tokenizer: PromptTokenizer,
    pub scheduler: SchedulerConfig,
    pub device: Device,
    /// Dtype the models compute in when generating (weights stay f32); F32 unless changed.
    pub compute_dtype: DType,
    pub inference: InferenceModels,
    pub unet_config: UNetConfig,
    pub text_config: ClipTextConfig,
    /// Set by [`Pipeline::attach_lora`]: the adapters, whose Vars `unet_vars`/`text_vars` then hold.
    pub lora: Option<adapters::PipelineLora>,
    /// Set by [`Pipeline::release_text_encoder`].
    pub text_released: bool,
    /// SDXL's second text encoder; `None` for SD 1.x / 2.x.
    pub text_2: Option<TextEncoder2>,
    /// SDXL pipelines' `force_zeros_for_empty_prompt` (`model_index.json`, default true): an empty
    /// negative prompt is all zeros, not the encoding of "".
    pub force_zeros_for_empty_prompt: bool,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: unexpected content", path.display()))
}

/// The UNet and VAE that sampling uses when [`crate::switches::Switch::CastWeightsOnce`] is on:
/// built over weights cast to the compute dtype once (see [`Pipeline::sampling_models`]).
pub struct SamplingModels {
    /// `None`: the inference UNet as it is (f32 compute, or a LoRA base already held in the
    /// compute dtype).
    pub unet: Option<UNet>,
    pub vae: Option<Vae>,
}

impl Pipeline {
    /// With [`crate::switches::Switch::CastWeightsOnce`] on and a compute dtype below f32: the
    /// sampling UNet and VAE over weights cast once now (norm parameters stay f32), so no step
    /// casts a weight again. Built afresh per call, so training updates are seen.
    pub fn sampling_models(&self) -> Result<SamplingModels> {
        use crate::models::weights::{as_stored, cast_for_compute};
        let dtype = self.compute_dtype;
        if !crate::switches::Switch::CastWeightsOnce.on() || dtype == DType::F32 {
            return Ok(SamplingModels { unet: None, vae: None });
        }
        let unet = match self.lora {
            Some(_) => None,
            None => Some(UNet::new(as_stored(cast_for_compute(&self.unet_vars, dtype)?, dtype, &self.device), &self.unet_config)?),
        };
        let vae = match self.vae_dtype() {
            DType::F32 => None,
            _ => Some(Vae::new(as_stored(cast_for_compute(&self.vae_vars, dtype)?, dtype, &self.device), &self.vae.config)?),
        };
        Ok(SamplingModels { unet, vae })
    }

    /// Builds the three models from their configs, with random weights (benchmarks; `load` sets them).
    pub fn from_configs(unet: &UNetConfig, text: &ClipTextConfig, vae: &VaeConfig, scheduler: SchedulerConfig, device: &Device) -> Result<Pipeline> {
        let (unet_vars, text_vars, vae_vars) = (VarMap::new(), VarMap::new(), VarMap::new());
        let (unet_cfg, text_cfg, vae_cfg) = (unet, text, vae);
        let unet = UNet::new(VarBuilder::from_varmap(&unet_vars, DType::F32, device), unet_cfg)?;
        let text = ClipTextModel::new(VarBuilder::from_varmap(&text_vars, DType::F32, device), text_cfg)?;
        let vae = Vae::new(VarBuilder::from_varmap(&vae_vars, DType::F32, device), vae_cfg)?;
        let inference = InferenceModels {
            unet: UNet::new(detached(&unet_vars, device), unet_cfg)?,
            text: ClipTextModel::new(detached(&text_vars, device), text_cfg)?,
            vae: Vae::new(detached(&vae_vars, device), vae_cfg)?,
        };
        Ok(Pipeline {
            unet,
            unet_vars,
            text,
            text_vars,
            vae,
            vae_vars,
            inference,
            tokenizer: PromptTokenizer::default(),
            scheduler,
            device: device.clone(),
            compute_dtype: DType::F32,
            unet_config: unet_cfg.clone(),
            text_config: text_cfg.clone(),
            lora: None,
            text_released: false,
            text_2: None,
            force_zeros_for_empty_prompt: false,
        })
    }

    /// Adds SDXL's second text encoder (random weights until loaded into `text_2.vars`).
    pub fn attach_text_encoder_2(&mut self, config: &ClipTextConfig, tokenizer: PromptTokenizer) -> Result<()> {
        let vars = VarMap::new();
        let model = ClipTextModel::with_projection(VarBuilder::from_varmap(&vars, DType::F32, &self.device), config)?;
        let inference = ClipTextModel::with_projection(detached(&vars, &self.device), config)?;
        self.text_2 = Some(TextEncoder2 { model, vars, inference, config: config.clone(), tokenizer });
        self.force_zeros_for_empty_prompt = true;
        Ok(())
    }

    /// diffusers' default image size: the UNet's `sample_size` times the VAE's downscale factor
    /// (512 when the config has no `sample_size`).
    pub fn default_size(&self) -> usize {
        self.unet_config.sample_size.map_or(512, |s| s * self.vae_scale_factor())
    }

    /// Pixels per latent along each side: 2 to the number of VAE levels minus one (8 for SD).
    pub fn vae_scale_factor(&self) -> usize {
        1 << self.vae.config.block_out_channels.len().saturating_sub(1)
    }

    /// Whether this is an SDXL pipeline (two text encoders, added conditioning).
    pub fn is_sdxl(&self) -> bool {
        self.text_2.is_some()
    }

    /// Loads unet, text_encoder, vae, the tokenizer and the scheduler config of a diffusers folder (f32 weights).
    pub fn load(dir: &Path, device: &Device) -> Result<Pipeline> {
        Pipeline::load_variant(dir, device, None)
    }

    /// [`Pipeline::load`] reading the weights of a variant (`fp16`: `*.fp16.safetensors`), as
    /// diffusers' `variant=`; the weights are held in f32 either way.
    pub fn load_variant(dir: &Path, device: &Device, variant: Option<&str>) -> Result<Pipeline> {
        let mut pipe = Pipeline::from_configs(
            &read_json(&dir.join("unet/config.json"))?,
            &read_json(&dir.join("text_encoder/config.json"))?,
            &read_json(&dir.join("vae/config.json"))?,
            read_json(&dir.join("scheduler/scheduler_config.json"))?,
            device,
        )?;
        let weights = |c: Component| match variant {
            None => find_weights(dir, c),
            Some(v) => find_variant_weights(dir, c, v),
        };
        load_into(&pipe.unet_vars, &weights(Component::Unet)?, "")?;
        load_into(&pipe.text_vars, &weights(Component::TextEncoder)?, "text_model.")?;
        load_into(&pipe.vae_vars, &weights(Component::Vae)?, "")?;
        pipe.tokenizer = PromptTokenizer::for_pipeline(dir)?;
        if dir.join("text_encoder_2").join("config.json").is_file() {
            pipe.load_text_encoder_2(dir, variant)?;
        }
        if pipe.unet_config.is_text_time() {
            anyhow::ensure!(pipe.text_2.is_some(), "{}: the UNet takes SDXL's added conditioning, but there is no text_encoder_2/config.json", dir.display());
        }
        Ok(pipe)
    }

    /// SDXL: `text_encoder_2` and `tokenizer_2` of `dir`, and `force_zeros_for_empty_prompt`.
    fn load_text_encoder_2(&mut self, dir: &Path, variant: Option<&str>) -> Result<()> {
        let config: ClipTextConfig = read_json(&dir.join("text_encoder_2/config.json"))?;
        let tokenizer_dir = dir.join("tokenizer_2");
        let tokenizer = PromptTokenizer::load(&tokenizer_dir).with_context(|| format!("{}: SDXL's second tokenizer", tokenizer_dir.display()))?;
        self.attach_text_encoder_2(&config, tokenizer)?;
        let file = match variant {
            None => find_weights_of(dir, "text_encoder_2", "model.safetensors")?,
            Some(v) => {
                let p = dir.join("text_encoder_2").join(format!("model.{v}.safetensors"));
                anyhow::ensure!(p.is_file(), "{}: missing (--variant {v})", p.display());
                p
            }
        };
        load_into(&self.text_2.as_ref().expect("attached").vars, &file, "text_model.")?;
        let index: serde_json::Value = read_json(&dir.join("model_index.json")).unwrap_or_default();
        self.force_zeros_for_empty_prompt = index.get("force_zeros_for_empty_prompt").and_then(serde_json::Value::as_bool).unwrap_or(true);
        Ok(())
    }

    /// Drops the text encoder's weights (`--pre_compute_text_embeddings`): its models become empty
    /// and `embed` fails from here on.
    pub fn release_text_encoder(&mut self) -> Result<()> {
        let empty = ClipTextConfig { vocab_size: 1, hidden_size: 1, intermediate_size: 1, num_hidden_layers: 0, num_attention_heads: 1, max_position_embeddings: 1, ..self.text_config.clone() };
        self.text = ClipTextModel::new(VarBuilder::from_varmap(&VarMap::new(), DType::F32, &self.device), &empty)?;
        self.inference.text = ClipTextModel::new(VarBuilder::from_varmap(&VarMap::new(), DType::F32, &self.device), &empty)?;
        self.text_vars = VarMap::new();
        self.text_released = true;
        Ok(())
    }

    /// A prompt's embeddings for sampling: SD 1/2 the text encoder's output; SDXL the penultimate
    /// hidden states of both encoders side by side and the second one's projected pooled output,
    /// as diffusers' `StableDiffusionXLPipeline.encode_prompt`.
    pub fn encode(&self, prompt: &str) -> Result<PromptEmbeds> {
        let Some(t2) = &self.text_2 else {
            return Ok(PromptEmbeds { context: self.embed(prompt)?, pooled: None });
        };
        anyhow::ensure!(!self.text_released, "the text encoders were freed; prompt `{prompt}` cannot be encoded");
        let ids = |tok: &PromptTokenizer| -> Result<Tensor> { Ok(Tensor::new(tok.ids(prompt).as_slice(), &self.device)?.unsqueeze(0)?) };
        let first = self.inference.text.forward_hidden(&ids(&self.tokenizer)?, self.compute_dtype)?;
        let second = t2.inference.forward_hidden(&ids(&t2.tokenizer)?, self.compute_dtype)?;
        let context = Tensor::cat(&[&first.penultimate, &second.penultimate], 2)?;
        Ok(PromptEmbeds { context, pooled: Some(second.pooled) })
    }

    /// The negative side of guidance: [`Pipeline::encode`], except that SDXL with
    /// `force_zeros_for_empty_prompt` makes an empty negative prompt all zeros, as diffusers does
    /// when no negative prompt is given.
    pub fn encode_negative(&self, negative: &str) -> Result<PromptEmbeds> {
        let embeds = self.encode(negative)?;
        if negative.is_empty() && self.is_sdxl() && self.force_zeros_for_empty_prompt {
            return embeds.zeros_like();
        }
        Ok(embeds)
    }

    /// The dtype the VAE decodes in: the compute dtype, except f32 for SDXL in f16 when the VAE's
    /// `force_upcast` is set (diffusers' `needs_upcasting`).
    pub fn vae_dtype(&self) -> DType {
        if self.is_sdxl() && self.compute_dtype == DType::F16 && self.vae.config.force_upcast {
            DType::F32
        } else {
            self.compute_dtype
        }
    }

    /// Text embeddings `(1, 77, D)` of a prompt (SD 1/2's text encoder).
    pub fn embed(&self, prompt: &str) -> Result<Tensor> {
        anyhow::ensure!(!self.text_released, "the text encoder was freed (--pre_compute_text_embeddings); prompt `{prompt}` cannot be encoded");
        let ids = Tensor::new(self.tokenizer.ids(prompt).as_slice(), &self.device)?.unsqueeze(0)?;
        Ok(self.inference.text.forward(&ids, self.compute_dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(dev: &Device) -> Pipeline {
        let text: ClipTextConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 50, "hidden_size": 12, "intermediate_size": 24, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 8
        }))
        .unwrap();
        let vae: VaeConfig = serde_json::from_value(serde_json::json!({
            "in_channels": 3, "out_channels": 3, "block_out_channels": [8, 8], "layers_per_block": 1,
            "latent_channels": 4, "norm_num_groups": 4
        }))
        .unwrap();
        Pipeline::from_configs(&crate::models::testing::tiny_unet_config(), &text, &vae, crate::bench::sd15::scheduler().unwrap(), dev).unwrap()
    }

    #[test]
    fn casting_weights_once_samples_the_same_images() {
        use crate::generate::{scheduler::SchedulerKind, text_to_image::generate_batch};
        use crate::switches::Switch;
        let dev = Device::Cpu;
        let mut pipe = tiny(&dev);
        pipe.compute_dtype = DType::F16;
        let embeds = |t: Tensor| PromptEmbeds { context: t, pooled: None };
        let (cond, uncond) = (embeds(Tensor::randn(0f32, 1.0, (1, 3, 12), &dev).unwrap()), embeds(Tensor::randn(0f32, 1.0, (1, 3, 12), &dev).unwrap()));
        let sample = |on: bool| {
            Switch::CastWeightsOnce.force(on);
            let cast = pipe.sampling_models().unwrap();
            assert_eq!(cast.unet.is_some() && cast.vae.is_some(), on);
            let mut rngs = [crate::rng::TrainRng::new(7), crate::rng::TrainRng::new(8)];
            let images = generate_batch(&pipe, &cond, &uncond, 16, 3, 7.5, SchedulerKind::EulerAncestralDiscrete, &mut rngs).unwrap();
            Tensor::stack(&images, 0).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let (per_step, once) = (sample(false), sample(true));
        assert!(per_step.iter().all(|v| v.is_finite()) && per_step.iter().any(|v| *v != per_step[0]));
        // The same casts, made once instead of at every use: the same numbers, bit for bit.
        assert_eq!(per_step, once);
        // Norm parameters stay f32; the rest is held in the compute dtype.
        let unet = crate::models::weights::cast_for_compute(&pipe.unet_vars, DType::F16).unwrap();
        for (k, t) in &unet {
            assert_eq!(t.dtype(), if crate::models::weights::is_norm_parameter(k) { DType::F32 } else { DType::F16 }, "{k}");
        }
        assert!(unet.keys().any(|k| crate::models::weights::is_norm_parameter(k)) && unet.keys().any(|k| k.ends_with("conv_in.weight")));
    }

    #[test]
    fn inference_models_see_weight_updates_and_record_no_graph() {
        let dev = Device::Cpu;
        let pipe = tiny(&dev);
        let x = Tensor::ones((1, 4, 8, 8), DType::F32, &dev).unwrap();
        let t = Tensor::new(&[10f32], &dev).unwrap();
        let ctx = Tensor::ones((1, 3, 12), DType::F32, &dev).unwrap();
        let run = |unet: &UNet| unet.forward(&x, &t, &ctx).unwrap();
        let before = run(&pipe.inference.unet);
        assert!(!before.track_op(), "inference records no graph");
        let var = pipe.unet_vars.data().lock().unwrap()["conv_out.bias"].clone();
        var.set(&(var.as_tensor() + 1.0).unwrap()).unwrap();
        let (after, trained) = (run(&pipe.inference.unet), run(&pipe.unet));
        let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff(&after, &before) > 0.5, "the update is visible to inference");
        assert_eq!(diff(&after, &trained), 0.0, "both views compute the same");
    }
}
