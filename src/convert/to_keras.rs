//! A diffusers pipeline folder -> KerasCV legacy `.h5` files (one per KerasCV sub-model).

use super::phases::{time, Phase};
use super::plan::{detect, Plan};
use crate::diffusers::layout::{find_weights, Component};
use crate::diffusers::st_read::StFile;
use crate::keras::LegacyWriter;
use crate::output::Staging;
use crate::progress::Progress;
use crate::tensor::{RawTensor, TensorSource};
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};

/// The file name dreambridge writes for each KerasCV model kind.
pub fn keras_file_name(kind: &str) -> &'static str {
    match kind {
        k if k.starts_with("unet") => "diffusion_model.h5",
        k if k.starts_with("text-encoder") => "text_encoder.h5",
        "vae-encoder" => "image_encoder.h5",
        _ => "decoder.h5",
    }
}

#[derive(Debug)]
pub struct ToKerasResult {
    pub out: PathBuf,
    /// (kind, file name) written.
    pub files: Vec<(String, String)>,
}

/// One component of a diffusers folder matched against its tables (two for the VAE: encoder,
/// decoder).
pub struct FolderPart {
    pub component: Component,
    pub file: std::sync::Arc<StFile>,
    pub plans: Vec<Plan>,
}

/// Matches every component folder of `model` (unet/, text_encoder/, vae/) that exists; the SD
/// version found first (or given) applies to the rest.
pub fn plan_diffusers_folder(model: &Path, sd_version: Option<u8>) -> Result<Vec<FolderPart>> {
    ensure!(model.is_dir(), "{}: not a folder", model.display());
    let mut parts = Vec::new();
    let mut version = sd_version;
    for component in Component::ALL {
        if !model.join(component.dir()).is_dir() {
            continue;
        }
        let path = find_weights(model, component)?;
        let file = StFile::open(&path).with_context(|| path.display().to_string())?;
        let prefixes: &[&str] = match component {
            Component::Unet => &["unet"],
            Component::TextEncoder => &["text-encoder"],
            Component::Vae => &["vae-encoder", "vae-decoder"],
        };
        let mut plans = Vec::new();
        for prefix in prefixes {
            let plan = detect(
                |t| {
                    if !t.kind.starts_with(prefix) {
                        bail!("not a {prefix}");
                    }
                    Plan::for_diffusers(&file, t)
                },
                version,
                Some(prefix),
            )
            .with_context(|| path.display().to_string())?;
            version = version.or(plan.table.sd_version());
            plans.push(plan);
        }
        parts.push(FolderPart { component, file: std::sync::Arc::new(file), plans });
    }
    ensure!(!parts.is_empty(), "{}: no unet/, text_encoder/ or vae/ folder", model.display());
    Ok(parts)
}

pub fn diffusers_to_keras(model: &Path, out: &Path, force: bool, sd_version: Option<u8>) -> Result<ToKerasResult> {
    let parts = plan_diffusers_folder(model, sd_version)?;
    let jobs: Vec<(&StFile, &Plan)> = parts.iter().flat_map(|p| p.plans.iter().map(move |plan| (&*p.file, plan))).collect();
    let staging = Staging::new(out, force, &[model])?;
    let fill = || -> Result<Vec<(String, String)>> {
        let mut files = Vec::new();
        for (file, plan) in &jobs {
            let (file, plan) = (*file, *plan);
            let name = keras_file_name(&plan.table.kind);
            let path = staging.path(name)?;
            write_h5(&path, file, plan).with_context(|| format!("{}: writing from {}", path.display(), file.path.display()))?;
            files.push((plan.table.kind.clone(), name.to_string()));
        }
        Ok(files)
    };
    let filled = fill();
    let (files, out) = staging.finish(filled)?;
    Ok(ToKerasResult { out, files })
}

/// Writes one Keras-2 legacy file: group per layer named by its Keras-3 key, weights named
/// `<group>/<sub-layer path>/<variable>:0` as Keras would.
pub(crate) fn write_h5(path: &Path, file: &dyn TensorSource, plan: &Plan) -> Result<()> {
    let groups: Vec<String> = plan.layout.layers.iter().map(|l| l.keras3_key.clone()).collect();
    let writer = LegacyWriter::create(path, &groups)?;
    let total: u64 = plan.tensors.iter().map(|t| (t.diffusers_shape.iter().product::<usize>() * t.dtype.size()) as u64).sum();
    let progress = Progress::new(&plan.table.kind, total);
    for layer in &plan.layout.layers {
        let tensors = &plan.tensors[layer.tensors.clone()];
        let names: Vec<String> = tensors.iter().map(|t| format!("{}/{}:0", layer.keras3_key, t.spec.keras_path)).collect();
        writer.begin_layer(&layer.keras3_key, &names)?;
        for (t, name) in tensors.iter().zip(&names) {
            let n = t.diffusers_shape.iter().product::<usize>() * t.dtype.size();
            let raw = time(Phase::Read, n, || file.read(&t.source))?;
            let (dtype, bytes) = (raw.dtype, raw.data.len() as u64);
            let data = time(Phase::Permute, n, || t.spec.op.to_keras(raw.data, &t.diffusers_shape, dtype.size())).with_context(|| format!("tensor `{}`", t.source))?;
            time(Phase::Write, n, || writer.write(&layer.keras3_key, name, RawTensor { dtype, shape: t.keras_shape.clone(), data }))?;
            progress.advance(&t.source, bytes);
        }
    }
    time(Phase::Write, 0, || writer.finish())?;
    // Durable before the staging folder is renamed into place, as the safetensors writer's files.
    let synced = std::fs::File::open(path).and_then(|f| {
        let len = f.metadata()?.len() as usize;
        time(Phase::Sync, len, || f.sync_all())
    });
    synced.with_context(|| format!("{}: cannot sync", path.display()))?;
    progress.finish(&format!("{} tensors -> {}", plan.tensors.len(), path.file_name().unwrap_or_default().to_string_lossy()));
    Ok(())
}
