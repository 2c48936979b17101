//! `dreambridge train`: DreamBooth fine-tuning of the UNet, with diffusers' train_dreambooth.py
//! flags. The VAE and text encoder are frozen, so latent distributions and prompt embeddings are
//! computed once (image augmentation is drawn once per image, at caching time).
//!
//! Every draw made before training has its own seeded stream per image (class image `i`, the
//! augmentation of the `k`-th file in sorted order), so a run that generated its class images and
//! a resumed run that found them on disk cache the same examples and train the same trajectory.

use super::data::{image_files, Crop};
use super::interrupt::StopRequest;
use crate::models::lora::{LoraConfig, Targets};
use super::loss::LossConfig;
use super::optim::AdamWParams;
use crate::rng::TrainRng;
use crate::pipeline::schedule::NoiseSchedule;
use super::trainer::{Example, TrainConfig, Trainer};
use crate::diffusers::layout::Component;
use crate::diffusers::st_write::{PendingTensor, StWriter};
use crate::generate::scheduler::SchedulerKind;
use crate::generate::text_to_image::{generate_batch, save_png};
use crate::pipeline::{Pipeline, PromptEmbeds};
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
    /// Optimiser steps; `None`: `num_train_epochs` passes over the data (diffusers' rule).
    pub max_train_steps: Option<usize>,
    /// Epochs when `max_train_steps` is not given; an epoch is ceil(ceil(examples / batch) /
    /// accumulation) steps, examples being max(instance images, class images).
    pub num_train_epochs: usize,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub lr_scheduler: String,
    pub lr_warmup_steps: usize,
    pub max_grad_norm: f64,
    pub adam_weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// AdamW with 8-bit block-wise moments (bitsandbytes' AdamW8bit).
    pub use_8bit_adam: bool,
    /// Cosine waves of `cosine_with_restarts`.
    pub lr_num_cycles: f64,
    /// Exponent of the `polynomial` schedule.
    pub lr_power: f64,
    pub snr_gamma: Option<f64>,
    pub noise_offset: f64,
    pub seed: u64,
    pub checkpointing_steps: usize,
    pub checkpoints_total_limit: Option<usize>,
    pub resume_from_checkpoint: Option<String>,
    pub validation_prompt: Option<String>,
    pub validation_steps: usize,
    /// Validate after every n-th epoch instead (diffusers' LoRA script; the first epoch included).
    pub validation_epochs: Option<usize>,
    pub num_validation_images: usize,
    /// DDIM steps for class images (validation images take 25, as diffusers).
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
    /// Branch, tag or commit of a Hub base model.
    pub revision: Option<String>,
    /// Weights variant of the base (`fp16`: `*.fp16.safetensors`), held in f32 for training.
    pub variant: Option<String>,
    /// A tokenizer folder or Hub repo to use instead of the base's `tokenizer/`.
    pub tokenizer_name: Option<PathBuf>,
    /// Token length of the training prompts (default: the tokenizer's `model_max_length`).
    pub tokenizer_max_length: Option<usize>,
    /// Give the text encoder the tokenizer's attention mask for training prompts.
    pub text_encoder_use_attention_mask: bool,
    /// Class images generated per batch.
    pub sample_batch_size: usize,
    /// Precision of class-image generation: fp32, fp16 or bf16 (`None`: fp16 on a GPU, else fp32).
    pub prior_generation_precision: Option<String>,
    /// Encode every prompt up front, then free the text encoder's weights.
    pub pre_compute_text_embeddings: bool,
    /// Leave the text encoder out of the saved pipeline (model_index.json marks it absent).
    pub skip_save_text_encoder: bool,
    /// Threads decoding and resizing training images (0: the main thread).
    pub dataloader_num_workers: usize,
    /// TensorBoard event files of the run (`None`: no event files).
    pub tensorboard: Option<PathBuf>,
    /// The resampling filter of training images.
    pub interpolation: super::data::Interpolation,
    /// This process's place in a data-parallel run (a single process by default): ranks share
    /// the global batch, and rank 0 alone writes.
    pub dist: crate::scale::dist::DistConfig,
}

