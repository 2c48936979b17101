"""SDXL LoRA files against diffusers/peft on a tiny random SDXL pipeline (`sdxl_common.make_sdxl`):

1. peft makes a LoRA on the UNet (attention q/k/v/out, proj_in/out, ff.net.2, resnet conv1 and
   time_emb_proj), CLIP-L (q/k/v/out, fc1) and OpenCLIP-G (the same and its text_projection), with
   random non-zero A and B and lora_alpha != r, saved by `StableDiffusionXLPipeline.save_lora_weights`
   with its adapter metadata (PEFT keys `unet.`, `text_encoder.`, `text_encoder_2.`).
2. `dreambridge lora convert` to kohya (sd-scripts' LDM numbering, `lora_te1_`/`lora_te2_`) and back
   to diffusers: both files load with `load_lora_weights`, every tensor taken (no warning, every
   adapter weight of the file in the models, equal to the original's), and the UNet output and
   both text encoders' hidden states / pooled projection equal those with the original loaded.
3. The kohya file diffusers' `convert_state_dict_to_kohya` writes (`--output_kohya_format`,
   diffusers numbering, alpha = rank) reads in dreambridge with the original's factors, and
   dreambridge's diffusers rewrite of it loads in diffusers to the outputs of their kohya file.
4. A kohya sd-scripts style file (LDM numbering built here from the diffusers module paths with
   sd-scripts' naming, alphas from the peft configs) loads in diffusers' kohya reader and in
   dreambridge to the outputs of the original; dreambridge's own kohya file has its names and
   tensors exactly.
5. `dreambridge lora merge --scale 0.7` into the folder equals `fuse_lora(lora_scale=0.7)` on the
   UNet and both text encoders (every weight, f32 rounding).

    parity/.venv-torch/bin/python parity/sdxl_lora_parity.py DREAMBRIDGE

Work files: $PARITY_WORK/sdxl_lora. Prints a JSON line per check; exits 1 when a check failed.
"""
import json
import os
import re
import sys
import traceback

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import LogWarnings, WORK, drop, record, record_fact, run_checked  # noqa: E402
from sdxl_common import make_sdxl  # noqa: E402
from diffusers import StableDiffusionXLPipeline  # noqa: E402

torch.set_grad_enabled(False)
W = os.path.join(WORK, "sdxl_lora")
FAILED = []
DB = None
TOL = 1e-6
PARTS = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "time_emb_proj"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def fact(check, component, ok, note=""):
    if not ok:
        FAILED.append(f"{check} / {component}")
    print(json.dumps(dict(check=check, component=component, ok=bool(ok), note=note)), flush=True)
    record_fact(check, component, ok, note)
    return ok


def close(check, component, ref, got, note=""):
    ok = record(check, component, ref, got, TOL, note)
    if not ok:
        FAILED.append(f"{check} / {component}")
    ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    rel = float(np.max(np.abs(ref - got)) / max(np.max(np.abs(ref)), 1e-30))
    print(json.dumps(dict(check=check, component=component, ok=bool(ok), rel=rel, tol=TOL, note=note)), flush=True)
    return ok


def guarded(check, fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # the failure is the result
        traceback.print_exc()
        fact(check, "ran to the end", False, f"{type(e).__name__}: {e}"[:600])


def db(*args):
    p = run_checked([DB, *args])
    return p.stdout + p.stderr


def load(folder):
    return StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)


def inputs():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 999, (2, 77), generator=g)
    ids[:, 0], ids[0, 9:], ids[1, 30:] = 0, 2, 2
    return dict(sample=torch.randn(2, 4, 16, 16, generator=g), t=torch.tensor([17.0, 803.0]), context=torch.randn(2, 77, 192, generator=g),
                text_embeds=torch.randn(2, 96, generator=g), time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64], [96, 64, 8, 0, 64, 64]]), ids=ids)


def outputs(pipe, x):
    unet = pipe.unet(x["sample"], x["t"], encoder_hidden_states=x["context"], added_cond_kwargs=dict(text_embeds=x["text_embeds"], time_ids=x["time_ids"])).sample
    te = pipe.text_encoder(x["ids"], output_hidden_states=True)
    te2 = pipe.text_encoder_2(x["ids"], output_hidden_states=True)
    return {"unet": unet.numpy(), "text_encoder hidden_states[-2]": te.hidden_states[-2].numpy(), "text_encoder last_hidden_state": te.last_hidden_state.numpy(),
            "text_encoder_2 hidden_states[-2]": te2.hidden_states[-2].numpy(), "text_encoder_2 text_embeds": te2.text_embeds.numpy()}


