//! The `train` command line: diffusers' train_dreambooth.py flags (in either spelling, see
//! `main.rs`), read into [`TrainArgs`], then the run and what follows it (KerasCV export, Hub push).

use super::command::{train, LoraArgs, TrainArgs, ValidationEval};
use crate::convert::to_keras::diffusers_to_keras;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Clone, Debug)]
pub struct TrainCli {
    /// Base model: diffusers folder, Hub repo id, or a single-file checkpoint (.safetensors/.ckpt,
    /// local or `hf://owner/repo/file`, or a Hub resolve URL).
    #[arg(long)]
    pub pretrained_model_name_or_path: PathBuf,
    #[arg(long)]
    pub instance_data_dir: PathBuf,
    #[arg(long)]
    pub instance_prompt: String,
    #[arg(long)]
    pub class_data_dir: Option<PathBuf>,
    #[arg(long)]
    pub class_prompt: Option<String>,
    #[arg(long)]
    pub with_prior_preservation: bool,
    #[arg(long, default_value_t = 1.0)]
    pub prior_loss_weight: f64,
    #[arg(long, default_value_t = 100)]
    pub num_class_images: usize,
    #[arg(long, default_value_t = 512)]
    pub resolution: usize,
    #[arg(long)]
    pub center_crop: bool,
    #[arg(long)]
    pub random_flip: bool,
    #[arg(long, default_value_t = 1)]
    pub train_batch_size: usize,
    #[arg(long, default_value_t = 400)]
    pub max_train_steps: usize,
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    /// Default 5e-6, or 5e-4 with LoRA (as diffusers' scripts).
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// constant, constant_with_warmup, linear, cosine
    #[arg(long, default_value = "constant")]
    pub lr_scheduler: String,
    #[arg(long, default_value_t = 0)]
    pub lr_warmup_steps: usize,
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 1e-2)]
    pub adam_weight_decay: f64,
    #[arg(long)]
    pub snr_gamma: Option<f64>,
    #[arg(long, default_value_t = 0.0)]
    pub noise_offset: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 500)]
    pub checkpointing_steps: usize,
    #[arg(long)]
    pub checkpoints_total_limit: Option<usize>,
    /// `latest` or a checkpoint folder.
    #[arg(long)]
    pub resume_from_checkpoint: Option<String>,
    #[arg(long)]
    pub validation_prompt: Option<String>,
    #[arg(long, default_value_t = 100)]
    pub validation_steps: usize,
    #[arg(long, default_value_t = 4)]
    pub num_validation_images: usize,
    /// DDIM steps for generated class and validation images.
    #[arg(long, default_value_t = 50)]
    pub sample_steps: usize,
    #[arg(long)]
    pub output_dir: PathBuf,
    /// Replace a pipeline already in the output folder.
    #[arg(long)]
    pub force: bool,
    /// Fine-tune the text encoder too.
    #[arg(long)]
    pub train_text_encoder: bool,
    /// UNet compute precision: no, fp16 (dynamic loss scaling), bf16 (CUDA builds); weights stay f32.
    #[arg(long, default_value = "no")]
    pub mixed_precision: String,
    /// auto (GPU when this is a CUDA build and one is present), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Let f32 matrix products use TF32 tensor cores (CUDA).
    #[arg(long)]
    pub allow_tf32: bool,
    /// Recompute UNet blocks during backward instead of keeping their activations (less memory).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Also write the KerasCV .h5 files (output_dir/keras).
    #[arg(long)]
    pub export_keras: bool,
    /// Also write the trained model as one file for AUTOMATIC1111 / ComfyUI
    /// (output_dir/<name>.safetensors in the original layout; with LoRA, the kohya LoRA file).
    #[arg(long)]
    pub save_single_file: bool,
    /// The sampler of the validation images (diffusers' default: DPMSolverMultistepScheduler).
    #[arg(long, value_enum, default_value = "DPMSolverMultistepScheduler")]
    pub validation_scheduler: crate::generate::scheduler::SchedulerKind,
    /// Accepted for diffusers' command lines: dreambridge's attention already runs in bounded
    /// memory (no xformers needed).
    #[arg(long)]
    pub enable_xformers_memory_efficient_attention: bool,
    /// Accepted for diffusers' command lines: dreambridge's optimizer never keeps zeroed gradient
    /// tensors between steps.
    #[arg(long)]
    pub set_grads_to_none: bool,
    /// DeepFloyd IF only (refused for Stable Diffusion).
    #[arg(long, hide = true)]
    pub class_labels_conditioning: Option<String>,
    /// DeepFloyd IF only (refused for Stable Diffusion).
    #[arg(long, hide = true)]
    pub validation_images: Vec<String>,
    /// Score each validation round (DINO and CLIP-I against the instance images, CLIP-T against the
    /// validation prompt without the identifier) into logs/metrics.jsonl and logs/metrics.png.
    #[arg(long)]
    pub validation_eval: bool,
    /// CLIP model for --validation-eval (folder or Hub repo id).
    #[arg(long, default_value = "openai/clip-vit-base-patch32")]
    pub eval_clip_model: PathBuf,
    /// DINO ViT model for --validation-eval (folder or Hub repo id).
    #[arg(long, default_value = "facebook/dino-vits16")]
    pub eval_dino_model: PathBuf,
    /// Train LoRA adapters of this rank instead of the whole UNet (the base stays frozen).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub lora_rank: Option<u64>,
    /// LoRA alpha (scale alpha/rank; default: the rank).
    #[arg(long, requires = "lora_rank")]
    pub lora_alpha: Option<f64>,
    /// Dropout on the LoRA input.
    #[arg(long, default_value_t = 0.0, requires = "lora_rank")]
    pub lora_dropout: f64,
    /// attn (to_q/k/v/out of the transformer blocks, as diffusers), transformer (kohya's set:
    /// every Linear and 1x1 conv of the transformers) or transformer+conv (plus the resnets: LoCon).
    #[arg(long, default_value = "attn", requires = "lora_rank")]
    pub lora_targets: String,
    /// diffusers (pytorch_lora_weights.safetensors), kohya (<output name>.safetensors, for
    /// AUTOMATIC1111 and ComfyUI) or both.
    #[arg(long, default_value = "diffusers", requires = "lora_rank")]
    pub lora_format: String,
    /// Publish the result to this Hub repo.
    #[arg(long, value_name = "REPO")]
    pub push_to_hub: Option<String>,
}