impl Default for TrainArgs {
    /// diffusers' train_dreambooth.py defaults (seed 0 instead of none: runs repeat exactly).
    fn default() -> Self {
        TrainArgs {
            pretrained_model: PathBuf::new(),
            instance_data_dir: PathBuf::new(),
            instance_prompt: String::new(),
            class_data_dir: None,
            class_prompt: None,
            with_prior_preservation: false,
            prior_loss_weight: 1.0,
            num_class_images: 100,
            resolution: 512,
            center_crop: false,
            random_flip: false,
            train_batch_size: 4,
            max_train_steps: None,
            num_train_epochs: 1,
            gradient_accumulation_steps: 1,
            learning_rate: 5e-6,
            lr_scheduler: "constant".into(),
            lr_warmup_steps: 500,
            max_grad_norm: 1.0,
            adam_weight_decay: 1e-2,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            use_8bit_adam: false,
            lr_num_cycles: 1.0,
            lr_power: 1.0,
            snr_gamma: None,
            noise_offset: 0.0,
            seed: 0,
            checkpointing_steps: 500,
            checkpoints_total_limit: None,
            resume_from_checkpoint: None,
            validation_prompt: None,
            validation_steps: 100,
            validation_epochs: None,
            num_validation_images: 4,
            sample_steps: 50,
            output_dir: PathBuf::from("dreambooth-model"),
            force: false,
            train_text_encoder: false,
            mixed_precision: "no".into(),
            device: "auto".into(),
            allow_tf32: false,
            gradient_checkpointing: false,
            stop: StopRequest::default(),
            lora: None,
            save_single_file: false,
            validation_eval: None,
            validation_scheduler: crate::generate::scheduler::SchedulerKind::DpmSolverMultistep,
            revision: None,
            variant: None,
            tokenizer_name: None,
            tokenizer_max_length: None,
            text_encoder_use_attention_mask: false,
            sample_batch_size: 4,
            prior_generation_precision: None,
            pre_compute_text_embeddings: false,
            skip_save_text_encoder: false,
            dataloader_num_workers: 0,
            tensorboard: None,
            interpolation: super::data::Interpolation::Bilinear,
            dist: Default::default(),
        }
    }
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
    /// Whether this process wrote the output (rank 0 of a data-parallel run, or a single process).
    pub wrote: bool,
}

/// `<output>/<output folder name>.safetensors`: the trained pipeline in the original layout.
fn write_single_file(a: &TrainArgs) -> Result<PathBuf> {
    let name = a.output_dir.file_name().map_or("model".into(), |n| n.to_string_lossy().to_string());
    let out = a.output_dir.join(format!("{name}.safetensors"));
    let opts = crate::single_file::convert::ExportOptions { out: out.clone(), half: false, force: true };
    crate::single_file::convert::diffusers_to_single_file(&a.output_dir, &opts).context("--save-single-file")?;
    Ok(out)
}

/// Optimiser steps per epoch, diffusers' way: ceil(ceil(examples / batch) / accumulation), the
/// dataset holding max(instance images, class images) examples with prior preservation.
pub fn steps_per_epoch(instances: usize, classes: usize, batch: usize, accumulation: usize) -> usize {
    instances.max(classes).div_ceil(batch.max(1)).div_ceil(accumulation.max(1)).max(1)
}

/// Checks the command line (see [`super::preflight`]), then trains.
pub fn train(a: &TrainArgs) -> Result<Trained> {
    let ready = super::preflight::check(a)?;
    train_checked(a, ready)
}

