//! The `dreambridge` command line.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use dreambridge::convert::to_diffusers::{keras_to_diffusers, KerasInputs, ToDiffusersOptions};
use dreambridge::convert::to_keras::diffusers_to_keras;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "dreambridge", version, about = "KerasCV Stable Diffusion checkpoints <-> diffusers, verified")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert between KerasCV .h5 files, diffusers pipeline folders and single-file checkpoints.
    Convert(ConvertArgs),
    /// Publish a diffusers pipeline folder to the Hub in one commit (HF_ENDPOINT, HF_TOKEN honoured).
    Push(PushArgs),
    /// DreamBooth fine-tuning of a Stable Diffusion UNet (diffusers train_dreambooth.py flags).
    #[command(args_override_self = true)]
    Train(Box<dreambridge::train::cli::TrainCli>),
    /// LoRA DreamBooth with diffusers' train_dreambooth_lora.py flags and defaults (--rank 4,
    /// --learning_rate 5e-4, --validation_epochs 50, lanczos resize).
    #[command(args_override_self = true)]
    TrainLora(Box<dreambridge::train::cli::TrainCli>),
    /// Text-to-image with a diffusers folder or Hub repo (DDIM, classifier-free guidance), PNG files out.
    Generate(GenerateArgs),
    /// Benchmarks on SD 1.5 shapes (training step, text-to-image) and the GPU correctness check.
    #[command(subcommand)]
    Bench(dreambridge::bench::cli::BenchCommand),
    /// LoRA files: fold into a base pipeline (merge) or change format (convert).
    #[command(subcommand)]
    Lora(dreambridge::lora::cli::LoraCommand),
    /// Download a Hub model repo into the Hub cache (Python-compatible) and print its folder.
    Download {
        /// Repository id, `namespace/name`.
        repo: String,
        /// Branch, tag or commit.
        #[arg(long)]
        revision: Option<String>,
    },
    /// Run a training model (unet, text-encoder) on saved inputs (parity checks).
    #[command(hide = true)]
    Forward {
        component: String,
        #[arg(long)]
        model: PathBuf,
        /// LoRA files folded into the weights first; repeatable.
        #[arg(long)]
        lora: Vec<PathBuf>,
        #[arg(long)]
        lora_scale: Vec<f64>,
        #[arg(long)]
        inputs: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Run a sampler on saved model outputs (parity checks): `sample`, `model_output_<i>` and, for
    /// ancestral samplers, `noise_<i>` in; `scaled_<i>` and `sample_<i>` after each step out.
    #[command(hide = true)]
    SamplerSteps {
        #[arg(long, value_enum)]
        scheduler: dreambridge::generate::scheduler::SchedulerKind,
        /// scheduler_config.json
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        steps: usize,
        #[arg(long)]
        inputs: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Run 8-bit AdamW on saved gradients (parity checks against bitsandbytes): `param.<name>`,
    /// `grad.<i>.<name>` and the `hyper` metadata in; `param.<i>.<name>` after each step and the
    /// final state out.
    #[command(hide = true)]
    OptimizerSteps {
        #[arg(long)]
        inputs: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Tokenize a prompt with a tokenizer folder, as training does (parity checks): JSON
    /// `{"input_ids": [...], "attention_mask": [...]}` on stdout.
    #[command(hide = true)]
    Tokenize {
        /// A transformers CLIPTokenizer folder.
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        prompt: String,
        /// Pad or truncate to this many tokens (default: the tokenizer's model_max_length).
        #[arg(long)]
        max_length: Option<usize>,
    },
    /// DreamBooth's metrics for a folder of generated images against the real ones: DINO, CLIP-I, CLIP-T.
    Eval(EvalArgs),
    /// List a .h5 or .safetensors file's tensors and its detected model kind.
    Inspect {
        file: PathBuf,
        /// Force the Stable Diffusion version (1 or 2) instead of detecting it.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
        sd_version: Option<u8>,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct EvalArgs {
    #[command(subcommand)]
    bench: Option<EvalBench>,
    /// Folder of generated images.
    #[arg(long, required = true)]
    generated: Option<PathBuf>,
    /// Folder of the subject's real images.
    #[arg(long, required = true)]
    real: Option<PathBuf>,
    /// The prompt of every generated image (for CLIP-T; write it with the class noun, without the identifier).
    #[arg(long, conflicts_with = "prompts")]
    prompt: Option<String>,
    /// A JSON object mapping generated file names to their prompts.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// CLIP model (transformers CLIPModel folder or Hub repo id; e.g. openai/clip-vit-large-patch14).
    #[arg(long, default_value = "openai/clip-vit-base-patch32")]
    clip_model: PathBuf,
    /// DINO ViT model (transformers ViTModel folder or Hub repo id).
    #[arg(long, default_value = "facebook/dino-vits16")]
    dino_model: PathBuf,
    /// Write the report (scores, conventions, preprocessing, per image) as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Refuse unreadable images instead of skipping them (each skipped one is named).
    #[arg(long)]
    strict: bool,
    /// Images per model call.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Subcommand)]
enum EvalBench {
    /// The DreamBooth paper's benchmark on a local copy of its dataset: generate, score, print the table.
    Dreambench(DreambenchArgs),
}

#[derive(Args)]
struct DreambenchArgs {
    /// The DreamBooth dataset folder (30 subject folders and prompts_and_classes.txt).
    #[arg(long)]
    dataset: PathBuf,
    /// The model (diffusers folder, Hub repo id or single file); `{subject}` in it names one per subject.
    #[arg(long)]
    model: String,
    /// A LoRA file applied to the model (`{subject}` as in --model).
    #[arg(long)]
    lora: Option<String>,
    /// Only these subjects (folder names).
    #[arg(long, num_args = 1..)]
    subjects: Vec<String>,
    /// The identifier the models were trained with.
    #[arg(long, default_value = "sks")]
    identifier: String,
    /// Images per prompt and subject (the paper: 4).
    #[arg(long, default_value_t = 4)]
    images_per_prompt: usize,
    /// Image size in pixels.
    #[arg(long, default_value_t = 512)]
    resolution: usize,
    /// Sampler steps per image.
    #[arg(long, default_value_t = 25)]
    steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 7.5)]
    guidance_scale: f64,
    /// The sampler, by diffusers' class name.
    #[arg(long, value_enum, default_value = "DPMSolverMultistepScheduler")]
    scheduler: dreambridge::generate::scheduler::SchedulerKind,
    /// Seed of the per-image noise streams.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the generated images go (kept: a rerun generates only what is missing).
    #[arg(long)]
    out: PathBuf,
    /// CLIP model (transformers CLIPModel folder or Hub repo id).
    #[arg(long, default_value = "openai/clip-vit-base-patch32")]
    clip_model: PathBuf,
    /// DINO ViT model (transformers ViTModel folder or Hub repo id).
    #[arg(long, default_value = "facebook/dino-vits16")]
    dino_model: PathBuf,
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct ConvertArgs {
    #[command(subcommand)]
    direction: Option<Direction>,
    /// Many conversions: a JSON-lines file, one object per row with `"command"` (a direction
    /// below, e.g. "keras-to-diffusers") and its flags (each row with its own `out`; rows whose
    /// output exists are skipped). Runs the row --index, JOB_COMPLETION_INDEX or
    /// SLURM_ARRAY_TASK_ID names, or every row in turn.
    #[arg(long, required = true)]
    manifest: Option<PathBuf>,
    /// The manifest row to run (0-based; default: the job array's index variable, else all rows).
    #[arg(long)]
    index: Option<usize>,
}

#[derive(Subcommand)]
enum Direction {
    /// diffusers folder -> one single-file checkpoint in the original SD layout (A1111, ComfyUI);
    /// a Stable Diffusion 3 folder -> Stability's SD3 single file (with T5 when the folder has it); an SDXL
    /// (StableDiffusionXLPipeline) folder -> Stability's SDXL base single file.
    DiffusersToSingleFile {
        /// The diffusers pipeline folder (or Hub repo id).
        #[arg(long)]
        model: PathBuf,
        /// The .safetensors file to write (a v-prediction model also gets `<name>.yaml` beside it).
        #[arg(long)]
        out: PathBuf,
        /// Write fp16 tensors.
        #[arg(long)]
        half: bool,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// One single-file checkpoint (.safetensors, or a .ckpt/.pt read without running pickled code) -> diffusers folder
    /// (a Stability SD3 / SD3.5 file -> a StableDiffusion3Pipeline folder; an SDXL base file -> a
    /// StableDiffusionXLPipeline folder).
    SingleFileToDiffusers(SingleFileToDiffusers),
    /// KerasCV .h5 files, or a KerasHub SD3 input (--preset, or the MMDiT alone as --unet) -> one single-file
    /// checkpoint, directly (parts not given come from --base).
    KerasToSingleFile(KerasToSingleFile),
    /// One single-file checkpoint -> KerasCV legacy .h5 files (diffusion_model.h5, text_encoder.h5, image_encoder.h5, decoder.h5);
    /// Stability's SD3 file -> a KerasHub preset folder, or its MMDiT alone with `--out <name>.weights.h5`.
    SingleFileToKeras {
        /// The checkpoint: a local file, `hf://owner/repo/file[@rev]` or a Hub resolve URL.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Output folder for the .h5 files (SD3: the preset folder, or a `.weights.h5` file for the MMDiT alone).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        read: SingleFileRead,
        /// Replace an existing output folder.
        #[arg(long)]
        force: bool,
        /// SD3 (KerasHub): weights above this many GB (2^30 bytes) are written as Keras shards.
        #[arg(long, default_value_t = dreambridge::convert::sd3_to_keras::DEFAULT_MAX_SHARD_GB)]
        max_shard_size: f64,
    },
    /// KerasCV .h5 / .weights.h5 files -> diffusers folder (runs the embedded sample when no file is given).
    KerasToDiffusers(KerasToDiffusers),
    /// diffusers folder -> KerasCV legacy .h5 files (diffusion_model.h5, text_encoder.h5, image_encoder.h5, decoder.h5);
    /// a Stable Diffusion 3 folder -> a KerasHub preset folder, or its MMDiT alone with `--out <name>.weights.h5`.
    DiffusersToKeras {
        /// The diffusers pipeline folder (or Hub repo id).
        #[arg(long)]
        model: PathBuf,
        /// Output folder for the .h5 files (SD3: the preset folder, or a `.weights.h5` file for the MMDiT alone).
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing output folder.
        #[arg(long)]
        force: bool,
        /// Force the Stable Diffusion version (1 or 2) instead of detecting it.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
        sd_version: Option<u8>,
        /// SD3 (KerasHub): weights above this many GB (2^30 bytes, as Keras counts) are written as
        /// Keras shards (`model.weights.json` + `model_NNNNN.weights.h5`), as keras-hub's
        /// `save_to_preset` does.
        #[arg(long, default_value_t = dreambridge::convert::sd3_to_keras::DEFAULT_MAX_SHARD_GB)]
        max_shard_size: f64,
    },
}

#[derive(Args)]
struct GenerateArgs {
    /// Diffusers pipeline folder, Hub repo id, or a single-file checkpoint (local, `hf://…` or a resolve URL).
    #[arg(long)]
    model: PathBuf,
    /// The sampler, by diffusers' class name (aliases: ddim, dpm++, euler_a).
    #[arg(long, value_enum, default_value = "DDIMScheduler")]
    scheduler: dreambridge::generate::scheduler::SchedulerKind,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// What the image should not show (the unconditional side of classifier-free guidance).
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Sampler steps (diffusers: --num_inference_steps).
    #[arg(long, alias = "num-inference-steps", default_value_t = 30)]
    steps: usize,
    /// Classifier-free guidance scale (1 = no guidance).
    #[arg(long, default_value_t = 7.5)]
    guidance_scale: f64,
    /// Image size in pixels (a multiple of 8); default: the model's (the UNet's `sample_size`
    /// times 8: 512 for SD 1.5, 768 for SD 2 768-v, 1024 for SDXL).
    #[arg(long)]
    size: Option<usize>,
    /// diffusers' --height; it must equal --width (square images).
    #[arg(long)]
    height: Option<usize>,
    /// diffusers' --width; it must equal --height (square images).
    #[arg(long)]
    width: Option<usize>,
    /// How many images (diffusers: --num_images_per_prompt).
    #[arg(long, alias = "num-images-per-prompt", default_value_t = 1)]
    num_images: usize,
    /// Seed of the initial noise (image n uses the n-th draw).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder for image_<n>.png (created if missing; existing images are not overwritten).
    #[arg(long)]
    out: PathBuf,
    /// auto (GPU when this is a CUDA build and one is present), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// A LoRA file (diffusers, PEFT or kohya format) to apply; repeatable.
    #[arg(long)]
    lora: Vec<PathBuf>,
    /// Strength of each --lora (one for all, or one per file; default 1).
    #[arg(long)]
    lora_scale: Vec<f64>,
    /// Parity checks: initial latents (`latents` in a safetensors file) instead of drawn noise.
    #[arg(long, hide = true, requires = "trace")]
    init_latents: Option<PathBuf>,
    /// Parity checks: write the embeddings, every step's latents and the images to this
    /// safetensors file instead of PNGs.
    #[arg(long, hide = true, requires = "init_latents")]
    trace: Option<PathBuf>,
}

#[derive(Args)]
struct PushArgs {
    /// The pipeline folder to publish.
    dir: PathBuf,
    /// Target repository, `namespace/name`.
    #[arg(long)]
    repo: String,
    /// Access token (else HF_TOKEN, else the token file `huggingface-cli login` writes).
    #[arg(long)]
    token: Option<String>,
    /// Create the repository as private.
    #[arg(long)]
    private: bool,
    /// Branch to commit to (created from main when missing).
    #[arg(long)]
    revision: Option<String>,
    /// Folder inside the repository to upload into.
    #[arg(long)]
    path_in_repo: Option<String>,
    /// Commit message.
    #[arg(long)]
    commit_message: Option<String>,
    /// For the model card: the model this one was trained from.
    #[arg(long)]
    base_model: Option<String>,
    /// For the model card: the DreamBooth instance prompt.
    #[arg(long)]
    instance_prompt: Option<String>,
    /// For the model card: license (default creativeml-openrail-m).
    #[arg(long)]
    license: Option<String>,
}

/// How a single file is read.
#[derive(Args, Clone)]
struct SingleFileRead {
    /// Use the UNet's EMA weights (`model_ema.*`) instead of the live ones.
    #[arg(long)]
    ema: bool,
    /// Force the Stable Diffusion version (1 or 2) instead of detecting it.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    sd_version: Option<u8>,
    /// Force the prediction type instead of detecting it (sidecar .yaml, v_pred key, metadata, weights).
    #[arg(long, value_enum)]
    prediction_type: Option<dreambridge::single_file::detect::PredictionType>,
}

impl SingleFileRead {
    fn options(&self) -> dreambridge::single_file::ReadOptions {
        dreambridge::single_file::ReadOptions { ema: self.ema, sd_version: self.sd_version, prediction: self.prediction_type }
    }
}

#[derive(Args)]
struct SingleFileToDiffusers {
    /// The checkpoint: a local file, `hf://owner/repo/file[@rev]` or a Hub resolve URL.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Output pipeline folder.
    #[arg(long)]
    out: PathBuf,
    /// A diffusers folder (or Hub repo id) giving configs, tokenizer, scheduler and any part the file lacks
    /// (default: the embedded SD1/SD2/SDXL/SD3 configs, derived from the weights; an SD3 file with T5 needs one for T5's
    /// config and tokenizer).
    #[arg(long)]
    base: Option<PathBuf>,
    #[command(flatten)]
    read: SingleFileRead,
    /// Write fp16 weights with diffusers' `fp16` variant names.
    #[arg(long)]
    half: bool,
    /// Replace an existing output folder.
    #[arg(long)]
    force: bool,
}

/// The four KerasCV files of a conversion, in any form and place they come in.
#[derive(Args)]
struct KerasFiles {
    /// KerasHub Stable Diffusion 3: a preset folder (config.json + model.weights.h5), a whole
    /// StableDiffusion3Backbone .weights.h5, or the MMDiT alone (`backbone.diffuser.save_weights`,
    /// the keras.io SD3 DreamBooth output; the rest from --base); local, hf://owner/repo/file or a repo id.
    #[arg(long, conflicts_with_all = ["unet", "text_encoder", "vae_encoder", "vae_decoder"])]
    preset: Option<PathBuf>,
    /// KerasCV DiffusionModel / DiffusionModelV2 weights (.h5, .weights.h5, .keras, TF checkpoint, SavedModel folder; or hf://owner/repo/file, a resolve URL, a Hub repo id).
    #[arg(long)]
    unet: Option<PathBuf>,
    /// KerasCV TextEncoder / TextEncoderV2 weights (any form --unet takes).
    #[arg(long)]
    text_encoder: Option<PathBuf>,
    /// KerasCV ImageEncoder (VAE encoder) weights (any form --unet takes).
    #[arg(long)]
    vae_encoder: Option<PathBuf>,
    /// KerasCV Decoder (VAE decoder) weights (any form --unet takes).
    #[arg(long)]
    vae_decoder: Option<PathBuf>,
}

impl KerasFiles {
    /// As given (for model cards).
    fn specs(&self) -> Vec<String> {
        [&self.preset, &self.unet, &self.text_encoder, &self.vae_encoder, &self.vae_decoder].into_iter().flatten().map(|p| p.display().to_string()).collect()
    }

    /// The KerasHub SD3 input: `--preset`, or a `--unet` that is KerasHub's MMDiT (the keras.io
    /// SD3 DreamBooth file), fetched and matched.
    fn keras_hub(&self) -> Result<Option<dreambridge::convert::kerashub::Sd3Keras>> {
        let path = match (&self.preset, &self.unet) {
            (Some(p), _) => dreambridge::hub::download::local_file_or_hub(p)?,
            (None, Some(u)) if self.text_encoder.is_none() && self.vae_encoder.is_none() && self.vae_decoder.is_none() => {
                let local = dreambridge::hub::download::keras_input(u)?;
                if !dreambridge::convert::kerashub::is_sd3(&local) {
                    return Ok(None);
                }
                local
            }
            _ => return Ok(None),
        };
        dreambridge::convert::kerashub::open(&path).map(Some)
    }

    /// Local paths, Hub files and repos downloaded first.
    fn fetch(&self) -> Result<KerasInputs> {
        let fetch = |p: &Option<PathBuf>| p.as_deref().map(dreambridge::hub::download::keras_input).transpose();
        Ok(KerasInputs { unet: fetch(&self.unet)?, text_encoder: fetch(&self.text_encoder)?, vae_encoder: fetch(&self.vae_encoder)?, vae_decoder: fetch(&self.vae_decoder)? })
    }
}

#[derive(Args)]
struct KerasToSingleFile {
    #[command(flatten)]
    files: KerasFiles,
    /// A diffusers folder, Hub repo id or single file supplying the parts not given (SD3: an SD3 folder or SD3 single file).
    #[arg(long)]
    base: Option<PathBuf>,
    /// The .safetensors file to write.
    #[arg(long)]
    out: PathBuf,
    /// Write fp16 tensors.
    #[arg(long)]
    half: bool,
    /// Replace an existing file.
    #[arg(long)]
    force: bool,
    /// Force the Stable Diffusion version (1 or 2) instead of detecting it.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    sd_version: Option<u8>,
    /// The model's prediction type (default: the base's, else epsilon).
    #[arg(long, value_enum)]
    prediction_type: Option<dreambridge::single_file::detect::PredictionType>,
}

#[derive(Args)]
struct KerasToDiffusers {
    #[command(flatten)]
    files: KerasFiles,
    /// A diffusers pipeline folder, or a Hub repo id, supplying the parts not given (tokenizer, scheduler, ...).
    #[arg(long)]
    base: Option<PathBuf>,
    /// Publish the result to this Hub repo (`namespace/name`) after converting.
    #[arg(long, value_name = "REPO")]
    push_to_hub: Option<String>,
    /// Textual inversion: the token of each text-encoder row beyond CLIP's 49408, in row order (repeatable).
    #[arg(long)]
    placeholder_token: Vec<String>,
    /// Also write the learned rows as diffusers learned-embeds files (`{token: [dim]}`, for `load_textual_inversion`).
    #[arg(long, value_name = "FILE")]
    learned_embeds: Option<PathBuf>,
    /// Convert the embedded tiny SD1 sample (the default when no file is given).
    #[arg(long)]
    sample: bool,
    /// Output pipeline folder.
    #[arg(long)]
    out: PathBuf,
    /// Write fp16 weights with diffusers' `fp16` variant names (load with variant="fp16").
    #[arg(long)]
    half: bool,
    /// Replace an existing output folder.
    #[arg(long)]
    force: bool,
    /// Force the Stable Diffusion version (1 or 2) instead of detecting it.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    sd_version: Option<u8>,
}

/// The words of a command line after the subcommand, without `--manifest` and `--index`.
fn common_flags(argv: &[std::ffi::OsString]) -> Vec<String> {
    let words: Vec<String> = argv.iter().skip(2).map(|w| w.to_string_lossy().to_string()).collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let w = &words[i];
        if w == "--manifest" || w == "--index" {
            i += 2;
            continue;
        }
        if !w.starts_with("--manifest=") && !w.starts_with("--index=") {
            out.push(w.clone());
        }
        i += 1;
    }
    out
}

/// Runs a manifest's rows as `dreambridge <command> <common flags> <row flags>`; the process
/// exits with the manifest's status (0, retryable 75, else 1).
fn run_manifest(path: &std::path::Path, index: Option<usize>, kind: dreambridge::scale::manifest::RowKind, command: &str, argv: &[std::ffi::OsString]) -> Result<()> {
    use dreambridge::scale::{launch, manifest};
    let m = manifest::Manifest::read(path)?;
    let index = launch::row_index(index, &launch::process_env)?;
    if let Some((from, i)) = &index {
        eprintln!("{}: row {i} ({from})", path.display());
    }
    let common = common_flags(argv);
    let outcomes = manifest::run_rows(&m, index.map(|(_, i)| i), kind, |i, flags| {
        let mut words: Vec<String> = vec!["dreambridge".into()];
        match kind {
            manifest::RowKind::Train => words.push(command.into()),
            manifest::RowKind::Convert => {
                let direction = m.rows[i].1.get("command").and_then(|v| v.as_str()).context("a conversion row needs \"command\" (e.g. \"keras-to-diffusers\")")?;
                words.extend(["convert".to_string(), direction.to_string()]);
            }
        }
        words.extend(common.iter().cloned());
        words.extend(flags.into_iter().filter(|f| !f.starts_with("--command=")));
        let os: Vec<std::ffi::OsString> = words.iter().map(Into::into).collect();
        let cli = Cli::try_parse_from(kebab_flags(os.clone().into_iter())).map_err(|e| anyhow::anyhow!("{}", e.render().to_string().lines().next().unwrap_or("bad flags").trim_start_matches("error: ")))?;
        run(cli, &os)
    })?;
    let status = dreambridge::scale::manifest::exit_status(&outcomes);
    if status != 0 {
        return Err(ManifestFailed(status).into());
    }
    Ok(())
}

/// Some manifest rows failed (each was reported); the process exits with this status.
#[derive(Debug)]
struct ManifestFailed(u8);

impl std::fmt::Display for ManifestFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "manifest rows failed ({})", if self.0 == dreambridge::failure::RETRYABLE_EXIT { "all retryable" } else { "some permanently" })
    }
}

impl std::error::Error for ManifestFailed {}

fn run(cli: Cli, argv: &[std::ffi::OsString]) -> Result<()> {
    match cli.command {
        Command::Push(a) => {
            let card = dreambridge::hub::model_card::CardInfo { repo_id: a.repo.clone(), base_model: a.base_model, instance_prompt: a.instance_prompt, license: a.license, ..Default::default() };
            let opts = dreambridge::hub::push::PushOptions {
                repo: a.repo.clone(),
                endpoint: None,
                token: a.token,
                private: a.private,
                revision: a.revision,
                path_in_repo: a.path_in_repo,
                commit_message: a.commit_message,
                card,
            };
            let done = dreambridge::hub::push::push(&a.dir, &opts)?;
            println!(
                "pushed {} as commit {} ({} LFS files sent, {} already stored, {} regular files, {} unchanged)",
                a.repo, done.commit, done.uploaded_lfs, done.skipped_lfs, done.regular, done.unchanged
            );
        }
        Command::Forward { component, model, lora, lora_scale, inputs, out, device } => {
            dreambridge::models::forward::run(&component, &model, &lora, &lora_scale, &inputs, &out, &dreambridge::device::parse(&device)?)?
        }
        Command::Train(a) | Command::TrainLora(a) if a.manifest.is_some() => {
            let command = argv.get(1).map_or("train".into(), |c| c.to_string_lossy().to_string());
            run_manifest(a.manifest.as_deref().expect("checked"), a.index, dreambridge::scale::manifest::RowKind::Train, &command, argv)?
        }
        Command::Train(a) => dreambridge::train::cli::run(*a, dreambridge::train::cli::Script::DreamBooth)?,
        Command::TrainLora(a) => dreambridge::train::cli::run(*a, dreambridge::train::cli::Script::DreamBoothLora)?,
        Command::Convert(ConvertArgs { direction: None, manifest, index }) => {
            run_manifest(&manifest.context("convert needs a direction or --manifest")?, index, dreambridge::scale::manifest::RowKind::Convert, "convert", argv)?
        }
        Command::Generate(a) => {
            let size = match (a.height, a.width) {
                (None, None) => a.size,
                (Some(h), Some(w)) if h == w => Some(h),
                (Some(s), None) | (None, Some(s)) => Some(s),
                (Some(h), Some(w)) => anyhow::bail!("--height {h} and --width {w}: only square images are generated for now"),
            };
            let model = dreambridge::single_file::base::resolve_base(&a.model)?;
            let pipe = dreambridge::pipeline::Pipeline::load(&model, &dreambridge::device::parse(&a.device)?)?;
            let size = size.unwrap_or_else(|| pipe.default_size());
            anyhow::ensure!(size % 8 == 0 && size >= 8, "--size {size}: must be a multiple of 8");
            dreambridge::lora::merge::merge_files_into_vars(&a.lora, &a.lora_scale, Some(&pipe.unet_vars), Some(&pipe.text_vars))?;
            if let (Some(init), Some(trace)) = (&a.init_latents, &a.trace) {
                let sampling = dreambridge::generate::text_to_image::Sampling { size, steps: a.steps, guidance: a.guidance_scale, kind: a.scheduler };
                return dreambridge::generate::trajectory::trace_generation(&pipe, &a.prompt, &a.negative_prompt, &sampling, init, trace);
            }
            std::fs::create_dir_all(&a.out).with_context(|| format!("{}: cannot create", a.out.display()))?;
            let mut rng = dreambridge::rng::TrainRng::new(a.seed);
            for i in 0..a.num_images {
                let path = a.out.join(format!("image_{i}.png"));
                anyhow::ensure!(!path.exists(), "{}: already exists", path.display());
                let image =
                    dreambridge::generate::text_to_image::generate_with(&pipe, &a.prompt, &a.negative_prompt, size, a.steps, a.guidance_scale, a.scheduler, &mut rng)?;
                dreambridge::generate::text_to_image::save_png(&image, &path)?;
                println!("{}", path.display());
            }
        }
        Command::Tokenize { tokenizer, prompt, max_length } => {
            let tok = dreambridge::pipeline::prompt::PromptTokenizer::load(&tokenizer)?;
            let (ids, mask) = tok.encode_to(&prompt, max_length.unwrap_or(tok.max_length));
            println!("{}", serde_json::json!({"input_ids": ids, "attention_mask": mask}));
        }
        Command::SamplerSteps { scheduler, config, steps, inputs, out } => dreambridge::generate::trajectory::run(scheduler, &config, steps, &inputs, &out)?,
        Command::OptimizerSteps { inputs, out } => dreambridge::train::adamw8bit::run_trajectory(&inputs, &out)?,
        Command::Eval(EvalArgs { bench: Some(EvalBench::Dreambench(b)), .. }) => {
            use dreambridge::eval::{clip::Clip, dino::Dino, dreambench};
            let device = dreambridge::device::parse(&b.device)?;
            let opts = dreambench::BenchOptions {
                dataset: b.dataset,
                model: b.model,
                lora: b.lora,
                subjects: b.subjects,
                identifier: b.identifier,
                images_per_prompt: b.images_per_prompt,
                resolution: b.resolution,
                steps: b.steps,
                guidance: b.guidance_scale,
                scheduler: b.scheduler,
                seed: b.seed,
                out: b.out,
                device: device.clone(),
            };
            dreambench::plan(&opts)?;
            let clip = Clip::load(&dreambridge::hub::download::local_or_hub(&b.clip_model)?, &device)?;
            let dino = Dino::load(&dreambridge::hub::download::local_or_hub(&b.dino_model)?, &device)?;
            let report = dreambench::run(&opts, &clip, &dino)?;
            print!("{}", dreambench::table(&report));
            if let Some(path) = &b.json {
                dreambridge::output::atomic_file(path, |temp| Ok(std::fs::write(temp, serde_json::to_string_pretty(&report)?)?))?;
            }
        }
        Command::Eval(a) => {
            use dreambridge::eval::{clip::Clip, dino::Dino, preprocess::image_files, score};
            let (generated_dir, real_dir) = (a.generated.clone().context("--generated")?, a.real.clone().context("--real")?);
            let device = dreambridge::device::parse(&a.device)?;
            let prompts = match (&a.prompt, &a.prompts) {
                (Some(p), _) => Some([("*".to_string(), p.clone())].into_iter().collect()),
                (None, Some(f)) => Some(serde_json::from_str(&std::fs::read_to_string(f).with_context(|| f.display().to_string())?).with_context(|| format!("{}: not a JSON object of file name -> prompt", f.display()))?),
                (None, None) => None,
            };
            let clip = Clip::load(&dreambridge::hub::download::local_or_hub(&a.clip_model)?, &device)?;
            let dino = Dino::load(&dreambridge::hub::download::local_or_hub(&a.dino_model)?, &device)?;
            let (generated, real) = (image_files(&generated_dir)?, image_files(&real_dir)?);
            let inputs = score::EvalInputs { generated: &generated, real: &real, prompts, strict: a.strict, batch: a.batch_size };
            let report = score::evaluate(&inputs, &clip, &dino, &device)?;
            let m = &report["metrics"];
            let f = |v: &serde_json::Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.4}"));
            println!("{:<10}{:>10}{:>10}{:>10}", "", "DINO", "CLIP-I", "CLIP-T");
            println!("{:<10}{:>10}{:>10}{:>10}", "ours", f(&m["dino"]), f(&m["clip_i"]), f(&m["clip_t"]));
            println!("{:<10}{:>10}{:>10}{:>10}", "paper SD", "0.668", "0.803", "0.305");
            println!("({} generated x {} real images; raw cosine, all pairs)", report["generated"], report["real"]);
            if let Some(path) = &a.json {
                dreambridge::output::atomic_file(path, |temp| Ok(std::fs::write(temp, serde_json::to_string_pretty(&report)?)?))?;
            }
        }
        Command::Bench(cmd) => dreambridge::bench::cli::run(cmd)?,
        Command::Lora(cmd) => dreambridge::lora::cli::run(cmd)?,
        Command::Download { repo, revision } => {
            println!("{}", dreambridge::hub::download::snapshot(&repo, revision.as_deref())?.display());
        }
        Command::Inspect { file, sd_version } => print!("{}", dreambridge::inspect::inspect(&file, sd_version)?),
        Command::Convert(ConvertArgs { direction: Some(Direction::KerasToDiffusers(a)), .. }) if a.files.preset.is_some() || a.files.unet.is_some() => {
            let sources = a.files.specs();
            let Some(sd3) = a.files.keras_hub()? else {
                return run_keras_to_diffusers(a);
            };
            anyhow::ensure!(a.placeholder_token.is_empty() && a.learned_embeds.is_none(), "--placeholder-token and --learned-embeds are for KerasCV text encoders, not KerasHub SD3");
            anyhow::ensure!(a.sd_version.is_none(), "--sd-version is for KerasCV SD1/SD2 files; a KerasHub SD3 input's variant is read from its weights");
            eprintln!("{}: {}", sd3.path.display(), sd3.describe());
            let base = a.base.as_deref().map(dreambridge::hub::download::local_or_hub).transpose()?;
            let opts = ToDiffusersOptions { base, out: a.out.clone(), half: a.half, force: a.force, ..Default::default() };
            let done = dreambridge::convert::sd3_to_diffusers::sd3_to_diffusers(&sd3, &opts)?;
            println!("converted {} -> {}", done.kinds.join(", "), done.out.display());
            if !done.complete_pipeline {
                println!("note: the MMDiT alone (transformer/ only); give --base (a diffusers SD3 folder or Hub repo) for a complete pipeline");
            }
            push_converted(&a, &done, sources)?;
        }
        Command::Convert(ConvertArgs { direction: Some(Direction::KerasToDiffusers(a)), .. }) => run_keras_to_diffusers(a)?,
        Command::Convert(ConvertArgs { direction: Some(Direction::DiffusersToSingleFile { model, out, half, force }), .. }) => {
            use dreambridge::single_file::convert::{diffusers_to_single_file, ExportOptions};
            let model = dreambridge::hub::download::local_or_hub(&model)?;
            if dreambridge::single_file::sd3::is_sd3_folder(&model) {
                let done = dreambridge::single_file::sd3::diffusers_to_single_file(&model, &ExportOptions { out, half, force })?;
                print_sd3_exported(&done);
                return Ok(());
            }
            if dreambridge::single_file::sdxl::is_sdxl_folder(&model) {
                let done = dreambridge::single_file::sdxl::diffusers_to_single_file(&model, &ExportOptions { out, half, force })?;
                println!("wrote {} tensors (SDXL base: {}) -> {}", done.tensors, done.parts.join(", "), done.out.display());
                return Ok(());
            }
            let done = diffusers_to_single_file(&model, &ExportOptions { out, half, force })?;
            print_exported(&done);
        }
        Command::Convert(ConvertArgs { direction: Some(Direction::KerasToSingleFile(a)), .. }) => {
            use dreambridge::single_file::convert::{keras_to_single_file, ExportOptions};
            let base = a.base.as_deref().map(dreambridge::hub::download::local_file_or_hub).transpose()?;
            let opts = ExportOptions { out: a.out.clone(), half: a.half, force: a.force };
            if let Some(sd3) = a.files.keras_hub()? {
                anyhow::ensure!(a.sd_version.is_none() && a.prediction_type.is_none(), "--sd-version and --prediction-type are for KerasCV SD1/SD2 files; a KerasHub SD3 input's variant is read from its weights");
                eprintln!("{}: {}", sd3.path.display(), sd3.describe());
                let done = dreambridge::single_file::sd3::keras_to_single_file(&sd3, base.as_deref(), &opts)?;
                print_sd3_exported(&done);
                return Ok(());
            }
            let inputs = a.files.fetch()?;
            let done = keras_to_single_file(&inputs, base.as_deref(), a.sd_version, a.prediction_type, &opts)?;
            print_exported(&done);
        }
        Command::Convert(ConvertArgs { direction: Some(Direction::SingleFileToDiffusers(a)), .. }) => {
            use dreambridge::single_file::convert::{describe_prediction, single_file_to_diffusers, ToFolderOptions};
            let checkpoint = dreambridge::hub::download::local_file_or_hub(&a.checkpoint)?;
            let base = a.base.as_deref().map(dreambridge::hub::download::local_or_hub).transpose()?;
            if dreambridge::single_file::sd3::is_sd3_file(&checkpoint) {
                use dreambridge::single_file::sd3::{single_file_to_diffusers, Sd3ToFolderOptions};
                anyhow::ensure!(
                    !a.read.ema && a.read.sd_version.is_none() && a.read.prediction_type.is_none(),
                    "{}: a Stable Diffusion 3 single file; --ema, --sd-version and --prediction-type are for SD1/SD2 files",
                    checkpoint.display()
                );
                let done = single_file_to_diffusers(&checkpoint, &Sd3ToFolderOptions { base, out: a.out, half: a.half, force: a.force })?;
                println!("converted {} single file ({}) -> {}", done.variant.name(), done.from_file.join(", "), done.out.display());
                if !done.from_base.is_empty() {
                    println!("from --base: {}", done.from_base.join(", "));
                }
                return Ok(());
            }
            if dreambridge::single_file::sdxl::is_sdxl_file(&checkpoint) {
                use dreambridge::single_file::sdxl::{single_file_to_diffusers, SdxlToFolderOptions};
                anyhow::ensure!(
                    !a.read.ema && a.read.sd_version.is_none() && a.read.prediction_type.is_none(),
                    "{}: an SDXL single file; --ema, --sd-version and --prediction-type are for SD1/SD2 files",
                    checkpoint.display()
                );
                let done = single_file_to_diffusers(&checkpoint, &SdxlToFolderOptions { base, out: a.out, half: a.half, force: a.force })?;
                println!("converted SDXL base single file ({}) -> {}", done.from_file.join(", "), done.out.display());
                if !done.from_base.is_empty() {
                    println!("from --base: {}", done.from_base.join(", "));
                }
                return Ok(());
            }
            let opts = ToFolderOptions { read: a.read.options(), base, out: a.out, half: a.half, force: a.force };
            let done = single_file_to_diffusers(&checkpoint, &opts)?;
            println!(
                "converted SD {} single file ({}; prediction {}) -> {}",
                done.sd_version,
                done.from_file.join(", "),
                describe_prediction(&done.prediction),
                done.out.display()
            );
            if !done.from_base.is_empty() {
                println!("from --base: {}", done.from_base.join(", "));
            }
        }
        Command::Convert(ConvertArgs { direction: Some(Direction::SingleFileToKeras { checkpoint, out, read, force, max_shard_size }), .. }) => {
            let checkpoint = dreambridge::hub::download::local_file_or_hub(&checkpoint)?;
            if dreambridge::single_file::sd3::is_sd3_file(&checkpoint) {
                let done = dreambridge::convert::sd3_to_keras::single_file_to_keras(&checkpoint, &out, force, max_shard_size)?;
                println!("{} -> {} (KerasHub)", done.parts.join(", "), done.out.display());
                return Ok(());
            }
            let done = dreambridge::single_file::convert::single_file_to_keras(&checkpoint, &read.options(), &out, force)?;
            for (kind, name) in &done.files {
                println!("{kind} -> {}", done.out.join(name).display());
            }
        }
        Command::Convert(ConvertArgs { direction: Some(Direction::DiffusersToKeras { model, out, force, sd_version, max_shard_size }), .. }) => {
            let local = if model.exists() { model.clone() } else { dreambridge::hub::download::local_or_hub(&model)? };
            if dreambridge::convert::sd3_to_keras::is_sd3_folder(&local) {
                anyhow::ensure!(sd_version.is_none(), "--sd-version is for SD1/SD2 folders, not Stable Diffusion 3");
                let done = dreambridge::convert::sd3_to_keras::sd3_to_keras_sharded(&local, &out, force, max_shard_size)?;
                println!("{} -> {} (KerasHub)", done.parts.join(", "), done.out.display());
                return Ok(());
            }
            let model = local;
            let done = diffusers_to_keras(&model, &out, force, sd_version)?;
            for (kind, name) in &done.files {
                println!("{kind} -> {}", done.out.join(name).display());
            }
        }
    }
    Ok(())
}

