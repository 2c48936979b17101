//! `dreambridge train`: DreamBooth fine-tuning of the UNet, with diffusers' train_dreambooth.py
//! flags. The VAE and text encoder are frozen, so latent distributions and prompt embeddings are
//! computed once (image augmentation is drawn once per image, at caching time).
//!
//! Every draw made before training has its own seeded stream per image (class image `i`, the
//! augmentation of the `k`-th file in sorted order), so a run that generated its class images and
//! a resumed run that found them on disk cache the same examples and train the same trajectory.

use super::data::{image_files, load_image, Crop};
use super::interrupt::StopRequest;
use crate::models::lora::{LoraConfig, Targets};
use super::loss::LossConfig;
use super::optim::AdamWParams;
use crate::rng::TrainRng;
use crate::pipeline::schedule::NoiseSchedule;
use super::trainer::{Example, TrainConfig, Trainer};
use crate::diffusers::layout::Component;
use crate::diffusers::st_write::{PendingTensor, StWriter};
use crate::generate::text_to_image::{generate, generate_with, save_png};
use crate::pipeline::Pipeline;
use crate::hub::model_card::{model_card, CardInfo};
use crate::tensor::{DType as RawDType, RawTensor};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct TrainArgs {
    pub pretrained_model: PathBuf,
    pub instance_data_dir: PathBuf,
    pub instance_prompt: String,
    pub class_data_dir: Option<PathBuf>,
    pub class_prompt: Option<String>,
    pub with_prior_preservation: bool,
    pub prior_loss_weight: f64,
    pub num_class_images: usize,
    pub resolution: usize,
    pub center_crop: bool,
    pub random_flip: bool,
    pub train_batch_size: usize,
    pub max_train_steps: usize,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub lr_scheduler: String,
    pub lr_warmup_steps: usize,
    pub max_grad_norm: f64,
    pub adam_weight_decay: f64,
    pub snr_gamma: Option<f64>,
    pub noise_offset: f64,
    pub seed: u64,
    pub checkpointing_steps: usize,
    pub checkpoints_total_limit: Option<usize>,
    pub resume_from_checkpoint: Option<String>,
    pub validation_prompt: Option<String>,
    pub validation_steps: usize,
    pub num_validation_images: usize,
    /// DDIM steps for class and validation images.
    pub sample_steps: usize,
    pub output_dir: PathBuf,
    pub force: bool,
    /// Fine-tune the text encoder as well (prompt embeddings recomputed every step).
    pub train_text_encoder: bool,
    /// `no`, `fp16` or `bf16` (bf16 needs CUDA): UNet compute dtype; master weights stay f32.
    pub mixed_precision: String,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// TF32 tensor cores for f32 GEMMs (CUDA).
    pub allow_tf32: bool,
    /// Recompute UNet blocks in backward instead of storing their activations.
    pub gradient_checkpointing: bool,
    /// Set by SIGINT/SIGTERM (see [`StopRequest::on_signals`]): stop after the current step.
    pub stop: StopRequest,
    /// Train LoRA adapters instead of the whole UNet (and text encoder).
    pub lora: Option<LoraArgs>,
    /// Also write the trained model as one file for AUTOMATIC1111 / ComfyUI: the whole model in
    /// the original single-file layout, or (LoRA runs) the kohya LoRA file.
    pub save_single_file: bool,
    /// Score every validation round (DINO, CLIP-I against the instance images; CLIP-T against the
    /// validation prompt without the identifier) with these models.
    pub validation_eval: Option<ValidationEval>,
    /// The sampler of the validation images.
    pub validation_scheduler: crate::generate::scheduler::SchedulerKind,
}

/// The metric models of `--validation-eval` (folders or Hub repo ids).
#[derive(Clone, Debug)]
pub struct ValidationEval {
    pub clip_model: PathBuf,
    pub dino_model: PathBuf,
}

/// `--lora-*`: LoRA DreamBooth as diffusers' `train_dreambooth_lora.py` (rank 4, alpha = rank).
#[derive(Clone, Debug)]
pub struct LoraArgs {
    pub rank: usize,
    /// `None`: the rank (scale 1, diffusers' convention).
    pub alpha: Option<f64>,
    pub dropout: f64,
    pub targets: Targets,
    pub format: LoraFormat,
}

impl LoraArgs {
    pub fn config(&self, seed: u64) -> LoraConfig {
        LoraConfig { rank: self.rank, alpha: self.alpha.unwrap_or(self.rank as f64), targets: self.targets, dropout: self.dropout, seed }
    }
}