def norm(key):
    """A LoRA key without the `text_model.` level of a text encoder's module path: transformers 5's
    `CLIPTextModel` has none (so diffusers' own files lack it), 4's and kohya's names have it;
    diffusers loads either."""
    for prefix in ("text_encoder.", "text_encoder_2."):
        if key.startswith(prefix + "text_model."):
            return prefix + key[len(prefix + "text_model."):]
    return key


def normed(sd):
    return {norm(k): v for k, v in sd.items()}


def same_factors(a, b):
    a, b = normed(a), normed(b)
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def adapters(pipe):
    """{part.module.lora_A.weight: tensor} (keys as `norm`) of the adapter in the three models."""
    got = {}
    for part, model in [("unet", pipe.unet), ("text_encoder", pipe.text_encoder), ("text_encoder_2", pipe.text_encoder_2)]:
        for n, p in model.named_parameters():
            m = re.match(r"(.*\.lora_[AB])\.[^.]+\.weight$", n)
            if m:
                got[norm(f"{part}.{m.group(1)}.weight")] = p.detach().clone()
    return got


def make_lora(folder, path):
    """The peft LoRA of step 1, saved; returns (the pipeline with it, its state dict, the configs)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = load(folder)
    configs = {"unet": LoraConfig(r=4, lora_alpha=2, target_modules=UNET_TARGETS, init_lora_weights=False),
               "text_encoder": LoraConfig(r=4, lora_alpha=8, target_modules=TEXT_TARGETS, init_lora_weights=False),
               "text_encoder_2": LoraConfig(r=2, lora_alpha=3, target_modules=TEXT_TARGETS + ["text_projection"], init_lora_weights=False)}
    g = torch.Generator().manual_seed(7)
    for part, cfg in configs.items():
        model = getattr(pipe, part)
        model.add_adapter(cfg)
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    layers = {part: get_peft_model_state_dict(getattr(pipe, part)) for part in configs}
    StableDiffusionXLPipeline.save_lora_weights(
        os.path.dirname(path), weight_name=os.path.basename(path),
        unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"], text_encoder_2_lora_layers=layers["text_encoder_2"],
        unet_lora_adapter_metadata=configs["unet"].to_dict(), text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict(),
        text_encoder_2_lora_adapter_metadata=configs["text_encoder_2"].to_dict())
    return pipe, load_file(path), configs


def loaded(folder, path, check, name, expect_factors=None):
    """The folder with `path` loaded by diffusers: no key warning, and the adapter weights in the
    models are as many as the file's (and equal to `expect_factors` when given, keyed PEFT-style)."""
    pipe = load(folder)
    with LogWarnings("diffusers", "peft") as w:
        pipe.load_lora_weights(path)
    bad = [m for m in w.messages if "lora" in m.lower() or "unexpected" in m.lower() or "not loaded" in m.lower() or "missing" in m.lower()]
    fact(check, f"{name}: load_lora_weights warns of no key", not bad, "; ".join(bad)[:300] or "no warnings")
    got = adapters(pipe)
    with safe_open(path, framework="pt") as f:
        factors = sum(1 for k in f.keys() if not k.endswith(".alpha"))
    fact(check, f"{name}: every factor of the file in the models", len(got) == factors, f"{len(got)} adapter weights for {factors} factors in the file")
    if expect_factors is not None:
        expect_factors = normed(expect_factors)
        differ = [k for k in expect_factors if k not in got or not torch.equal(got[k], expect_factors[k])]
        fact(check, f"{name}: the loaded factors are the original's", not differ and len(got) == len(expect_factors), f"{len(expect_factors)} factors, {len(differ)} differ {differ[:3]}")
    return pipe


def compare(check, name, ref, pipe, x):
    got = outputs(pipe, x)
    for k in ref:
        close(check, f"{name}: {k}", ref[k], got[k])