/// Trains, `a` having passed [`super::preflight::check`], which gave `ready`.
pub fn train_checked(a: &TrainArgs, ready: super::preflight::Ready) -> Result<Trained> {
    let dev = ready.device;
    crate::device::allow_tf32(a.allow_tf32);
    let collective = a.dist.connect(&dev)?;
    // Rank 0 alone writes (class images, logs, validation images, checkpoints, the model).
    let main = collective.rank() == 0;
    match collective.world() {
        1 => eprintln!("training on {}", crate::device::describe(&dev)),
        w => eprintln!("rank {} of {w}: training on {}", collective.rank(), crate::device::describe(&dev)),
    }
    let base = crate::single_file::base::resolve_base_at(&a.pretrained_model, a.revision.as_deref())?;
    let mut pipe = Pipeline::load_variant(&base, &dev, a.variant.as_deref()).with_context(|| format!("loading {}", base.display()))?;
    if let Some(name) = &a.tokenizer_name {
        let dir = crate::hub::download::local_or_hub_at(name, a.revision.as_deref())?;
        let nested = dir.join("tokenizer");
        let dir = if nested.join("vocab.json").is_file() || nested.join("tokenizer.json").is_file() { nested } else { dir };
        pipe.tokenizer = crate::pipeline::prompt::PromptTokenizer::load(&dir).with_context(|| format!("--tokenizer_name {}", name.display()))?;
    }
    let prompt_tokens = PromptTokens { max_length: a.tokenizer_max_length.unwrap_or(pipe.tokenizer.max_length), use_mask: a.text_encoder_use_attention_mask };
    ensure!(prompt_tokens.max_length >= 2, "--tokenizer_max_length must be at least 2 (start and end tokens)");
    ensure!(
        prompt_tokens.max_length <= pipe.text_config.max_position_embeddings,
        "--tokenizer_max_length {} exceeds the text encoder's {} positions",
        prompt_tokens.max_length,
        pipe.text_config.max_position_embeddings
    );

    let class_dir = if a.with_prior_preservation {
        let dir = a.class_data_dir.clone().context("--with-prior-preservation needs --class-data-dir")?;
        let prompt = a.class_prompt.clone().context("--with-prior-preservation needs --class-prompt")?;
        if main {
            generate_class_images(&mut pipe, &dir, &prompt, a)?;
        }
        // The other ranks read them once rank 0 has made them.
        collective.barrier().context("waiting for rank 0's class images")?;
        Some((dir, prompt))
    } else {
        None
    };
    a.stop.check(0)?;
    eprintln!("caching latents and prompt embeddings");
    let instances = encode_images(&pipe, &a.instance_data_dir, &a.instance_prompt, a, "instance", None, &prompt_tokens)?;
    let classes = match &class_dir {
        Some((dir, prompt)) => encode_images(&pipe, dir, prompt, a, "class", Some(a.num_class_images), &prompt_tokens)?,
        None => Vec::new(),
    };
    // The validation prompt's embeddings, when the text encoder stays as it is.
    let validation_embeds = match (&a.validation_prompt, a.train_text_encoder) {
        (Some(p), false) => Some((pipe.encode(p)?, pipe.encode_negative("")?)),
        _ => None,
    };
    if a.pre_compute_text_embeddings {
        pipe.release_text_encoder()?;
        eprintln!("prompt embeddings computed; the text encoder's weights are freed");
    }
    a.stop.check(0)?;
    if let Some(lora) = &a.lora {
        // After the class images and the cache, which come from the base alone. The frozen base is
        // held in the compute dtype; the adapters stay f32.
        pipe.attach_lora(&lora.config(a.seed), a.train_text_encoder, ready.compute_dtype)?;
        let count = |vars: &candle_nn::VarMap| vars.all_vars().iter().map(|v| v.elem_count()).sum::<usize>();
        let text = if a.train_text_encoder { format!(" + {} in the text encoder", count(&pipe.text_vars)) } else { String::new() };
        eprintln!("LoRA rank {} ({}): {} adapter parameters in the UNet{text}", lora.rank, lora.targets.name(), count(&pipe.unet_vars));
    }

    let per_epoch = steps_per_epoch(instances.len(), classes.len(), a.train_batch_size, a.gradient_accumulation_steps);
    let max_train_steps = a.max_train_steps.unwrap_or(a.num_train_epochs * per_epoch);
    eprintln!(
        "{} examples, {per_epoch} steps per epoch: {max_train_steps} steps ({} epochs)",
        instances.len().max(classes.len()),
        max_train_steps.div_ceil(per_epoch)
    );
    let schedule = NoiseSchedule::new(&pipe.scheduler.schedule)?;
    let config = TrainConfig {
        max_train_steps,
        train_batch_size: a.train_batch_size,
        gradient_accumulation_steps: a.gradient_accumulation_steps.max(1),
        learning_rate: a.learning_rate,
        lr_scheduler: super::optim::LrSchedule::from_args(&a.lr_scheduler, a.lr_num_cycles, a.lr_power, a.learning_rate)?,
        lr_warmup_steps: a.lr_warmup_steps,
        max_grad_norm: a.max_grad_norm,
        adam: AdamWParams { lr: a.learning_rate, weight_decay: a.adam_weight_decay, beta1: a.adam_beta1, beta2: a.adam_beta2, eps: a.adam_epsilon },
        use_8bit_adam: a.use_8bit_adam,
        loss: LossConfig { with_prior_preservation: a.with_prior_preservation, prior_loss_weight: a.prior_loss_weight, snr_gamma: a.snr_gamma },
        noise_offset: a.noise_offset,
        checkpointing_steps: Some(a.checkpointing_steps.max(1)),
        checkpoints_total_limit: a.checkpoints_total_limit,
        checkpoint_dir: a.output_dir.clone(),
        seed: a.seed,
        compute_dtype: ready.compute_dtype,
    };
    if a.gradient_checkpointing {
        pipe.unet.enable_gradient_checkpointing(&pipe.unet_vars.all_vars());
    }
    let mut trainer = Trainer::new(&pipe.unet, &pipe.unet_vars, &schedule, config)?;
    if a.train_text_encoder {
        trainer = trainer.with_text_encoder(&pipe.text, &pipe.text_vars)?;
    }
    eprintln!("optimizer: {} ({:.1} MiB of state)", trainer.optimizer.name(), trainer.optimizer.state_bytes() as f64 / (1u64 << 20) as f64);
    trainer.stop = a.stop.clone();
    trainer.collective = collective.clone();
    trainer.adapters = pipe.lora.iter().flat_map(|l| l.plans().cloned()).collect();
    match (&a.resume_from_checkpoint, &ready.resume) {
        (_, Some(path)) => {
            // diffusers' words (the folder's name), then the step reached.
            eprintln!("Resuming from checkpoint {}", path.file_name().unwrap_or_default().to_string_lossy());
            trainer.resume(&path.to_string_lossy())?;
            eprintln!("resumed at step {}", trainer.step);
        }
        // diffusers' words again: preemptible jobs pass `latest` on every start.
        (Some(spec), None) => eprintln!("Checkpoint '{spec}' does not exist. Starting a new training run."),
        (None, None) => {}
    }
    let mut log = main.then(|| super::metrics_log::MetricsLog::open(&a.output_dir, trainer.step)).transpose()?;
    let mut events = a.tensorboard.as_deref().filter(|_| main).map(super::tensorboard::EventWriter::create).transpose()?;
    let validation_prompt = a.validation_prompt.as_ref().filter(|_| main);
    let scorers = match &a.validation_eval {
        Some(v) if main => {
            let clip = crate::eval::clip::Clip::load(&crate::hub::download::local_or_hub(&v.clip_model)?, &dev)?;
            let dino = crate::eval::dino::Dino::load(&crate::hub::download::local_or_hub(&v.dino_model)?, &dev)?;
            Some((clip, dino, crate::eval::preprocess::image_files(&a.instance_data_dir)?))
        }
        _ => None,
    };
    let validate_now = |step: usize| match a.validation_epochs {
        // diffusers' LoRA script validates at the end of epochs 0, n, 2n, ...
        Some(n) => step % per_epoch == 0 && (step / per_epoch - 1) % n.max(1) == 0,
        None => step % a.validation_steps.max(1) == 0,
    };
    let mut log_error = None;
    let bar = if main { ProgressBar::new(max_train_steps as u64) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("steps {pos}/{len} [{bar:30}] {per_sec} {msg}").expect("template").progress_chars("=> "));
    bar.set_position(trainer.step as u64);
    // Without a terminal (logs, schedulers) the bar draws nothing: one plain line per step instead.
    let plain = main && !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut validation_error = None;
    let mut last_images: Vec<PathBuf> = Vec::new();
    let losses = trainer.run(&instances, &classes, None, |step, loss, lr| {
        bar.set_position(step as u64);
        bar.set_message(format!("loss {loss:.4} lr {lr:.2e}"));
        if plain {
            eprintln!("step {step}/{max_train_steps} loss {loss:.4} lr {lr:.2e}");
        }
        if let Some(Err(e)) = log.as_mut().map(|l| l.step(step, loss, lr)) {
            log_error.get_or_insert(e);
        }
        if let Some(w) = events.as_mut() {
            if let Err(e) = w.scalars(step, &[("loss", loss as f64), ("lr", lr)]) {
                log_error.get_or_insert(e);
            }
        }
        if let Some(prompt) = validation_prompt {
            if validate_now(step) && validation_error.is_none() {
                match validate(&pipe, prompt, validation_embeds.as_ref(), a, step) {
                    Err(e) => validation_error = Some(e),
                    Ok(images) => {
                        if let Some(w) = events.as_mut() {
                            let decoded: Result<Vec<image::RgbImage>> = images.iter().map(|p| Ok(image::open(p)?.to_rgb8())).collect();
                            if let Err(e) = decoded.and_then(|d| w.images(step, "validation", &d)) {
                                log_error.get_or_insert(e);
                            }
                        }
                        if let Some((clip, dino, instance_files)) = &scorers {
                            let clip_t = super::metrics_log::without_identifier(prompt, &a.instance_prompt, a.class_prompt.as_deref());
                            let prompts = Some([("*".to_string(), clip_t.clone())].into_iter().collect());
                            let inputs = crate::eval::score::EvalInputs { generated: &images, real: instance_files, prompts, strict: true, batch: 8 };
                            let scored = crate::eval::score::evaluate(&inputs, clip, dino, &pipe.device).and_then(|r| log.as_mut().map_or(Ok(()), |l| l.scores(step, &r["metrics"], &clip_t)));
                            if let Err(e) = scored {
                                validation_error = Some(e.context("--validation-eval"));
                            }
                        }
                        last_images = images;
                    }
                }
            }
        }
    })?;
    bar.finish();
    if let Some(e) = log_error {
        return Err(e);
    }
    if let Some(l) = &log {
        l.plot()?;
    }
    if let Some(e) = validation_error {
        return Err(e.context("validation images"));
    }
    let trained_steps = trainer.step;
    drop(trainer);
    if !main {
        return Ok(Trained { output_dir: a.output_dir.clone(), losses, lora_files: Vec::new(), single_file: None, wrote: false });
    }
    let (lora_files, single_file) = match &a.lora {
        Some(lora) => {
            let mut lora = lora.clone();
            if a.save_single_file && lora.format == LoraFormat::Diffusers {
                lora.format = LoraFormat::Both;
            }
            (write_lora(&pipe, &lora, a, trained_steps, &last_images)?, None)
        }
        None => {
            write_pipeline(&pipe, &base, a, &last_images)?;
            let single = a.save_single_file.then(|| write_single_file(a)).transpose()?;
            (Vec::new(), single)
        }
    };
    Ok(Trained { output_dir: a.output_dir.clone(), losses, lora_files, single_file, wrote: true })
}