/// Which LoRA files the run writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraFormat {
    /// `pytorch_lora_weights.safetensors`, for diffusers' `load_lora_weights`.
    Diffusers,
    /// `<output folder name>.safetensors` in kohya's format, for AUTOMATIC1111 and ComfyUI.
    Kohya,
    Both,
}

impl std::str::FromStr for LoraFormat {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<LoraFormat> {
        Ok(match s {
            "diffusers" => LoraFormat::Diffusers,
            "kohya" => LoraFormat::Kohya,
            "both" => LoraFormat::Both,
            other => bail!("--lora-format `{other}`: expected diffusers, kohya or both"),
        })
    }
}

pub struct Trained {
    pub output_dir: PathBuf,
    pub losses: Vec<f32>,
    /// The LoRA files written (LoRA runs).
    pub lora_files: Vec<PathBuf>,
    /// The whole model as one file (`--save-single-file`, full fine-tuning).
    pub single_file: Option<PathBuf>,
}

/// `<output>/<output folder name>.safetensors`: the trained pipeline in the original layout.
fn write_single_file(a: &TrainArgs) -> Result<PathBuf> {
    let name = a.output_dir.file_name().map_or("model".into(), |n| n.to_string_lossy().to_string());
    let out = a.output_dir.join(format!("{name}.safetensors"));
    let opts = crate::single_file::convert::ExportOptions { out: out.clone(), half: false, force: true };
    crate::single_file::convert::diffusers_to_single_file(&a.output_dir, &opts).context("--save-single-file")?;
    Ok(out)
}

