//! `dreambridge inspect`: a file's tensors (name, shape, dtype) and its detected model kind.

use crate::convert::plan::{detect, Plan};
use crate::diffusers::st_read::StFile;
use crate::keras::{KerasFile, KerasFormat};
use crate::mapping::all_tables;
use crate::single_file::convert::describe_prediction;
use crate::single_file::{open_tensors, ReadOptions, SingleFile};
use crate::tensor::TensorSource;
use std::sync::Arc;
use anyhow::{Context, Result};
use std::fmt::Write;
use std::path::Path;

pub fn inspect(path: &Path, sd_version: Option<u8>) -> Result<String> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let report = match ext {
        _ if path.to_string_lossy().ends_with(".lora.h5") => inspect_keras_hub_lora(path),
        _ if crate::convert::kerashub::is_sd3(path) => inspect_keras_hub(path),
        // A TF checkpoint prefix such as TF's `training_1/cp.ckpt`: the bundle, not a torch file.
        _ if crate::keras::is_checkpoint_prefix(path) => inspect_keras(path, sd_version),
        "safetensors" => inspect_safetensors(path, sd_version),
        "ckpt" | "pt" | "pth" => inspect_single_file(path, sd_version, open_tensors(path)?),
        _ => inspect_keras(path, sd_version),
    };
    report.with_context(|| path.display().to_string())
}

/// A file in the original LDM single-file layout: its SD version, prediction type and parts.
fn inspect_single_file(path: &Path, sd_version: Option<u8>, source: Arc<dyn TensorSource>) -> Result<String> {
    let mut out = String::new();
    let format = if ckpt_like(path) { "torch checkpoint archive (read without running pickled code)" } else { "safetensors" };
    writeln!(out, "format: {format}, {} tensors", source.keys().len())?;
    if crate::single_file::sd3::is_sd3_source(&*source) {
        match crate::single_file::sd3::open_file(path) {
            Ok(m) => writeln!(out, "layout: Stability AI's Stable Diffusion 3 single file, {}", m.describe())?,
            Err(e) => writeln!(out, "layout: Stability AI's Stable Diffusion 3 single file, not convertible: {}", crate::output::one_line(&e))?,
        }
        tensor_table(&mut out, &*source)?;
        return Ok(out);
    }
    if crate::single_file::sdxl::family(&*source) != crate::single_file::sdxl::Family::Other {
        match crate::single_file::sdxl::open_file(path) {
            Ok(m) => writeln!(out, "layout: Stability AI's SDXL single file, {}", m.describe())?,
            Err(e) => writeln!(out, "layout: Stability AI's SDXL single file, not convertible: {}", crate::output::one_line(&e))?,
        }
        tensor_table(&mut out, &*source)?;
        return Ok(out);
    }
    let opts = ReadOptions { sd_version, ..Default::default() };
    match SingleFile::open(path, &opts) {
        Ok(f) => {
            writeln!(
                out,
                "layout: Stable Diffusion single file (original LDM layout of AUTOMATIC1111 / ComfyUI), SD {}.x, prediction {}",
                f.sd_version,
                describe_prediction(&f.prediction)
            )?;
            for (component, part) in f.parts() {
                for plan in &part.plans {
                    writeln!(out, "  {component} (`{}*`): {}", part.view.table.prefix, describe_plan(plan).trim_start_matches("detected: "))?;
                }
                if !part.view.ignored.is_empty() {
                    writeln!(out, "  {component}: {} tensors diffusers does not load (e.g. `{}`)", part.view.ignored.len(), part.view.ignored[0])?;
                }
                if !part.view.unknown.is_empty() {
                    writeln!(out, "  {component}: {} unknown tensors (e.g. `{}`)", part.view.unknown.len(), part.view.unknown[0])?;
                }
            }
            for (component, what) in [("text_encoder", "text encoder"), ("vae", "VAE")] {
                if !f.parts().iter().any(|(c, _)| *c == component) {
                    writeln!(out, "  no {what}")?;
                }
            }
            if f.ema_keys > 0 {
                writeln!(out, "EMA weights: {} tensors under `model_ema.` (convert with --ema to use them)", f.ema_keys)?;
            }
            if f.other_keys > 0 {
                writeln!(out, "other tensors: {} (schedule buffers, EMA copies and the like)", f.other_keys)?;
            }
        }
        Err(e) => writeln!(out, "layout: Stable Diffusion single file, not convertible: {}", crate::output::one_line(&e))?,
    }
    tensor_table(&mut out, &*source)?;
    Ok(out)
}