/// How training prompts are tokenized and encoded (`--tokenizer_max_length`,
/// `--text_encoder_use_attention_mask`).
pub struct PromptTokens {
    pub max_length: usize,
    pub use_mask: bool,
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

/// The dtype of class-image generation: `--prior_generation_precision`, else fp16 on a GPU and
/// fp32 on the CPU (as diffusers).
pub(super) fn prior_dtype(a: &TrainArgs, dev: &Device) -> Result<candle_core::DType> {
    Ok(match a.prior_generation_precision.as_deref() {
        None | Some("no") => match dev.is_cpu() {
            true => candle_core::DType::F32,
            false => candle_core::DType::F16,
        },
        Some("fp32") => candle_core::DType::F32,
        Some("fp16") => candle_core::DType::F16,
        Some("bf16") if dev.is_cpu() => bail!("--prior_generation_precision bf16 needs a CUDA build (the CPU backend has no bf16 matmul); use fp32 or fp16"),
        Some("bf16") => candle_core::DType::BF16,
        Some(other) => bail!("--prior_generation_precision `{other}`: expected no, fp32, fp16 or bf16"),
    })
}

/// Tops the class folder up to `num_class_images` with images the base model makes from the
/// class prompt (saved for reuse, never replacing the user's images), `--sample_batch_size` at a
/// time in `--prior_generation_precision`. Image `i` comes from its own stream, so an interrupted
/// top-up continues with the images it would have made, whatever the batch size.
/// Jobs sharing a class folder (rows of one class in a manifest, running at once) take turns:
/// the first generates, the others then find the images there.
fn generate_class_images(pipe: &mut Pipeline, dir: &Path, prompt: &str, a: &TrainArgs) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    // The folder itself is the lock (flock on its handle), so the folder holds only images, as
    // diffusers leaves it; the lock goes with the handle when this function returns or the job dies.
    let lock = std::fs::File::open(dir).with_context(|| format!("{}: cannot open", dir.display()))?;
    let flock = |op| {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this function owns (`lock` outlives every call).
        match unsafe { libc::flock(lock.as_raw_fd(), op) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    };
    if flock(libc::LOCK_EX | libc::LOCK_NB).is_err() {
        eprintln!("{}: another job is generating class images; waiting for it", dir.display());
        flock(libc::LOCK_EX).with_context(|| format!("{}: cannot lock", dir.display()))?;
    }
    let have = image_files(dir).map(|f| f.len()).unwrap_or(0);
    if have >= a.num_class_images {
        return Ok(());
    }
    let dtype = prior_dtype(a, &pipe.device)?;
    let batch = a.sample_batch_size.max(1);
    eprintln!("generating {} class images, {batch} at a time, in {dtype:?}", a.num_class_images - have);
    let kept = std::mem::replace(&mut pipe.compute_dtype, dtype);
    let result = (|| {
        let (cond, uncond) = (pipe.encode(prompt)?, pipe.encode_negative("")?);
        let bar = ProgressBar::new((a.num_class_images - have) as u64).with_message("class images");
        let mut next_name = have;
        for first in (have..a.num_class_images).step_by(batch) {
            let ids: Vec<usize> = (first..(first + batch).min(a.num_class_images)).collect();
            let mut rngs: Vec<TrainRng> = ids.iter().map(|&i| TrainRng::stream(a.seed, "class image", i as u64)).collect();
            let images = generate_batch(pipe, &cond, &uncond, a.resolution, a.sample_steps, 7.5, SchedulerKind::Ddim, &mut rngs)?;
            for image in &images {
                let mut path = dir.join(format!("class_{next_name}.png"));
                while path.exists() {
                    next_name += 1;
                    path = dir.join(format!("class_{next_name}.png"));
                }
                save_png(image, &path)?;
                next_name += 1;
                bar.inc(1);
            }
            a.stop.check(0)?;
        }
        bar.finish_and_clear();
        Ok(())
    })();
    pipe.compute_dtype = kept;
    result
}

/// Latent distributions (× the VAE scaling factor) and the prompt embedding of every image; the
/// `k`-th file's crop and flip come from stream `k` of `set` ("instance" or "class"). Images are
/// decoded and resized on `--dataloader_num_workers` threads, then encoded in file order.
fn encode_images(pipe: &Pipeline, dir: &Path, prompt: &str, a: &TrainArgs, set: &str, limit: Option<usize>, tokens: &PromptTokens) -> Result<Vec<Example>> {
    let (ids, mask) = pipe.tokenizer.encode_to(prompt, tokens.max_length);
    let ids = Tensor::new(ids.as_slice(), &pipe.device)?;
    let mask = tokens.use_mask.then(|| Tensor::new(mask.as_slice(), &pipe.device)).transpose()?;
    let context = pipe.inference.text.forward_masked(&ids.unsqueeze(0)?, mask.as_ref().map(|m| m.unsqueeze(0)).transpose()?.as_ref(), pipe.compute_dtype)?.squeeze(0)?;
    let sf = pipe.vae.config.scaling_factor;
    let files: Vec<PathBuf> = image_files(dir)?.into_iter().take(limit.unwrap_or(usize::MAX)).collect();
    let draws: Vec<(Crop, bool)> = (0..files.len())
        .map(|k| {
            let mut rng = TrainRng::stream(a.seed, &format!("{set} augmentation"), k as u64);
            let crop = if a.center_crop { Crop::Center } else { Crop::At(rng.uniform(), rng.uniform()) };
            (crop, a.random_flip && rng.uniform() < 0.5)
        })
        .collect();
    let pixels = super::data::decode_all(&files, &draws, a.resolution, a.interpolation, a.dataloader_num_workers)?;
    let mut out = Vec::new();
    for image in pixels {
        let image = image.to_device(&pipe.device)?.unsqueeze(0)?;
        let (mean, logvar) = pipe.inference.vae.encode(&image)?;
        out.push(Example {
            latent_mean: (mean.squeeze(0)? * sf)?.detach(),
            latent_std: ((logvar.squeeze(0)? * 0.5)?.exp()? * sf)?.detach(),
            context: context.clone(),
            ids: Some(ids.clone()),
            attention_mask: mask.clone(),
        });
    }
    Ok(out)
}

/// The validation images of a round (`validation/step_<step>_<i>.png`), their paths returned: 25
/// steps of `--validation_scheduler`, one seeded stream for the round, as diffusers' script.
fn validate(pipe: &Pipeline, prompt: &str, embeds: Option<&(PromptEmbeds, PromptEmbeds)>, a: &TrainArgs, step: usize) -> Result<Vec<PathBuf>> {
    const VALIDATION_STEPS: usize = 25;
    let dir = a.output_dir.join("validation");
    std::fs::create_dir_all(&dir)?;
    let (cond, uncond) = match embeds {
        Some((c, u)) => (c.clone(), u.clone()),
        None => (pipe.encode(prompt)?, pipe.encode_negative("")?),
    };
    let mut rng = TrainRng::new(a.seed);
    let mut paths = Vec::new();
    for i in 0..a.num_validation_images {
        let path = dir.join(format!("step_{step}_{i}.png"));
        let image = generate_batch(pipe, &cond, &uncond, a.resolution, VALIDATION_STEPS, 7.5, a.validation_scheduler, std::slice::from_mut(&mut rng))?;
        save_png(&image[0], &path)?;
        paths.push(path);
    }
    Ok(paths)
}

/// The trained pipeline: the base folder's other parts, the trained UNet, a model card. Built in a
/// staging folder, then moved into the output folder entry by entry. On failure the staging
/// folder goes, the error names the file by its destination, and the checkpoints stay.
fn write_pipeline(pipe: &Pipeline, base: &Path, a: &TrainArgs, images: &[PathBuf]) -> Result<()> {
    let staging = a.output_dir.join(".pipeline-tmp");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).with_context(|| format!("{}: cannot remove", staging.display()))?;
    }
    let built = build_pipeline(pipe, base, a, &staging, images);
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

