//! The `train` command line: diffusers' train_dreambooth.py flags (in either spelling, see
//! `main.rs`), read into [`TrainArgs`], then the run and what follows it (KerasCV export, Hub push).

use super::command::{train_checked, LoraArgs, TrainArgs, ValidationEval};
use crate::convert::to_keras::diffusers_to_keras;
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Clone, Debug)]
pub struct TrainCli {
    /// Base model: diffusers folder, Hub repo id, or a single-file checkpoint (.safetensors/.ckpt,
    /// local or `hf://owner/repo/file`, or a Hub resolve URL).
    #[arg(long, required_unless_present = "manifest")]
    pub pretrained_model_name_or_path: Option<PathBuf>,
    /// Branch, tag or commit of a Hub base model.
    #[arg(long)]
    pub revision: Option<String>,
    /// Weights variant of the base, e.g. fp16 (reads `*.fp16.safetensors`; training holds f32 weights).
    #[arg(long)]
    pub variant: Option<String>,
    /// A tokenizer folder or Hub repo to use instead of the base's tokenizer.
    #[arg(long)]
    pub tokenizer_name: Option<PathBuf>,
    /// Folder of the subject's images.
    #[arg(long, required_unless_present = "manifest")]
    pub instance_data_dir: Option<PathBuf>,
    /// The prompt of every instance image, with the identifier (e.g. "a photo of sks dog").
    #[arg(long, required_unless_present = "manifest")]
    pub instance_prompt: Option<String>,
    /// Many subjects: a JSON-lines file, one object of train flags per row (each with its own
    /// output_dir). Runs the row --index, JOB_COMPLETION_INDEX or SLURM_ARRAY_TASK_ID names, or
    /// every row in turn; flags given beside --manifest apply to every row.
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// The manifest row to run (0-based; default: the job array's index variable, else all rows).
    #[arg(long, requires = "manifest")]
    pub index: Option<usize>,
    /// Folder of class images (generated up to --num_class_images when short).
    #[arg(long)]
    pub class_data_dir: Option<PathBuf>,
    /// The prompt of the class images (e.g. "a photo of dog").
    #[arg(long)]
    pub class_prompt: Option<String>,
    /// Add the prior-preservation loss on class images.
    #[arg(long)]
    pub with_prior_preservation: bool,
    /// Weight of the prior-preservation loss.
    #[arg(long, default_value_t = 1.0)]
    pub prior_loss_weight: f64,
    /// Class images wanted; missing ones are generated with the base model.
    #[arg(long, default_value_t = 100)]
    pub num_class_images: usize,
    /// Class images generated per batch.
    #[arg(long, default_value_t = 4)]
    pub sample_batch_size: usize,
    /// Precision of class-image generation (default: fp16 on a GPU, else fp32).
    #[arg(long, value_parser = ["no", "fp32", "fp16", "bf16"])]
    pub prior_generation_precision: Option<String>,
    /// Training resolution (images are resized and cropped to a square).
    #[arg(long, default_value_t = 512)]
    pub resolution: usize,
    /// Centre crop instead of a random crop.
    #[arg(long)]
    pub center_crop: bool,
    /// Flip each image horizontally with probability 0.5 (drawn once per image).
    #[arg(long)]
    pub random_flip: bool,
    /// Resampling filter of the resize: nearest, nearest_exact, bilinear, bicubic or lanczos
    /// (default: bilinear; lanczos for train-lora, as diffusers' LoRA script).
    #[arg(long)]
    pub image_interpolation_mode: Option<String>,
    /// Threads decoding and resizing the training images (0: the main thread).
    #[arg(long, default_value_t = 0)]
    pub dataloader_num_workers: usize,
    /// Images per step (instance images; as many class images are added with prior preservation).
    #[arg(long, default_value_t = 4)]
    pub train_batch_size: usize,
    /// Passes over the data when --max_train_steps is not given.
    #[arg(long, default_value_t = 1)]
    pub num_train_epochs: usize,
    /// Optimiser steps (overrides --num_train_epochs).
    #[arg(long)]
    pub max_train_steps: Option<usize>,
    /// Micro-batches per optimiser step.
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    /// Default 5e-6, or 5e-4 with LoRA (as diffusers' scripts).
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Multiply the learning rate by accumulation steps x batch size x processes.
    #[arg(long)]
    pub scale_lr: bool,
    /// linear, cosine, cosine_with_restarts, polynomial, constant or constant_with_warmup.
    #[arg(long, default_value = "constant")]
    pub lr_scheduler: String,
    /// Warmup steps of the schedule (the constant schedule has none).
    #[arg(long, default_value_t = 500)]
    pub lr_warmup_steps: usize,
    /// Hard restarts of cosine_with_restarts.
    #[arg(long, default_value_t = 1)]
    pub lr_num_cycles: usize,
    /// Power of the polynomial schedule.
    #[arg(long, default_value_t = 1.0)]
    pub lr_power: f64,
    /// AdamW with 8-bit block-wise moments (bitsandbytes' AdamW8bit): about 4x less optimiser memory.
    #[arg(long)]
    pub use_8bit_adam: bool,
    #[arg(long, default_value_t = 0.9, help = "AdamW's beta1.")]
    pub adam_beta1: f64,
    #[arg(long, default_value_t = 0.999, help = "AdamW's beta2.")]
    pub adam_beta2: f64,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 1e-2)]
    pub adam_weight_decay: f64,
    /// AdamW's epsilon.
    #[arg(long, default_value_t = 1e-8)]
    pub adam_epsilon: f64,
    /// Global gradient-norm clipping.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Min-SNR loss weighting with this gamma (5.0 is the usual value).
    #[arg(long)]
    pub snr_gamma: Option<f64>,
    /// Offset noise: noise + 0.1 x N(0, 1) per image and channel (diffusers' switch).
    #[arg(long)]
    pub offset_noise: bool,
    /// Offset noise of any strength (kohya's --noise_offset).
    #[arg(long, default_value_t = 0.0)]
    pub noise_offset: f64,
    /// Seed of every random draw (dreambridge runs repeat exactly; diffusers' default is unseeded).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Save a resumable checkpoint every N steps.
    #[arg(long, default_value_t = 500)]
    pub checkpointing_steps: usize,
    /// Keep only the newest N checkpoints.
    #[arg(long)]
    pub checkpoints_total_limit: Option<usize>,
    /// `latest` or a checkpoint folder.
    #[arg(long)]
    pub resume_from_checkpoint: Option<String>,
    /// Prompt of the validation images.
    #[arg(long)]
    pub validation_prompt: Option<String>,
    /// Validate every N steps (default 100).
    #[arg(long)]
    pub validation_steps: Option<usize>,
    /// Validate after every N-th epoch, the first included (train-lora's default: 50).
    #[arg(long)]
    pub validation_epochs: Option<usize>,
    /// Validation images per round.
    #[arg(long, default_value_t = 4)]
    pub num_validation_images: usize,
    /// DDIM steps for generated class images.
    #[arg(long, default_value_t = 50)]
    pub sample_steps: usize,
    /// Output folder.
    #[arg(long, default_value = "dreambooth-model")]
    pub output_dir: PathBuf,
    /// Replace a pipeline already in the output folder.
    #[arg(long)]
    pub force: bool,
    /// Fine-tune the text encoder too.
    #[arg(long)]
    pub train_text_encoder: bool,
    /// Encode the prompts once before training, then free the text encoder.
    #[arg(long)]
    pub pre_compute_text_embeddings: bool,
    /// Token length of the training prompts (default: the tokenizer's, 77).
    #[arg(long)]
    pub tokenizer_max_length: Option<usize>,
    /// Pass the tokenizer's attention mask to the text encoder for training prompts.
    #[arg(long)]
    pub text_encoder_use_attention_mask: bool,
    /// Leave the text encoder out of the saved pipeline.
    #[arg(long)]
    pub skip_save_text_encoder: bool,
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
    /// Where training logs go: tensorboard (event files in <output_dir>/<logging_dir>/dreambooth),
    /// none; wandb, comet_ml and all also write the event files (and say how to sync them).
    #[arg(long, default_value = "tensorboard", value_parser = ["tensorboard", "wandb", "comet_ml", "all", "none"])]
    pub report_to: String,
    /// Log folder, inside the output folder.
    #[arg(long, default_value = "logs")]
    pub logging_dir: PathBuf,
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
    /// This process's GPU on its machine in a data-parallel run (default: LOCAL_RANK,
    /// SLURM_LOCALID or OMPI_COMM_WORLD_LOCAL_RANK; -1: unset), as torch.distributed launchers pass it.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub local_rank: i64,
    /// This process's rank in a data-parallel run (default: RANK, SLURM_PROCID or OMPI_COMM_WORLD_RANK).
    #[arg(long)]
    pub dist_rank: Option<usize>,
    /// The number of processes of a data-parallel run (default: WORLD_SIZE, SLURM_NTASKS or
    /// OMPI_COMM_WORLD_SIZE); each draws its share of the global batch of
    /// world x --train_batch_size.
    #[arg(long)]
    pub dist_world_size: Option<usize>,
    /// How the ranks sum gradients: nccl (GPUs; a build with --nccl), tcp (CPU processes), or
    /// auto (nccl on GPUs, tcp on the CPU).
    #[arg(long, value_enum, default_value = "auto")]
    pub dist_backend: crate::scale::dist::Backend,
    /// The port rank 0 listens on at MASTER_ADDR (default: MASTER_PORT + 1, else 29501).
    #[arg(long)]
    pub dist_port: Option<u16>,
    /// Seconds the ranks wait for each other to join.
    #[arg(long, default_value_t = 1800)]
    pub dist_timeout: u64,
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
    /// Train LoRA adapters of this rank instead of the whole UNet (the base stays frozen;
    /// train-lora: 4 by default).
    #[arg(long, alias = "rank", value_parser = clap::value_parser!(u64).range(1..))]
    pub lora_rank: Option<u64>,
    /// LoRA alpha (scale alpha/rank; default: the rank).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Dropout on the LoRA input (default 0).
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// attn (to_q/k/v/out of the transformer blocks, as diffusers), transformer (kohya's set:
    /// every Linear and 1x1 conv of the transformers) or transformer+conv (plus the resnets: LoCon).
    #[arg(long)]
    pub lora_targets: Option<String>,
    /// diffusers (pytorch_lora_weights.safetensors), kohya (<output name>.safetensors, for
    /// AUTOMATIC1111 and ComfyUI) or both.
    #[arg(long)]
    pub lora_format: Option<String>,
    /// Publish the result to the Hub at the end (repo: --hub_model_id, else the output folder's
    /// name under the token's user; a `namespace/name` value also names it).
    #[arg(long, value_name = "REPO", num_args = 0..=1)]
    pub push_to_hub: Option<Option<String>>,
    /// Hub access token (else HF_TOKEN, else the token `hf auth login` saved).
    #[arg(long)]
    pub hub_token: Option<String>,
    /// The Hub repo to push to (`name` or `namespace/name`).
    #[arg(long)]
    pub hub_model_id: Option<String>,
}