pub fn train(a: &TrainArgs) -> Result<Trained> {
    let dev = crate::device::parse(&a.device)?;
    crate::device::allow_tf32(a.allow_tf32);
    eprintln!("training on {}", crate::device::describe(&dev));
    ensure!(a.resolution % 8 == 0, "--resolution must be a multiple of 8");
    let done = a.output_dir.join("model_index.json").exists() || a.output_dir.join(crate::lora::DIFFUSERS_FILE_NAME).exists();
    if done && !a.force && a.resume_from_checkpoint.is_none() {
        bail!("{}: already holds a trained model (use --force to replace it)", a.output_dir.display());
    }
    let base = crate::single_file::base::resolve_base(&a.pretrained_model)?;
    let mut pipe = Pipeline::load(&base, &dev).with_context(|| format!("loading {}", base.display()))?;

    let class_dir = if a.with_prior_preservation {
        let dir = a.class_data_dir.clone().context("--with-prior-preservation needs --class-data-dir")?;
        let prompt = a.class_prompt.clone().context("--with-prior-preservation needs --class-prompt")?;
        generate_class_images(&pipe, &dir, &prompt, a)?;
        Some((dir, prompt))
    } else {
        None
    };
    a.stop.check(0)?;
    eprintln!("caching latents and prompt embeddings");
    let instances = encode_images(&pipe, &a.instance_data_dir, &a.instance_prompt, a, "instance", None)?;
    let classes = match &class_dir {
        Some((dir, prompt)) => encode_images(&pipe, dir, prompt, a, "class", Some(a.num_class_images))?,
        None => Vec::new(),
    };
    a.stop.check(0)?;
    if let Some(lora) = &a.lora {
        // After the class images and the cache, which come from the base alone. The frozen base is
        // held in the compute dtype; the adapters stay f32.
        pipe.attach_lora(&lora.config(a.seed), a.train_text_encoder, compute_dtype(&a.mixed_precision, &dev)?)?;
        let count = |vars: &candle_nn::VarMap| vars.all_vars().iter().map(|v| v.elem_count()).sum::<usize>();
        let text = if a.train_text_encoder { format!(" + {} in the text encoder", count(&pipe.text_vars)) } else { String::new() };
        eprintln!("LoRA rank {} ({}): {} adapter parameters in the UNet{text}", lora.rank, lora.targets.name(), count(&pipe.unet_vars));
    }

    let schedule = NoiseSchedule::new(&pipe.scheduler.schedule)?;
    let config = TrainConfig {
        max_train_steps: a.max_train_steps,
        train_batch_size: a.train_batch_size,
        gradient_accumulation_steps: a.gradient_accumulation_steps.max(1),
        learning_rate: a.learning_rate,
        lr_scheduler: a.lr_scheduler.parse()?,
        lr_warmup_steps: a.lr_warmup_steps,
        max_grad_norm: a.max_grad_norm,
        adam: AdamWParams { lr: a.learning_rate, weight_decay: a.adam_weight_decay, ..Default::default() },
        loss: LossConfig { with_prior_preservation: a.with_prior_preservation, prior_loss_weight: a.prior_loss_weight, snr_gamma: a.snr_gamma },
        noise_offset: a.noise_offset,
        checkpointing_steps: Some(a.checkpointing_steps.max(1)),
        checkpoints_total_limit: a.checkpoints_total_limit,
        checkpoint_dir: a.output_dir.clone(),
        seed: a.seed,
        compute_dtype: compute_dtype(&a.mixed_precision, &dev)?,
    };
    if a.gradient_checkpointing {
        pipe.unet.enable_gradient_checkpointing(&pipe.unet_vars.all_vars());
    }
    let mut trainer = Trainer::new(&pipe.unet, &pipe.unet_vars, &schedule, config)?;
    if a.train_text_encoder {
        trainer = trainer.with_text_encoder(&pipe.text, &pipe.text_vars)?;
    }
    trainer.stop = a.stop.clone();
    trainer.adapters = pipe.lora.iter().flat_map(|l| l.plans().cloned()).collect();
    if let Some(spec) = &a.resume_from_checkpoint {
        trainer.resume(spec)?;
        eprintln!("resumed at step {}", trainer.step);
    }
    let mut log = super::metrics_log::MetricsLog::open(&a.output_dir, trainer.step)?;
    let scorers = match &a.validation_eval {
        Some(v) => {
            anyhow::ensure!(a.validation_prompt.is_some(), "--validation-eval needs --validation-prompt");
            let clip = crate::eval::clip::Clip::load(&crate::hub::download::local_or_hub(&v.clip_model)?, &dev)?;
            let dino = crate::eval::dino::Dino::load(&crate::hub::download::local_or_hub(&v.dino_model)?, &dev)?;
            Some((clip, dino, crate::eval::preprocess::image_files(&a.instance_data_dir)?))
        }
        None => None,
    };
    let mut log_error = None;
    let bar = ProgressBar::new(a.max_train_steps as u64);
    bar.set_style(ProgressStyle::with_template("steps {pos}/{len} [{bar:30}] {per_sec} {msg}").expect("template").progress_chars("=> "));
    bar.set_position(trainer.step as u64);
    // Without a terminal (logs, schedulers) the bar draws nothing: one plain line per step instead.
    let plain = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut validation_error = None;
    let losses = trainer.run(&instances, &classes, None, |step, loss, lr| {
        bar.set_position(step as u64);
        bar.set_message(format!("loss {loss:.4} lr {lr:.2e}"));
        if plain {
            eprintln!("step {step}/{} loss {loss:.4} lr {lr:.2e}", a.max_train_steps);
        }
        if let Err(e) = log.step(step, loss, lr) {
            log_error.get_or_insert(e);
        }
        if let Some(prompt) = &a.validation_prompt {
            if step % a.validation_steps.max(1) == 0 && validation_error.is_none() {
                match validate(&pipe, prompt, a, step) {
                    Err(e) => validation_error = Some(e),
                    Ok(images) => {
                        if let Some((clip, dino, instance_files)) = &scorers {
                            let clip_t = super::metrics_log::without_identifier(prompt, &a.instance_prompt, a.class_prompt.as_deref());
                            let prompts = Some([("*".to_string(), clip_t.clone())].into_iter().collect());
                            let inputs = crate::eval::score::EvalInputs { generated: &images, real: instance_files, prompts, strict: true, batch: 8 };
                            let scored = crate::eval::score::evaluate(&inputs, clip, dino, &pipe.device).and_then(|r| log.scores(step, &r["metrics"], &clip_t));
                            if let Err(e) = scored {
                                validation_error = Some(e.context("--validation-eval"));
                            }
                        }
                    }
                }
            }
        }
    })?;
    bar.finish();
    if let Some(e) = log_error {
        return Err(e);
    }
    log.plot()?;
    if let Some(e) = validation_error {
        return Err(e.context("validation images"));
    }
    let (lora_files, single_file) = match &a.lora {
        Some(lora) => {
            let mut lora = lora.clone();
            if a.save_single_file && lora.format == LoraFormat::Diffusers {
                lora.format = LoraFormat::Both;
            }
            (write_lora(&pipe, &lora, a)?, None)
        }
        None => {
            write_pipeline(&pipe, &base, a)?;
            let single = a.save_single_file.then(|| write_single_file(a)).transpose()?;
            (Vec::new(), single)
        }
    };
    Ok(Trained { output_dir: a.output_dir.clone(), losses, lora_files, single_file })
}

