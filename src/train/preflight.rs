//! Every check of a `train` command line that needs no model: flag combinations, the device and
//! its dtypes, the input and output paths, the checkpoint to resume from, the base's kind. It
//! runs before anything is loaded, generated, downloaded or written, so a bad command line fails
//! in milliseconds instead of after the class images and the latent cache.

use super::command::{compute_dtype, prior_dtype, TrainArgs};
use super::data::image_files;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// What the checks settled, for the run that follows.
#[derive(Debug)]
pub struct Ready {
    pub device: Device,
    /// The UNet's compute dtype (`--mixed_precision`).
    pub compute_dtype: DType,
    /// The checkpoint folder to resume from; `None` for a fresh run, `latest` with no checkpoint
    /// included.
    pub resume: Option<PathBuf>,
}

/// Checks `a` without touching a model; the first problem is the error.
pub fn check(a: &TrainArgs) -> Result<Ready> {
    ensure!(a.resolution % 8 == 0 && a.resolution > 0, "--resolution {}: must be a positive multiple of 8", a.resolution);
    ensure!(a.train_batch_size >= 1, "--train_batch_size must be at least 1");
    ensure!(!(a.train_text_encoder && a.pre_compute_text_embeddings), "--train_text_encoder cannot be used with --pre_compute_text_embeddings");
    ensure!(!(a.skip_save_text_encoder && a.save_single_file), "--save-single-file writes the whole model, text encoder included: drop --skip_save_text_encoder");
    ensure!(a.validation_eval.is_none() || a.validation_prompt.is_some(), "--validation-eval needs --validation-prompt");
    if let Some(n) = a.tokenizer_max_length {
        ensure!(n >= 2, "--tokenizer_max_length must be at least 2 (start and end tokens)");
    }
    super::optim::LrSchedule::from_args(&a.lr_scheduler, a.lr_num_cycles, a.lr_power, a.learning_rate)?;
    let device = crate::device::parse(&a.dist.device_spec(&a.device))?;
    a.dist.check(&device)?;
    let compute_dtype = compute_dtype(&a.mixed_precision, &device)?;

    image_files(&a.instance_data_dir).context("--instance_data_dir")?;
    if a.with_prior_preservation {
        let dir = a.class_data_dir.as_deref().context("--with-prior-preservation needs --class-data-dir")?;
        a.class_prompt.as_deref().context("--with-prior-preservation needs --class-prompt")?;
        ensure!(!dir.exists() || dir.is_dir(), "--class_data_dir {}: not a folder", dir.display());
        let have = image_files(dir).map_or(0, |f| f.len());
        if have < a.num_class_images {
            // Class images will be generated: their dtype, and a folder to put them in.
            prior_dtype(a, &device)?;
            writable(dir).context("--class_data_dir")?;
        }
    }

    let out = &a.output_dir;
    ensure!(!out.exists() || out.is_dir(), "--output_dir {}: not a folder", out.display());
    let done = out.join("model_index.json").exists() || out.join(crate::lora::DIFFUSERS_FILE_NAME).exists();
    if done && !a.force && a.resume_from_checkpoint.is_none() {
        bail!("{}: already holds a trained model (use --force to replace it)", out.display());
    }
    writable(out).context("--output_dir")?;
    let resume = a.resume_from_checkpoint.as_deref().map(|spec| super::checkpoint::resolve(out, spec)).transpose()?.flatten();

    check_base(a)?;
    Ok(Ready { device, compute_dtype, resume })
}

/// A base given as a local diffusers folder: its configs read (no weights), its kind one that
/// trains (SD 1.x/2.x), the `--variant` weights present, `--tokenizer_max_length` within its
/// positions. Single files and Hub repos are checked once fetched.
fn check_base(a: &TrainArgs) -> Result<()> {
    let dir = &a.pretrained_model;
    if !dir.is_dir() {
        ensure!(
            dir.exists() || crate::hub::download::parse_hub_file(&dir.to_string_lossy()).is_some() || crate::hub::download::is_repo_id(&dir.to_string_lossy()),
            "--pretrained_model_name_or_path {}: no such file or folder (nor a Hub repo id `namespace/name`)",
            dir.display()
        );
        return Ok(());
    }
    let read = |rel: &str| -> Result<serde_json::Value> {
        let path = dir.join(rel);
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read (not a diffusers Stable Diffusion folder?)", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))
    };
    if dir.join("transformer").is_dir() && !dir.join("unet").is_dir() {
        bail!("{}: a transformer-based pipeline (SD3, Flux): dreambridge trains Stable Diffusion 1.x/2.x UNets", dir.display());
    }
    let unet = read("unet/config.json")?;
    if unet.get("addition_embed_type").and_then(|v| v.as_str()).is_some() {
        bail!("{}: an SDXL UNet (addition_embed_type {}): dreambridge trains Stable Diffusion 1.x/2.x for now", dir.join("unet/config.json").display(), unet["addition_embed_type"]);
    }
    serde_json::from_value::<crate::models::unet::UNetConfig>(unet).with_context(|| format!("{}: not a UNet2DConditionModel config", dir.join("unet/config.json").display()))?;
    let text: crate::models::clip::ClipTextConfig =
        serde_json::from_value(read("text_encoder/config.json")?).with_context(|| format!("{}: not a CLIP text config", dir.join("text_encoder/config.json").display()))?;
    if let Some(n) = a.tokenizer_max_length {
        ensure!(n <= text.max_position_embeddings, "--tokenizer_max_length {n} exceeds the text encoder's {} positions", text.max_position_embeddings);
    }
    use crate::diffusers::layout::{find_variant_weights, find_weights, Component};
    for component in [Component::Unet, Component::TextEncoder, Component::Vae] {
        match a.variant.as_deref() {
            Some(v) => find_variant_weights(dir, component, v).map(drop),
            None => find_weights(dir, component).map(drop),
        }
        .with_context(|| format!("--pretrained_model_name_or_path {}", dir.display()))?;
    }
    Ok(())
}

