//! `dreambridge inspect`: a file's tensors (name, shape, dtype) and its detected model kind.

use crate::convert::plan::{detect, Plan};
use crate::diffusers::st_read::StFile;
use crate::keras::{KerasFile, KerasFormat};
use crate::mapping::all_tables;
use anyhow::{Context, Result};
use std::fmt::Write;
use std::path::Path;

pub fn inspect(path: &Path, sd_version: Option<u8>) -> Result<String> {
    let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
    let report = if is_safetensors { inspect_safetensors(path) } else { inspect_keras(path, sd_version) };
    report.with_context(|| path.display().to_string())
}

fn inspect_keras(path: &Path, sd_version: Option<u8>) -> Result<String> {
    let file = KerasFile::open(path)?;
    let mut out = String::new();
    let version = file.keras_version.as_deref().unwrap_or("unknown");
    match file.format {
        KerasFormat::Legacy => writeln!(out, "format: Keras legacy .h5 (keras_version {version}), {} weighted layers", file.layers.len())?,
        KerasFormat::Keras3 => writeln!(out, "format: Keras 3 .weights.h5")?,
    }
    let detected = detect(|t| Plan::for_keras(&file, t), sd_version, None);
    match &detected {
        Ok(plan) => writeln!(out, "{}", describe_plan(plan))?,
        Err(e) => writeln!(out, "detected: none ({e:#})")?,
    }
    writeln!(out, "{:>4}  {:<70} {:<22} {:<8} diffusers key", "#", "tensor", "shape", "dtype")?;
    let paths: Vec<String> = match file.format {
        KerasFormat::Legacy => file.layers.iter().flat_map(|l| l.weights.clone()).collect(),
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

fn inspect_safetensors(path: &Path) -> Result<String> {
    let file = StFile::open(path)?;
    let mut out = String::new();
    writeln!(out, "format: safetensors, {} tensors", file.keys().len())?;
    if crate::lora::read::is_lora(&file.keys()) {
        match crate::lora::read::read(path) {
            Ok(set) => out.push_str(&crate::lora::describe::describe(&set)),
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

fn tensor_table(out: &mut String, file: &StFile) -> Result<()> {
    writeln!(out, "{:>4}  {:<70} {:<22} dtype", "#", "tensor", "shape")?;
    for (i, k) in file.keys().iter().enumerate() {
        let info = file.info(k)?;
        writeln!(out, "{i:>4}  {k:<70} {:<22} {}", format!("{:?}", info.shape), info.dtype)?;
    }
    Ok(())
}

fn describe_plan(plan: &Plan) -> String {
    let symbols: Vec<String> = plan.symbols.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(
        "detected: {} (KerasCV {} <-> diffusers {}), {} tensors, {}",
        plan.table.kind,
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