/// `--mixed-precision` (no, fp16, bf16) as the UNet compute dtype on `dev`.
pub fn compute_dtype(mixed: &str, dev: &Device) -> Result<candle_core::DType> {
    Ok(match mixed {
        "no" | "fp32" => candle_core::DType::F32,
        "fp16" => candle_core::DType::F16,
        "bf16" if dev.is_cpu() => bail!("--mixed-precision bf16 needs a CUDA build (the CPU backend has no bf16 matmul); use no or fp16"),
        "bf16" => candle_core::DType::BF16,
        other => bail!("--mixed-precision `{other}`: expected no, fp16 or bf16"),
    })
}

/// Tops the class folder up to `num_class_images` with images the base model makes from the
/// class prompt (saved for reuse, never replacing the user's images). Image `i` comes from its
/// own stream, so an interrupted top-up continues with the images it would have made.
fn generate_class_images(pipe: &Pipeline, dir: &Path, prompt: &str, a: &TrainArgs) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let have = image_files(dir).map(|f| f.len()).unwrap_or(0);
    if have >= a.num_class_images {
        return Ok(());
    }
    let bar = ProgressBar::new((a.num_class_images - have) as u64).with_message("class images");
    for i in have..a.num_class_images {
        let mut path = dir.join(format!("class_{i}.png"));
        let mut n = i;
        while path.exists() {
            n += 1;
            path = dir.join(format!("class_{n}.png"));
        }
        let mut rng = TrainRng::stream(a.seed, "class image", i as u64);
        save_png(&generate(pipe, prompt, "", a.resolution, a.sample_steps, 7.5, &mut rng)?, &path)?;
        bar.inc(1);
        a.stop.check(0)?;
    }
    bar.finish_and_clear();
    Ok(())
}

/// Latent distributions (× the VAE scaling factor) and the prompt embedding of every image; the
/// `k`-th file's crop and flip come from stream `k` of `set` ("instance" or "class").
fn encode_images(pipe: &Pipeline, dir: &Path, prompt: &str, a: &TrainArgs, set: &str, limit: Option<usize>) -> Result<Vec<Example>> {
    let context = pipe.embed(prompt)?.squeeze(0)?;
    let ids = Tensor::new(pipe.tokenizer.ids(prompt).as_slice(), &pipe.device)?;
    let sf = pipe.vae.config.scaling_factor;
    let mut out = Vec::new();
    for (k, path) in image_files(dir)?.into_iter().take(limit.unwrap_or(usize::MAX)).enumerate() {
        let mut rng = TrainRng::stream(a.seed, &format!("{set} augmentation"), k as u64);
        let crop = if a.center_crop { Crop::Center } else { Crop::At(rng.uniform(), rng.uniform()) };
        let flip = a.random_flip && rng.uniform() < 0.5;
        let image = load_image(&path, a.resolution, crop, flip, &pipe.device)?.unsqueeze(0)?;
        let (mean, logvar) = pipe.inference.vae.encode(&image)?;
        out.push(Example {
            latent_mean: (mean.squeeze(0)? * sf)?.detach(),
            latent_std: ((logvar.squeeze(0)? * 0.5)?.exp()? * sf)?.detach(),
            context: context.clone(),
            ids: Some(ids.clone()),
        });
    }
    Ok(out)
}

/// The validation images of a round (`validation/step_<step>_<i>.png`), their paths returned.
fn validate(pipe: &Pipeline, prompt: &str, a: &TrainArgs, step: usize) -> Result<Vec<PathBuf>> {
    let dir = a.output_dir.join("validation");
    std::fs::create_dir_all(&dir)?;
    let mut rng = TrainRng::new(a.seed);
    let mut paths = Vec::new();
    for i in 0..a.num_validation_images {
        let path = dir.join(format!("step_{step}_{i}.png"));
        save_png(&generate_with(pipe, prompt, "", a.resolution, a.sample_steps, 7.5, a.validation_scheduler, &mut rng)?, &path)?;
        paths.push(path);
    }
    Ok(paths)
}

/// The trained pipeline: the base folder's other parts, the trained UNet, a model card. Built in a
/// staging folder, then moved into the output folder entry by entry. On failure the staging
/// folder goes, the error names the file by its destination, and the checkpoints stay.
fn write_pipeline(pipe: &Pipeline, base: &Path, a: &TrainArgs) -> Result<()> {
    let staging = a.output_dir.join(".pipeline-tmp");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).with_context(|| format!("{}: cannot remove", staging.display()))?;
    }
    let built = build_pipeline(pipe, base, a, &staging);
    if let Err(e) = built {
        let _ = std::fs::remove_dir_all(&staging);
        bail!(
            "{}; the trained pipeline was not written to {} (its checkpoints are kept)",
            crate::output::named_by_destination(&e, &staging, &a.output_dir),
            a.output_dir.display()
        );
    }
    for entry in std::fs::read_dir(&staging)? {
        let entry = entry?;
        let dest = a.output_dir.join(entry.file_name());
        if dest.is_dir() {
            std::fs::remove_dir_all(&dest)?;
        } else if dest.exists() {
            std::fs::remove_file(&dest)?;
        }
        std::fs::rename(entry.path(), &dest).with_context(|| format!("{}: cannot rename into place", dest.display()))?;
    }
    std::fs::remove_dir_all(&staging)?;
    crate::output::sync_dir(&a.output_dir);
    Ok(())
}

