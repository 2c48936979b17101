//! Every Stable Diffusion DreamBooth command line of diffusers' `examples/dreambooth/README.md`
//! (diffusers 58eb52c), run as written with `accelerate launch train_dreambooth.py` replaced by
//! `dreambridge train` (`train_dreambooth_lora.py` by `dreambridge train-lora`; accelerate's own
//! `--mixed_precision` goes along), shrunk only in resolution, steps and class-image count,
//! against the tiny sample served as the README's base repos by the loopback Hub, `--push_to_hub`
//! included.

mod common;
use common::hub::{Hub, TOKEN};
use common::*;

/// "Dog toy example"
const DOG_TOY_EXAMPLE: &str = r#"export MODEL_NAME="CompVis/stable-diffusion-v1-4"
export INSTANCE_DIR="dog"
export OUTPUT_DIR="path-to-save-model"

accelerate launch train_dreambooth.py \
  --pretrained_model_name_or_path=$MODEL_NAME  \
  --instance_data_dir=$INSTANCE_DIR \
  --output_dir=$OUTPUT_DIR \
  --instance_prompt="a photo of sks dog" \
  --resolution=512 \
  --train_batch_size=1 \
  --gradient_accumulation_steps=1 \
  --learning_rate=5e-6 \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --max_train_steps=400 \
  --push_to_hub
"#;

/// "Training with prior-preservation loss"
const PRIOR_PRESERVATION: &str = r#"export MODEL_NAME="CompVis/stable-diffusion-v1-4"
export INSTANCE_DIR="dog"
export CLASS_DIR="path-to-class-images"
export OUTPUT_DIR="path-to-save-model"

accelerate launch train_dreambooth.py \
  --pretrained_model_name_or_path=$MODEL_NAME  \
  --instance_data_dir=$INSTANCE_DIR \
  --class_data_dir=$CLASS_DIR \
  --output_dir=$OUTPUT_DIR \
  --with_prior_preservation --prior_loss_weight=1.0 \
  --instance_prompt="a photo of sks dog" \
  --class_prompt="a photo of dog" \
  --resolution=512 \
  --train_batch_size=1 \
  --gradient_accumulation_steps=1 \
  --learning_rate=5e-6 \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --num_class_images=200 \
  --max_train_steps=800 \
  --push_to_hub
"#;

/// "Training on a 16GB GPU:"
const SIXTEEN_GB_GPU: &str = r#"export MODEL_NAME="CompVis/stable-diffusion-v1-4"
export INSTANCE_DIR="dog"
export CLASS_DIR="path-to-class-images"
export OUTPUT_DIR="path-to-save-model"

accelerate launch train_dreambooth.py \
  --pretrained_model_name_or_path=$MODEL_NAME  \
  --instance_data_dir=$INSTANCE_DIR \
  --class_data_dir=$CLASS_DIR \
  --output_dir=$OUTPUT_DIR \
  --with_prior_preservation --prior_loss_weight=1.0 \
  --instance_prompt="a photo of sks dog" \
  --class_prompt="a photo of dog" \
  --resolution=512 \
  --train_batch_size=1 \
  --gradient_accumulation_steps=2 --gradient_checkpointing \
  --use_8bit_adam \
  --learning_rate=5e-6 \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --num_class_images=200 \
  --max_train_steps=800 \
  --push_to_hub
"#;

/// "Training on a 12GB GPU:"
const TWELVE_GB_GPU: &str = r#"export MODEL_NAME="CompVis/stable-diffusion-v1-4"
export INSTANCE_DIR="dog"
export CLASS_DIR="path-to-class-images"
export OUTPUT_DIR="path-to-save-model"

