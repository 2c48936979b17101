//! The DreamBooth paper's benchmark (DreamBench) on a local copy of its dataset
//! (google/dreambooth `dataset/`: one folder of real images per subject and
//! `prompts_and_classes.txt` with each subject's class and the object / live-subject prompt
//! lists): for each subject, `images_per_prompt` images for each of its 25 prompts with the
//! identifier and class the dataset defines, then DINO and CLIP-I against the subject's real
//! images and CLIP-T against each prompt without the identifier. Images already generated are
//! kept, so an interrupted run resumes.

use super::clip::Clip;
use super::dino::Dino;
use super::preprocess::image_files;
use super::score::{evaluate, EvalInputs};
use crate::generate::scheduler::SchedulerKind;
use crate::generate::text_to_image::{generate_with, save_png};
use crate::rng::TrainRng;
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The dataset's definitions.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Subject folder name -> class noun.
    pub classes: BTreeMap<String, String>,
    /// `format` templates with `{0}` (identifier) and `{1}` (class).
    pub object_prompts: Vec<String>,
    pub live_prompts: Vec<String>,
}

/// Classes whose subjects take the live-subject prompts (the dataset's cats and dogs).
const LIVE_CLASSES: [&str; 2] = ["cat", "dog"];

/// Parses `prompts_and_classes.txt`.
pub fn parse(text: &str) -> Result<Dataset> {
    let mut classes = BTreeMap::new();
    let (mut object_prompts, mut live_prompts) = (Vec::new(), Vec::new());
    let mut section = "";
    for line in text.lines().map(str::trim) {
        match line {
            "" => continue,
            "Classes" | "subject_name,class" => section = "classes",
            l if l.starts_with("Object Prompts") => section = "object",
            l if l.starts_with("Live Subject Prompts") => section = "live",
            l if l.starts_with("Prompts") || l.starts_with("prompt_list") || l == "]" => {}
            l => match section {
                "classes" => {
                    let (subject, class) = l.split_once(',').with_context(|| format!("prompts_and_classes.txt: `{l}` is not `subject,class`"))?;
                    classes.insert(subject.trim().to_string(), class.trim().to_string());
                }
                "object" | "live" => {
                    // 'a {0} {1} in the jungle'.format(unique_token, class_token),
                    let quoted = l.trim_end_matches(',').split(".format").next().unwrap_or(l).trim();
                    let template = quoted.trim_matches(|c| c == '\'' || c == '"').to_string();
                    ensure!(template.contains("{0}") && template.contains("{1}"), "prompts_and_classes.txt: `{l}` has no {{0}} / {{1}}");
                    if section == "object" { object_prompts.push(template) } else { live_prompts.push(template) }
                }
                _ => {}
            },
        }
    }
    ensure!(!classes.is_empty() && !object_prompts.is_empty() && !live_prompts.is_empty(), "prompts_and_classes.txt: no classes or prompt lists");
    Ok(Dataset { classes, object_prompts, live_prompts })
}

impl Dataset {
    /// The subject's prompt templates.
    pub fn templates(&self, subject: &str) -> &[String] {
        let live = self.classes.get(subject).is_some_and(|c| LIVE_CLASSES.contains(&c.as_str()));
        if live { &self.live_prompts } else { &self.object_prompts }
    }
}