# sd-scripts' SDXL UNet (sdxl_original_unet.py) is named as Stability's generative-models UNet:
# written out here from the block structure, independent of dreambridge's tables.
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def sgm_path(module):
    s = module.split(".")
    inner = lambda rest, resnet: ".".join(([RESNET[rest[0]]] + rest[1:]) if resnet else rest)  # noqa: E731
    if s[0] == "down_blocks":
        i, kind = int(s[1]), s[2]
        if kind == "downsamplers":
            return f"input_blocks.{3 * (i + 1)}.0.op"
        j = int(s[3])
        slot = 0 if kind == "resnets" else 1
        return f"input_blocks.{3 * i + j + 1}.{slot}." + inner(s[4:], kind == "resnets")
    if s[0] == "mid_block":
        slot = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{s[1]}.{s[2]}"]
        return f"middle_block.{slot}." + inner(s[3:], s[1] == "resnets")
    if s[0] == "up_blocks":
        i, kind = int(s[1]), s[2]
        if kind == "upsamplers":
            return f"output_blocks.{3 * i + 2}.2." + ".".join(s[4:])
        j = int(s[3])
        slot = 0 if kind == "resnets" else 1
        return f"output_blocks.{3 * i + j}.{slot}." + inner(s[4:], kind == "resnets")
    raise ValueError(f"no SGM name for {module}")


def sd_scripts_file(original, configs, path):
    """The original in kohya sd-scripts' SDXL names: lora_unet_<SGM path>, lora_te1_, lora_te2_;
    `.alpha` from the peft configs."""
    out = {}
    prefix = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    for key, v in original.items():
        part, rest = key.split(".", 1)
        module, factor = rest.rsplit(".lora_", 1)
        if part != "unet" and not module.startswith(("text_model.", "text_projection")):
            module = "text_model." + module  # kohya names transformers 4's CLIPTextModel paths
        name = prefix[part] + "_" + (sgm_path(module) if part == "unet" else module).replace(".", "_")
        out[f"{name}.lora_{'down' if factor == 'A.weight' else 'up'}.weight"] = v.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(configs[part].lora_alpha))
    save_file(out, path)
    return out