accelerate launch train_dreambooth.py \
  --pretrained_model_name_or_path=$MODEL_NAME  \
  --instance_data_dir=$INSTANCE_DIR \
  --class_data_dir=$CLASS_DIR \
  --output_dir=$OUTPUT_DIR \
  --with_prior_preservation --prior_loss_weight=1.0 \
  --instance_prompt="a photo of sks dog" \
  --class_prompt="a photo of dog" \
  --resolution=512 \
  --train_batch_size=1 \
  --gradient_accumulation_steps=1 --gradient_checkpointing \
  --use_8bit_adam \
  --enable_xformers_memory_efficient_attention \
  --set_grads_to_none \
  --learning_rate=2e-6 \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --num_class_images=200 \
  --max_train_steps=800 \
  --push_to_hub
"#;

/// "Training on a 8 GB GPU:"
const EIGHT_GB_GPU: &str = r#"export MODEL_NAME="CompVis/stable-diffusion-v1-4"
export INSTANCE_DIR="dog"
export CLASS_DIR="path-to-class-images"
export OUTPUT_DIR="path-to-save-model"

accelerate launch --mixed_precision="fp16" train_dreambooth.py \
  --pretrained_model_name_or_path=$MODEL_NAME \
  --instance_data_dir=$INSTANCE_DIR \
  --class_data_dir=$CLASS_DIR \
  --output_dir=$OUTPUT_DIR \
  --with_prior_preservation --prior_loss_weight=1.0 \
  --instance_prompt="a photo of sks dog" \
  --class_prompt="a photo of dog" \
  --resolution=512 \
  --train_batch_size=1 \
  --sample_batch_size=1 \
  --gradient_accumulation_steps=1 --gradient_checkpointing \
  --learning_rate=5e-6 \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --num_class_images=200 \
  --max_train_steps=800 \
  --push_to_hub
"#;

/// "Fine-tune text encoder with the UNet."
const TEXT_ENCODER: &str = r#"export MODEL_NAME="CompVis/stable-diffusion-v1-4"
export INSTANCE_DIR="dog"
export CLASS_DIR="path-to-class-images"
export OUTPUT_DIR="path-to-save-model"

accelerate launch train_dreambooth.py \
  --pretrained_model_name_or_path=$MODEL_NAME  \
  --train_text_encoder \
  --instance_data_dir=$INSTANCE_DIR \
  --class_data_dir=$CLASS_DIR \
  --output_dir=$OUTPUT_DIR \
  --with_prior_preservation --prior_loss_weight=1.0 \
  --instance_prompt="a photo of sks dog" \
  --class_prompt="a photo of dog" \
  --resolution=512 \
  --train_batch_size=1 \
  --use_8bit_adam \
  --gradient_checkpointing \
  --learning_rate=2e-6 \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --num_class_images=200 \
  --max_train_steps=800 \
  --push_to_hub
"#;

/// "Training"
const LORA: &str = r#"export MODEL_NAME="stable-diffusion-v1-5/stable-diffusion-v1-5"
export INSTANCE_DIR="dog"
export OUTPUT_DIR="path-to-save-model"

accelerate launch train_dreambooth_lora.py \
  --pretrained_model_name_or_path=$MODEL_NAME  \
  --instance_data_dir=$INSTANCE_DIR \
  --output_dir=$OUTPUT_DIR \
  --instance_prompt="a photo of sks dog" \
  --resolution=512 \
  --train_batch_size=1 \
  --gradient_accumulation_steps=1 \
  --checkpointing_steps=100 \
  --learning_rate=1e-4 \
  --report_to="wandb" \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --max_train_steps=500 \
  --validation_prompt="A photo of sks dog in a bucket" \
  --validation_epochs=50 \
  --seed="0" \
  --push_to_hub
"#;

