//! Training images as diffusers' DreamBooth dataset prepares them: resize the shorter side to the
//! resolution (bilinear; the LoRA script's default is lanczos), centre or random crop to a square,
//! optional horizontal flip, then scale to [-1, 1] as a `(3, R, R)` tensor.

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use std::path::{Path, PathBuf};

/// Image files (png, jpg, jpeg, webp) directly in `dir`, sorted.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot read", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| matches!(e.to_string_lossy().to_lowercase().as_str(), "png" | "jpg" | "jpeg" | "webp")))
        .collect();
    files.sort();
    ensure!(!files.is_empty(), "{}: no images (png, jpg, webp)", dir.display());
    Ok(files)
}

/// Where to take the square crop from: the centre, or a position in [0, 1]² (random crop).
#[derive(Clone, Copy, Debug)]
pub enum Crop {
    Center,
    At(f64, f64),
}

/// The resampling filter of the resize (`--image_interpolation_mode`, torchvision's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interpolation {
    Nearest,
    Bilinear,
    Bicubic,
    Lanczos,
}

impl std::str::FromStr for Interpolation {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Interpolation> {
        Ok(match s {
            "nearest" | "nearest_exact" => Interpolation::Nearest,
            "bilinear" => Interpolation::Bilinear,
            "bicubic" => Interpolation::Bicubic,
            "lanczos" => Interpolation::Lanczos,
            "box" | "hamming" => anyhow::bail!("--image_interpolation_mode {s}: not available; use nearest, bilinear, bicubic or lanczos"),
            other => anyhow::bail!("--image_interpolation_mode `{other}`: expected nearest, nearest_exact, bilinear, bicubic or lanczos"),
        })
    }
}

impl Interpolation {
    fn filter(self) -> FilterType {
        match self {
            Interpolation::Nearest => FilterType::Nearest,
            Interpolation::Bilinear => FilterType::Triangle,
            Interpolation::Bicubic => FilterType::CatmullRom,
            Interpolation::Lanczos => FilterType::Lanczos3,
        }
    }
}

/// Decodes and prepares `files[k]` with `draws[k]` (crop, flip) on `workers` threads (0: this
/// thread), as CPU tensors in file order. The first unreadable file, by order, is the error.
pub fn decode_all(files: &[PathBuf], draws: &[(Crop, bool)], resolution: usize, filter: Interpolation, workers: usize) -> Result<Vec<Tensor>> {
    let one = |k: usize| load_image_with(&files[k], resolution, draws[k].0, draws[k].1, filter, &Device::Cpu);
    if workers == 0 || files.len() < 2 {
        return (0..files.len()).map(one).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<Result<Tensor>>>> = files.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..workers.min(files.len()) {
            scope.spawn(|| loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if k >= files.len() {
                    break;
                }
                *slots[k].lock().unwrap() = Some(one(k));
            });
        }
    });
    slots.into_iter().map(|s| s.into_inner().unwrap().expect("every file was taken")).collect()
}

/// Loads, resizes (bilinear), crops and normalises one image.
pub fn load_image(path: &Path, resolution: usize, crop: Crop, flip: bool, device: &Device) -> Result<Tensor> {
    load_image_with(path, resolution, crop, flip, Interpolation::Bilinear, device)
}

