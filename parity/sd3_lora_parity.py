"""KerasHub SD3 LoRA (`enable_lora` + `save_lora_weights`, `*.lora.h5`) <-> diffusers SD3 LoRA (PEFT
names, `StableDiffusion3Pipeline.load_lora_weights`), proven against both peers on a tiny keras-hub
backbone with random weights, per MMDiT variant:

1. keras (`make`): random weights, saved; LoRA with random kernels on every kind of layer keras-hub
   can adapt by name in the CLIPs and the MMDiT: fused q/k/v (`attention_qkv`), per-head CLIP
   kernels (`query`, `value`: a (D, heads, r), one b for all heads), the CLIPs' output kernel
   (`attention_output`, (heads, head_dim, D)), Dense layers everywhere (`attention_proj`, `dense1`,
   and `dense`, which includes the adaptive norms whose scale/shift halves diffusers swaps and the
   CLIP projections). Saves the base and LoRA outputs (MMDiT, CLIP-L/G penultimate states).
2. dreambridge: the base to a diffusers folder, `lora convert adapter.lora.h5 --to diffusers`.
3. torch (`forward`): `load_lora_weights` of the converted file: every tensor of it loaded (no
   key left out), outputs equal to keras-hub's with its LoRA, and different from the base's (the
   LoRA did something). Then a LoRA made by peft on the diffusers side (q/k/v and out of every
   attention, context projections, adaptive norms; CLIP q/k/v/out) with lora_alpha != r saved by
   `save_lora_weights` with its adapter metadata; its outputs saved.
4. dreambridge: `lora convert peft.safetensors back.lora.h5 --to keras`; it prints the
   `enable_lora` call.
5. keras (`back`): that call, `load_lora_weights`, outputs equal to diffusers' with peft's LoRA.

    parity/.venv-torch/bin/python parity/sd3_lora_parity.py run DREAMBRIDGE

(`run` drives both venvs.) Tolerance: max |diff| / max |reference| <= 1e-4 in f32.
"""
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import run_checked, WORK, drop, record, record_fact  # noqa: E402

TARGETS = ["attention_qkv", "attention_proj", "query", "value", "attention_output", "dense1", "dense"]
VARIANTS = os.environ.get("SD3_VARIANTS", "sd3-medium,sd3.5-medium,sd3.5-large").split(",")
TOL = 1e-4
KERAS_PY = os.path.join(HERE, ".venv-kerashub", "bin", "python")


def build(variant):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    from keras_hub.models import CLIPTextEncoder, StableDiffusion3Backbone
    from keras_hub.src.models.vae.vae_backbone import VAEBackbone

    clip_l = CLIPTextEncoder(49408, 32, 32, 2, 2, 64, intermediate_activation="quick_gelu", intermediate_output_index=-2, name="clip_l")
    clip_g = CLIPTextEncoder(49408, 64, 64, 3, 2, 128, intermediate_activation="gelu", intermediate_output_index=-2, name="clip_g")
    vae = VAEBackbone([32, 64, 128, 128], [2, 2, 2, 2], [128, 128, 64, 32], [3, 3, 3, 3], name="vae")
    qk = None if variant == "sd3-medium" else "rms_norm"
    dual = [0, 1] if variant == "sd3.5-medium" else None
    return StableDiffusion3Backbone(
        mmdit_patch_size=2, mmdit_hidden_dim=128, mmdit_num_layers=3, mmdit_num_heads=2, mmdit_position_size=16,
        mmdit_qk_norm=qk, mmdit_dual_attention_indices=dual, vae=vae, clip_l=clip_l, clip_g=clip_g, image_shape=(64, 64, 3),
    )


def inputs(seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 49406, size=(2, 77)).astype("int32")
    ids[:, 0] = 49406
    ids[0, 9] = 49407
    ids[1, 30] = 49407
    return {
        "latent": rng.normal(size=(2, 8, 8, 16)).astype("float32"),
        "context": rng.normal(size=(2, 154, 4096)).astype("float32"),
        "pooled": rng.normal(size=(2, 96)).astype("float32"),
        "timestep": np.array([[250.0], [800.0]], dtype="float32"),
        "ids": ids,
    }


def keras_outputs(backbone, x):
    out = backbone.diffuser({"latent": x["latent"], "context": x["context"], "pooled_projection": x["pooled"], "timestep": x["timestep"]})
    ref = {"mmdit": np.asarray(out)}
    for name in ["clip_l", "clip_g"]:
        ref[name] = np.asarray(getattr(backbone, name)({"token_ids": x["ids"]})["intermediate_output"])
    return ref


