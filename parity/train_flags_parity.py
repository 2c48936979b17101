"""train_dreambooth.py's flags in dreambridge against the libraries that define them:

* every --lr_scheduler, step by step, against diffusers.optimization.get_scheduler (read back from
  dreambridge's TensorBoard event files with TensorBoard's own EventAccumulator);
* the event files: scalars `loss` and `lr` per step, the `validation` image grid;
* tokenization (pad token, --tokenizer_max_length, attention mask, added tokens) against
  transformers' CLIPTokenizer, and the text encoder with an attention mask against CLIPTextModel;
* --skip_save_text_encoder and --variant outputs loading in diffusers.

    parity/.venv-torch/bin/python parity/train_flags_parity.py target/release/dreambridge
"""
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import WORK, record, record_fact  # noqa: E402


def train(db, sample, inst, out, *flags):
    subprocess.run([db, "train", f"--pretrained_model_name_or_path={sample}", f"--instance_data_dir={inst}", "--instance_prompt=a photo of sks dog",
                    "--resolution=64", "--train_batch_size=1", "--device=cpu", f"--output_dir={out}", *flags], check=True, capture_output=True)


def events(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    files = glob.glob(os.path.join(out, "logs", "dreambooth", "events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = EventAccumulator(os.path.dirname(files[0]), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def lr_schedules(db, sample, inst, tmp):
    from diffusers.optimization import get_scheduler
    steps, warmup, lr = 9, 3, 1e-4
    for name in ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]:
        out = os.path.join(tmp, f"lr-{name}")
        train(db, sample, inst, out, f"--lr_scheduler={name}", f"--max_train_steps={steps}", f"--lr_warmup_steps={warmup}", "--lr_num_cycles=3",
              "--lr_power=2", f"--learning_rate={lr}", "--checkpointing_steps=100")
        got = [e.value for e in events(out).Scalars("lr")]
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        sched = get_scheduler(name, optimizer=opt, num_warmup_steps=warmup, num_training_steps=steps, num_cycles=3, power=2.0)
        want = []
        for _ in range(steps):
            want.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        # TensorBoard stores f32 scalars.
        record("lr schedule", name, np.array(want, dtype=np.float32), np.array(got), 1e-6, f"{steps} steps, {warmup} warmup, get_scheduler")


def tensorboard_files(db, sample, inst, tmp):
    out = os.path.join(tmp, "tb")
    train(db, sample, inst, out, "--max_train_steps=4", "--validation_prompt=a photo of sks dog", "--validation_steps=2", "--num_validation_images=3",
          "--learning_rate=1e-4", "--checkpointing_steps=100")
    acc = events(out)
    tags = acc.Tags()
    loss = [(e.step, e.value) for e in acc.Scalars("loss")]
    ours = [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(out, "logs", "metrics.jsonl")))]
    ok = [s for s, _ in loss] == [1, 2, 3, 4] and np.allclose([v for _, v in loss], [v for _, v in ours], rtol=1e-6)
    record_fact("tensorboard events", "loss per step", ok and "lr" in tags["scalars"], f"EventAccumulator read {loss}")
    images = acc.Images("validation")
    ok = [i.step for i in images] == [2, 4] and all((i.width, i.height) == (192, 64) for i in images)
    grid = np.asarray(Image.open(__import__("io").BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    first = np.asarray(Image.open(os.path.join(out, "validation", "step_4_0.png")).convert("RGB"))
    ok = ok and np.array_equal(grid[:, :64], first)
    record_fact("tensorboard events", "validation images", ok, "one 3-image grid per round, as add_images(NHWC)")


def tokenizers(db, sample, tmp):
    from transformers import CLIPTextModel, CLIPTokenizer
    src = os.path.join(sample, "tokenizer")
    # SD2's convention (pad "!"), a placeholder token, a short maximum length.
    sd2 = os.path.join(tmp, "tok-sd2")
    tok = CLIPTokenizer.from_pretrained(src)
    tok.pad_token = "!"
    tok.add_tokens(["<cat-toy>"])
    tok.save_pretrained(sd2)
    for folder, tokenizer in [(src, CLIPTokenizer.from_pretrained(src)), (sd2, CLIPTokenizer.from_pretrained(sd2))]:
        for prompt in ["a photo of sks dog", "a <cat-toy> on a beach, 4k", "dog " * 100]:
            for n in [None, 12]:
                flags = [] if n is None else ["--max-length", str(n)]
                got = json.loads(subprocess.run([db, "tokenize", "--tokenizer", folder, "--prompt", prompt, *flags], check=True, capture_output=True, text=True).stdout)
                want = tokenizer(prompt, padding="max_length", truncation=True, max_length=n or tokenizer.model_max_length)
                ok = got["input_ids"] == want["input_ids"] and got["attention_mask"] == want["attention_mask"]
                record_fact("CLIPTokenizer", f"{os.path.basename(folder)} len {n or 77}", ok, repr(prompt[:24]) + ("" if ok else f" {got} vs {dict(want)}"))
    # The text encoder with the attention mask (training's --text_encoder_use_attention_mask).
    from safetensors.torch import load_file, save_file
    model = CLIPTextModel.from_pretrained(os.path.join(sample, "text_encoder")).eval()
    enc = CLIPTokenizer.from_pretrained(sd2)(["a photo of sks dog", "a <cat-toy>"], padding="max_length", max_length=16, return_tensors="pt")
    ids = enc["input_ids"].clamp(max=model.config.vocab_size - 1)
    inputs, out = os.path.join(tmp, "mask_in.safetensors"), os.path.join(tmp, "mask_out.safetensors")
    save_file({"input_ids": ids.to(torch.int64), "attention_mask": enc["attention_mask"].to(torch.float32)}, inputs)
    subprocess.run([db, "forward", "text-encoder", "--model", sample, "--inputs", inputs, "--out", out], check=True, capture_output=True)
    with torch.no_grad():
        want = model(ids, attention_mask=enc["attention_mask"]).last_hidden_state
        unmasked = model(ids).last_hidden_state
    got = load_file(out)["out"]
    record("text encoder", "attention_mask", want.numpy(), got.numpy(), 1e-5, f"masked vs unmasked differ by {float((want - unmasked).abs().max()):.2e}")


def saved_folders(db, sample, inst, tmp):
    from diffusers import StableDiffusionPipeline
    out = os.path.join(tmp, "no-text")
    train(db, sample, inst, out, "--max_train_steps=1", "--skip_save_text_encoder", "--pre_compute_text_embeddings")
    try:
        # diffusers saves text_encoder=None as [null, null] and loads it back with text_encoder=None.
        pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True, text_encoder=None)
        index = json.load(open(os.path.join(out, "model_index.json")))
        ok = pipe.text_encoder is None and index["text_encoder"] == [None, None] and not os.path.exists(os.path.join(out, "text_encoder"))
        record_fact("--skip_save_text_encoder", "from_pretrained", ok, "model_index text_encoder [null, null], as diffusers' save_pretrained writes it")
    except Exception as e:
        record_fact("--skip_save_text_encoder", "from_pretrained", False, repr(e)[:300])
    half = os.path.join(tmp, "half")
    subprocess.run([db, "convert", "keras-to-diffusers", "--half", "--out", half], check=True, capture_output=True)
    out = os.path.join(tmp, "from-variant")
    train(db, half, inst, out, "--max_train_steps=1", "--variant=fp16")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
        dtypes = {str(m.dtype) for m in (pipe.unet, pipe.text_encoder, pipe.vae)}
        img = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np").images
        record_fact("--variant fp16 base", "from_pretrained + run", dtypes == {"torch.float32"} and bool(np.isfinite(img).all()), f"dtypes {dtypes}, no variant= needed")
    except Exception as e:
        record_fact("--variant fp16 base", "from_pretrained + run", False, repr(e)[:300])


def main(db):
    tmp = tempfile.mkdtemp(dir=WORK)
    sample, inst = os.path.join(tmp, "sample"), os.path.join(tmp, "instance")
    subprocess.run([db, "convert", "keras-to-diffusers", "--out", sample], check=True, capture_output=True)
    os.makedirs(inst)
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((64, 80, 3)) * 255).astype("uint8")).save(os.path.join(inst, f"{i}.png"))
    lr_schedules(db, sample, inst, tmp)
    tensorboard_files(db, sample, inst, tmp)
    tokenizers(db, sample, tmp)
    saved_folders(db, sample, inst, tmp)


if __name__ == "__main__":
    main(os.path.abspath(sys.argv[1]))
