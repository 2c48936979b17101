//! The scores over folders of images: features in batches, cosine similarities, the report.

use super::clip::Clip;
use super::dino::Dino;
use super::preprocess::{load_rgb, Transform, CLIP, DINO};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, D};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Rows scaled to unit length (the norm clamped at `EPS`, as `torch.nn.functional.normalize`).
pub const EPS: f64 = 1e-12;

pub fn normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(EPS, f64::MAX)?;
    Ok(x.broadcast_div(&norm)?)
}

/// Cosine similarity of every row of `a` with every row of `b`: `(n, m)`.
pub fn cosine_matrix(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(normalize(a)?.matmul(&normalize(b)?.t()?)?)
}

/// The images that load, and the ones that do not (named).
pub fn load_images(files: &[PathBuf], strict: bool) -> Result<(Vec<(PathBuf, image::RgbImage)>, Vec<String>)> {
    let (mut ok, mut skipped) = (Vec::new(), Vec::new());
    for f in files {
        match load_rgb(f) {
            Ok(img) => ok.push((f.clone(), img)),
            Err(e) if !strict => {
                eprintln!("skipped: {}", crate::output::one_line(&e));
                skipped.push(f.display().to_string());
            }
            Err(e) => return Err(e.context("an unreadable image (drop --strict to skip such files)")),
        }
    }
    Ok((ok, skipped))
}

fn features(images: &[(PathBuf, image::RgbImage)], t: &Transform, batch: usize, device: &Device, f: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let mut out = Vec::new();
    for chunk in images.chunks(batch.max(1)) {
        let pixels: Vec<Tensor> = chunk.iter().map(|(_, img)| t.apply(img, device)).collect::<Result<_>>()?;
        out.push(f(&Tensor::stack(&pixels, 0)?)?);
    }
    Ok(Tensor::cat(&out, 0)?)
}

/// What to score.
pub struct EvalInputs<'a> {
    pub generated: &'a [PathBuf],
    pub real: &'a [PathBuf],
    /// The prompt of each generated image (CLIP-T), by file name; `None` skips CLIP-T.
    pub prompts: Option<BTreeMap<String, String>>,
    pub strict: bool,
    pub batch: usize,
}

fn mean(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.mean_all()?.to_scalar::<f64>()?)
}

/// DINO, CLIP-I and CLIP-T (raw cosine; image metrics over all generated × real pairs) and the
/// per-image values, as a JSON report.
pub fn evaluate(inputs: &EvalInputs, clip: &Clip, dino: &Dino, device: &Device) -> Result<Value> {
    let (generated, skipped_gen) = load_images(inputs.generated, inputs.strict)?;
    let (real, skipped_real) = load_images(inputs.real, inputs.strict)?;
    if generated.is_empty() || real.is_empty() {
        bail!("no readable {} images", if generated.is_empty() { "generated" } else { "real" });
    }
    let progress = crate::progress::Progress::new("eval", (2 * (generated.len() + real.len())) as u64);
    let dino_f = |x: &Tensor| dino.features(x);
    let clip_f = |x: &Tensor| clip.image_features(x);
    let (g_dino, r_dino) = (features(&generated, &DINO, inputs.batch, device, &dino_f)?, features(&real, &DINO, inputs.batch, device, &dino_f)?);
    progress.advance("dino", (generated.len() + real.len()) as u64);
    let (g_clip, r_clip) = (features(&generated, &CLIP, inputs.batch, device, &clip_f)?, features(&real, &CLIP, inputs.batch, device, &clip_f)?);
    progress.advance("clip", (generated.len() + real.len()) as u64);
    let dino_m = cosine_matrix(&g_dino, &r_dino)?;
    let clip_m = cosine_matrix(&g_clip, &r_clip)?;
    let mut clip_t = Vec::new();
    if let Some(prompts) = &inputs.prompts {
        let mut cache: BTreeMap<&str, Tensor> = BTreeMap::new();
        for (i, (path, _)) in generated.iter().enumerate() {
            let name = path.file_name().unwrap_or_default().to_string_lossy().to_string();
            let prompt = prompts.get(&name).or_else(|| prompts.get("*")).with_context(|| format!("no prompt for {name}"))?;
            if !cache.contains_key(prompt.as_str()) {
                cache.insert(prompt, clip.text_features(prompt)?);
            }
            let sim = cosine_matrix(&g_clip.narrow(0, i, 1)?, &cache[prompt.as_str()])?;
            clip_t.push(mean(&sim)?);
        }
    }
    progress.finish("scored");
    let per_image: Vec<Value> = generated
        .iter()
        .enumerate()
        .map(|(i, (p, _))| {
            Ok(json!({
                "file": p.display().to_string(),
                "dino": mean(&dino_m.narrow(0, i, 1)?)?,
                "clip_i": mean(&clip_m.narrow(0, i, 1)?)?,
                "clip_t": clip_t.get(i),
            }))
        })
        .collect::<Result<_>>()?;
    let clip_t_mean = (!clip_t.is_empty()).then(|| clip_t.iter().sum::<f64>() / clip_t.len() as f64);
    Ok(json!({
        "metrics": {"dino": mean(&dino_m)?, "clip_i": mean(&clip_m)?, "clip_t": clip_t_mean},
        "convention": "raw cosine similarity; DINO and CLIP-I: mean over all generated x real pairs; CLIP-T: mean over generated images of cos(image, its prompt)",
        "other_conventions": {"clip_t_x100": clip_t_mean.map(|c| 100.0 * c), "clip_score_2.5": clip_t_mean.map(|c| 2.5 * c.max(0.0))},
        "preprocessing": {
            "dino": "shortest side 256 bicubic, centre crop 224, ImageNet mean/std; final-norm CLS",
            "clip": "shortest side 224 bicubic, centre crop 224, CLIP mean/std; projected features",
            "normalize_eps": EPS,
        },
        "generated": generated.len(),
        "real": real.len(),
        "skipped": skipped_gen.iter().chain(&skipped_real).collect::<Vec<_>>(),
        "per_image": per_image,
    }))
}
