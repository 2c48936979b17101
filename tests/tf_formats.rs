//! KerasCV weights in TensorFlow's and Keras 3's other forms (TF checkpoint, SavedModel, `.keras`
//! archive, all written by real TensorFlow/Keras: fixtures/make_fixtures.py) convert to the same
//! tensors as the `.h5` of the same weights; corrupted bundles are refused by name; textual
//! inversion text encoders get their placeholder tokens.

mod common;
use common::*;
use dreambridge::convert::to_diffusers::{keras_to_diffusers, open_keras, KerasInputs, ToDiffusersOptions};
use dreambridge::keras::KerasFormat;
use dreambridge::tensor::RawTensor;
use std::path::Path;

/// (diffusers key, tensor in diffusers layout) of a KerasCV input, as the converter sees it.
fn converted(path: &Path, role: &str, sd_version: Option<u8>) -> (KerasFormat, Vec<(String, RawTensor)>) {
    let m = open_keras(path, role, sd_version).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
    let tensors = m
        .plan
        .tensors
        .iter()
        .map(|t| {
            let raw = m.file.read(&t.source).unwrap();
            let data = t.spec.op.to_diffusers(raw.data, &raw.shape, raw.dtype.size()).unwrap();
            (t.spec.key.clone(), RawTensor { dtype: raw.dtype, shape: t.diffusers_shape.clone(), data })
        })
        .collect();
    (m.file.format, tensors)
}

#[test]
fn tf_checkpoints_saved_models_and_keras_archives_give_the_h5_tensors() {
    no_hdf5_locks();
    let (_, encoder) = converted(&fixture("image_encoder.h5"), "vae-encoder", None);
    let ckpt = fixture("tf_checkpoint");
    // The folder (its `checkpoint` file names the latest), the index, the prefix, a data shard.
    for given in [ckpt.clone(), ckpt.join("ckpt.index"), ckpt.join("ckpt"), ckpt.join("ckpt.data-00000-of-00001")] {
        let (format, tensors) = converted(&given, "vae-encoder", None);
        assert_eq!(format, KerasFormat::TfCheckpoint, "{}", given.display());
        assert!(tensors == encoder, "{}: tensors differ from the .h5", given.display());
    }
    let (_, text) = converted(&fixture("text_encoder_sd2.h5"), "text-encoder", Some(2));
    let (format, saved) = converted(&fixture("saved_model_text_encoder_sd2"), "text-encoder", Some(2));
    assert_eq!(format, KerasFormat::SavedModel);
    assert!(saved == text, "SavedModel tensors differ from the .h5");
    let (format, archive) = converted(&fixture("text_encoder_sd2.keras"), "text-encoder", Some(2));
    assert_eq!(format, KerasFormat::Keras3);
    assert!(archive == text, ".keras tensors differ from the .h5");
    // And the whole conversion: the SavedModel folder as --text-encoder.
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for (input, out) in [(fixture("text_encoder_sd2.h5"), &a), (fixture("saved_model_text_encoder_sd2"), &b)] {
        let inputs = KerasInputs { text_encoder: Some(input), ..Default::default() };
        keras_to_diffusers(&inputs, &ToDiffusersOptions { out: out.clone(), sd_version: Some(2), ..Default::default() }).unwrap();
    }
    assert_eq!(st_tensors(&a.join("text_encoder/model.safetensors")), st_tensors(&b.join("text_encoder/model.safetensors")));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn corrupted_bundles_are_named_and_leave_nothing() {
    no_hdf5_locks();
    let dir = tempfile::tempdir().unwrap();
    let convert = |input: &Path| {
        let out = dir.path().join("out");
        let (ok, err) = run(&["convert", "keras-to-diffusers", "--text-encoder", input.to_str().unwrap(), "--sd-version", "2", "--out", out.to_str().unwrap()]);
        assert!(!ok && !out.exists(), "{err}");
        let last = err.trim().lines().last().unwrap_or_default().to_string();
        assert!(last.starts_with("error: "), "{err}");
        last
    };
    let fresh = |name: &str| {
        let d = dir.path().join(name);
        copy_dir(&fixture("saved_model_text_encoder_sd2"), &d);
        d
    };
    // A flipped bit in a tensor's data: its checksum names it.
    let flipped = fresh("flipped");
    let data = flipped.join("variables/variables.data-00000-of-00001");
    let mut bytes = std::fs::read(&data).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&data, &bytes).unwrap();
    let err = convert(&flipped);
    assert!(err.contains("flipped") && err.contains("checksum mismatch") && err.contains("tensor `variables/"), "{err}");
    // A truncated data shard.
    let short = fresh("short");
    let data = short.join("variables/variables.data-00000-of-00001");
    let bytes = std::fs::read(&data).unwrap();
    std::fs::write(&data, &bytes[..bytes.len() - 64]).unwrap();
    assert!(convert(&short).contains("truncated"));
    // A damaged index: a changed byte fails its block checksum; a cut one loses its footer.
    let damaged = fresh("damaged");
    let index = damaged.join("variables/variables.index");
    let mut bytes = std::fs::read(&index).unwrap();
    bytes[20] ^= 0x01;
    std::fs::write(&index, &bytes).unwrap();
    let err = convert(&damaged);
    assert!(err.contains("variables.index") && err.contains("checksum mismatch"), "{err}");
    std::fs::write(&index, &bytes[..bytes.len() - 10]).unwrap();
    assert!(convert(&damaged).contains("variables.index"));
    // A missing data shard.
    let missing = fresh("missing");
    std::fs::remove_file(missing.join("variables/variables.data-00000-of-00001")).unwrap();
    assert!(convert(&missing).contains("missing data shard"));
}