def keras_make(work, variant):
    backbone = build(variant)
    rng = np.random.default_rng(VARIANTS.index(variant))
    for w in backbone.weights:  # no zeros, no identities
        w.assign(rng.normal(size=w.shape).astype("float32") * 0.05)
    backbone.save_weights(os.path.join(work, "backbone.weights.h5"))
    x = inputs()
    base = keras_outputs(backbone, x)
    backbone.enable_lora(2, target_layer_names=TARGETS)
    for layer in backbone._flatten_layers(include_self=False):
        if getattr(layer, "lora_enabled", False):
            layer.lora_kernel_a.assign(rng.normal(size=layer.lora_kernel_a.shape).astype("float32") * 0.2)
            layer.lora_kernel_b.assign(rng.normal(size=layer.lora_kernel_b.shape).astype("float32") * 0.2)
    backbone.save_lora_weights(os.path.join(work, "adapter.lora.h5"))
    ref = keras_outputs(backbone, x)
    np.savez(os.path.join(work, "keras_ref.npz"), **ref, **{"base_" + k: v for k, v in base.items()}, **x)
    print(json.dumps({"variant": variant, "lora_layers": len(backbone._lora_enabled_layers)}))


def keras_back(work, variant, call):
    backbone = build(variant)
    backbone.load_weights(os.path.join(work, "backbone.weights.h5"))
    eval(call, {"backbone": backbone})  # the `backbone.enable_lora(...)` dreambridge printed
    backbone.load_lora_weights(os.path.join(work, "back.lora.h5"))
    x = dict(np.load(os.path.join(work, "keras_ref.npz")))
    np.savez(os.path.join(work, "keras_back.npz"), **keras_outputs(backbone, x))


def torch_outputs(pipe, ref):
    import torch

    with torch.no_grad():
        latent = torch.from_numpy(ref["latent"]).permute(0, 3, 1, 2)
        out = pipe.transformer(hidden_states=latent, encoder_hidden_states=torch.from_numpy(ref["context"]), pooled_projections=torch.from_numpy(ref["pooled"]), timestep=torch.from_numpy(ref["timestep"][:, 0])).sample
        res = {"mmdit": out.permute(0, 2, 3, 1).numpy()}
        ids = torch.from_numpy(ref["ids"]).long()
        for name, model in [("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2)]:
            res[name] = model(ids, output_hidden_states=True).hidden_states[-2].numpy()
    return res


def torch_forward(work, variant):
    import torch
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    check = f"sd3 lora {variant}"
    ref = dict(np.load(os.path.join(work, "keras_ref.npz")))
    pipe = StableDiffusion3Pipeline.from_pretrained(os.path.join(work, "diffusers"), text_encoder_3=None, tokenizer_3=None, torch_dtype=torch.float32)
    base = torch_outputs(pipe, ref)
    path = os.path.join(work, "adapter.safetensors")
    pipe.load_lora_weights(path, adapter_name="kh")
    with safe_open(path, framework="pt") as f:
        file_keys = set(f.keys())
    loaded = set()
    for prefix, model in [("transformer.", pipe.transformer), ("text_encoder.", pipe.text_encoder), ("text_encoder_2.", pipe.text_encoder_2)]:
        loaded |= {prefix + n.replace(".kh.", ".") for n, _ in model.named_parameters() if ".lora_A.kh." in n or ".lora_B.kh." in n}
    unloaded = sorted(file_keys - loaded)
    record_fact(check, "keras -> diffusers", not unloaded and len(file_keys) > 0, f"{len(file_keys)} tensors, {len(unloaded)} not loaded {unloaded[:3]}")
    got = torch_outputs(pipe, ref)
    for k in ["mmdit", "clip_l", "clip_g"]:
        record(check, f"keras->diffusers {k}", ref[k], got[k], TOL)
        change = float(np.abs(ref[k] - ref["base_" + k]).max() / np.abs(ref["base_" + k]).max())
        record_fact(check, f"LoRA changes {k}", change > 1e-2, f"max |lora - base| / max |base| = {change:.3g}")
        record(check, f"base {k}", ref["base_" + k], base[k], TOL, "the converted base without LoRA")
    pipe.unload_lora_weights()

    # A LoRA made on the diffusers side, alpha != r, saved with its metadata.
    torch.manual_seed(VARIANTS.index(variant))
    mmdit_modules = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "norm1.linear", "norm1_context.linear", "norm_out.linear", "ff.net.2"]
    t_cfg = LoraConfig(r=3, lora_alpha=6, target_modules=mmdit_modules, init_lora_weights=False)
    c_cfg = LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"], init_lora_weights=False)
    pipe.transformer.add_adapter(t_cfg)
    pipe.text_encoder.add_adapter(c_cfg)
    pipe.text_encoder_2.add_adapter(c_cfg)
    meta = lambda m: m.peft_config["default"].to_dict()  # noqa: E731
    StableDiffusion3Pipeline.save_lora_weights(
        os.path.join(work, "peft"),
        transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2),
        transformer_lora_adapter_metadata=meta(pipe.transformer),
        text_encoder_lora_adapter_metadata=meta(pipe.text_encoder),
        text_encoder_2_lora_adapter_metadata=meta(pipe.text_encoder_2),
    )
    got = torch_outputs(pipe, ref)
    np.savez(os.path.join(work, "torch_peft.npz"), **got)
    # The file reloaded by diffusers gives the same (the metadata carries alpha).
    pipe2 = StableDiffusion3Pipeline.from_pretrained(os.path.join(work, "diffusers"), text_encoder_3=None, tokenizer_3=None, torch_dtype=torch.float32)
    pipe2.load_lora_weights(os.path.join(work, "peft"))
    again = torch_outputs(pipe2, ref)
    for k in got:
        record(check, f"peft file reloads {k}", got[k], again[k], 1e-6)


