//! `dreambridge bench generate`: text-to-image as `dreambridge generate` runs it (two prompt
//! encodings, DDIM with classifier-free guidance, VAE decode), with SD 1.5-size random models.

use super::memory::PeakMemory;
use super::stats::{gib, Timing};
use crate::generate::text_to_image::generate;
use crate::pipeline::Pipeline;
use crate::models::clip::ClipTextConfig;
use crate::models::unet::UNetConfig;
use crate::models::vae::VaeConfig;
use crate::rng::TrainRng;
use anyhow::Result;
use candle_core::{DType, Device};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct GenerateBenchOptions {
    pub unet: UNetConfig,
    pub text_encoder: ClipTextConfig,
    pub vae: VaeConfig,
    pub resolution: usize,
    pub steps: usize,
    /// Untimed images first, then timed ones.
    pub warmup_images: usize,
    pub images: usize,
    pub compute_dtype: DType,
    /// Alternate this speed switch off and on, image by image (warm-up images once per state).
    pub compare: Option<crate::switches::Switch>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct GenerateBenchReport {
    pub device: String,
    pub compute_dtype: String,
    pub resolution: usize,
    pub steps: usize,
    pub images: usize,
    pub image: Timing,
    pub unet_steps_per_s: f64,
    pub peak_memory_bytes: u64,
    pub peak_memory_kind: &'static str,
    /// The speed switches' states (`VAR=0|1 ...`) at the start.
    pub switches: String,
    /// With `compare`: the switch off and on (`image` is then the "off" images).
    pub compare: Option<super::stats::Comparison>,
}

impl GenerateBenchReport {
    pub fn summary(&self) -> String {
        format!(
            "text-to-image  {} {} {}px, {} DDIM steps with guidance: {:.0} ms/image median ({:.0} mean) over {} images, {:.2} UNet steps/s, peak memory {:.2} GiB ({})",
            self.device,
            self.compute_dtype,
            self.resolution,
            self.steps,
            self.image.median_ms,
            self.image.mean_ms,
            self.images,
            self.unet_steps_per_s,
            gib(self.peak_memory_bytes),
            self.peak_memory_kind
        ) + &self.compare.as_ref().map_or(String::new(), |c| format!("\n{}", c.summary()))
    }
}

pub fn run(o: &GenerateBenchOptions, dev: &Device, mut progress: impl FnMut(usize, usize)) -> Result<GenerateBenchReport> {
    anyhow::ensure!(o.resolution % 8 == 0 && o.images > 0, "resolution must be a multiple of 8, at least one image");
    let switches = crate::switches::state();
    let memory = PeakMemory::start(dev)?;
    let mut pipe = Pipeline::from_configs(&o.unet, &o.text_encoder, &o.vae, super::sd15::scheduler()?, dev)?;
    pipe.compute_dtype = o.compute_dtype;
    let mut rng = TrainRng::new(0);
    let states = if o.compare.is_some() { 2 } else { 1 };
    let total = (o.warmup_images + o.images) * states;
    let mut times: [Vec<f64>; 2] = Default::default();
    for i in 0..total {
        let on = super::stats::alternate(o.compare, i, dev)?;
        dev.synchronize()?;
        let start = Instant::now();
        let image = generate(&pipe, "a photo of sks dog in a bucket", "", o.resolution, o.steps, 7.5, &mut rng)?;
        image.flatten_all()?.to_vec1::<f32>()?; // the image reaches the host, as when saved
        if i >= o.warmup_images * states {
            times[(on == Some(true)) as usize].push(start.elapsed().as_secs_f64() * 1e3);
        }
        progress(i + 1, total);
    }
    let compare = o.compare.map(|s| super::stats::Comparison::of(s.var(), &times[0], &times[1]));
    let times = &times[0];
    let image = Timing::of(times);
    Ok(GenerateBenchReport {
        device: crate::device::describe(dev),
        compute_dtype: format!("{:?}", o.compute_dtype).to_lowercase(),
        resolution: o.resolution,
        steps: o.steps,
        images: o.images,
        image,
        unet_steps_per_s: o.steps as f64 / (image.median_ms / 1e3),
        peak_memory_bytes: memory.finish()?,
        peak_memory_kind: PeakMemory::label(dev),
        switches,
        compare,
    })
}
