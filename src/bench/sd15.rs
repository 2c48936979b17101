//! Stable Diffusion 1.5's model configs (diffusers' `runwayml/stable-diffusion-v1-5` folder), the
//! shapes every benchmark uses. The PyTorch side reads the same files from bench/sd15/.

use crate::pipeline::schedule::SchedulerConfig;
use crate::models::clip::ClipTextConfig;
use crate::models::unet::UNetConfig;
use crate::models::vae::VaeConfig;
use anyhow::Result;

pub const UNET: &str = include_str!("../../bench/sd15/unet.json");
pub const TEXT_ENCODER: &str = include_str!("../../bench/sd15/text_encoder.json");
pub const VAE: &str = include_str!("../../bench/sd15/vae.json");
pub const SCHEDULER: &str = include_str!("../../bench/sd15/scheduler.json");

pub fn unet() -> Result<UNetConfig> {
    Ok(serde_json::from_str(UNET)?)
}

pub fn text_encoder() -> Result<ClipTextConfig> {
    Ok(serde_json::from_str(TEXT_ENCODER)?)
}

pub fn vae() -> Result<VaeConfig> {
    Ok(serde_json::from_str(VAE)?)
}

pub fn scheduler() -> Result<SchedulerConfig> {
    Ok(serde_json::from_str(SCHEDULER)?)
}

/// A reduced SD-shaped UNet (same block types, 32/64 wide) for quick runs and the GPU check.
pub fn small_unet() -> Result<UNetConfig> {
    Ok(serde_json::from_value(serde_json::json!({
        "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64], "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 32, "attention_head_dim": 4, "norm_num_groups": 8
    }))?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn configs_parse_with_sd15_sizes() {
        let u = super::unet().unwrap();
        assert_eq!((u.block_out_channels.clone(), u.cross_attention_dim), (vec![320, 640, 1280, 1280], 768));
        assert_eq!(super::text_encoder().unwrap().num_hidden_layers, 12);
        assert_eq!(super::vae().unwrap().block_out_channels, vec![128, 256, 512, 512]);
        super::scheduler().unwrap();
        super::small_unet().unwrap();
    }
}
