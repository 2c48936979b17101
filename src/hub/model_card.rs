//! The model card (README.md) that diffusers' `train_dreambooth.py` writes: YAML front matter with
//! base_model, library_name, license, instance_prompt, tags and (when images exist) a widget.

/// What the card says about the model.
#[derive(Clone, Debug, Default)]
pub struct CardInfo {
    pub repo_id: String,
    pub base_model: Option<String>,
    pub instance_prompt: Option<String>,
    pub license: Option<String>,
    /// A LoRA repo (adapter weights for `base_model`), as diffusers' LoRA script publishes.
    pub lora: bool,
    /// The files the weights were converted from (KerasCV `.h5` URLs, SavedModel repos, ...).
    pub sources: Vec<String>,
    /// Placeholder tokens added for textual inversion.
    pub placeholder_tokens: Vec<String>,
}

/// JSON string quoting is valid YAML and escapes whatever the user typed.
fn q(s: &str) -> String {
    serde_json::to_string(s).expect("string serializes")
}

/// The card text; `images` are sample image file names in the folder (shown in the widget).
pub fn model_card(info: &CardInfo, images: &[String]) -> String {
    let mut y = String::from("---\n");
    if let Some(b) = &info.base_model {
        y += &format!("base_model: {}\n", q(b));
    }
    y += "library_name: diffusers\n";
    y += &format!("license: {}\n", q(info.license.as_deref().unwrap_or("creativeml-openrail-m")));
    y += "inference: true\n";
    if let Some(p) = &info.instance_prompt {
        y += &format!("instance_prompt: {}\n", q(p));
    }
    y += "tags:\n";
    let lora: &[&str] = if info.lora { &["lora"] } else { &[] };
    for t in ["text-to-image", "dreambooth", "diffusers-training", "stable-diffusion", "stable-diffusion-diffusers"].iter().chain(lora).chain(&["dreambridge"]) {
        y += &format!("- {t}\n");
    }
    if !images.is_empty() {
        y += "widget:\n";
        for img in images {
            y += &format!("- text: {}\n  output:\n    url: {}\n", q(info.instance_prompt.as_deref().unwrap_or("")), q(img));
        }
    }
    y += "---\n\n";
    y += &format!("# {}DreamBooth - {}\n\n", if info.lora { "LoRA " } else { "" }, info.repo_id);
    match (&info.base_model, &info.instance_prompt) {
        (Some(b), Some(p)) if info.lora => y += &format!("These are LoRA adaption weights for {b}, trained on {} with DreamBooth.\n", q(p)),
        (Some(b), Some(p)) => y += &format!("These are DreamBooth weights for {b}, trained on {}.\n", q(p)),
        (Some(b), None) => y += &format!("Weights derived from {b}.\n"),
        _ => y += "A Stable Diffusion pipeline in the diffusers layout.\n",
    }
    if !info.sources.is_empty() {
        y += "\nConverted by dreambridge from:\n\n";
        for s in &info.sources {
            y += &format!("* `{s}`\n");
        }
    }
    if !info.placeholder_tokens.is_empty() {
        let tokens: Vec<String> = info.placeholder_tokens.iter().map(|t| format!("`{t}`")).collect();
        y += &format!("\nTextual inversion: the tokenizer knows the placeholder token{} {}.\n", if tokens.len() == 1 { "" } else { "s" }, tokens.join(", "));
    }
    for img in images {
        y += &format!("\n![]({img})\n");
    }
    y += "\n## Usage\n\n```python\nfrom diffusers import StableDiffusionPipeline\n\n";
    match (&info.base_model, info.lora) {
        (Some(b), true) => {
            y += &format!("pipe = StableDiffusionPipeline.from_pretrained({})\n", q(b));
            y += &format!("pipe.load_lora_weights({})\n```\n", q(&info.repo_id));
            y += "\nThe kohya-format file (if present) loads in AUTOMATIC1111 and ComfyUI.\n";
        }
        _ => y += &format!("pipe = StableDiffusionPipeline.from_pretrained({})\n```\n", q(&info.repo_id)),
    }
    y += "\nPublished with dreambridge.\n";
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_has_the_dreambooth_front_matter() {
        let info = CardInfo {
            repo_id: "me/dog".into(),
            base_model: Some("runwayml/stable-diffusion-v1-5".into()),
            instance_prompt: Some("a photo of sks \"dog\"".into()),
            license: None,
            lora: false,
            sources: vec!["hf://me/kcv/unet.h5".into()],
            placeholder_tokens: vec!["<sks>".into()],
        };
        let card = model_card(&info, &["image_0.png".into()]);
        assert!(card.contains("Converted by dreambridge from:\n\n* `hf://me/kcv/unet.h5`") && card.contains("placeholder token `<sks>`"), "{card}");
        let front = card.split("---\n").nth(1).unwrap();
        for line in [
            "base_model: \"runwayml/stable-diffusion-v1-5\"",
            "library_name: diffusers",
            "license: \"creativeml-openrail-m\"",
            "instance_prompt: \"a photo of sks \\\"dog\\\"\"",
            "- dreambooth",
            "    url: \"image_0.png\"",
        ] {
            assert!(front.contains(line), "missing `{line}` in\n{front}");
        }
        assert!(!front.contains("- lora"));
        let lora = model_card(&CardInfo { lora: true, ..info }, &[]);
        assert!(lora.contains("- lora\n") && lora.contains("# LoRA DreamBooth - me/dog") && lora.contains("pipe.load_lora_weights(\"me/dog\")"), "{lora}");
    }
}
