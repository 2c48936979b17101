//! The embedded sample: tiny KerasCV SD1 checkpoints (from `fixtures/tiny/`, made by
//! `fixtures/make_fixtures.py`) so `dreambridge convert` runs with no input at all.

use super::convert::to_diffusers::KerasInputs;
use anyhow::{Context, Result};

const UNET: &[u8] = include_bytes!("../fixtures/tiny/unet_sd1.h5");
const TEXT_ENCODER: &[u8] = include_bytes!("../fixtures/tiny/text_encoder_sd1.h5");
const IMAGE_ENCODER: &[u8] = include_bytes!("../fixtures/tiny/image_encoder.h5");
const DECODER: &[u8] = include_bytes!("../fixtures/tiny/decoder.h5");

/// Writes the sample files into a temporary folder (HDF5 reads from paths) and names them.
pub fn unpack() -> Result<(tempfile::TempDir, KerasInputs)> {
    let dir = tempfile::tempdir().with_context(|| format!("{}: cannot create a folder for the embedded sample", std::env::temp_dir().display()))?;
    let write = |name: &str, bytes: &[u8]| -> Result<std::path::PathBuf> {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).with_context(|| format!("{}: cannot unpack the embedded sample", p.display()))?;
        Ok(p)
    };
    let inputs = KerasInputs {
        unet: Some(write("unet_sd1.h5", UNET)?),
        text_encoder: Some(write("text_encoder_sd1.h5", TEXT_ENCODER)?),
        vae_encoder: Some(write("image_encoder.h5", IMAGE_ENCODER)?),
        vae_decoder: Some(write("decoder.h5", DECODER)?),
    };
    Ok((dir, inputs))
}
