//! A loaded Stable Diffusion pipeline (our Candle models on diffusers weights) that turns prompts
//! into images.

use super::ddim::{Ddim, DdimConfig};
use crate::diffusers::layout::{find_weights, Component};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{UNet, UNetConfig};
use crate::models::vae::{Vae, VaeConfig};
use crate::models::weights::load_into;
use crate::train::prompt::PromptTokenizer;
use crate::train::rng::TrainRng;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use std::path::Path;

pub struct Pipeline {
    pub unet: UNet,
    pub unet_vars: VarMap,
    pub text: ClipTextModel,
    pub text_vars: VarMap,
    pub vae: Vae,
    pub vae_vars: VarMap,
    pub tokenizer: PromptTokenizer,
    pub scheduler: DdimConfig,
    pub device: Device,
    /// Dtype the models compute in when generating (weights stay f32); F32 unless changed.
    pub compute_dtype: DType,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: unexpected content", path.display()))
}

impl Pipeline {
    /// Builds the three models from their configs, with random weights (benchmarks; `load` sets them).
    pub fn from_configs(unet: &UNetConfig, text: &ClipTextConfig, vae: &VaeConfig, scheduler: DdimConfig, device: &Device) -> Result<Pipeline> {
        let (unet_vars, text_vars, vae_vars) = (VarMap::new(), VarMap::new(), VarMap::new());
        Ok(Pipeline {
            unet: UNet::new(VarBuilder::from_varmap(&unet_vars, DType::F32, device), unet)?,
            unet_vars,
            text: ClipTextModel::new(VarBuilder::from_varmap(&text_vars, DType::F32, device), text)?,
            text_vars,
            vae: Vae::new(VarBuilder::from_varmap(&vae_vars, DType::F32, device), vae)?,
            vae_vars,
            tokenizer: PromptTokenizer::default(),
            scheduler,
            device: device.clone(),
            compute_dtype: DType::F32,
        })
    }

    /// Loads unet, text_encoder, vae and the scheduler config of a diffusers folder (f32 weights).
    pub fn load(dir: &Path, device: &Device) -> Result<Pipeline> {
        let pipe = Pipeline::from_configs(
            &read_json(&dir.join("unet/config.json"))?,
            &read_json(&dir.join("text_encoder/config.json"))?,
            &read_json(&dir.join("vae/config.json"))?,
            read_json(&dir.join("scheduler/scheduler_config.json"))?,
            device,
        )?;
        load_into(&pipe.unet_vars, &find_weights(dir, Component::Unet)?, "")?;
        load_into(&pipe.text_vars, &find_weights(dir, Component::TextEncoder)?, "text_model.")?;
        load_into(&pipe.vae_vars, &find_weights(dir, Component::Vae)?, "")?;
        Ok(pipe)
    }

    /// Text embeddings `(1, 77, D)` of a prompt.
    pub fn embed(&self, prompt: &str) -> Result<Tensor> {
        let ids = Tensor::new(self.tokenizer.ids(prompt).as_slice(), &self.device)?.unsqueeze(0)?;
        Ok(self.text.forward(&ids, self.compute_dtype)?.detach())
    }

    /// One image `(3, H, W)` in [0, 1]: DDIM with classifier-free guidance (`guidance` > 1).
    pub fn generate(&self, prompt: &str, negative: &str, size: usize, steps: usize, guidance: f64, rng: &mut TrainRng) -> Result<Tensor> {
        let (cond, uncond) = (self.embed(prompt)?, self.embed(negative)?);
        let context = Tensor::cat(&[&uncond, &cond], 0)?.to_dtype(self.compute_dtype)?;
        let ddim = Ddim::new(&self.scheduler, steps)?;
        let z = self.vae.config.latent_channels;
        let mut latents = rng.normal(&[1, z, size / 8, size / 8], &self.device)?;
        for &t in &ddim.timesteps {
            let input = Tensor::cat(&[&latents, &latents], 0)?.to_dtype(self.compute_dtype)?;
            let ts = Tensor::new(&[t as f32, t as f32], &self.device)?;
            let out = self.unet.forward(&input, &ts, &context)?.detach().to_dtype(DType::F32)?;
            let (u, c) = (out.narrow(0, 0, 1)?, out.narrow(0, 1, 1)?);
            let guided = (&u + ((c - &u)? * guidance)?)?;
            latents = ddim.step(&guided, t, &latents)?;
        }
        let z = (latents / self.vae.config.scaling_factor)?.to_dtype(self.compute_dtype)?;
        let image = self.vae.decode(&z)?.detach().to_dtype(DType::F32)?;
        Ok(((image / 2.0)? + 0.5)?.clamp(0f32, 1f32)?.squeeze(0)?)
    }
}

/// Saves a `(3, H, W)` [0, 1] tensor as a PNG (atomically: temp file + rename).
pub fn save_png(image: &Tensor, path: &Path) -> Result<()> {
    let (_, h, w) = image.dims3()?;
    let data: Vec<f32> = image.permute((1, 2, 0))?.flatten_all()?.to_vec1()?;
    let bytes: Vec<u8> = data.iter().map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8).collect();
    let img = image::RgbImage::from_raw(w as u32, h as u32, bytes).context("image buffer size")?;
    let temp = path.with_extension("png.tmp");
    img.save_with_format(&temp, image::ImageFormat::Png).with_context(|| format!("{}: cannot write", temp.display()))?;
    std::fs::rename(&temp, path)?;
    Ok(())
}