/// Which diffusers script a command line is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Script {
    /// `train_dreambooth.py`: full fine-tuning unless --rank/--lora-rank is given.
    DreamBooth,
    /// `train_dreambooth_lora.py`: LoRA rank 4 by default, validation every 50 epochs, lanczos resize.
    DreamBoothLora,
}

/// Runs `dreambridge train` (or `train-lora`).
pub fn run(a: TrainCli, script: Script) -> Result<()> {
    anyhow::ensure!(a.manifest.is_none(), "--manifest rows cannot name another manifest");
    let instance_prompt = a.instance_prompt.clone().context("--instance_prompt is required")?;
    anyhow::ensure!(a.class_labels_conditioning.is_none(), "--class_labels_conditioning is for DeepFloyd IF: not supported for Stable Diffusion");
    anyhow::ensure!(a.validation_images.is_empty(), "--validation_images is for DeepFloyd IF's upscaler: not supported for Stable Diffusion");
    anyhow::ensure!(
        !(a.report_to == "wandb" && a.hub_token.is_some()),
        "You cannot use both --report_to=wandb and --hub_token due to a security risk of exposing your token; log in with `hf auth login` (or set HF_TOKEN) instead"
    );
    if a.enable_xformers_memory_efficient_attention {
        eprintln!("note: --enable_xformers_memory_efficient_attention: not needed, dreambridge's attention already runs in bounded memory");
    }
    if a.set_grads_to_none {
        eprintln!("note: --set_grads_to_none: not needed, dreambridge keeps no zeroed gradients between steps");
    }
    let local_rank = usize::try_from(a.local_rank).ok();
    let rank = crate::scale::launch::rank((a.dist_rank, a.dist_world_size, local_rank), &crate::scale::launch::process_env)?;
    if rank.world == 1 && (local_rank.is_some() || std::env::var_os("LOCAL_RANK").is_some()) {
        eprintln!("note: --local_rank {}: no world size was given (WORLD_SIZE, SLURM_NTASKS, OMPI_COMM_WORLD_SIZE or --dist-world-size), so this process trains alone on --device", rank.local_rank);
    }
    let dist = crate::scale::dist::DistConfig::new(rank, a.dist_backend, a.dist_port, std::time::Duration::from_secs(a.dist_timeout), &crate::scale::launch::process_env)?;
    if matches!(a.report_to.as_str(), "wandb" | "comet_ml" | "all") {
        eprintln!(
            "note: --report_to {}: dreambridge writes TensorBoard event files only ({}); `wandb sync --sync-tensorboard` or comet's TensorBoard import uploads them",
            a.report_to,
            a.output_dir.join(&a.logging_dir).join("dreambooth").display()
        );
    }
    let lora_rank = a.lora_rank.or((script == Script::DreamBoothLora).then_some(4));
    let lora = match lora_rank {
        Some(rank) => {
            let dropout = a.lora_dropout.unwrap_or(0.0);
            anyhow::ensure!((0.0..1.0).contains(&dropout), "--lora_dropout must be in [0, 1)");
            anyhow::ensure!(!a.export_keras, "--export-keras needs full weights: fold the LoRA in with `dreambridge lora merge`, then `convert diffusers-to-keras`");
            let targets = a.lora_targets.as_deref().unwrap_or("attn").parse()?;
            let format = a.lora_format.as_deref().unwrap_or("diffusers").parse()?;
            Some(LoraArgs { rank: rank as usize, alpha: a.lora_alpha, dropout, targets, format })
        }
        None => {
            let given = [("--lora_alpha", a.lora_alpha.is_some()), ("--lora_dropout", a.lora_dropout.is_some()), ("--lora_targets", a.lora_targets.is_some()), ("--lora_format", a.lora_format.is_some())];
            if let Some((flag, _)) = given.iter().find(|(_, set)| *set) {
                anyhow::bail!("{flag} needs LoRA training: add --rank N (or use `dreambridge train-lora`)");
            }
            None
        }
    };
    let default_lr = if lora.is_some() { 5e-4 } else { 5e-6 };
    let mut learning_rate = a.learning_rate.unwrap_or(default_lr);
    if a.scale_lr {
        learning_rate *= (a.gradient_accumulation_steps * a.train_batch_size * rank.world) as f64;
    }
    let interpolation = a.image_interpolation_mode.as_deref().unwrap_or(if script == Script::DreamBoothLora { "lanczos" } else { "bilinear" }).parse()?;
    let (validation_steps, validation_epochs) = match (a.validation_steps, a.validation_epochs, script) {
        (Some(s), None, _) => (s, None),
        (None, Some(e), _) => (100, Some(e)),
        (None, None, Script::DreamBooth) => (100, None),
        (None, None, Script::DreamBoothLora) => (100, Some(50)),
        (Some(_), Some(_), _) => anyhow::bail!("--validation_steps and --validation_epochs: give one of them"),
    };
    let args = TrainArgs {
        pretrained_model: a.pretrained_model_name_or_path.clone().context("--pretrained_model_name_or_path is required")?,
        instance_data_dir: a.instance_data_dir.clone().context("--instance_data_dir is required")?,
        instance_prompt: instance_prompt.clone(),
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
        num_train_epochs: a.num_train_epochs,
        gradient_accumulation_steps: a.gradient_accumulation_steps,
        learning_rate,
        lr_scheduler: a.lr_scheduler,
        lr_warmup_steps: a.lr_warmup_steps,
        lr_num_cycles: a.lr_num_cycles as f64,
        lr_power: a.lr_power,
        max_grad_norm: a.max_grad_norm,
        adam_weight_decay: a.adam_weight_decay,
        adam_beta1: a.adam_beta1,
        adam_beta2: a.adam_beta2,
        adam_epsilon: a.adam_epsilon,
        use_8bit_adam: a.use_8bit_adam,
        snr_gamma: a.snr_gamma,
        noise_offset: if a.offset_noise { 0.1 } else { a.noise_offset },
        seed: a.seed,
        checkpointing_steps: a.checkpointing_steps,
        checkpoints_total_limit: a.checkpoints_total_limit,
        resume_from_checkpoint: a.resume_from_checkpoint,
        validation_prompt: a.validation_prompt,
        validation_steps,
        validation_epochs,
        num_validation_images: a.num_validation_images,
        sample_steps: a.sample_steps,
        output_dir: a.output_dir.clone(),
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
        revision: a.revision,
        variant: a.variant,
        tokenizer_name: a.tokenizer_name,
        tokenizer_max_length: a.tokenizer_max_length,
        text_encoder_use_attention_mask: a.text_encoder_use_attention_mask,
        sample_batch_size: a.sample_batch_size,
        prior_generation_precision: a.prior_generation_precision,
        pre_compute_text_embeddings: a.pre_compute_text_embeddings,
        skip_save_text_encoder: a.skip_save_text_encoder,
        dataloader_num_workers: a.dataloader_num_workers,
        tensorboard: (a.report_to != "none").then(|| a.output_dir.join(&a.logging_dir).join("dreambooth")),
        interpolation,
        dist,
    };
    // Every check that needs no model first (a bad combination fails in milliseconds), then the
    // Hub repo, then training.
    let ready = super::preflight::check(&args)?;
    // The repo is created before training, as diffusers does, so a bad token fails in seconds.
    let push_repo = match &a.push_to_hub {
        // Rank 0 alone talks to the Hub.
        _ if !rank.is_main() => None,
        None => None,
        Some(value) => {
            let name = match (a.hub_model_id.as_deref(), value.as_deref()) {
                (Some(id), Some(v)) if id != v => anyhow::bail!("--push_to_hub {v} and --hub_model_id {id} name different repos"),
                (Some(id), _) | (None, Some(id)) => id.to_string(),
                (None, None) => a.output_dir.file_name().map(|n| n.to_string_lossy().to_string()).filter(|n| !n.is_empty()).context("--push_to_hub: the output folder has no name to name the repo; give --hub_model_id")?,
            };
            let repo = crate::hub::push::create_repo(&name, a.hub_token.as_deref(), false)?;
            eprintln!("Hub repo {repo} ready; the trained model is pushed to it at the end");
            Some(repo)
        }
    };
    let done = train_checked(&args, ready)?;
    if !done.wrote {
        println!("rank {} trained {} steps; rank 0 writes {}", rank.rank, done.losses.len(), done.output_dir.display());
        return Ok(());
    }
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
    if let Some(repo) = push_repo {
        let card = crate::hub::model_card::CardInfo { repo_id: repo.clone(), instance_prompt: Some(instance_prompt), ..Default::default() };
        let opts = crate::hub::push::PushOptions { repo: repo.clone(), token: a.hub_token, card, commit_message: Some("End of training".into()), ..Default::default() };
        println!("pushed {repo} as commit {}", crate::hub::push::push(&done.output_dir, &opts)?.commit);
    }
    Ok(())
}