#[test]
fn textual_inversion_rows_get_their_placeholder_tokens() {
    no_hdf5_locks();
    let dir = tempfile::tempdir().unwrap();
    let ti = fixture("text_encoder_sd1_ti.h5");
    let out = dir.path().join("pipe");
    let (ok, err) = run(&["convert", "keras-to-diffusers", "--text-encoder", ti.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!ok && !out.exists());
    assert!(err.contains("2 token-embedding rows beyond CLIP's 49408") && err.contains("--placeholder-token"), "{err}");
    let embeds = dir.path().join("learned_embeds.safetensors");
    let (ok, err) = run(&[
        "convert", "keras-to-diffusers", "--text-encoder", ti.to_str().unwrap(), "--placeholder-token", "<cat-toy>",
        "--placeholder-token", "<dog-toy>", "--learned-embeds", embeds.to_str().unwrap(), "--out", out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let added: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer/added_tokens.json")).unwrap()).unwrap();
    assert_eq!(added, serde_json::json!({"<cat-toy>": 49408, "<dog-toy>": 49409}));
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer/tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(config["added_tokens_decoder"]["49409"]["content"], "<dog-toy>");
    // The learned rows, one file per token, as load_textual_inversion reads them.
    let text = st_tensors(&out.join("text_encoder/model.safetensors"));
    let table = &text.iter().find(|(k, _)| k.ends_with("token_embedding.weight")).unwrap().1;
    assert_eq!(table.shape, vec![49410, 8]);
    for (file, token, row) in [(embeds.clone(), "<cat-toy>", 49408usize), (dir.path().join("learned_embeds-1.safetensors"), "<dog-toy>", 49409)] {
        let t = st_tensors(&file);
        assert_eq!(t.len(), 1);
        assert_eq!((t[0].0.as_str(), t[0].1.shape.clone()), (token, vec![8]));
        assert_eq!(t[0].1.data, table.data[row * 32..(row + 1) * 32].to_vec());
    }
}

/// The CLI in `cwd`, with no Hub to reach (an input taken for a repo id fails at once); (success,
/// stdout, stderr).
fn run_in(cwd: &Path, args: &[&str]) -> (bool, String, String) {
    let out = cli().args(args).current_dir(cwd).env("HF_ENDPOINT", "http://127.0.0.1:9").env("HF_HOME", cwd.join("hf_home")).env_remove("HF_TOKEN").output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn tf_checkpoint_prefixes_convert_and_inspect_like_the_h5() {
    no_hdf5_locks();
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    // `save_weights("tf_checkpoint/ckpt")` as is, and TF's tutorial naming `training_1/cp.ckpt`.
    copy_dir(&fixture("tf_checkpoint"), &cwd.join("tf_checkpoint"));
    let training = cwd.join("training_1");
    std::fs::create_dir(&training).unwrap();
    for (from, to) in [("ckpt.index", "cp.ckpt.index"), ("ckpt.data-00000-of-00001", "cp.ckpt.data-00000-of-00001")] {
        std::fs::copy(fixture("tf_checkpoint").join(from), training.join(to)).unwrap();
    }
    std::fs::write(training.join("checkpoint"), "model_checkpoint_path: \"cp.ckpt\"\nall_model_checkpoint_paths: \"cp.ckpt\"\n").unwrap();
    let vae = |out: &str| st_tensors(&cwd.join(out).join("vae/diffusion_pytorch_model.safetensors"));
    // The VAE's decoder half, the same in every conversion.
    let decoder = fixture("decoder.h5");
    let convert = |encoder: &str, out: &str| run_in(cwd, &["convert", "keras-to-diffusers", "--vae-encoder", encoder, "--vae-decoder", decoder.to_str().unwrap(), "--out", out]);
    let (ok, _, err) = convert(fixture("image_encoder.h5").to_str().unwrap(), "from_h5");
    assert!(ok, "{err}");
    for (prefix, out) in [("tf_checkpoint/ckpt", "from_ckpt"), ("training_1/cp.ckpt", "from_cp")] {
        let (ok, _, err) = convert(prefix, out);
        assert!(ok, "{prefix}: {err}");
        assert!(vae(out) == vae("from_h5"), "{prefix}: tensors differ from the .h5");
        let (ok, report, err) = run_in(cwd, &["inspect", prefix]);
        assert!(ok, "{prefix}: {err}");
        assert!(report.contains("format: TensorFlow checkpoint") && report.contains("detected: vae-encoder"), "{prefix}: {report}");
    }
}
