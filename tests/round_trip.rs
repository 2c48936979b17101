//! h5 -> safetensors -> h5 reproduces every tensor bit for bit, and the written .h5 is read back
//! as the same model.

mod common;
use common::*;
use dreambridge::convert::to_diffusers::{keras_to_diffusers, KerasInputs, ToDiffusersOptions};
use dreambridge::convert::to_keras::diffusers_to_keras;
use dreambridge::keras::{KerasFile, KerasFormat};

fn round_trip(inputs: KerasInputs, pairs: &[(&str, &str)], sd_version: Option<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let pipe = dir.path().join("pipe");
    keras_to_diffusers(&inputs, &ToDiffusersOptions { out: pipe.clone(), sd_version, ..Default::default() }).unwrap();
    let back = dir.path().join("keras");
    diffusers_to_keras(&pipe, &back, false, sd_version).unwrap();
    for (original, written) in pairs {
        let a = keras_tensors(&fixture(original));
        let b = keras_tensors(&back.join(written));
        assert_eq!(a.len(), b.len(), "{original}");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(x, y, "{original}: tensor #{i} differs after the round trip");
        }
        let f = KerasFile::open(&back.join(written)).unwrap();
        assert_eq!(f.format, KerasFormat::Legacy);
        assert_eq!(f.keras_version.as_deref(), Some("2.14.0"));
    }
    // And once more: safetensors -> h5 -> safetensors is the identity too.
    let pipe2 = dir.path().join("pipe2");
    let back_inputs = KerasInputs {
        unet: back.join("diffusion_model.h5").exists().then(|| back.join("diffusion_model.h5")),
        text_encoder: back.join("text_encoder.h5").exists().then(|| back.join("text_encoder.h5")),
        vae_encoder: back.join("image_encoder.h5").exists().then(|| back.join("image_encoder.h5")),
        vae_decoder: back.join("decoder.h5").exists().then(|| back.join("decoder.h5")),
    };
    keras_to_diffusers(&back_inputs, &ToDiffusersOptions { out: pipe2.clone(), sd_version, ..Default::default() }).unwrap();
    for f in ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"] {
        if pipe.join(f).exists() {
            assert_eq!(st_tensors(&pipe.join(f)), st_tensors(&pipe2.join(f)), "{f}");
        }
    }
}

#[test]
fn sd1_round_trip_is_bit_exact() {
    round_trip(
        KerasInputs {
            unet: Some(fixture("unet_sd1.h5")),
            text_encoder: Some(fixture("text_encoder_sd1.h5")),
            vae_encoder: Some(fixture("image_encoder.h5")),
            vae_decoder: Some(fixture("decoder.h5")),
        },
        &[("unet_sd1.h5", "diffusion_model.h5"), ("text_encoder_sd1.h5", "text_encoder.h5"), ("image_encoder.h5", "image_encoder.h5"), ("decoder.h5", "decoder.h5")],
        None,
    );
}

#[test]
fn sd2_round_trip_is_bit_exact() {
    round_trip(
        KerasInputs { unet: Some(fixture("unet_sd2.h5")), text_encoder: Some(fixture("text_encoder_sd2.h5")), ..Default::default() },
        &[("unet_sd2.h5", "diffusion_model.h5"), ("text_encoder_sd2.h5", "text_encoder.h5")],
        Some(2),
    );
}

#[test]
fn f16_round_trip_keeps_f16() {
    round_trip(
        KerasInputs { text_encoder: Some(fixture("text_encoder_sd2_f16.h5")), ..Default::default() },
        &[("text_encoder_sd2_f16.h5", "text_encoder.h5")],
        Some(2),
    );
}