fn ckpt_like(path: &Path) -> bool {
    std::fs::File::open(path).ok().and_then(|mut f| {
        let mut head = [0u8; 4];
        std::io::Read::read_exact(&mut f, &mut head).ok().map(|_| crate::single_file::ckpt::looks_like_torch_zip(&head))
    }) == Some(true)
}

fn inspect_keras(path: &Path, sd_version: Option<u8>) -> Result<String> {
    let file = KerasFile::open(path)?;
    let mut out = String::new();
    let version = file.keras_version.as_deref().unwrap_or("unknown");
    match file.format {
        KerasFormat::Legacy => writeln!(out, "format: Keras legacy .h5 (keras_version {version}), {} weighted layers", file.layers.len())?,
        KerasFormat::Keras3 => writeln!(out, "format: Keras 3 .weights.h5{}", if path.extension().is_some_and(|e| e == "keras") { " (in a .keras archive)" } else { "" })?,
        KerasFormat::TfCheckpoint => writeln!(out, "format: TensorFlow checkpoint (tensor bundle + object graph), {} weighted layers", file.layers.len())?,
        KerasFormat::SavedModel => writeln!(out, "format: TensorFlow SavedModel (variables bundle + object graph), {} weighted layers", file.layers.len())?,
    }
    let detected = detect(|t| Plan::for_keras(&file, t), sd_version, None);
    match &detected {
        Ok(plan) => writeln!(out, "{}", describe_plan(plan))?,
        Err(e) => writeln!(out, "detected: none ({e:#})")?,
    }
    writeln!(out, "{:>4}  {:<70} {:<22} {:<8} diffusers key", "#", "tensor", "shape", "dtype")?;
    let paths: Vec<String> = match file.format {
        KerasFormat::Legacy | KerasFormat::TfCheckpoint | KerasFormat::SavedModel => file.layers.iter().flat_map(|l| l.weights.clone()).collect(),
        KerasFormat::Keras3 => match &detected {
            Ok(plan) => plan.tensors.iter().map(|t| t.source.clone()).collect(),
            Err(_) => file.keras3_datasets()?.into_iter().map(|(p, _)| p).collect(),
        },
    };
    for (i, p) in paths.iter().enumerate() {
        let info = file.info(p)?;
        let key = detected.as_ref().ok().and_then(|plan| plan.tensors.get(i)).map_or("", |t| t.spec.key.as_str());
        writeln!(out, "{i:>4}  {p:<70} {:<22} {:<8} {key}", format!("{:?}", info.shape), info.dtype.to_string())?;
    }
    Ok(out)
}

/// A KerasHub Stable Diffusion 3 preset, backbone or MMDiT: its form, variant and parts.
fn inspect_keras_hub(path: &Path) -> Result<String> {
    let sd3 = crate::convert::kerashub::open(path)?;
    let mut out = String::new();
    writeln!(out, "format: Keras 3 .weights.h5")?;
    writeln!(out, "detected: {}", sd3.describe())?;
    for plan in sd3.plans() {
        writeln!(out, "  {}", describe_plan(plan).trim_start_matches("detected: "))?;
    }
    for (feature, keys) in &sd3.mmdit.features {
        writeln!(out, "  MMDiT feature `{feature}` in {} blocks", keys.len())?;
    }
    if sd3.form == crate::convert::kerashub::Form::Mmdit {
        writeln!(out, "  the MMDiT alone: convert with --base (a diffusers SD3 folder) for a complete pipeline")?;
    }
    Ok(out)
}

/// A KerasHub LoRA file (`save_lora_weights`): its rank, its layers and, where the layer numbers
/// and widths fit one, the full-size SD3 variant it was made on.
fn inspect_keras_hub_lora(path: &Path) -> Result<String> {
    use crate::lora::kerashub::{fitting_variants, read_lora_h5};
    let (rank, layers) = read_lora_h5(path)?;
    let mut out = String::new();
    writeln!(out, "format: KerasHub LoRA (.lora.h5, Backbone.save_lora_weights), rank {rank}, {} layers", layers.len())?;
    let fits = fitting_variants(&layers);
    match fits.as_slice() {
        [] => writeln!(out, "detected: KerasHub LoRA of no full-size SD3 backbone's layer numbering (a smaller model: convert with --base, which numbers its layers)")?,
        [(name, flat)] => {
            writeln!(out, "detected: KerasHub Stable Diffusion 3 LoRA, {name} (its layer numbers and widths fit that backbone)")?;
            for (index, a, b) in &layers {
                writeln!(out, "  lora/{index:<5} {:<60} a {:?}  b {:?}", flat[*index].path, a.shape, b.shape)?;
            }
        }
        several => {
            let names: Vec<&str> = several.iter().map(|(n, _)| *n).collect();
            writeln!(out, "detected: KerasHub Stable Diffusion 3 LoRA, fits {} (the text encoders alone do not tell them apart)", names.join(", "))?;
            for (index, a, b) in &layers {
                writeln!(out, "  lora/{index:<5} {:<60} a {:?}  b {:?}", several[0].1[*index].path, a.shape, b.shape)?;
            }
        }
    }
    writeln!(out, "convert: dreambridge lora convert {} out.safetensors --to diffusers --base <the KerasHub preset or diffusers SD3 folder>", path.display())?;
    Ok(out)
}

