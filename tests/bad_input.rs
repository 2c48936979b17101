//! Bad input: one-line errors that name the file (and the tensor), a non-zero exit, no output
//! folder left behind, and nothing of the user's overwritten.

mod common;
use common::*;
use dreambridge::keras::LegacyWriter;
use std::path::Path;

fn convert_unet(file: &Path, out: &Path) -> (bool, String) {
    run(&["convert", "keras-to-diffusers", "--unet", file.to_str().unwrap(), "--out", out.to_str().unwrap()])
}

fn only_error_line(stderr: &str) -> &str {
    let line = stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("no error line in {stderr:?}"));
    line
}

#[test]
fn not_hdf5_truncated_and_wrong_model_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");

    let text = dir.path().join("notes.h5");
    std::fs::write(&text, "this is not a checkpoint").unwrap();
    let (ok, err) = convert_unet(&text, &out);
    assert!(!ok);
    assert!(only_error_line(&err).contains("notes.h5") && err.contains("not an HDF5 file"), "{err}");

    let truncated = dir.path().join("cut.h5");
    let bytes = std::fs::read(fixture("unet_sd1.h5")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, err) = convert_unet(&truncated, &out);
    assert!(!ok);
    assert!(only_error_line(&err).contains("cut.h5"), "{err}");

    let (ok, err) = convert_unet(&fixture("decoder.h5"), &out);
    assert!(!ok);
    let line = only_error_line(&err);
    assert!(line.contains("decoder.h5") && line.contains("vae-decoder") && line.contains("not a unet"), "{line}");
    assert!(!out.exists(), "no output folder may be left behind");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "no staging folder may be left behind");
}

/// Rewrites a legacy file with our writer, letting `edit` change the list of (group, weights).
fn rewrite(from: &Path, to: &Path, edit: impl Fn(&mut Vec<(String, Vec<(String, dreambridge::tensor::RawTensor)>)>)) {
    let f = dreambridge::keras::KerasFile::open(from).unwrap();
    let mut layers: Vec<(String, Vec<(String, dreambridge::tensor::RawTensor)>)> = f
        .layers
        .iter()
        .map(|l| {
            let weights = l.weights.iter().map(|w| (w.split_once('/').unwrap().1.to_string(), f.read(w).unwrap())).collect();
            (l.name.clone(), weights)
        })
        .collect();
    edit(&mut layers);
    let names: Vec<String> = layers.iter().map(|l| l.0.clone()).collect();
    let w = LegacyWriter::create(to, &names).unwrap();
    for (group, weights) in layers {
        let wn: Vec<String> = weights.iter().map(|x| x.0.clone()).collect();
        w.begin_layer(&group, &wn).unwrap();
        for (name, t) in weights {
            w.write(&group, &name, t).unwrap();
        }
    }
    w.finish().unwrap();
}

#[test]
fn shape_mismatch_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad_shape.h5");
    rewrite(&fixture("text_encoder_sd1.h5"), &bad, |layers| {
        // fc1 kernel of the second encoder layer: (8, 32) -> (8, 31)
        let t = &mut layers[2].1[12].1;
        assert_eq!(t.shape, vec![8, 32]);
        t.shape = vec![8, 31];
        t.data.truncate(8 * 31 * 4);
    });
    let out = dir.path().join("out");
    let (ok, err) = run(&["convert", "keras-to-diffusers", "--text-encoder", bad.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!ok);
    let line = only_error_line(&err);
    assert!(line.contains("bad_shape.h5") && line.contains("mlp.fc1.weight") && line.contains("[8, 31]"), "{line}");
    assert!(!out.exists());
}

#[test]
fn missing_layer_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("missing_layer.h5");
    rewrite(&fixture("image_encoder.h5"), &bad, |layers| {
        layers.remove(13); // the mid-block attention
    });
    let out = dir.path().join("out");
    let (ok, err) = run(&["convert", "keras-to-diffusers", "--vae-encoder", bad.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!ok);
    let line = only_error_line(&err);
    assert!(line.contains("missing_layer.h5") && line.contains("expected 18 weighted layers, found 17"), "{line}");
    assert!(!out.exists());
}

#[test]
fn existing_output_is_kept_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("mine.txt"), "user data").unwrap();
    let (ok, err) = convert_unet(&fixture("unet_sd1.h5"), &out);
    assert!(!ok && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("mine.txt")).unwrap(), "user data");
    let (ok, err) = run(&["convert", "keras-to-diffusers", "--unet", fixture("unet_sd1.h5").to_str().unwrap(), "--out", out.to_str().unwrap(), "--force"]);
    assert!(ok, "{err}");
    assert!(out.join("unet/config.json").exists() && !out.join("mine.txt").exists());
}

#[test]
fn embedded_sample_and_inspect_work_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sample");
    let (ok, err) = run(&["convert", "keras-to-diffusers", "--out", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.join("model_index.json").exists() && out.join("unet/diffusion_pytorch_model.safetensors").exists());
    let report = cli().args(["inspect", fixture("unet_sd1.h5").to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8(report.stdout).unwrap();
    assert!(text.contains("detected: unet-sd1") && text.contains("conv_in.weight"), "{text}");
    let report = cli().args(["inspect", out.join("vae/diffusion_pytorch_model.safetensors").to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8(report.stdout).unwrap();
    assert!(text.contains("detected: vae-encoder") && text.contains("detected: vae-decoder"), "{text}");
}