fn fill(template: &str, identifier: &str, class: &str) -> String {
    let text = template.replace("{0}", identifier).replace("{1}", class);
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// How to run it.
pub struct BenchOptions {
    pub dataset: PathBuf,
    /// The model of each subject: a path or repo with `{subject}` for one model per subject.
    pub model: String,
    pub lora: Option<String>,
    pub subjects: Vec<String>,
    pub identifier: String,
    pub images_per_prompt: usize,
    pub resolution: usize,
    pub steps: usize,
    pub guidance: f64,
    pub scheduler: SchedulerKind,
    pub seed: u64,
    pub out: PathBuf,
    pub device: candle_core::Device,
}

/// The dataset and the subjects to run, checked before any model is loaded.
pub fn plan(o: &BenchOptions) -> Result<(Dataset, Vec<String>)> {
    let text = std::fs::read_to_string(o.dataset.join("prompts_and_classes.txt")).with_context(|| format!("{}: no prompts_and_classes.txt", o.dataset.display()))?;
    let data = parse(&text)?;
    let subjects: Vec<String> = if o.subjects.is_empty() { data.classes.keys().cloned().collect() } else { o.subjects.clone() };
    if !o.model.contains("{subject}") && subjects.len() > 1 {
        bail!("--model `{}` is one model for {} subjects; DreamBench trains one per subject: write `{{subject}}` in the path, or pick one with --subjects", o.model, subjects.len());
    }
    for s in &subjects {
        ensure!(data.classes.contains_key(s), "subject `{s}` is not in prompts_and_classes.txt");
    }
    Ok((data, subjects))
}

/// Generates what is missing, scores every subject; returns the report.
pub fn run(o: &BenchOptions, clip: &Clip, dino: &Dino) -> Result<Value> {
    let (data, subjects) = plan(o)?;
    let mut rows = BTreeMap::new();
    for subject in &subjects {
        let class = data.classes.get(subject).with_context(|| format!("subject `{subject}` is not in prompts_and_classes.txt"))?;
        let real = image_files(&o.dataset.join(subject))?;
        ensure!(!real.is_empty(), "{}: no real images", o.dataset.join(subject).display());
        let dir = o.out.join(subject);
        std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        let templates = data.templates(subject);
        let wanted: Vec<(PathBuf, String, String)> = templates
            .iter()
            .enumerate()
            .flat_map(|(p, t)| (0..o.images_per_prompt).map(move |k| (p, t, k)))
            .map(|(p, t, k)| (dir.join(format!("{p:02}_{k}.png")), fill(t, &o.identifier, class), fill(t, "", class)))
            .collect();
        let missing: Vec<&(PathBuf, String, String)> = wanted.iter().filter(|(path, _, _)| !path.is_file()).collect();
        if !missing.is_empty() {
            let model = PathBuf::from(o.model.replace("{subject}", subject));
            let base = crate::single_file::base::resolve_base(&model)?;
            let pipe = crate::pipeline::Pipeline::load(&base, &o.device).with_context(|| format!("loading {}", base.display()))?;
            if let Some(lora) = &o.lora {
                crate::lora::merge::merge_files_into_vars(&[PathBuf::from(lora.replace("{subject}", subject))], &[1.0], Some(&pipe.unet_vars), Some(&pipe.text_vars))?;
            }
            let bar = indicatif::ProgressBar::new(missing.len() as u64).with_message(format!("{subject}: generating"));
            for (path, prompt, _) in &missing {
                // One stream per image: the same image whether generated now or after a resume.
                let index = wanted.iter().position(|w| &w.0 == path).unwrap_or(0) as u64;
                let mut rng = TrainRng::stream(o.seed, subject, index);
                save_png(&generate_with(&pipe, prompt, "", o.resolution, o.steps, o.guidance, o.scheduler, &mut rng)?, path)?;
                bar.inc(1);
            }
            bar.finish_and_clear();
        }
        let generated: Vec<PathBuf> = wanted.iter().map(|w| w.0.clone()).collect();
        let prompts = Some(wanted.iter().map(|(p, _, clip_t)| (p.file_name().unwrap().to_string_lossy().to_string(), clip_t.clone())).collect());
        let report = evaluate(&EvalInputs { generated: &generated, real: &real, prompts, strict: true, batch: 8 }, clip, dino, &o.device)?;
        rows.insert(subject.clone(), json!({"class": class, "generated": generated.len(), "real": real.len(), "metrics": report["metrics"]}));
    }
    let mean = |k: &str| rows.values().filter_map(|r| r["metrics"][k].as_f64()).sum::<f64>() / rows.len().max(1) as f64;
    let pooled = |k: &str| {
        let (s, n) = rows.values().fold((0.0, 0usize), |(s, n), r| (s + r["metrics"][k].as_f64().unwrap_or(0.0) * r["generated"].as_u64().unwrap_or(0) as f64, n + r["generated"].as_u64().unwrap_or(0) as usize));
        s / n.max(1) as f64
    };
    Ok(json!({
        "subjects": rows,
        "mean_over_subjects": {"dino": mean("dino"), "clip_i": mean("clip_i"), "clip_t": mean("clip_t")},
        "pooled_over_images": {"dino": pooled("dino"), "clip_i": pooled("clip_i"), "clip_t": pooled("clip_t")},
        "paper_dreambooth_sd": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
        "settings": {"identifier": o.identifier, "images_per_prompt": o.images_per_prompt, "resolution": o.resolution, "steps": o.steps, "guidance": o.guidance, "scheduler": format!("{:?}", o.scheduler), "seed": o.seed},
        "convention": "per subject: DINO / CLIP-I mean over all generated x real pairs, CLIP-T mean over images against the prompt without the identifier; raw cosine",
    }))
}

/// The table: one row per subject, the mean over subjects, and the paper's row.
pub fn table(report: &Value) -> String {
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.3}"));
    let mut out = format!("{:<22}{:>8}{:>8}{:>8}\n", "subject", "DINO", "CLIP-I", "CLIP-T");
    for (s, r) in report["subjects"].as_object().into_iter().flatten() {
        let m = &r["metrics"];
        out += &format!("{:<22}{:>8}{:>8}{:>8}\n", s, f(&m["dino"]), f(&m["clip_i"]), f(&m["clip_t"]));
    }
    for (label, key) in [("mean over subjects", "mean_over_subjects"), ("paper: DreamBooth (SD)", "paper_dreambooth_sd")] {
        let m = &report[key];
        out += &format!("{:<22}{:>8}{:>8}{:>8}\n", label, f(&m["dino"]), f(&m["clip_i"]), f(&m["clip_t"]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const SAMPLE: &str = "Classes\n\nsubject_name,class\nbackpack,backpack\nbear_plushie,stuffed animal\ndog,dog\n\nPrompts\n\nObject Prompts\nprompt_list = [\n'a {0} {1} in the jungle'.format(unique_token, class_token),\n'a red {0} {1}'.format(unique_token, class_token)\n]\n\nLive Subject Prompts\nprompt_list = [\n'a {0} {1} in the jungle'.format(unique_token, class_token),\n'a {0} {1} wearing a red hat'.format(unique_token, class_token)\n]\n";

    #[test]
    fn the_dataset_file_parses_as_google_dreambooth_writes_it() {
        let d = parse(SAMPLE).unwrap();
        assert_eq!(d.classes["bear_plushie"], "stuffed animal");
        assert_eq!(d.templates("dog")[1], "a {0} {1} wearing a red hat");
        assert_eq!(d.templates("backpack")[1], "a red {0} {1}");
        assert_eq!(fill(&d.templates("bear_plushie")[0], "sks", "stuffed animal"), "a sks stuffed animal in the jungle");
        assert_eq!(fill(&d.templates("bear_plushie")[0], "", "stuffed animal"), "a stuffed animal in the jungle");
        assert!(parse("nothing").is_err());
    }
}
