//! The image transforms the metrics' reference code uses. CLIP: shortest side to 224 (bicubic),
//! centre crop 224, CLIP's mean/std (openai/clip-vit-base-patch32's preprocessor config). DINO:
//! shortest side to 256 (bicubic), centre crop 224, ImageNet mean/std (DINO's k-NN evaluation
//! transform, which DreamBooth evaluations use). Images of any size and colour mode.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::path::Path;

/// A resize-and-crop transform with per-channel normalisation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Transform {
    pub resize_shortest: u32,
    pub crop: u32,
    /// Crop offsets as torchvision's `CenterCrop` rounds them (half to even) rather than as
    /// transformers' `center_crop` floors them.
    pub round_crop: bool,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

pub const CLIP: Transform = Transform {
    resize_shortest: 224,
    crop: 224,
    round_crop: false,
    mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
    std: [0.268_629_54, 0.261_302_58, 0.275_777_11],
};

pub const DINO: Transform = Transform { resize_shortest: 256, crop: 224, round_crop: true, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225] };

impl Transform {
    /// `(3, crop, crop)` normalised pixels of an RGB image.
    pub fn apply(&self, img: &image::RgbImage, device: &Device) -> Result<Tensor> {
        let (w, h) = img.dimensions();
        let short = w.min(h).max(1);
        // As transformers' / torchvision's resize: the short side exact, the long one truncated.
        let (nw, nh) = if w <= h {
            (self.resize_shortest, (self.resize_shortest as u64 * h as u64 / short as u64) as u32)
        } else {
            ((self.resize_shortest as u64 * w as u64 / short as u64) as u32, self.resize_shortest)
        };
        let resized = super::pil_resize::resize_bicubic(img, nw, nh);
        let offset = |extra: u32| if self.round_crop { (extra as f64 / 2.0).round_ties_even() as u32 } else { extra / 2 };
        let (left, top) = (offset(nw - self.crop), offset(nh - self.crop));
        let c = self.crop as usize;
        let mut data = vec![0f32; 3 * c * c];
        for y in 0..c {
            for x in 0..c {
                let p = resized.get_pixel(left + x as u32, top + y as u32).0;
                for ch in 0..3 {
                    data[ch * c * c + y * c + x] = (p[ch] as f32 / 255.0 - self.mean[ch]) / self.std[ch];
                }
            }
        }
        Ok(Tensor::from_vec(data, (3, c, c), device)?)
    }
}

/// An image file as RGB (grey, alpha and 16-bit images converted).
pub fn load_rgb(path: &Path) -> Result<image::RgbImage> {
    Ok(image::open(path).with_context(|| format!("{}: not a readable image", path.display()))?.to_rgb8())
}

/// The image files of a folder, sorted (png, jpg, jpeg, webp, bmp).
pub fn image_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot read the folder", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg" | "webp" | "bmp")))
        .collect();
    out.sort();
    Ok(out)
}