/// The README's command as dreambridge runs it: the launcher replaced, 64 px, 2 steps, 2 class images.
fn translated(block: &str) -> String {
    let mut text = block.replace("accelerate launch --mixed_precision=\"fp16\" train_dreambooth.py", "\"$DREAMBRIDGE\" train --mixed_precision=\"fp16\"");
    text = text.replace("accelerate launch train_dreambooth_lora.py", "\"$DREAMBRIDGE\" train-lora");
    text = text.replace("accelerate launch train_dreambooth.py", "\"$DREAMBRIDGE\" train");
    text = text.replace("--resolution=512", "--resolution=64").replace("--num_class_images=200", "--num_class_images=2");
    let words: Vec<String> = text
        .split(' ')
        .map(|w| match w.strip_prefix("--max_train_steps=") {
            Some(_) => "--max_train_steps=2".to_string(),
            None => w.to_string(),
        })
        .collect();
    words.join(" ")
}

fn run_readme_command(block: &str) {
    let script = translated(block);
    assert!(!script.contains("accelerate") && script.contains("--resolution=64"), "{script}");
    let hub = Hub::start();
    let work = tempfile::tempdir().unwrap();
    let sample = work.path().join("sample");
    let (ok, err) = run(&["convert", "keras-to-diffusers", "--out", sample.to_str().unwrap()]);
    assert!(ok, "{err}");
    for repo in ["CompVis/stable-diffusion-v1-4", "stable-diffusion-v1-5/stable-diffusion-v1-5"] {
        dreambridge::hub::push::push(&sample, &hub.opts(repo)).unwrap();
    }
    instance_images(&work.path().join("dog"));
    let out = std::process::Command::new("bash")
        .args(["-euc", &script])
        .current_dir(work.path())
        .env("DREAMBRIDGE", env!("CARGO_BIN_EXE_dreambridge"))
        .env("HF_ENDPOINT", &hub.url)
        .env("HF_TOKEN", TOKEN)
        .env("HF_HOME", work.path().join("hf-home"))
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script}\n{err}");
    let model = work.path().join("path-to-save-model");
    let lora = script.contains("train-lora");
    let weights = if lora { "pytorch_lora_weights.safetensors" } else { "unet/diffusion_pytorch_model.safetensors" };
    assert!(model.join(weights).is_file(), "{err}");
    if script.contains("--with_prior_preservation") {
        let class: Vec<_> = std::fs::read_dir(work.path().join("path-to-class-images")).unwrap().collect();
        assert_eq!(class.len(), 2, "two class images generated");
    }
    if script.contains("--use_8bit_adam") {
        assert!(err.contains("optimizer: AdamW8bit"), "{err}");
    }
    let events = std::fs::read_dir(model.join("logs/dreambooth")).unwrap().count();
    assert_eq!(events, 1, "one TensorBoard event file");
    // Pushed under the token's user, in a repo named after the output folder.
    let info = hub.json("/api/models/user/path-to-save-model/revision/main");
    let remote: Vec<String> = info["siblings"].as_array().unwrap().iter().map(|s| s["rfilename"].as_str().unwrap().to_string()).collect();
    assert!(remote.contains(&weights.to_string()) && remote.contains(&"README.md".to_string()), "{remote:?}");
    assert!(!remote.iter().any(|f| f.starts_with("checkpoint-")), "{remote:?}");
    if lora {
        // Validation ran after epoch 0 (--validation_epochs=50), and the card shows its images.
        assert!(model.join("validation/step_2_3.png").is_file() && remote.contains(&"image_0.png".to_string()), "{remote:?}");
    }
}

#[test]
fn readme_dog_toy_example() {
    run_readme_command(DOG_TOY_EXAMPLE);
}

#[test]
fn readme_prior_preservation() {
    run_readme_command(PRIOR_PRESERVATION);
}

#[test]
fn readme_sixteen_gb_gpu() {
    run_readme_command(SIXTEEN_GB_GPU);
}

#[test]
fn readme_twelve_gb_gpu() {
    run_readme_command(TWELVE_GB_GPU);
}

#[test]
fn readme_eight_gb_gpu() {
    run_readme_command(EIGHT_GB_GPU);
}

#[test]
fn readme_text_encoder() {
    run_readme_command(TEXT_ENCODER);
}

#[test]
fn readme_lora() {
    run_readme_command(LORA);
}