/// The pipeline folder in `staging`: the base's files, with the trained weights written over
/// theirs. A variant base (`--variant fp16`) has its frozen parts written from the loaded f32
/// weights under the plain names, so the folder loads without `variant=`, as diffusers saves it.
/// `--skip_save_text_encoder` leaves `text_encoder/` out and marks it absent in model_index.json.
/// The last validation round's images go in as `image_<i>.png`, shown by the model card.
fn build_pipeline(pipe: &Pipeline, base: &Path, a: &TrainArgs, staging: &Path, images: &[PathBuf]) -> Result<()> {
    let trained_text = a.train_text_encoder;
    let variant = a.variant.is_some();
    let skip_text = a.skip_save_text_encoder;
    crate::output::copy_tree(base, staging, &|rel| {
        let weights = rel.ends_with(".safetensors") || rel.ends_with(".bin");
        (weights && (variant || rel.starts_with("unet/") || (trained_text && rel.starts_with("text_encoder/"))))
            || (skip_text && rel.starts_with("text_encoder"))
            || rel.starts_with('.')
            || rel == "README.md"
    })?;
    write_vars(&pipe.unet_vars, &staging.join("unet").join(Component::Unet.weights_name(false)))?;
    let text_path = staging.join("text_encoder").join(Component::TextEncoder.weights_name(false));
    if (trained_text || variant) && !skip_text && !pipe.text_released {
        write_vars(&pipe.text_vars, &text_path)?;
    } else if variant && !skip_text {
        // Freed by --pre_compute_text_embeddings: read the base's variant weights again, in f32.
        let vars = candle_nn::VarMap::new();
        crate::models::clip::ClipTextModel::new(candle_nn::VarBuilder::from_varmap(&vars, candle_core::DType::F32, &Device::Cpu), &pipe.text_config)?;
        let file = crate::diffusers::layout::find_variant_weights(base, Component::TextEncoder, a.variant.as_deref().unwrap_or_default())?;
        crate::models::weights::load_into(&vars, &file, "text_model.")?;
        write_vars(&vars, &text_path)?;
    }
    if variant {
        write_vars(&pipe.vae_vars, &staging.join("vae").join(Component::Vae.weights_name(false)))?;
        // transformers loads a config's `torch_dtype` as the model's dtype: the weights are f32 now.
        let config_path = staging.join("text_encoder").join("config.json");
        if config_path.is_file() {
            let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path)?).with_context(|| format!("{}: not JSON", config_path.display()))?;
            for key in ["torch_dtype", "dtype"] {
                if config.get(key).is_some() {
                    config[key] = "float32".into();
                }
            }
            std::fs::write(&config_path, serde_json::to_string_pretty(&config)?).with_context(|| format!("{}: cannot write", config_path.display()))?;
        }
    }
    if skip_text {
        let index_path = staging.join("model_index.json");
        let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index_path).with_context(|| format!("{}: cannot read", index_path.display()))?)?;
        index["text_encoder"] = serde_json::json!([null, null]);
        std::fs::write(&index_path, serde_json::to_string_pretty(&index)?).with_context(|| format!("{}: cannot write", index_path.display()))?;
    }
    let names = copy_card_images(images, staging)?;
    let card_path = staging.join("README.md");
    std::fs::write(&card_path, model_card(&card_info(a), &names)).with_context(|| format!("{}: cannot write", card_path.display()))
}

/// The validation images as `image_<i>.png` in `dir` (diffusers' card images); their names.
fn copy_card_images(images: &[PathBuf], dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for (i, img) in images.iter().enumerate() {
        let name = format!("image_{i}.png");
        crate::output::copy_file(img, &dir.join(&name))?;
        names.push(name);
    }
    Ok(names)
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
fn write_lora(pipe: &Pipeline, lora: &LoraArgs, a: &TrainArgs, steps: usize, images: &[PathBuf]) -> Result<Vec<PathBuf>> {
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
            steps: Some(steps),
        };
        let path = a.output_dir.join(format!("{name}.safetensors"));
        crate::lora::write::write_kohya(&set, &path, &info)?;
        files.push(path);
    }
    let names = copy_card_images(images, &a.output_dir)?;
    crate::output::atomic_file(&a.output_dir.join("README.md"), |temp| Ok(std::fs::write(temp, model_card(&card_info(a), &names))?))?;
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