fn build_pipeline(pipe: &Pipeline, base: &Path, a: &TrainArgs, staging: &Path) -> Result<()> {
    let trained_text = a.train_text_encoder;
    crate::output::copy_tree(base, staging, &|rel| {
        let weights = rel.ends_with(".safetensors") || rel.ends_with(".bin");
        (weights && (rel.starts_with("unet/") || (trained_text && rel.starts_with("text_encoder/")))) || rel.starts_with('.') || rel == "README.md"
    })?;
    write_vars(&pipe.unet_vars, &staging.join("unet").join(Component::Unet.weights_name(false)))?;
    if trained_text {
        write_vars(&pipe.text_vars, &staging.join("text_encoder").join(Component::TextEncoder.weights_name(false)))?;
    }
    let card_path = staging.join("README.md");
    std::fs::write(&card_path, model_card(&card_info(a), &[])).with_context(|| format!("{}: cannot write", card_path.display()))
}

/// The model card of the run's output (a LoRA card for LoRA runs).
fn card_info(a: &TrainArgs) -> CardInfo {
    CardInfo {
        repo_id: a.output_dir.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default(),
        base_model: Some(a.pretrained_model.display().to_string()),
        instance_prompt: Some(a.instance_prompt.clone()),
        license: None,
        lora: a.lora.is_some(),
        ..Default::default()
    }
}

/// The trained adapters as LoRA files in the output folder (diffusers' and/or kohya's format) and
/// a LoRA model card as diffusers' LoRA script writes it.
fn write_lora(pipe: &Pipeline, lora: &LoraArgs, a: &TrainArgs) -> Result<Vec<PathBuf>> {
    let set = pipe.lora_set()?;
    std::fs::create_dir_all(&a.output_dir).with_context(|| format!("{}: cannot create", a.output_dir.display()))?;
    let mut files = Vec::new();
    if lora.format != LoraFormat::Kohya {
        let path = a.output_dir.join(crate::lora::DIFFUSERS_FILE_NAME);
        crate::lora::write::write_diffusers(&set, &path)?;
        files.push(path);
    }
    if lora.format != LoraFormat::Diffusers {
        let name = a.output_dir.file_name().map_or("lora".into(), |n| n.to_string_lossy().to_string());
        let info = crate::lora::write::KohyaInfo {
            output_name: name.clone(),
            base_model: Some(a.pretrained_model.display().to_string()),
            sd_version: if pipe.unet_config.cross_attention_dim >= 1024 { 2 } else { 1 },
            v_prediction: pipe.scheduler.schedule.prediction_type == "v_prediction",
            resolution: Some(a.resolution),
            learning_rate: Some(a.learning_rate),
            steps: Some(a.max_train_steps),
        };
        let path = a.output_dir.join(format!("{name}.safetensors"));
        crate::lora::write::write_kohya(&set, &path, &info)?;
        files.push(path);
    }
    crate::output::atomic_file(&a.output_dir.join("README.md"), |temp| Ok(std::fs::write(temp, model_card(&card_info(a), &[]))?))?;
    Ok(files)
}

/// Writes a VarMap's tensors (f32, keys = diffusers/transformers names) as a safetensors file,
/// refusing any tensor that holds a NaN or an infinity.
fn write_vars(vars: &candle_nn::VarMap, path: &Path) -> Result<()> {
    let vars = vars.data().lock().unwrap();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let pending: Vec<PendingTensor> = names.iter().map(|n| PendingTensor { key: n.to_string(), dtype: RawDType::F32, shape: vars[*n].dims().to_vec() }).collect();
    let mut w = StWriter::create(path, pending)?;
    for n in &names {
        let t: Tensor = vars[*n].as_tensor().to_dtype(candle_core::DType::F32)?;
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        ensure!(values.iter().all(|v| v.is_finite()), "{}: tensor `{n}` holds NaN or infinite values; not written", path.display());
        w.write_next(n, &RawTensor::from_f32(t.dims(), &values))?;
    }
    w.finish()
}
