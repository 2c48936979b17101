"""LoRA files against diffusers/peft, on the embedded tiny SD1 pipeline:

1. dreambridge trains a LoRA (UNet + text encoder, kohya's transformer targets, alpha != rank) and
   writes both formats; diffusers' `load_lora_weights` of each (no "not loaded" / unexpected-key
   warnings) gives the UNet and text-encoder outputs `dreambridge forward --lora` gives;
2. a LoRA made by peft/diffusers themselves (LoraConfig on the UNet and text encoder, random
   factors, alpha != rank, saved with `save_lora_weights` under PEFT and diffusers key names, and
   through diffusers' `convert_state_dict_to_kohya`) loads into dreambridge with the same outputs;
3. `fuse_lora(lora_scale=s)` in diffusers equals `dreambridge lora merge --scale s`.

    parity/.venv-torch/bin/python parity/lora_parity.py target/release/dreambridge
"""
import logging
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import WORK, LogWarnings, record, record_fact  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

torch.set_grad_enabled(False)


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((1, 77), 49407, dtype=torch.long)
    ids[0, :6] = torch.tensor([49406, 320, 1125, 539, 48136, 1929])
    return {"sample": torch.randn(2, 4, 8, 8, generator=g), "timesteps": torch.tensor([17.0, 803.0]),
            "context": torch.randn(2, 77, 8, generator=g), "input_ids": ids}


def ours(db, folder, component, x, loras, scales=None):
    """`dreambridge forward` with the LoRA files applied."""
    tmp = tempfile.mkdtemp(dir=WORK)
    src, out = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.safetensors")
    save_file({k: v.contiguous() for k, v in x.items()}, src)
    cmd = [db, "forward", component, "--model", folder, "--inputs", src, "--out", out]
    for i, f in enumerate(loras):
        cmd += ["--lora", f] + (["--lora-scale", str(scales[i])] if scales else [])
    subprocess.run(cmd, check=True)
    return load_file(out)["out"].numpy()


def theirs(pipe, x):
    unet = pipe.unet(x["sample"], x["timesteps"], encoder_hidden_states=x["context"]).sample.numpy()
    text = pipe.text_encoder(x["input_ids"]).last_hidden_state.numpy()
    return unet, text


def loaded(base, path, check, name):
    """The base pipeline with `path` loaded by diffusers; records that no key was left out."""
    pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True, safety_checker=None)
    with LogWarnings("diffusers", "peft") as w:
        pipe.load_lora_weights(path)
    bad = [m for m in w.messages if "lora" in m.lower() or "unexpected" in m.lower() or "not loaded" in m.lower()]
    record_fact(check, f"{name}: no keys left out", not bad, "; ".join(bad)[:300] or "no warnings")
    return pipe


def compare_outputs(db, base, pipe, files, check, name, seed, scales=None):
    x = inputs(seed)
    unet_ref, text_ref = theirs(pipe, x)
    record(check, f"{name}: unet", unet_ref, ours(db, base, "unet", x, files, scales), 1e-4)
    record(check, f"{name}: text encoder", text_ref, ours(db, base, "text-encoder", {"input_ids": x["input_ids"]}, files, scales), 1e-4)
    return unet_ref


