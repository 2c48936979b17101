//! A diffusers pipeline folder -> KerasCV legacy `.h5` files (one per KerasCV sub-model).

use super::phases::{time, Phase};
use super::pieces::{fill_piece, pool, PIECE};
use super::plan::{detect, Plan};
use crate::diffusers::layout::{find_weights, Component};
use crate::diffusers::st_read::StFile;
use crate::keras::LegacyWriter;
use crate::output::Staging;
use crate::progress::Progress;
use crate::mapping::op::{PlacedEmit, Relayout};
use crate::tensor::{DType, TensorSource};
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
    crate::single_file::sdxl::refuse_for_keras(model, "")?;
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
/// `<group>/<sub-layer path>/<variable>:0` as Keras would. libhdf5 lays out the file (groups,
/// attributes, every dataset's storage); the tensors' bytes are re-laid-out in pieces and
/// written at their datasets' places by a writer thread, overlapping the next tensor's work.
pub(crate) fn write_h5(path: &Path, file: &dyn TensorSource, plan: &Plan) -> Result<()> {
    let groups: Vec<String> = plan.layout.layers.iter().map(|l| l.keras3_key.clone()).collect();
    let writer = LegacyWriter::create(path, &groups)?;
    let data_file = std::fs::OpenOptions::new().write(true).open(path).with_context(|| format!("{}: cannot open for writing", path.display()))?;
    // libhdf5 has placed every dataset; reserve the file's blocks at once (a full disk is reported
    // by the writes below, as libhdf5's own writes would be).
    let _ = crate::output::preallocate(&data_file, data_file.metadata().map_or(0, |m| m.len()));
    let total: u64 = plan.tensors.iter().map(|t| (t.diffusers_shape.iter().product::<usize>() * t.dtype.size()) as u64).sum();
    let progress = Progress::new(&plan.table.kind, total);
    let (send, receive) = std::sync::mpsc::sync_channel::<(u64, Vec<(usize, usize)>, Vec<u8>, String)>(1);
    let (give_back, take) = pool();
    std::thread::scope(|scope| -> Result<()> {
        let (progress, data_file) = (&progress, &data_file);
        let written = scope.spawn(move || -> Result<()> {
            use std::os::unix::fs::FileExt;
            let mut streamer = crate::output::Streamer::default();
            for (base, runs, data, key) in receive {
                let mut from = 0;
                for (at, n) in runs {
                    let offset = base + at as u64;
                    time(Phase::Write, n, || data_file.write_all_at(&data[from..from + n], offset)).with_context(|| format!("{}: cannot write", path.display()))?;
                    streamer.written(data_file, offset, n as u64);
                    from += n;
                }
                progress.advance(&key, data.len() as u64);
                let _ = give_back.send(data);
            }
            Ok(())
        });
        let produced = (|| -> Result<()> {
            let mut scratch = Vec::new();
            for layer in &plan.layout.layers {
                let tensors = &plan.tensors[layer.tensors.clone()];
                let names: Vec<String> = tensors.iter().map(|t| format!("{}/{}:0", layer.keras3_key, t.spec.keras_path)).collect();
                writer.begin_layer(&layer.keras3_key, &names)?;
                for (t, name) in tensors.iter().zip(&names) {
                    let mut open = true;
                    file.with_bytes(&t.source, &mut |from, _, data| {
                        let elem = from.size();
                        let to = if from == DType::BF16 { DType::F32 } else { from }; // HDF5 has no bf16
                        let relayout = Relayout::new(t.spec.op, false, data, &t.diffusers_shape, elem)?;
                        let place = time(Phase::Write, 0, || writer.create_placed(&layer.keras3_key, name, to, &t.keras_shape))?;
                        let (mut whole, mut own) = (Vec::new(), Vec::new()); // for a dataset without a place
                        let pieces = |emit: &mut PlacedEmit<'_>| match place {
                            Some(_) => relayout.placed_pieces(data, elem, PIECE * elem / to.size(), emit),
                            None => relayout.pieces(data, elem, PIECE, |len, fill| emit(&[(0, len)], len, fill)),
                        };
                        pieces(&mut |runs, len, fill| {
                            let mut out = match place {
                                Some(_) => match take.recv() {
                                    Ok(buffer) => buffer,
                                    Err(_) => {
                                        open = false;
                                        return Ok(());
                                    }
                                },
                                None => std::mem::take(&mut own),
                            };
                            fill_piece(from, to, len, fill, &mut out, &mut scratch);
                            if place.is_none() {
                                whole.extend_from_slice(&out);
                                own = out;
                                return Ok(());
                            }
                            // Runs count bytes of the re-laid-out tensor; a cast to f32 doubles them.
                            let scale = to.size() / elem;
                            let runs = runs.iter().map(|&(at, n)| (at * scale, n * scale)).collect();
                            open = open && send.send((place.unwrap_or(0), runs, out, t.source.clone())).is_ok();
                            Ok(())
                        })?;
                        if place.is_none() {
                            time(Phase::Write, whole.len(), || writer.write_unplaced(&layer.keras3_key, name, to, &whole))?;
                        }
                        Ok(())
                    })
                    .with_context(|| format!("tensor `{}`", t.source))?;
                    if !open {
                        return Ok(()); // the writer stopped: its error is the one to report
                    }
                }
            }
            Ok(())
        })();
        drop(send);
        let wrote = written.join().expect("the writer thread panicked");
        produced?;
        wrote
    })?;
    time(Phase::Write, 0, || writer.finish())?;
    // Durable before the staging folder is renamed into place, as the safetensors writer's files.
    let len = data_file.metadata().map_or(0, |m| m.len() as usize);
    time(Phase::Sync, len, || data_file.sync_all()).with_context(|| format!("{}: cannot sync", path.display()))?;
    progress.finish(&format!("{} tensors -> {}", plan.tensors.len(), path.file_name().unwrap_or_default().to_string_lossy()));
    Ok(())
}

