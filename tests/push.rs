//! `dreambridge push` against the loopback Hub emulator (tests/support/hub_emulator.py): the LFS
//! upload path, skipping what the server has, retries that resume, and failures that leave the
//! repo untouched. Loopback only.

mod common;
use common::hub::{Hub, TOKEN};
use common::*;
use dreambridge::convert::to_diffusers::{keras_to_diffusers, KerasInputs, ToDiffusersOptions};
use dreambridge::hub::push::{push, PushOptions};
use serde_json::json;
use std::path::{Path, PathBuf};

/// The embedded sample converted to a pipeline folder (its UNet is 1.4 MB: six 256 KiB parts).
fn pipeline(dir: &Path) -> PathBuf {
    let out = dir.join("pipe");
    let inputs = KerasInputs {
        unet: Some(fixture("unet_sd1.h5")),
        text_encoder: Some(fixture("text_encoder_sd1.h5")),
        vae_encoder: Some(fixture("image_encoder.h5")),
        vae_decoder: Some(fixture("decoder.h5")),
    };
    keras_to_diffusers(&inputs, &ToDiffusersOptions { out: out.clone(), ..Default::default() }).unwrap();
    out
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in walk(dir) {
        out.push(e.strip_prefix(dir).unwrap().to_string_lossy().to_string());
    }
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).unwrap().flatten().flat_map(|e| if e.path().is_dir() { walk(&e.path()) } else { vec![e.path()] }).collect()
}

#[test]
fn push_uploads_every_file_byte_for_byte_through_lfs() {
    no_hdf5_locks();
    let hub = Hub::start();
    let dir = tempfile::tempdir().unwrap();
    let pipe = pipeline(dir.path());
    let mut opts = hub.opts("me/sks-dog");
    opts.card.instance_prompt = Some("a photo of sks dog".into());
    let done = push(&pipe, &opts).unwrap();
    assert_eq!((done.uploaded_lfs, done.skipped_lfs), (3, 0), "three safetensors files go by LFS");
    assert!(pipe.join("README.md").exists(), "a model card is written when the folder has none");
    let info = hub.json("/api/models/me/sks-dog/revision/main");
    assert_eq!(info["sha"], done.commit.as_str());
    let remote: Vec<String> = info["siblings"].as_array().unwrap().iter().map(|s| s["rfilename"].as_str().unwrap().to_string()).collect();
    assert_eq!(remote, files_in(&pipe));
    for f in &remote {
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut hub.get(&format!("/me/sks-dog/resolve/main/{f}")).into_reader(), &mut body).unwrap();
        assert_eq!(body, std::fs::read(pipe.join(f)).unwrap(), "{f}");
    }
    let parts: u64 = ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"]
        .iter()
        .map(|f| std::fs::metadata(pipe.join(f)).unwrap().len().div_ceil(262144))
        .sum();
    assert_eq!(hub.count("PUT", "/part/") as u64, parts, "every weight file is above 256 KiB: multipart, each part once");
    assert_eq!(hub.count("POST", "/verify"), 3);
    let tree = hub.json("/api/models/me/sks-dog/tree/main");
    let unet = tree.as_array().unwrap().iter().find(|e| e["path"] == "unet/diffusion_pytorch_model.safetensors").unwrap();
    assert!(unet["lfs"]["oid"].is_string(), "weights are LFS files: {unet}");
    let card = std::fs::read_to_string(pipe.join("README.md")).unwrap();
    assert!(card.contains("instance_prompt: \"a photo of sks dog\"") && card.contains("- dreambooth"));

    // Pushing again: the objects are on the server already and no byte is re-sent.
    let puts = hub.count("PUT", "/_lfs/");
    let again = push(&pipe, &hub.opts("me/sks-dog")).unwrap();
    assert_eq!(hub.count("PUT", "/_lfs/"), puts);
    assert_eq!(again.unchanged, remote.len());
}