/// [`load_image`] with another resampling filter.
pub fn load_image_with(path: &Path, resolution: usize, crop: Crop, flip: bool, filter: Interpolation, device: &Device) -> Result<Tensor> {
    let img = image::open(path).with_context(|| format!("{}: cannot decode image", path.display()))?.to_rgb8();
    let (w, h) = img.dimensions();
    let scale = resolution as f64 / w.min(h) as f64;
    let (nw, nh) = (((w as f64 * scale).round() as u32).max(resolution as u32), ((h as f64 * scale).round() as u32).max(resolution as u32));
    let resized = image::imageops::resize(&img, nw, nh, filter.filter());
    let r = resolution as u32;
    let (fx, fy) = match crop {
        Crop::Center => (0.5, 0.5),
        Crop::At(x, y) => (x.clamp(0.0, 1.0), y.clamp(0.0, 1.0)),
    };
    let (x0, y0) = (((nw - r) as f64 * fx).round() as u32, ((nh - r) as f64 * fy).round() as u32);
    let mut data = vec![0f32; 3 * resolution * resolution];
    for y in 0..r {
        for x in 0..r {
            let sx = if flip { x0 + r - 1 - x } else { x0 + x };
            let px = resized.get_pixel(sx, y0 + y);
            for c in 0..3 {
                data[(c * resolution + y as usize) * resolution + x as usize] = px[c] as f32 / 127.5 - 1.0;
            }
        }
    }
    Ok(Tensor::from_vec(data, (3, resolution, resolution), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 6x4 image whose left half is black and right half white.
    fn two_tone(dir: &Path) -> PathBuf {
        let mut img = image::RgbImage::new(6, 4);
        for (x, _, p) in img.enumerate_pixels_mut() {
            *p = if x < 3 { image::Rgb([0, 0, 0]) } else { image::Rgb([255, 255, 255]) };
        }
        let path = dir.join("a.png");
        img.save(&path).unwrap();
        path
    }

    #[test]
    fn crops_flips_and_normalises() {
        let dir = tempfile::tempdir().unwrap();
        let path = two_tone(dir.path());
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        assert_eq!(image_files(dir.path()).unwrap(), vec![path.clone()]);
        let dev = Device::Cpu;
        // Shorter side 4 -> resolution 4: no resize, the centre crop keeps columns 1..5.
        let t = load_image(&path, 4, Crop::Center, false, &dev).unwrap();
        assert_eq!(t.dims(), &[3, 4, 4]);
        let row: Vec<f32> = t.get(0).unwrap().get(0).unwrap().to_vec1().unwrap();
        assert_eq!(row, vec![-1.0, -1.0, 1.0, 1.0]);
        let flipped: Vec<f32> = load_image(&path, 4, Crop::Center, true, &dev).unwrap().get(0).unwrap().get(0).unwrap().to_vec1().unwrap();
        assert_eq!(flipped, vec![1.0, 1.0, -1.0, -1.0]);
        let left: Vec<f32> = load_image(&path, 4, Crop::At(0.0, 0.0), false, &dev).unwrap().get(1).unwrap().get(2).unwrap().to_vec1().unwrap();
        assert_eq!(left, vec![-1.0, -1.0, -1.0, 1.0]);
    }

    #[test]
    fn worker_threads_decode_the_same_images_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<PathBuf> = (0..5u8)
            .map(|i| {
                let path = dir.path().join(format!("{i}.png"));
                image::RgbImage::from_fn(9, 7, |x, y| image::Rgb([x as u8 * 20 + i, y as u8 * 30, i * 40])).save(&path).unwrap();
                path
            })
            .collect();
        let draws: Vec<(Crop, bool)> = (0..5).map(|k| (Crop::At(k as f64 / 4.0, 0.5), k % 2 == 0)).collect();
        let values = |workers| -> Vec<Vec<f32>> {
            decode_all(&files, &draws, 6, Interpolation::Lanczos, workers).unwrap().iter().map(|t| t.flatten_all().unwrap().to_vec1().unwrap()).collect()
        };
        let serial = values(0);
        assert_eq!(values(3), serial);
        assert_ne!(serial[0], serial[1]);
        let bilinear: Vec<f32> = decode_all(&files[..1], &draws[..1], 6, Interpolation::Bilinear, 0).unwrap()[0].flatten_all().unwrap().to_vec1().unwrap();
        assert_ne!(bilinear, serial[0], "the filter is applied");
        std::fs::write(&files[3], b"not an image").unwrap();
        assert!(decode_all(&files, &draws, 6, Interpolation::Bilinear, 2).unwrap_err().to_string().contains("3.png"));
    }
}