fn inspect_safetensors(path: &Path, sd_version: Option<u8>) -> Result<String> {
    let file = StFile::open(path)?;
    if file.keys().iter().any(|k| k.starts_with("model.diffusion_model.")) {
        return inspect_single_file(path, sd_version, Arc::new(file));
    }
    let mut out = String::new();
    writeln!(out, "format: safetensors, {} tensors", file.keys().len())?;
    if crate::lora::read::is_lora(&file.keys()) {
        match crate::lora::read::read(path) {
            Ok(set) => {
                out.push_str(&crate::lora::describe::describe(&set));
                if let Some(numbering) = crate::lora::describe::kohya_numbering(&file.keys()) {
                    writeln!(out, "kohya UNet names: {numbering}")?;
                }
            }
            Err(e) => writeln!(out, "LoRA: unreadable ({})", crate::output::one_line(&e))?,
        }
        tensor_table(&mut out, &file)?;
        return Ok(out);
    }
    // A VAE file holds two parts (encoder, decoder): every table whose tensors it holds is listed,
    // but tables over the same tensors (SD1/SD2 text towers) count once, the preferred one.
    let mut plans: Vec<Plan> = Vec::new();
    for plan in all_tables()?.iter().filter_map(|t| Plan::for_diffusers(&file, t).ok()) {
        let keys = |p: &Plan| p.tensors.iter().map(|t| t.source.clone()).collect::<Vec<_>>();
        match plans.iter_mut().find(|p| keys(p) == keys(&plan)) {
            Some(existing) if plan.table.preferred_for(&plan.symbols) => *existing = plan,
            Some(_) => {}
            None => plans.push(plan),
        }
    }
    let matches: Vec<String> = plans.iter().map(describe_plan).collect();
    if matches.is_empty() {
        writeln!(out, "detected: none (not a KerasCV-convertible diffusers component)")?;
    }
    for m in matches {
        writeln!(out, "{m}")?;
    }
    tensor_table(&mut out, &file)?;
    Ok(out)
}

fn tensor_table(out: &mut String, file: &dyn TensorSource) -> Result<()> {
    writeln!(out, "{:>4}  {:<70} {:<22} dtype", "#", "tensor", "shape")?;
    for (i, k) in file.keys().iter().enumerate() {
        match file.info(k) {
            Ok(info) => writeln!(out, "{i:>4}  {k:<70} {:<22} {}", format!("{:?}", info.shape), info.dtype)?,
            Err(e) => writeln!(out, "{i:>4}  {k:<70} ({})", crate::output::one_line(&e))?,
        }
    }
    Ok(())
}

fn describe_plan(plan: &Plan) -> String {
    let symbols: Vec<String> = plan.symbols.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(
        "detected: {} ({} {} <-> diffusers {}), {} tensors, {}",
        plan.table.kind,
        if plan.table.kind.ends_with("-kerashub") || plan.table.kind.ends_with("-sd3") { "KerasHub" } else { "KerasCV" },
        plan.table.keras_class,
        plan.table.component,
        plan.tensors.len(),
        symbols.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use crate::lora::read::tests::{ramp, write_file};

    #[test]
    fn lora_files_are_described() {
        let dir = tempfile::tempdir().unwrap();
        let k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k";
        let path = write_file(dir.path(), "k.safetensors", &[(&format!("{k}.lora_down.weight"), ramp(&[4, 768], 0.0)), (&format!("{k}.lora_up.weight"), ramp(&[320, 4], 0.0))], &[]);
        let report = super::inspect(&path, None).unwrap();
        assert!(report.contains("LoRA: kohya format, 1 UNet modules") && report.contains("base model: SD1"), "{report}");
        assert!(report.contains(&format!("{k}.lora_up.weight")) && !report.contains("detected: none"), "{report}");
    }
}