fn print_sd3_exported(done: &dreambridge::single_file::sd3::Sd3Exported) {
    println!("wrote {} tensors ({}: {}) -> {}", done.tensors, done.variant.name(), done.parts.join(", "), done.out.display());
}

fn print_exported(done: &dreambridge::single_file::convert::Exported) {
    println!(
        "wrote {} tensors (SD {}, {}) -> {}",
        done.tensors,
        done.sd_version,
        done.prediction.diffusers_name(),
        done.out.display()
    );
    if let Some(yaml) = &done.sidecar {
        println!("config for v-prediction -> {}", yaml.display());
    }
}

/// diffusers' scripts spell flags with underscores (`--pretrained_model_name_or_path=X`); every
/// flag here is also accepted so, by reading `_` in a flag's name (not in its value) as `-`.
fn kebab_flags(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    args.map(|a| match a.to_str() {
        Some(text) if text.starts_with("--") && text.len() > 2 => {
            let (name, value) = match text.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (text, None),
            };
            let name = format!("--{}", name[2..].replace('_', "-"));
            value.map_or(name.clone(), |v| format!("{name}={v}")).into()
        }
        _ => a,
    })
    .collect()
}

/// `convert keras-to-diffusers` on KerasCV files (or the embedded sample).
fn run_keras_to_diffusers(a: KerasToDiffusers) -> Result<()> {
    let sources = a.files.specs();
    let given = a.files.fetch()?;
    let nothing_given = given.unet.is_none() && given.text_encoder.is_none() && given.vae_encoder.is_none() && given.vae_decoder.is_none();
    let _sample_dir;
    let inputs = if a.sample || (nothing_given && a.base.is_none()) {
        anyhow::ensure!(nothing_given, "--sample cannot be combined with input files");
        eprintln!("no input files given: converting the embedded tiny KerasCV SD1 sample");
        let (dir, inputs) = dreambridge::sample::unpack()?;
        _sample_dir = dir;
        inputs
    } else {
        given
    };
    let base = a.base.as_deref().map(dreambridge::hub::download::local_or_hub).transpose()?;
    let opts = ToDiffusersOptions {
        base,
        out: a.out.clone(),
        half: a.half,
        force: a.force,
        sd_version: a.sd_version,
        placeholder_tokens: a.placeholder_token.clone(),
        learned_embeds: a.learned_embeds.clone(),
    };
    let done = keras_to_diffusers(&inputs, &opts)?;
    println!("converted {} -> {}", done.kinds.join(", "), done.out.display());
    for f in &done.learned_embeds {
        println!("learned embeds -> {}", f.display());
    }
    if !done.complete_pipeline {
        println!("note: not a complete pipeline (no model_index.json); give the missing parts or --base to get one");
    }
    push_converted(&a, &done, sources)
}