def run_all(folder):
    x = inputs()
    original = os.path.join(W, "lora", "pytorch_lora_weights.safetensors")
    os.makedirs(os.path.dirname(original), exist_ok=True)
    made, orig_sd, configs = make_lora(folder, original)
    ref = outputs(made, x)
    base = outputs(load(folder), x)
    for k in ref:
        change = float(np.abs(ref[k] - base[k]).max() / np.abs(base[k]).max())
        fact("the LoRA acts", k, change > 1e-3, f"max |lora - base| / max |base| = {change:.3g}")
    pipe = loaded(folder, original, "diffusers' own file", "original", orig_sd)
    compare("diffusers' own file", "original reloaded", ref, pipe, x)
    del made, pipe

    # 2. dreambridge to kohya (LDM numbering) and back.
    check = "dreambridge kohya and back"
    ours_k, back = os.path.join(W, "sks.safetensors"), os.path.join(W, "back.safetensors")
    fact(check, "lora convert --to kohya", True, db("lora", "convert", original, ours_k, "--to", "kohya", "--force").strip().splitlines()[-1])
    fact(check, "lora convert --to diffusers", True, db("lora", "convert", ours_k, back, "--to", "diffusers", "--force").strip().splitlines()[-1])
    with safe_open(ours_k, framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    ldm = [k for k in keys if k.startswith("lora_unet_")]
    fact(check, "kohya file: UNet in LDM numbering", ldm and all(any(b in k for b in ("input_blocks", "middle_block", "output_blocks")) for k in ldm), f"{len(ldm)} UNet keys, e.g. {ldm[0]}")
    fact(check, "kohya file: lora_te1_/lora_te2_", any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys) and not any(k.startswith("lora_te_") for k in keys))
    fact(check, "kohya file: SDXL metadata", meta.get("ss_base_model_version") == "sdxl_base_v1-0", json.dumps({k: meta.get(k) for k in ("ss_base_model_version", "modelspec.architecture")}))
    back_sd = load_file(back)
    fact(check, "the way back: the original's keys and factors bit for bit", same_factors(back_sd, orig_sd), f"{len(back_sd)} tensors (text-encoder keys compared without `text_model.`)")
    for name, path, factors in [("our kohya file", ours_k, None), ("our diffusers file", back, orig_sd)]:
        pipe = loaded(folder, path, check, name, factors)
        compare(check, name, ref, pipe, x)
        del pipe

    # 3. diffusers' --output_kohya_format file.
    check = "diffusers' kohya file in dreambridge"
    from diffusers.utils import convert_state_dict_to_kohya

    theirs = os.path.join(W, "pytorch_lora_weights_kohya.safetensors")
    save_file({k: v.contiguous() for k, v in convert_state_dict_to_kohya(dict(orig_sd)).items()}, theirs)
    mine = os.path.join(W, "from_theirs.safetensors")
    fact(check, "lora convert --to diffusers", True, db("lora", "convert", theirs, mine, "--to", "diffusers", "--force").strip().splitlines()[-1])
    mine_sd = load_file(mine)
    fact(check, "read as the original's factors (alpha = rank, as diffusers writes)", same_factors(mine_sd, orig_sd), f"{len(mine_sd)} tensors")
    theirs_pipe = loaded(folder, theirs, check, "their kohya file in diffusers")
    theirs_ref = outputs(theirs_pipe, x)
    del theirs_pipe
    pipe = loaded(folder, mine, check, "dreambridge's rewrite", orig_sd)
    compare(check, "dreambridge's rewrite vs their kohya file", theirs_ref, pipe, x)
    del pipe
    inspect = db("inspect", theirs)
    fact(check, "inspect", "family: SDXL" in inspect and "diffusers numbering" in inspect, " | ".join(line for line in inspect.splitlines() if line.startswith(("family", "kohya UNet"))))

    # 4. kohya sd-scripts' naming (LDM numbering) built here.
    check = "sd-scripts LDM file"
    scripts = os.path.join(W, "sd_scripts.safetensors")
    scripts_sd = sd_scripts_file(orig_sd, configs, scripts)
    pipe = loaded(folder, scripts, check, "in diffusers' kohya reader")
    compare(check, "in diffusers' kohya reader", ref, pipe, x)
    del pipe
    ours_sd = load_file(ours_k)
    names = set(ours_sd) == set(scripts_sd)
    fact(check, "dreambridge writes the same names", names, f"{len(ours_sd)} vs {len(scripts_sd)} keys; only ours {sorted(set(ours_sd) - set(scripts_sd))[:2]}, only theirs {sorted(set(scripts_sd) - set(ours_sd))[:2]}")
    if names:
        differ = [k for k in scripts_sd if not torch.equal(ours_sd[k].float(), scripts_sd[k].float())]
        fact(check, "dreambridge writes the same tensors", not differ, f"{len(differ)} differ {differ[:3]}")
    read_back = os.path.join(W, "from_scripts.safetensors")
    db("lora", "convert", scripts, read_back, "--to", "diffusers", "--force")
    rb = load_file(read_back)
    fact(check, "dreambridge reads it as the original's factors", same_factors(rb, orig_sd), f"{len(rb)} tensors")
    pipe = loaded(folder, read_back, check, "dreambridge's rewrite in diffusers", orig_sd)
    compare(check, "dreambridge's rewrite", ref, pipe, x)
    del pipe

    # 5. fuse_lora against lora merge.
    check = "fuse_lora vs lora merge"
    pipe = load(folder)
    plain = {p: {k: v.clone() for k, v in getattr(pipe, p).state_dict().items()} for p in PARTS}
    pipe.load_lora_weights(original)
    pipe.fuse_lora(components=list(PARTS), lora_scale=0.7)
    pipe.unload_lora_weights()
    merged = os.path.join(W, "merged")
    fact(check, "lora merge", True, db("lora", "merge", "--base", folder, "--lora", ours_k, "--scale", "0.7", "--out", merged, "--force").strip().splitlines()[-1])
    mine = load(merged)
    for p in PARTS:
        ref_sd, got_sd = getattr(pipe, p).state_dict(), getattr(mine, p).state_dict()
        keys = sorted(k for k in ref_sd if ref_sd[k].is_floating_point())
        changed = [k for k in keys if not torch.equal(plain[p][k], ref_sd[k])]
        fact(check, f"{p}: fusing changed weights", len(changed) > 0 and set(keys) == set(k for k in got_sd if got_sd[k].is_floating_point()), f"{len(changed)} of {len(keys)} tensors changed by fuse_lora")
        close(check, f"{p}: every weight", np.concatenate([ref_sd[k].numpy().ravel() for k in keys]), np.concatenate([got_sd[k].numpy().ravel() for k in keys]),
              f"{len(keys)} tensors, scale 0.7")
    del pipe, mine
    drop(merged)


def main():
    drop(W)
    os.makedirs(W, exist_ok=True)
    sample, folder = os.path.join(W, "sample"), os.path.join(W, "sdxl")
    db("convert", "keras-to-diffusers", "--out", sample)  # the embedded tiny sample: its CLIP tokenizer
    if guarded("build", make_sdxl, folder, sample, (1, 2, 3), 3) is not None:
        guarded("sdxl lora", run_all, folder)
    drop(W)
    print(json.dumps(dict(summary=True, failed=FAILED)), flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    DB = os.path.abspath(args[0]) if args else os.path.join(os.path.dirname(HERE), "target", "release", "dreambridge")
    os.makedirs(WORK, exist_ok=True)
    sys.exit(main())