/// Runs `dreambridge train`.
pub fn run(a: TrainCli) -> Result<()> {
    anyhow::ensure!(a.class_labels_conditioning.is_none(), "--class_labels_conditioning is for DeepFloyd IF: not supported for Stable Diffusion");
    anyhow::ensure!(a.validation_images.is_empty(), "--validation_images is for DeepFloyd IF's upscaler: not supported for Stable Diffusion");
    if a.enable_xformers_memory_efficient_attention {
        eprintln!("note: --enable_xformers_memory_efficient_attention: not needed, dreambridge's attention already runs in bounded memory");
    }
    if a.set_grads_to_none {
        eprintln!("note: --set_grads_to_none: not needed, dreambridge keeps no zeroed gradients between steps");
    }
    let lora = match a.lora_rank {
        Some(rank) => {
            anyhow::ensure!((0.0..1.0).contains(&a.lora_dropout), "--lora-dropout must be in [0, 1)");
            anyhow::ensure!(!a.export_keras, "--export-keras needs full weights: fold the LoRA in with `dreambridge lora merge`, then `convert diffusers-to-keras`");
            Some(LoraArgs { rank: rank as usize, alpha: a.lora_alpha, dropout: a.lora_dropout, targets: a.lora_targets.parse()?, format: a.lora_format.parse()? })
        }
        None => None,
    };
    let default_lr = if lora.is_some() { 5e-4 } else { 5e-6 };
    let args = TrainArgs {
        pretrained_model: a.pretrained_model_name_or_path,
        instance_data_dir: a.instance_data_dir,
        instance_prompt: a.instance_prompt.clone(),
        class_data_dir: a.class_data_dir,
        class_prompt: a.class_prompt,
        with_prior_preservation: a.with_prior_preservation,
        prior_loss_weight: a.prior_loss_weight,
        num_class_images: a.num_class_images,
        resolution: a.resolution,
        center_crop: a.center_crop,
        random_flip: a.random_flip,
        train_batch_size: a.train_batch_size,
        max_train_steps: a.max_train_steps,
        gradient_accumulation_steps: a.gradient_accumulation_steps,
        learning_rate: a.learning_rate.unwrap_or(default_lr),
        lr_scheduler: a.lr_scheduler,
        lr_warmup_steps: a.lr_warmup_steps,
        max_grad_norm: a.max_grad_norm,
        adam_weight_decay: a.adam_weight_decay,
        snr_gamma: a.snr_gamma,
        noise_offset: a.noise_offset,
        seed: a.seed,
        checkpointing_steps: a.checkpointing_steps,
        checkpoints_total_limit: a.checkpoints_total_limit,
        resume_from_checkpoint: a.resume_from_checkpoint,
        validation_prompt: a.validation_prompt,
        validation_steps: a.validation_steps,
        num_validation_images: a.num_validation_images,
        sample_steps: a.sample_steps,
        output_dir: a.output_dir,
        force: a.force,
        mixed_precision: a.mixed_precision,
        train_text_encoder: a.train_text_encoder,
        device: a.device,
        allow_tf32: a.allow_tf32,
        gradient_checkpointing: a.gradient_checkpointing,
        stop: crate::train::interrupt::StopRequest::on_signals()?,
        lora,
        save_single_file: a.save_single_file,
        validation_scheduler: a.validation_scheduler,
        validation_eval: a.validation_eval.then(|| ValidationEval { clip_model: a.eval_clip_model.clone(), dino_model: a.eval_dino_model.clone() }),
    };
    let done = train(&args)?;
    println!("trained {} steps -> {}", done.losses.len(), done.output_dir.display());
    for f in &done.lora_files {
        println!("LoRA -> {}", f.display());
    }
    if let Some(f) = &done.single_file {
        println!("single file -> {}", f.display());
    }
    if a.export_keras {
        let keras = diffusers_to_keras(&done.output_dir, &done.output_dir.join("keras"), true, None)?;
        println!("KerasCV files -> {}", keras.out.display());
    }
    if let Some(repo) = a.push_to_hub {
        let card = crate::hub::model_card::CardInfo { repo_id: repo.clone(), instance_prompt: Some(a.instance_prompt), ..Default::default() };
        let opts = crate::hub::push::PushOptions { repo: repo.clone(), card, ..Default::default() };
        println!("pushed {repo} as commit {}", crate::hub::push::push(&done.output_dir, &opts)?.commit);
    }
    Ok(())
}