/// `--push-to-hub` after a conversion: the folder with a model card naming the sources.
fn push_converted(a: &KerasToDiffusers, done: &dreambridge::convert::to_diffusers::Converted, sources: Vec<String>) -> Result<()> {
    if let Some(repo) = &a.push_to_hub {
        let card = dreambridge::hub::model_card::CardInfo {
            repo_id: repo.clone(),
            base_model: a.base.as_ref().map(|b| b.display().to_string()),
            sources,
            placeholder_tokens: a.placeholder_token.clone(),
            ..Default::default()
        };
        let opts = dreambridge::hub::push::PushOptions { repo: repo.clone(), card, ..Default::default() };
        let pushed = dreambridge::hub::push::push(&done.out, &opts)?;
        println!("pushed {repo} as commit {}", pushed.commit);
    }
    Ok(())
}

fn main() -> ExitCode {
    dreambridge::alloc::keep_freed_memory();
    let argv = kebab_flags(std::env::args_os());
    let result = run(Cli::parse_from(argv.clone()), &argv);
    if dreambridge::convert::phases::enabled() {
        eprintln!("{}", dreambridge::convert::phases::report());
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(ManifestFailed(status)) = e.downcast_ref::<ManifestFailed>() {
                eprintln!("error: {e}");
                return ExitCode::from(*status);
            }
            eprintln!("error: {}", dreambridge::output::one_line(&e));
            match e.downcast_ref::<dreambridge::train::interrupt::Interrupted>() {
                Some(stopped) => {
                    if argv.iter().any(|w| w.to_string_lossy().starts_with("--manifest")) {
                        eprintln!("rerun the same command: finished rows are skipped and this row resumes from its checkpoint");
                    } else if stopped.checkpoint.is_some() {
                        eprintln!("resume with: {}", resume_command());
                    }
                    ExitCode::from(stopped.exit_code())
                }
                None if dreambridge::failure::is_retryable(&e) => ExitCode::from(dreambridge::failure::RETRYABLE_EXIT),
                None => ExitCode::FAILURE,
            }
        }
    }
}

/// This command line with `--resume-from-checkpoint latest` in place of any resume flag given.
fn resume_command() -> String {
    let mut words = Vec::new();
    let mut args = std::env::args();
    while let Some(arg) = args.next() {
        if arg == "--resume-from-checkpoint" {
            args.next();
        } else if !arg.starts_with("--resume-from-checkpoint=") {
            words.push(arg);
        }
    }
    words.extend(["--resume-from-checkpoint".into(), "latest".into()]);
    let quote = |w: &String| match w.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) && !w.is_empty() {
        true => w.clone(),
        false => format!("'{}'", w.replace('\'', r"'\''")),
    };
    words.iter().map(quote).collect::<Vec<_>>().join(" ")
}