#[test]
fn multipart_part_keys_plain_or_padded_upload_and_gaps_are_refused() {
    no_hdf5_locks();
    let dir = tempfile::tempdir().unwrap();
    let pipe = pipeline(dir.path());
    let unet = std::fs::read(pipe.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    // Padded keys are the emulator's default (the push test above); here the plain spelling.
    let hub = Hub::start_with(&["--part-keys", "plain"]);
    push(&pipe, &hub.opts("me/plain")).unwrap();
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut hub.get("/me/plain/resolve/main/unet/diffusion_pytorch_model.safetensors").into_reader(), &mut body).unwrap();
    assert_eq!(body, unet);
    assert!(hub.count("PUT", "/part/") > 3, "the weights went up in parts");

    // A server that numbers the parts 1, 3, 4, ...: a clear error naming the file, nothing sent,
    // no commit (the official client would send part 3's bytes to part 2's URL).
    let hub = Hub::start_with(&["--part-keys", "gap"]);
    let err = format!("{:#}", push(&pipe, &hub.opts("me/gap")).unwrap_err());
    assert!(err.contains("model.safetensors") && err.contains("part 2 has no URL (next key: `00003`)"), "{err}");
    assert_eq!(hub.count("PUT", "/part/"), 0, "nothing is uploaded from an answer with a gap");
    let info = hub.json("/api/models/me/gap/revision/main");
    assert_eq!(info["siblings"].as_array().unwrap().len(), 0, "no commit");
}

#[test]
fn transient_failures_are_retried_without_resending_finished_parts() {
    no_hdf5_locks();
    let hub = Hub::start();
    let dir = tempfile::tempdir().unwrap();
    let pipe = pipeline(dir.path());
    hub.faults(json!({"rules": [
        {"method": "PUT", "path_contains": "/part/2", "action": "status", "status": 500, "count": 1},
        {"method": "PUT", "path_contains": "/part/4", "action": "drop", "count": 1},
        {"method": "POST", "path_contains": "/preupload/", "action": "status", "status": 503, "count": 1}
    ]}));
    push(&pipe, &hub.opts("me/flaky")).unwrap();
    let unet_parts: Vec<String> = hub
        .log()
        .into_iter()
        .filter(|(m, p)| m == "PUT" && p.contains("/part/"))
        .map(|(_, p)| p)
        .collect();
    // The first object's parts: 1 once, 2 twice (500), 3 once, 4 twice (dropped), ...
    let first_oid = unet_parts[0].split('/').nth(2).unwrap().to_string();
    let of_first: Vec<&String> = unet_parts.iter().filter(|p| p.contains(&first_oid)).collect();
    let count = |n: &str| of_first.iter().filter(|p| p.ends_with(n)).count();
    assert_eq!((count("/part/1"), count("/part/2"), count("/part/3"), count("/part/4")), (1, 2, 1, 2), "{of_first:?}");
    let info = hub.json("/api/models/me/flaky/revision/main");
    assert_eq!(info["siblings"].as_array().unwrap().len(), files_in(&pipe).len());
}

#[test]
fn failed_pushes_leave_the_repo_as_it_was() {
    no_hdf5_locks();
    let hub = Hub::start();
    let dir = tempfile::tempdir().unwrap();
    let pipe = pipeline(dir.path());
    // The commit keeps failing: every upload happened, but no commit exists.
    hub.faults(json!({"rules": [{"method": "POST", "path_contains": "/commit/", "action": "status", "status": 500, "count": 99}]}));
    let err = format!("{:#}", push(&pipe, &hub.opts("me/nocommit")).unwrap_err());
    assert!(err.contains("commit") && err.contains("attempts"), "{err}");
    let info = hub.json("/api/models/me/nocommit/revision/main");
    assert_eq!(info["siblings"].as_array().unwrap().len(), 0, "no partial commit");

    // A refused token fails at once, names the cause, and never shows the token.
    hub.faults(json!({"refuse_auth": true}));
    let out = cli()
        .args(["push", pipe.to_str().unwrap(), "--repo", "me/other", "--token", TOKEN])
        .env("HF_ENDPOINT", &hub.url)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("refused the token"), "{stderr}");
    assert!(!stderr.contains(TOKEN) && !String::from_utf8_lossy(&out.stdout).contains(TOKEN));
}