/// `path` can be created or written to: the nearest folder that exists on its way is writable.
fn writable(path: &Path) -> Result<()> {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let existing = absolute.ancestors().find(|p| p.exists()).context("no folder on the way exists")?;
    ensure!(existing.is_dir(), "{}: not a folder", existing.display());
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(existing.as_os_str().as_bytes())?;
        // SAFETY: a valid NUL-terminated path; access(2) only reads it.
        if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
            bail!("{}: not writable ({})", existing.display(), std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path) -> TrainArgs {
        let images = dir.join("images");
        std::fs::create_dir_all(&images).unwrap();
        image::RgbImage::new(8, 8).save(images.join("a.png")).unwrap();
        TrainArgs { pretrained_model: dir.join("no-such-base"), instance_data_dir: images, output_dir: dir.join("out"), device: "cpu".into(), ..Default::default() }
    }

    #[test]
    fn bad_command_lines_fail_before_any_model_and_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let base = args(dir.path());
        let fails = |a: TrainArgs, says: &str| {
            let err = match check(&a) {
                Ok(_) => panic!("accepted; expected an error saying {says}"),
                Err(e) => format!("{e:#}"),
            };
            assert!(err.contains(says), "`{err}` does not say `{says}`");
        };
        fails(TrainArgs { mixed_precision: "bf16".into(), ..base.clone() }, "bf16 needs a CUDA build");
        fails(TrainArgs { resolution: 500, ..base.clone() }, "multiple of 8");
        fails(TrainArgs { lr_scheduler: "cosine_forever".into(), ..base.clone() }, "cosine_forever");
        fails(TrainArgs { instance_data_dir: dir.path().join("nothing"), ..base.clone() }, "--instance_data_dir");
        fails(TrainArgs { with_prior_preservation: true, ..base.clone() }, "--class-data-dir");
        let class = TrainArgs { with_prior_preservation: true, class_data_dir: Some(dir.path().join("class")), class_prompt: Some("a dog".into()), ..base.clone() };
        fails(TrainArgs { prior_generation_precision: Some("bf16".into()), ..class.clone() }, "--prior_generation_precision bf16");
        fails(TrainArgs { resume_from_checkpoint: Some("checkpoint-3".into()), ..base.clone() }, "no such checkpoint");
        fails(base.clone(), "no-such-base");
        assert!(!dir.path().join("out").exists() && !dir.path().join("class").exists());

        // A fresh run with `latest`: nothing to resume, and no error.
        let fresh = TrainArgs { pretrained_model: "owner/model".into(), resume_from_checkpoint: Some("latest".into()), ..class };
        assert!(check(&fresh).unwrap().resume.is_none());
    }

    #[test]
    fn bases_that_do_not_train_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let sdxl = dir.path().join("sdxl");
        std::fs::create_dir_all(sdxl.join("unet")).unwrap();
        std::fs::write(sdxl.join("unet/config.json"), r#"{"addition_embed_type": "text_time", "cross_attention_dim": 2048}"#).unwrap();
        let err = format!("{:#}", check(&TrainArgs { pretrained_model: sdxl, ..args(dir.path()) }).unwrap_err());
        assert!(err.contains("SDXL") && err.contains("unet/config.json"), "{err}");
        let sd3 = dir.path().join("sd3");
        std::fs::create_dir_all(sd3.join("transformer")).unwrap();
        let err = format!("{:#}", check(&TrainArgs { pretrained_model: sd3, ..args(dir.path()) }).unwrap_err());
        assert!(err.contains("transformer-based"), "{err}");
    }
}
