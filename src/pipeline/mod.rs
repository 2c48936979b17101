//! A loaded Stable Diffusion pipeline: our Candle models on a diffusers folder's weights, its
//! tokenizer and scheduler config. Training, generation and the benchmarks all build on it.

pub mod adapters;
pub mod prompt;
pub mod schedule;

use crate::diffusers::layout::{find_variant_weights, find_weights, Component};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{UNet, UNetConfig};
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
        let vae = Vae::new(as_stored(cast_for_compute(&self.vae_vars, dtype)?, dtype, &self.device), &self.vae.config)?;
        Ok(SamplingModels { unet, vae: Some(vae) })
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
        })
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
        Ok(pipe)
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

    /// Text embeddings `(1, 77, D)` of a prompt.
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
        let (cond, uncond) = (Tensor::randn(0f32, 1.0, (1, 3, 12), &dev).unwrap(), Tensor::randn(0f32, 1.0, (1, 3, 12), &dev).unwrap());
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