def torch_back(work, variant):
    check = f"sd3 lora {variant}"
    want = dict(np.load(os.path.join(work, "torch_peft.npz")))
    got = dict(np.load(os.path.join(work, "keras_back.npz")))
    base = dict(np.load(os.path.join(work, "keras_ref.npz")))
    for k in ["mmdit", "clip_l", "clip_g"]:
        record(check, f"diffusers->keras {k}", want[k], got[k], TOL, "peft LoRA in keras-hub load_lora_weights vs diffusers")
        change = float(np.abs(want[k] - base["base_" + k]).max() / np.abs(base["base_" + k]).max())
        record_fact(check, f"peft LoRA changes {k}", change > 1e-2, f"{change:.3g}")


def sh(args, env=None):
    return run_checked(args, env).stdout


def run(db):
    results = os.path.join(WORK, "results.jsonl")
    start = sum(1 for _ in open(results)) if os.path.exists(results) else 0
    env = dict(os.environ, KERAS_BACKEND="jax")
    me = os.path.abspath(__file__)
    for variant in VARIANTS:
        work = os.path.join(WORK, "sd3_lora", variant)
        os.makedirs(work, exist_ok=True)
        try:
            sh([KERAS_PY, me, "keras-make", work, variant], env)
            sh([db, "convert", "keras-to-diffusers", "--preset", os.path.join(work, "backbone.weights.h5"), "--out", os.path.join(work, "diffusers"), "--force"])
            sh([db, "lora", "convert", os.path.join(work, "adapter.lora.h5"), os.path.join(work, "adapter.safetensors"), "--to", "diffusers", "--base", os.path.join(work, "backbone.weights.h5"), "--force"])
            torch_forward(work, variant)
            out = sh([db, "lora", "convert", os.path.join(work, "peft", "pytorch_lora_weights.safetensors"), os.path.join(work, "back.lora.h5"), "--to", "keras", "--base", os.path.join(work, "diffusers"), "--force"])
            call = next(line.strip() for line in out.splitlines() if line.strip().startswith("backbone.enable_lora("))
            sh([KERAS_PY, me, "keras-back", work, variant, call], env)
            torch_back(work, variant)
        except Exception as e:
            record_fact(f"sd3 lora {variant}", "ran", False, f"{type(e).__name__}: {e}"[:600])
        drop(work)
    with open(results) as f:
        rows = [json.loads(line) for line in f][start:]
    failed = [r for r in rows if r["check"].startswith("sd3 lora") and not r["ok"]]
    print(f"sd3 lora parity: {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    cmd = sys.argv[1]
    os.makedirs(WORK, exist_ok=True)
    if cmd == "keras-make":
        keras_make(sys.argv[2], sys.argv[3])
    elif cmd == "keras-back":
        keras_back(sys.argv[2], sys.argv[3], sys.argv[4])
    elif cmd == "run":
        sys.exit(run(os.path.abspath(sys.argv[2])))
    else:
        sys.exit(f"usage: {sys.argv[0]} run DREAMBRIDGE")
