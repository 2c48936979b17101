//! `dreambridge lora merge` and `dreambridge lora convert`.

use super::describe::{family, shape_version};
use super::write::{write_diffusers_as, write_kohya_as, KohyaInfo};
use super::{merge, read, Family, LoraSet};
use anyhow::{bail, ensure, Context, Result};
use clap::Subcommand;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum LoraCommand {
    /// Fuse LoRA files into a diffusers pipeline's UNet and text encoder(s) (SDXL: text_encoder_2
    /// too), as a new pipeline folder.
    Merge {
        /// Base pipeline: a diffusers folder or Hub repo id.
        #[arg(long)]
        base: PathBuf,
        /// A LoRA file (kohya, diffusers or PEFT keys); repeat for several.
        #[arg(long = "lora", required = true)]
        loras: Vec<PathBuf>,
        /// Strength: one for every --lora, or one per --lora in order (default 1.0).
        #[arg(long = "scale", allow_negative_numbers = true)]
        scales: Vec<f64>,
        /// Output pipeline folder.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing output folder.
        #[arg(long)]
        force: bool,
    },
    /// Rewrite a LoRA file in diffusers keys or kohya keys (AUTOMATIC1111, ComfyUI), SD 1.x/2.x or
    /// SDXL (as the file's modules show, or --base); a KerasHub SD3 `.lora.h5`
    /// (`save_lora_weights`) into diffusers' SD3 LoRA (PEFT names) and back (--to keras), with --base.
    Convert {
        input: PathBuf,
        output: PathBuf,
        /// The model the LoRA adapts. For kohya/diffusers files: a diffusers SD 1.x/2.x or SDXL
        /// folder (or Hub id); its family decides the names written and every module is checked to
        /// fit it. For KerasHub SD3 LoRA (`.lora.h5`, either way): a KerasHub preset folder or
        /// backbone .weights.h5, or a diffusers SD3 folder, which numbers its layers.
        #[arg(long)]
        base: Option<PathBuf>,
        /// The key layout to write: diffusers (load_lora_weights), kohya (AUTOMATIC1111, ComfyUI), or
        /// keras (a KerasHub SD3 `.lora.h5` for `backbone.load_lora_weights`, from a diffusers SD3 LoRA).
        #[arg(long, value_enum)]
        to: ConvertTo,
        /// SD version for the kohya metadata (default: as the file's metadata or shapes say, else 1).
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
        sd_version: Option<u8>,
        /// Mark the kohya file as v-prediction (SD 2 768-v).
        #[arg(long)]
        v_prediction: bool,
        /// Replace an existing output file.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
/// The format `lora convert --to` writes.
pub enum ConvertTo {
    Diffusers,
    Kohya,
    Keras,
}

pub fn run(cmd: LoraCommand) -> Result<()> {
    match cmd {
        LoraCommand::Merge { base, loras, scales, out, force } => {
            let scales = scales_for(loras.len(), &scales)?;
            let sets: Vec<(LoraSet, f64)> = loras.iter().map(|p| read::read(p)).zip(scales.iter().copied()).map(|(s, m)| s.map(|s| (s, m))).collect::<Result<_>>()?;
            let base = crate::hub::download::local_or_hub(&base)?;
            let modules: usize = sets.iter().map(|(s, _)| s.modules.len()).sum();
            let done = merge::merge_pipeline(&base, &sets, &out, force)?;
            let scales: Vec<String> = scales.iter().map(|s| s.to_string()).collect();
            println!("wrote {}: {} LoRA file(s), {modules} modules fused into {} (scale {})", done.display(), loras.len(), base.display(), scales.join(", "));
        }
        LoraCommand::Convert { input, output, base, to, force, .. } if input.to_string_lossy().ends_with(".lora.h5") => {
            ensure!(to == ConvertTo::Diffusers, "a KerasHub .lora.h5 converts to diffusers (--to diffusers)");
            let base = base.context("a KerasHub .lora.h5 numbers its layers by the backbone: give --base (the KerasHub preset or a diffusers SD3 folder)")?;
            let base = crate::hub::download::local_file_or_hub(&base)?;
            let n = super::kerashub::convert_to_diffusers(&input, &output, &base, force)?;
            println!("wrote {}: {n} modules in diffusers' SD3 PEFT keys (transformer., text_encoder., text_encoder_2.)", output.display());
        }
        LoraCommand::Convert { input, output, base, to: ConvertTo::Keras, force, .. } => {
            let base = base.context("a KerasHub .lora.h5 numbers its layers by the backbone: give --base (the KerasHub preset or a diffusers SD3 folder)")?;
            let base = crate::hub::download::local_file_or_hub(&base)?;
            let done = super::kerashub::convert_to_keras(&input, &output, &base, force)?;
            println!("wrote {}: {} diffusers modules as {} KerasHub layers at rank {}; load it with", output.display(), done.modules, done.layers, done.rank);
            println!("  {}", done.enable_lora_call());
            println!("  backbone.load_lora_weights({:?})", output.display().to_string());
        }
        LoraCommand::Convert { input, output, base, to, sd_version, v_prediction, force } => {
            let base = base.map(|b| crate::hub::download::local_or_hub(&b)).transpose()?;
            let (n, family) = convert(&input, &output, to, ConvertOptions { base: base.as_deref(), sd_version, v_prediction, force })?;
            let keys = match (to, family) {
                (ConvertTo::Diffusers, Family::Sd) => "diffusers keys (unet.…lora.down/up, text_encoder.…lora_linear_layer)",
                (ConvertTo::Diffusers, Family::Sdxl) => "diffusers' SDXL PEFT keys (unet., text_encoder., text_encoder_2. lora_A/lora_B)",
                (ConvertTo::Kohya, Family::Sd) => "kohya keys (lora_unet_, lora_te_)",
                (ConvertTo::Kohya, Family::Sdxl) => "kohya sd-scripts' SDXL keys (lora_unet_ in LDM numbering, lora_te1_, lora_te2_)",
                (ConvertTo::Keras, _) => unreachable!("handled above"),
            };
            println!("wrote {}: {n} {} modules in {keys}", output.display(), family.name());
        }
    }
    Ok(())
}

/// One multiplier per LoRA from `--scale` values: none (1.0), one for all, or one each.
pub fn scales_for(loras: usize, scales: &[f64]) -> Result<Vec<f64>> {
    Ok(match scales.len() {
        0 => vec![1.0; loras],
        1 => vec![scales[0]; loras],
        n if n == loras => scales.to_vec(),
        n => bail!("{n} --scale values for {loras} --lora files (give one, or one per --lora)"),
    })
}

/// How [`convert`] writes.
#[derive(Clone, Copy, Default)]
pub struct ConvertOptions<'a> {
    /// A diffusers pipeline folder the LoRA adapts: decides the family, every module is checked
    /// against it.
    pub base: Option<&'a Path>,
    /// SD version of the kohya metadata (SD 1.x/2.x only).
    pub sd_version: Option<u8>,
    pub v_prediction: bool,
    pub force: bool,
}

/// The family of a diffusers pipeline folder: SDXL when it has a `text_encoder_2`.
pub fn base_family(base: &Path) -> Result<Family> {
    ensure!(base.join("model_index.json").is_file(), "{}: not a diffusers pipeline folder (no model_index.json)", base.display());
    Ok(if base.join("text_encoder_2").is_dir() { Family::Sdxl } else { Family::Sd })
}

/// Reads `input` and writes it to `output` in `to`'s keys, as the family of `--base` or, without
/// one, of the modules writes them; returns the module count and the family.
pub fn convert(input: &Path, output: &Path, to: ConvertTo, opts: ConvertOptions) -> Result<(usize, Family)> {
    let same = output.exists() && std::fs::canonicalize(output).ok() == std::fs::canonicalize(input).ok();
    ensure!(!same, "{}: the output would overwrite the input", output.display());
    ensure!(opts.force || !output.exists(), "{}: already exists (use --force to replace it)", output.display());
    let set = read::read(input)?;
    let shown = family(&set);
    let family = match opts.base {
        Some(base) => {
            let f = base_family(base)?;
            if let Some((g, why)) = shown.filter(|(g, _)| *g != f) {
                bail!("{}: an {} LoRA ({why}), but --base {} is {}", input.display(), g.name(), base.display(), f.name());
            }
            merge::check_against(base, &set).with_context(|| format!("{} against --base {}", input.display(), base.display()))?;
            f
        }
        None => shown.map_or(Family::Sd, |(f, _)| f),
    };
    ensure!(family == Family::Sd || opts.sd_version.is_none(), "{}: --sd-version is for SD 1.x/2.x; this is an SDXL LoRA", input.display());
    match to {
        ConvertTo::Diffusers => write_diffusers_as(&set, output, family)?,
        ConvertTo::Keras => bail!("{}: --to keras takes a diffusers SD3 LoRA (PEFT names) and --base", input.display()),
        ConvertTo::Kohya => {
            let stem = output.file_stem().map_or("lora".into(), |s| s.to_string_lossy().to_string());
            let (mut info, declared) = KohyaInfo::from_metadata(&set.metadata, &stem);
            if family == Family::Sd {
                info.sd_version = match opts.sd_version.or(declared).or_else(|| shape_version(&set)) {
                    Some(v) => v,
                    None => {
                        // What A1111 assumes of a file that does not say.
                        eprintln!("{}: neither the metadata nor the shapes tell SD1 from SD2; marked SD1 (pass --sd-version 2 for SD2)", input.display());
                        1
                    }
                };
            }
            info.v_prediction |= opts.v_prediction;
            write_kohya_as(&set, output, &info, family)?;
        }
    }
    Ok((set.modules.len(), family))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::read::tests::{ramp, write_file};
    use crate::lora::Format;

    #[test]
    fn lora_scales_one_for_all_or_one_each() {
        assert_eq!(scales_for(2, &[]).unwrap(), vec![1.0, 1.0]);
        assert_eq!(scales_for(2, &[0.5]).unwrap(), vec![0.5, 0.5]);
        assert_eq!(scales_for(2, &[0.5, -1.0]).unwrap(), vec![0.5, -1.0]);
        assert!(scales_for(3, &[0.5, 1.0]).unwrap_err().to_string().contains("2 --scale values for 3"));
    }

    #[test]
    fn lora_convert_refuses_overwrites_and_detects_the_version() {
        let dir = tempfile::tempdir().unwrap();
        let q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k";
        let input = write_file(dir.path(), "in.safetensors", &[(&format!("{q}.lora.down.weight"), ramp(&[2, 1024], 0.0)), (&format!("{q}.lora.up.weight"), ramp(&[8, 2], 0.0))], &[]);
        let opts = |sd_version, v_prediction, force| ConvertOptions { base: None, sd_version, v_prediction, force };
        let err = convert(&input, &input, ConvertTo::Kohya, opts(None, false, true)).unwrap_err().to_string();
        assert!(err.contains("overwrite the input"), "{err}");
        let out = dir.path().join("sks.safetensors");
        assert_eq!(convert(&input, &out, ConvertTo::Kohya, opts(None, true, false)).unwrap(), (1, Family::Sd));
        let set = read::read(&out).unwrap();
        assert_eq!(set.format, Format::Kohya);
        assert_eq!((set.metadata["ss_v2"].as_str(), set.metadata["ss_base_model_version"].as_str(), set.metadata["ss_output_name"].as_str()), ("True", "sd_v2_v", "sks"));
        let err = convert(&input, &out, ConvertTo::Diffusers, opts(None, false, false)).unwrap_err().to_string();
        assert!(err.contains("--force"), "{err}");
        convert(&out, &out.with_file_name("back.safetensors"), ConvertTo::Diffusers, opts(None, false, false)).unwrap();
        assert_eq!(std::fs::read(&input).unwrap(), std::fs::read(out.with_file_name("back.safetensors")).unwrap());
        // Nothing tells the version: marked SD1, as A1111 assumes.
        let tiny = write_file(dir.path(), "tiny.safetensors", &[(&format!("{q}.lora.down.weight"), ramp(&[2, 32], 0.0)), (&format!("{q}.lora.up.weight"), ramp(&[8, 2], 0.0))], &[]);
        let k = dir.path().join("tiny_k.safetensors");
        convert(&tiny, &k, ConvertTo::Kohya, opts(None, false, false)).unwrap();
        assert_eq!(read::read(&k).unwrap().metadata["ss_base_model_version"], "sd_v1");
    }
}