#[test]
fn folders_that_from_pretrained_cannot_load_are_refused() {
    no_hdf5_locks();
    let dir = tempfile::tempdir().unwrap();
    let pipe = pipeline(dir.path());
    std::fs::remove_file(pipe.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::remove_file(pipe.join("scheduler/scheduler_config.json")).unwrap();
    let opts = PushOptions { repo: "me/x".into(), endpoint: Some("http://127.0.0.1:9".into()), token: Some(TOKEN.into()), ..Default::default() };
    let err = format!("{:#}", push(&pipe, &opts).unwrap_err());
    assert!(err.contains("vae/ weights") && err.contains("scheduler/scheduler_config.json"), "{err}");
    assert!(!pipe.join("README.md").exists(), "nothing is written before the check passes");
}

#[test]
fn the_emulator_refuses_large_binary_files_outside_lfs() {
    no_hdf5_locks();
    use base64::Engine;
    let hub = Hub::start();
    let auth = format!("Bearer {TOKEN}");
    ureq::post(&format!("{}/api/repos/create", hub.url)).set("Authorization", &auth).send_json(json!({"name": "big", "organization": "me"})).unwrap();
    let blob = vec![0u8; 1_500_000];
    let body = format!(
        "{}\n{}",
        json!({"key": "header", "value": {"summary": "x"}}),
        json!({"key": "file", "value": {"path": "w.safetensors", "encoding": "base64", "content": base64::engine::general_purpose::STANDARD.encode(&blob)}})
    );
    let r = ureq::post(&format!("{}/api/models/me/big/commit/main", hub.url)).set("Authorization", &auth).set("Content-Type", "application/x-ndjson").send_string(&body);
    match r {
        Err(ureq::Error::Status(400, resp)) => assert!(resp.into_string().unwrap().contains("git-lfs")),
        other => panic!("expected a 400, got {:?}", other.map(|r| r.status())),
    }
}

#[test]
fn downloads_land_in_the_python_compatible_cache_and_serve_as_base() {
    no_hdf5_locks();
    let hub = Hub::start();
    let dir = tempfile::tempdir().unwrap();
    let pipe = pipeline(dir.path());
    let pushed = push(&pipe, &hub.opts("me/base")).unwrap();
    let home = dir.path().join("hf_home");
    let run = |args: &[&str]| {
        let out = cli().args(args).env("HF_ENDPOINT", &hub.url).env("HF_HOME", &home).env("HF_TOKEN", TOKEN).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let snapshot = PathBuf::from(run(&["download", "me/base"]).trim());
    assert_eq!(snapshot, home.join("hub/models--me--base/snapshots").join(&pushed.commit));
    assert_eq!(std::fs::read_to_string(home.join("hub/models--me--base/refs/main")).unwrap().trim(), pushed.commit);
    for f in files_in(&pipe) {
        assert_eq!(std::fs::read(snapshot.join(&f)).unwrap(), std::fs::read(pipe.join(&f)).unwrap(), "{f}");
    }
    // A repo id as --base: only the UNet is converted, the rest comes from the Hub.
    let out = dir.path().join("out");
    run(&["convert", "keras-to-diffusers", "--unet", fixture("unet_sd1_shifted.h5").to_str().unwrap(), "--base", "me/base", "--out", out.to_str().unwrap()]);
    assert_eq!(std::fs::read(out.join("vae/diffusion_pytorch_model.safetensors")).unwrap(), std::fs::read(pipe.join("vae/diffusion_pytorch_model.safetensors")).unwrap());
    assert!(out.join("model_index.json").exists());
}

#[test]
fn branch_subfolder_privacy_existing_card_and_push_after_convert() {
    no_hdf5_locks();
    let hub = Hub::start();
    let dir = tempfile::tempdir().unwrap();
    let pipe = pipeline(dir.path());
    std::fs::write(pipe.join("README.md"), "---\nlicense: mit\n---\n# mine\n").unwrap();
    let run = |args: &[&str]| {
        let out = cli().args(args).env("HF_ENDPOINT", &hub.url).env("HF_TOKEN", TOKEN).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let p = pipe.to_str().unwrap();
    run(&["push", p, "--repo", "me/priv", "--private", "--revision", "dev", "--path-in-repo", "sd/v1", "--commit-message", "first"]);
    assert_eq!(std::fs::read_to_string(pipe.join("README.md")).unwrap(), "---\nlicense: mit\n---\n# mine\n", "an existing card is kept");
    let dev = hub.json("/api/models/me/priv/revision/dev");
    assert_eq!(dev["private"], true);
    let names: Vec<&str> = dev["siblings"].as_array().unwrap().iter().map(|s| s["rfilename"].as_str().unwrap()).collect();
    assert!(names.contains(&"sd/v1/unet/diffusion_pytorch_model.safetensors") && names.contains(&"sd/v1/README.md"), "{names:?}");
    let main = hub.json("/api/models/me/priv/revision/main");
    assert_eq!(main["siblings"].as_array().unwrap().len(), 0, "main is untouched by a push to dev");

    let out = dir.path().join("converted");
    run(&["convert", "keras-to-diffusers", "--out", out.to_str().unwrap(), "--push-to-hub", "me/converted"]);
    let info = hub.json("/api/models/me/converted/revision/main");
    assert!(info["siblings"].as_array().unwrap().iter().any(|s| s["rfilename"] == "model_index.json"));
}

#[test]
fn a_lora_folder_is_pushed_as_a_lora_repo() {
    no_hdf5_locks();
    use dreambridge::lora::{Format, LoraModule, LoraSet, Part};
    use dreambridge::tensor::{DType, RawTensor};
    let hub = Hub::start();
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("sks-lora");
    std::fs::create_dir(&folder).unwrap();
    let f32s = |shape: Vec<usize>| RawTensor { dtype: DType::F32, data: (0..shape.iter().product::<usize>()).flat_map(|i| (i as f32 * 0.01).to_le_bytes()).collect(), shape };
    let module = LoraModule { down: f32s(vec![4, 320]), up: f32s(vec![320, 4]), alpha: 4.0 };
    let mut set = LoraSet { modules: Default::default(), format: Format::Diffusers, metadata: Default::default() };
    set.modules.insert((Part::Unet, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q".into()), module);
    dreambridge::lora::write::write_diffusers(&set, &folder.join("pytorch_lora_weights.safetensors")).unwrap();
    let mut opts = hub.opts("me/sks-lora");
    opts.card.instance_prompt = Some("a photo of sks dog".into());
    opts.card.base_model = Some("runwayml/stable-diffusion-v1-5".into());
    let done = push(&folder, &opts).unwrap();
    assert_eq!(done.uploaded_lfs, 1);
    let card = std::fs::read_to_string(folder.join("README.md")).unwrap();
    assert!(card.contains("- lora\n") && card.contains("load_lora_weights(\"me/sks-lora\")"), "{card}");
    let names: Vec<String> = hub.json("/api/models/me/sks-lora/revision/main")["siblings"].as_array().unwrap().iter().map(|s| s["rfilename"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, ["README.md", "pytorch_lora_weights.safetensors"]);
}

#[test]
fn single_files_on_the_hub_convert_by_hf_uri_and_resolve_url() {
    no_hdf5_locks();
    let hub = Hub::start();
    let dir = tempfile::tempdir().unwrap();
    let pipe = pipeline(dir.path());
    let file = pipe.join("sd1.safetensors"); // as `train --save-single-file` leaves it
    let (ok, err) = run(&["convert", "diffusers-to-single-file", "--model", pipe.to_str().unwrap(), "--out", file.to_str().unwrap()]);
    assert!(ok, "{err}");
    let pushed = push(&pipe, &hub.opts("me/sf")).unwrap();
    let home = dir.path().join("hf_home");
    let convert = |spec: &str, out: &str| {
        cli()
            .args(["convert", "single-file-to-diffusers", "--checkpoint", spec, "--out", dir.path().join(out).to_str().unwrap()])
            .env("HF_ENDPOINT", &hub.url)
            .env("HF_HOME", &home)
            .env("HF_TOKEN", TOKEN)
            .output()
            .unwrap()
    };
    for (spec, out) in [
        ("hf://me/sf/sd1.safetensors".to_string(), "a"),
        (format!("hf://me/sf/sd1.safetensors@{}", pushed.commit), "b"),
        (format!("{}/me/sf/resolve/main/sd1.safetensors", hub.url), "c"),
    ] {
        let done = convert(&spec, out);
        assert!(done.status.success(), "{spec}: {}", String::from_utf8_lossy(&done.stderr));
        let unet = "unet/diffusion_pytorch_model.safetensors";
        assert_eq!(st_tensors(&dir.path().join(out).join(unet)), st_tensors(&pipe.join(unet)), "{spec}");
    }
    assert!(home.join("hub/models--me--sf/snapshots").join(&pushed.commit).join("sd1.safetensors").is_file());
    let missing = convert("hf://me/sf/nope.safetensors", "d");
    let err = String::from_utf8_lossy(&missing.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(!missing.status.success() && last.starts_with("error: me/sf: downloading nope.safetensors") && last.contains("404"), "{err}");
}

#[test]
fn kerascv_weights_come_from_hub_files_urls_and_savedmodel_repos_and_the_space_flow_pushes() {
    no_hdf5_locks();
    let hub = Hub::start();
    let dir = tempfile::tempdir().unwrap();
    // A repo with a diffusers base, a KerasCV UNet .h5 and a SavedModel (as push_to_hub_keras
    // leaves it) at its root.
    let pipe = pipeline(dir.path());
    std::fs::copy(fixture("unet_sd2.h5"), pipe.join("unet_sd2.h5")).unwrap();
    for e in std::fs::read_dir(fixture("saved_model_text_encoder_sd2")).unwrap().flatten() {
        let to = pipe.join(e.file_name());
        if e.path().is_dir() {
            std::fs::create_dir_all(&to).unwrap();
            for f in std::fs::read_dir(e.path()).unwrap().flatten() {
                std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
            }
        } else if e.file_name() != "README.md" {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
    let pushed = push(&pipe, &hub.opts("me/kcv")).unwrap();
    let home = dir.path().join("hf_home");
    let run = |args: &[&str], token: bool| {
        let mut c = cli();
        c.args(args).env("HF_ENDPOINT", &hub.url).env("HF_HOME", &home).env_remove("HF_TOKEN");
        if token {
            c.env("HF_TOKEN", TOKEN);
        }
        let out = c.output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    // The old conversion Space's flow in one command: UNet by hf:// at a revision, text encoder
    // from a SavedModel repo id, base repo, pushed with a card naming the sources.
    let out = dir.path().join("out");
    let unet_spec = format!("hf://me/kcv/unet_sd2.h5@{}", pushed.commit);
    let (ok, err) = run(
        &["convert", "keras-to-diffusers", "--unet", &unet_spec, "--text-encoder", "me/kcv", "--base", "me/kcv", "--out", out.to_str().unwrap(), "--push-to-hub", "me/converted"],
        true,
    );
    assert!(ok, "{err}");
    let local = dir.path().join("local");
    let inputs = KerasInputs { unet: Some(fixture("unet_sd2.h5")), text_encoder: Some(fixture("text_encoder_sd2.h5")), ..Default::default() };
    keras_to_diffusers(&inputs, &ToDiffusersOptions { out: local.clone(), sd_version: Some(2), ..Default::default() }).unwrap();
    for f in ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"] {
        assert_eq!(st_tensors(&out.join(f)), st_tensors(&local.join(f)), "{f}");
    }
    let card = hub.get("/me/converted/resolve/main/README.md").into_string().unwrap();
    assert!(card.contains(&unet_spec) && card.contains("`me/kcv`") && card.contains("base_model: \"me/kcv\""), "{card}");
    // A resolve URL works as well.
    let url_out = dir.path().join("url");
    let url = format!("{}/me/kcv/resolve/main/unet_sd2.h5", hub.url);
    let (ok, err) = run(&["convert", "keras-to-diffusers", "--unet", &url, "--out", url_out.to_str().unwrap()], true);
    assert!(ok, "{err}");
    assert_eq!(st_tensors(&url_out.join("unet/diffusion_pytorch_model.safetensors")), st_tensors(&local.join("unet/diffusion_pytorch_model.safetensors")));
    // A connection that breaks mid-download: the download continues from where it stopped.
    std::fs::remove_dir_all(&home).unwrap();
    hub.faults(json!({"rules": [{"method": "GET", "path_contains": "/me/kcv/resolve/main/unet_sd2.h5", "action": "truncate", "range": "bytes=0-", "count": 1}]}));
    let resumed = dir.path().join("resumed");
    let (ok, err) = run(&["convert", "keras-to-diffusers", "--unet", "hf://me/kcv/unet_sd2.h5", "--out", resumed.to_str().unwrap()], true);
    assert!(ok, "{err}");
    assert_eq!(st_tensors(&resumed.join("unet/diffusion_pytorch_model.safetensors")), st_tensors(&local.join("unet/diffusion_pytorch_model.safetensors")));
    let ranges: Vec<String> = hub.json("/_test/log").as_array().unwrap().iter().filter(|e| e["path"] == "/me/kcv/resolve/main/unet_sd2.h5" && e["method"] == "GET").map(|e| e["range"].as_str().unwrap_or("").to_string()).collect();
    assert!(ranges.len() >= 2 && ranges.last().unwrap().starts_with("bytes=") && ranges.last().unwrap() != "bytes=0-", "{ranges:?}");
    // A missing file, and a gated repo without a token: one clear line each, nothing written.
    let none = dir.path().join("none");
    let (ok, err) = run(&["convert", "keras-to-diffusers", "--unet", "hf://me/kcv/nope.h5", "--out", none.to_str().unwrap()], true);
    let last = err.trim().lines().last().unwrap().to_string();
    assert!(!ok && !none.exists() && last.contains("nope.h5") && last.contains("404"), "{err}");
    hub.faults(json!({"rules": [{"path_contains": "/me/kcv/resolve", "action": "status", "status": 401, "count": 5}]}));
    std::fs::remove_dir_all(&home).unwrap();
    let (ok, err) = run(&["convert", "keras-to-diffusers", "--unet", "hf://me/kcv/unet_sd2.h5", "--out", none.to_str().unwrap()], false);
    let last = err.trim().lines().last().unwrap().to_string();
    assert!(!ok && !none.exists() && last.contains("gated or private") && last.contains("set HF_TOKEN"), "{err}");
}

#[test]
fn tf_checkpoint_prefixes_and_folders_on_the_hub_convert_like_local_ones() {
    no_hdf5_locks();
    let hub = Hub::start();
    let dir = tempfile::tempdir().unwrap();
    // A pipeline repo with `save_weights("ckpt/ckpt")`'s three files under ckpt/.
    let pipe = pipeline(dir.path());
    std::fs::create_dir(pipe.join("ckpt")).unwrap();
    for e in std::fs::read_dir(fixture("tf_checkpoint")).unwrap().flatten() {
        std::fs::copy(e.path(), pipe.join("ckpt").join(e.file_name())).unwrap();
    }
    push(&pipe, &hub.opts("me/tfck")).unwrap();
    let home = dir.path().join("hf_home");
    let convert = |spec: &str, out: &Path| {
        let done = cli()
            .args(["convert", "keras-to-diffusers", "--vae-encoder", spec, "--vae-decoder", fixture("decoder.h5").to_str().unwrap(), "--out", out.to_str().unwrap()])
            .env("HF_ENDPOINT", &hub.url)
            .env("HF_HOME", &home)
            .env("HF_TOKEN", TOKEN)
            .output()
            .unwrap();
        (done.status.success(), String::from_utf8_lossy(&done.stderr).to_string())
    };
    let vae = |out: &Path| st_tensors(&out.join("vae/diffusion_pytorch_model.safetensors"));
    let local = dir.path().join("local");
    let (ok, err) = convert(fixture("tf_checkpoint").to_str().unwrap(), &local);
    assert!(ok, "{err}");
    let url = format!("{}/me/tfck/resolve/main/ckpt/ckpt", hub.url);
    for (spec, out) in [("hf://me/tfck/ckpt/ckpt", "prefix"), ("hf://me/tfck/ckpt", "folder"), (url.as_str(), "url")] {
        let out = dir.path().join(out);
        let (ok, err) = convert(spec, &out);
        assert!(ok, "{spec}: {err}");
        assert!(vae(&out) == vae(&local), "{spec}: tensors differ from the local checkpoint");
    }
    let snapshot = std::fs::read_dir(home.join("hub/models--me--tfck/snapshots")).unwrap().flatten().next().unwrap().path();
    for f in ["checkpoint", "ckpt.index", "ckpt.data-00000-of-00001"] {
        assert!(snapshot.join("ckpt").join(f).is_file(), "{f}");
    }
    assert!(!snapshot.join("unet").exists(), "only the checkpoint's files are downloaded");
    // Neither a file, a prefix nor a folder: one line naming the repo and path.
    let none = dir.path().join("none");
    let (ok, err) = convert("hf://me/tfck/ckpt/nope", &none);
    let last = err.trim().lines().last().unwrap().to_string();
    assert!(!ok && !none.exists() && last.contains("me/tfck") && last.contains("ckpt/nope") && last.contains("404"), "{err}");
}