def main(db):
    torch.manual_seed(3)  # peft's gaussian init draws from torch's global generator
    tmp = tempfile.mkdtemp(dir=WORK)
    base, inst, out = (os.path.join(tmp, n) for n in ("base", "instance", "sks-lora"))
    subprocess.run([db, "convert", "keras-to-diffusers", "--out", base], check=True, capture_output=True)
    os.makedirs(inst)
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((64, 64, 3)) * 255).astype("uint8")).save(os.path.join(inst, f"{i}.png"))

    # 1. Our LoRA files in diffusers: kohya's transformer set, and LoCon (conv LoRA on the resnets).
    check = "dreambridge LoRA in diffusers"
    plain = StableDiffusionPipeline.from_pretrained(base, local_files_only=True, safety_checker=None)
    base_unet, _ = theirs(plain, inputs(1))
    for targets in ["transformer+conv", "transformer"]:
        subprocess.run([db, "train", "--pretrained-model-name-or-path", base, "--instance-data-dir", inst, "--instance-prompt", "a photo of sks dog",
                        "--resolution", "64", "--max-train-steps", "12", "--learning-rate", "2e-2", "--checkpointing-steps", "100",
                        "--lora-rank", "4", "--lora-alpha", "6", "--lora-targets", targets, "--train-text-encoder", "--lora-format", "both",
                        "--output-dir", out, "--force"], check=True, capture_output=True)
        diffusers_file, kohya_file = os.path.join(out, "pytorch_lora_weights.safetensors"), os.path.join(out, "sks-lora.safetensors")
        for name, path in [(f"{targets}, diffusers format", diffusers_file), (f"{targets}, kohya format", kohya_file)]:
            pipe = loaded(base, path, check, name)
            got = compare_outputs(db, base, pipe, [path], check, name, 1)
            moved = float(np.max(np.abs(got - base_unet)) / np.max(np.abs(base_unet)))
            record_fact(check, f"{name}: the LoRA acts", moved > 1e-4, f"UNet output moved by {moved:.1e} relative to the base")

    # 3. fuse_lora equals `dreambridge lora merge` (scale 0.7).
    pipe = loaded(base, kohya_file, "fuse_lora vs lora merge", "kohya file")
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=0.7)
    pipe.unload_lora_weights()
    merged = os.path.join(tmp, "merged")
    subprocess.run([db, "lora", "merge", "--base", base, "--lora", kohya_file, "--scale", "0.7", "--out", merged], check=True, capture_output=True)
    ref = pipe.unet.state_dict() | {"text." + k: v for k, v in pipe.text_encoder.state_dict().items()}
    mine = StableDiffusionPipeline.from_pretrained(merged, local_files_only=True, safety_checker=None)
    got = mine.unet.state_dict() | {"text." + k: v for k, v in mine.text_encoder.state_dict().items()}
    keys = sorted(k for k in ref if not k.endswith("position_ids"))
    before = plain.unet.state_dict() | {"text." + k: v for k, v in plain.text_encoder.state_dict().items()}
    changed = [k for k in keys if not torch.equal(before[k], ref[k])]
    record_fact("fuse_lora vs lora merge", "fusing changed weights", len(changed) > 0, f"{len(changed)} of {len(keys)} tensors changed by fuse_lora")
    record("fuse_lora vs lora merge", "every UNet + text weight", np.concatenate([ref[k].numpy().ravel() for k in keys]),
           np.concatenate([got[k].numpy().ravel() for k in keys]), 1e-6, f"{len(keys)} tensors, scale 0.7")

    # 2. A LoRA made by peft/diffusers, in dreambridge.
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from diffusers.utils import convert_state_dict_to_diffusers

    from diffusers.utils import convert_state_dict_to_kohya

    # diffusers' kohya conversion writes alpha = rank, so that case trains with alpha = rank.
    for keys_as, alpha in [("peft", 5), ("diffusers", 5), ("kohya", 2)]:
        pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True, safety_checker=None)
        pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0", "proj_in", "ff.net.2"]))
        pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
        g = torch.Generator().manual_seed(7)
        for model in (pipe.unet, pipe.text_encoder):
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
        unet_sd, text_sd = get_peft_model_state_dict(pipe.unet), get_peft_model_state_dict(pipe.text_encoder)
        folder = os.path.join(tmp, f"peft-{keys_as}")
        path = os.path.join(folder, "pytorch_lora_weights.safetensors")
        if keys_as == "kohya":
            os.makedirs(folder)
            packed = {f"unet.{k}": v for k, v in unet_sd.items()} | {f"text_encoder.{k}": v for k, v in text_sd.items()}
            save_file({k: v.contiguous() for k, v in convert_state_dict_to_kohya(packed).items()}, path)
        else:
            if keys_as == "diffusers":
                unet_sd, text_sd = convert_state_dict_to_diffusers(unet_sd), convert_state_dict_to_diffusers(text_sd)
            StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=unet_sd, text_encoder_lora_layers=text_sd,
                                                      unet_lora_adapter_metadata={"r": 2, "lora_alpha": alpha},
                                                      text_encoder_lora_adapter_metadata={"r": 2, "lora_alpha": alpha})
        compare_outputs(db, base, pipe, [path], "peft LoRA in dreambridge", f"{keys_as} keys", 2)


if __name__ == "__main__":
    main(os.path.abspath(sys.argv[1]))
