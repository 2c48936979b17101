//! The metrics against transformers (fixtures/make_eval_fixtures.py): tiny random-weight CLIP and
//! DINO-ViT models, the reference transforms in PIL, the features and scores of the reference.

mod common;
use common::*;
use dreambridge::eval::{clip::Clip, dino::Dino, preprocess, score};
use dreambridge::tensor::TensorSource;
use candle_core::{Device, Tensor};

fn eval_fixture(p: &str) -> std::path::PathBuf {
    fixture("eval").join(p)
}

fn reference(key: &str) -> Tensor {
    let f = dreambridge::diffusers::st_read::StFile::open(&eval_fixture("reference.safetensors")).unwrap();
    let raw = TensorSource::read(&f, key).unwrap();
    Tensor::from_vec(raw.to_f32_values(), raw.shape.clone(), &Device::Cpu).unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    d / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

const IMAGES: [&str; 5] = ["generated/g0", "generated/g1", "generated/g2", "real/r0", "real/r1"];

#[test]
fn features_equal_transformers_on_the_same_pixels() {
    let dev = Device::Cpu;
    let clip = Clip::load(&eval_fixture("clip"), &dev).unwrap();
    let dino = Dino::load(&eval_fixture("dino"), &dev).unwrap();
    assert_eq!(dino.layer_norm_eps, 1e-12);
    for img in IMAGES {
        let k = img.replace('/', "_");
        let pc = reference(&format!("pixels_clip_{k}")).unsqueeze(0).unwrap();
        let pd = reference(&format!("pixels_dino_{k}")).unsqueeze(0).unwrap();
        let c = clip.image_features(&pc).unwrap().squeeze(0).unwrap();
        let d = dino.features(&pd).unwrap().squeeze(0).unwrap();
        assert!(max_rel(&c, &reference(&format!("clip_{k}"))) < 1e-5, "{img}: CLIP features");
        assert!(max_rel(&d, &reference(&format!("dino_{k}"))) < 1e-5, "{img}: DINO CLS");
    }
    let t = clip.text_features("a photo of a dog on the beach").unwrap().squeeze(0).unwrap();
    assert!(max_rel(&t, &reference("text")) < 1e-5, "text features");
}

#[test]
fn preprocessing_is_the_reference_transforms_to_the_bit() {
    // PIL's bicubic resize, crop and normalisation: equal to the reference pixels (which the
    // fixture stores in float16, so ours are compared after the same rounding).
    let dev = Device::Cpu;
    for img in IMAGES {
        let rgb = preprocess::load_rgb(&eval_fixture(&format!("images/{img}.png"))).unwrap();
        let k = img.replace('/', "_");
        for (t, name) in [(preprocess::CLIP, "clip"), (preprocess::DINO, "dino")] {
            let ours = t.apply(&rgb, &dev).unwrap().to_dtype(candle_core::DType::F16).unwrap().to_dtype(candle_core::DType::F32).unwrap();
            let theirs = reference(&format!("pixels_{name}_{k}"));
            assert_eq!(ours.dims(), &[3, 224, 224]);
            let worst = (ours - &theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(worst, 0.0, "{img} {name}");
        }
    }
}

#[test]
fn scores_match_the_reference_and_identical_images_score_one() {
    let dev = Device::Cpu;
    let clip = Clip::load(&eval_fixture("clip"), &dev).unwrap();
    let dino = Dino::load(&eval_fixture("dino"), &dev).unwrap();
    let files = |group: &str| preprocess::image_files(&eval_fixture(&format!("images/{group}"))).unwrap();
    let (generated, real) = (files("generated"), files("real"));
    let prompts = Some([("*".to_string(), "a photo of a dog on the beach".to_string())].into_iter().collect());
    let inputs = score::EvalInputs { generated: &generated, real: &real, prompts, strict: true, batch: 3 };
    let report = score::evaluate(&inputs, &clip, &dino, &dev).unwrap();
    let m = &report["metrics"];
    let reference_score = |k: &str| reference(k).to_vec1::<f32>().unwrap()[0] as f64;
    // The whole path from image files (the reference's features come from float16-rounded pixels).
    assert!((m["dino"].as_f64().unwrap() - reference_score("score_dino")).abs() < 1e-4, "{m}");
    assert!((m["clip_i"].as_f64().unwrap() - reference_score("score_clip")).abs() < 1e-4, "{m}");
    assert!((m["clip_t"].as_f64().unwrap() - reference_score("score_clip_t")).abs() < 1e-4, "{m}");
    assert_eq!(report["per_image"].as_array().unwrap().len(), 3);
    // A folder against itself: the diagonal of the pair matrix is 1.
    let one = [real[0].clone()];
    let same = score::EvalInputs { generated: &one, real: &one, prompts: None, strict: true, batch: 1 };
    let r = score::evaluate(&same, &clip, &dino, &dev).unwrap();
    assert!((r["metrics"]["dino"].as_f64().unwrap() - 1.0).abs() < 1e-6 && (r["metrics"]["clip_i"].as_f64().unwrap() - 1.0).abs() < 1e-6, "{r}");
}

#[test]
fn the_command_prints_the_table_and_names_unreadable_images() {
    let dir = tempfile::tempdir().unwrap();
    let generated = dir.path().join("generated");
    std::fs::create_dir_all(&generated).unwrap();
    for f in ["g0.png", "g1.png", "g2.png"] {
        std::fs::copy(eval_fixture(&format!("images/generated/{f}")), generated.join(f)).unwrap();
    }
    std::fs::write(generated.join("broken.png"), b"not a png").unwrap();
    let json = dir.path().join("report.json");
    let args = |strict: bool| {
        let mut v = vec![
            "eval".to_string(), "--generated".into(), generated.display().to_string(), "--real".into(), eval_fixture("images/real").display().to_string(),
            "--prompt".into(), "a photo of a dog on the beach".into(), "--clip-model".into(), eval_fixture("clip").display().to_string(),
            "--dino-model".into(), eval_fixture("dino").display().to_string(), "--json".into(), json.display().to_string(), "--device".into(), "cpu".into(),
        ];
        if strict {
            v.push("--strict".into());
        }
        v
    };
    let out = cli().args(args(false)).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("DINO") && stdout.contains("paper SD") && stdout.contains("0.668"), "{stdout}");
    assert!(stderr.contains("skipped") && stderr.contains("broken.png"), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!((report["generated"].as_u64(), report["skipped"].as_array().unwrap().len()), (Some(3), 1));
    let out = cli().args(args(true)).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("broken.png"));
}

#[test]
fn training_logs_its_steps_and_scores_its_validation_rounds() {
    let dir = tempfile::tempdir().unwrap();
    training_inputs(dir.path());
    let out = dir.path().join("run");
    let mut args = tiny_train_args(dir.path(), &out);
    (args.max_train_steps, args.validation_steps, args.with_prior_preservation) = (Some(4), 2, false);
    args.class_prompt = Some("a photo of dog".into());
    args.validation_prompt = Some("a photo of sks dog in a bucket".into());
    args.validation_eval = Some(dreambridge::train::command::ValidationEval { clip_model: eval_fixture("clip"), dino_model: eval_fixture("dino") });
    dreambridge::train::command::train(&args).unwrap();
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(out.join("logs/metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let steps: Vec<u64> = rows.iter().filter(|r| r.get("loss").is_some()).map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
    assert!(rows.iter().filter(|r| r.get("loss").is_some()).all(|r| r["lr"].as_f64().is_some()));
    let scored: Vec<&serde_json::Value> = rows.iter().filter(|r| r.get("dino").is_some()).collect();
    assert_eq!(scored.iter().map(|r| r["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![2, 4]);
    for r in &scored {
        for k in ["dino", "clip_i", "clip_t"] {
            let v = r[k].as_f64().unwrap();
            assert!((-1.0..=1.0).contains(&v), "{r}");
        }
        assert_eq!(r["clip_t_prompt"], "a photo of dog in a bucket");
    }
    assert!(image::open(out.join("logs/metrics.png")).is_ok());
}

#[test]
fn dreambench_generates_what_is_missing_scores_and_prints_the_table() {
    let dir = tempfile::tempdir().unwrap();
    training_inputs(dir.path()); // the tiny sample pipeline at dir/sample
    let data = dir.path().join("dataset");
    for subject in ["dog", "backpack"] {
        std::fs::create_dir_all(data.join(subject)).unwrap();
        for f in ["r0.png", "r1.png"] {
            std::fs::copy(eval_fixture(&format!("images/real/{f}")), data.join(subject).join(f)).unwrap();
        }
        // One model per subject, named by the {subject} pattern.
        let model = dir.path().join("models").join(subject);
        std::fs::create_dir_all(model.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(dir.path().join("sample"), &model).unwrap();
    }
    std::fs::write(
        data.join("prompts_and_classes.txt"),
        "Classes\n\nsubject_name,class\nbackpack,backpack\ndog,dog\n\nPrompts\n\nObject Prompts\nprompt_list = [\n'a {0} {1} in the jungle'.format(unique_token, class_token),\n'a red {0} {1}'.format(unique_token, class_token)\n]\n\nLive Subject Prompts\nprompt_list = [\n'a {0} {1} in the jungle'.format(unique_token, class_token),\n'a {0} {1} wearing a red hat'.format(unique_token, class_token),\n'a {0} {1} on the beach'.format(unique_token, class_token)\n]\n",
    )
    .unwrap();
    let out = dir.path().join("bench");
    let json = dir.path().join("bench.json");
    let model = format!("{}/models/{{subject}}", dir.path().display());
    let (clip, dino) = (eval_fixture("clip"), eval_fixture("dino"));
    let args = [
        "eval", "dreambench", "--dataset", data.to_str().unwrap(), "--model", &model, "--images-per-prompt", "2", "--resolution", "64", "--steps", "2",
        "--out", out.to_str().unwrap(), "--clip-model", clip.to_str().unwrap(), "--dino-model", dino.to_str().unwrap(),
        "--json", json.to_str().unwrap(), "--device", "cpu",
    ];
    let first = cli().args(args).output().unwrap();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let table = String::from_utf8_lossy(&first.stdout);
    assert!(table.contains("backpack") && table.contains("dog") && table.contains("paper: DreamBooth (SD)") && table.contains("0.668"), "{table}");
    // Live subjects get the live prompts: 3 for the dog, 2 for the backpack, 2 images each.
    assert_eq!(std::fs::read_dir(out.join("dog")).unwrap().count(), 6);
    assert_eq!(std::fs::read_dir(out.join("backpack")).unwrap().count(), 4);
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["subjects"]["dog"]["class"], "dog");
    assert!(report["mean_over_subjects"]["dino"].as_f64().is_some());
    // A rerun generates nothing (the images are kept) and scores the same.
    let kept = std::fs::metadata(out.join("dog/00_0.png")).unwrap().modified().unwrap();
    let second = cli().args(args).output().unwrap();
    assert!(second.status.success());
    assert_eq!(std::fs::metadata(out.join("dog/00_0.png")).unwrap().modified().unwrap(), kept);
    assert_eq!(String::from_utf8_lossy(&second.stdout), table);
    // One model for several subjects is refused.
    let one = cli().args(["eval", "dreambench", "--dataset", data.to_str().unwrap(), "--model", dir.path().join("sample").to_str().unwrap(), "--out", out.to_str().unwrap()]).output().unwrap();
    assert!(!one.status.success() && String::from_utf8_lossy(&one.stderr).contains("{subject}"));
}
