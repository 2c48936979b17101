"""Stability AI's SDXL base single file (`sd_xl_base_1.0.safetensors`: the UNet under
`model.diffusion_model.` in generative-models' layout, CLIP-L under `conditioner.embedders.0.transformer.`,
OpenCLIP-G under `conditioner.embedders.1.model.` with fused q/k/v and `text_projection` stored
transposed, the VAE under `first_stage_model.`) against diffusers' own single-file loader, on a tiny
SDXL pipeline built by diffusers / transformers with every float tensor set to seeded random values.

Two tiny pipelines: "sdxl-tiny" and "sdxl-depths" (SDXL base's own transformer depths 1/2/10 and
32 OpenCLIP-G blocks, so every key name of the real model is made). UNet of 3 levels (64, 128, 128 wide; no attention at the first level, transformer depth
2 and 3 after it in "sdxl-tiny", heads of 64), text-time conditioning with 8-wide time embeddings; CLIP-L 64 wide,
2 layers; OpenCLIP-G 128 wide, 10 layers in "sdxl-tiny" (diffusers' detection keys on `resblocks.9`), projection 96
(so `text_projection` is not square); a 4-level VAE with quant convs.

1. `convert diffusers-to-single-file` (f32): `StableDiffusionXLPipeline.from_single_file(file,
   config=folder)` and `UNet2DConditionModel` / `AutoencoderKL.from_single_file` give every tensor of
   the original models bit for bit.
2. diffusers' `infer_diffusers_model_type` names our file `xl_base`.
3. `convert single-file-to-diffusers` of the same file (no base: configs derived from the weights)
   loads with `StableDiffusionXLPipeline.from_pretrained`, every tensor bit-identical; the derived
   configs agree with the originals on every field the weights fix; the same tensors saved by
   `torch.save` as a `.ckpt` convert to the same models.
4. `--half`: the fp16 file loads in diffusers to the original weights cast to fp16, bit for bit.
5. Files written by diffusers' own `scripts/convert_diffusers_to_original_sdxl.py` (reproduced by
   `diffusers_sdxl_to_original.py`; with `SDXL_ORIGINAL_SCRIPT=<a copy of that script>` the copy is run
   too and must write the same tensors: safetensors files byte for byte): safetensors f32, `--half`,
   and `.ckpt` (`{"state_dict": ...}`, f32 and `--half`), from the folder as transformers 5 saves it
   (CLIP-L keys without `text_model.`) and from the same folder in transformers 4's form (`text_model.`
   keys, a persistent int64 `position_ids` in both CLIPs, which the script passes through and `--half`
   casts), import with `convert single-file-to-diffusers` and load with `from_pretrained` bit-identical
   to the original models (`--half`: to their fp16 cast).

    parity/.venv-torch/bin/python parity/sdxl_single_file_parity.py DREAMBRIDGE

Work files: $PARITY_WORK/sdxl_single_file. Prints a JSON line per check; exits 1 when a check failed.
"""
import json
import os
import shutil
import sys
import traceback

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import run_checked, WORK, drop, record_fact  # noqa: E402
import diffusers_sdxl_to_original as sdxl_script  # noqa: E402
from sdxl_common import make_sdxl  # noqa: E402
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

torch.set_grad_enabled(False)
W = os.path.join(WORK, "sdxl_single_file")
FAILED = []
DB = None
# name: (transformer depth per UNet level, OpenCLIP-G layers); "sdxl-depths" has SDXL base's own
# depths (1/2/10 per level, 32 OpenCLIP-G blocks) at tiny widths, so every real key name is made.
VARIANTS = {"sdxl-tiny": ((1, 2, 3), 10), "sdxl-depths": ((1, 2, 10), 32)}
VARIANT = ""
# A copy of diffusers' scripts/convert_diffusers_to_original_sdxl.py (not in the pip package): when
# given, it is run beside our reproduction of it and must write the same tensors.
ORIGINAL_SCRIPT = os.environ.get("SDXL_ORIGINAL_SCRIPT")


def fact(check, component, ok, note=""):
    check = f"{VARIANT}: {check}"
    if not ok:
        FAILED.append(f"{check} / {component}")
    print(json.dumps(dict(check=check, component=component, ok=bool(ok), note=note)), flush=True)
    record_fact(check, component, ok, note)
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


def make(sample):
    depths, g_layers = VARIANTS[VARIANT]
    return make_sdxl(os.path.join(W, VARIANT), sample, depths, g_layers)


def state(model):
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def same(check, component, ref, got, dtype=None):
    ref, got = state(ref), state(got)
    missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
    differ = []
    for k in sorted(set(ref) & set(got)):
        a, b = ref[k], got[k]
        if dtype is not None:
            a = a.to(dtype)
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            differ.append(f"{k} ({b.dtype} {tuple(b.shape)} vs {a.dtype} {tuple(a.shape)})")
    ok = not (missing or extra or differ)
    note = f"{len(ref)} tensors bit-identical"
    if not ok:
        note = f"{len(missing)} missing {missing[:3]}, {len(extra)} extra {extra[:3]}, {len(differ)} differ {differ[:3]}"
    return fact(check, component, ok, note)


def load(folder, **kw):
    return StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True, **kw)


def models(pipe):
    return dict(unet=pipe.unet, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2, vae=pipe.vae)


def check_in_diffusers(folder, path, half=False):
    check = "diffusers loads our file" + (" (fp16)" if half else "")
    dtype = torch.float16 if half else torch.float32
    orig = load(folder)
    pipe = StableDiffusionXLPipeline.from_single_file(path, config=folder, local_files_only=True, torch_dtype=dtype)
    for name, m in models(pipe).items():
        same(check, f"StableDiffusionXLPipeline.from_single_file {name}", getattr(orig, name), m, dtype)
    unet = UNet2DConditionModel.from_single_file(path, config=folder, subfolder="unet", local_files_only=True, torch_dtype=dtype)
    same(check, "UNet2DConditionModel.from_single_file", orig.unet, unet, dtype)
    vae = AutoencoderKL.from_single_file(path, config=folder, subfolder="vae", local_files_only=True, torch_dtype=dtype)
    same(check, "AutoencoderKL.from_single_file", orig.vae, vae, dtype)


def check_file_side(folder, path):
    sd = load_file(path)
    orig = load(folder)
    kind = sfu.infer_diffusers_model_type(sd)
    fact("diffusers' model-type detection", "infer_diffusers_model_type", kind == "xl_base", f"says {kind!r}")
    p = orig.text_encoder_2.text_projection.weight
    t = sd["conditioner.embedders.1.model.text_projection"]
    fact("file side", "OpenCLIP-G text_projection stored transposed", tuple(t.shape) == (128, 96) and torch.equal(t, p.T), f"shape {tuple(t.shape)}")
    a = orig.text_encoder_2.text_model.encoder.layers[3].self_attn
    fused = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
    fact("file side", "OpenCLIP-G in_proj_weight = q, k, v", torch.equal(sd["conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight"], fused))
    emb = orig.unet.add_embedding.linear_2.weight
    fact("file side", "label_emb.0.2 = add_embedding.linear_2", torch.equal(sd["model.diffusion_model.label_emb.0.2.weight"], emb))


def check_import(folder, path):
    out = os.path.join(W, "back")
    db("convert", "single-file-to-diffusers", "--checkpoint", path, "--out", out, "--force")
    orig, back = load(folder), load(out)
    for name, m in models(back).items():
        same("our single-file-to-diffusers", f"from_pretrained {name}", getattr(orig, name), m)
    fixed = dict(unet=["block_out_channels", "transformer_layers_per_block", "cross_attention_dim", "in_channels", "out_channels", "layers_per_block",
                       "projection_class_embeddings_input_dim", "addition_time_embed_dim", "addition_embed_type", "use_linear_projection",
                       "down_block_types", "up_block_types", "attention_head_dim"],
                 text_encoder=["hidden_size", "intermediate_size", "num_hidden_layers", "hidden_act", "projection_dim", "num_attention_heads"],
                 text_encoder_2=["hidden_size", "intermediate_size", "num_hidden_layers", "hidden_act", "projection_dim", "num_attention_heads"],
                 vae=["block_out_channels", "latent_channels", "scaling_factor"])
    for name, fields in fixed.items():
        a, b = getattr(orig, name).config, getattr(back, name).config
        bad = [f"{f}: {getattr(b, f, None)} vs {getattr(a, f, None)}" for f in fields if _norm(getattr(a, f, None)) != _norm(getattr(b, f, None))]
        fact("our single-file-to-diffusers", f"{name} config", not bad, "; ".join(bad) or f"{len(fields)} fields agree")
    fact("our single-file-to-diffusers", "tokenizer_2 pads with !", back.tokenizer_2.pad_token == "!", repr(back.tokenizer_2.pad_token))
    drop(out)
    # The same tensors in a torch.save `.ckpt` (a `state_dict` inside, as Stability's .ckpt files).
    ckpt = os.path.join(W, "sdxl.ckpt")
    torch.save({"state_dict": load_file(path)}, ckpt)
    db("convert", "single-file-to-diffusers", "--checkpoint", ckpt, "--out", out, "--force")
    back = load(out)
    for name, m in models(back).items():
        same("our single-file-to-diffusers (.ckpt)", f"from_pretrained {name}", getattr(orig, name), m)
    drop(out, ckpt)


def transformers4_folder(folder):
    """The same pipeline as transformers 4 saved it: CLIP-L keys under `text_model.`, and both CLIPs
    with the persistent int64 `text_model.embeddings.position_ids` buffer transformers < 4.31 wrote."""
    from safetensors.torch import save_file

    out = folder + "-tf4"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(folder, out)
    for part in ["text_encoder", "text_encoder_2"]:
        path = os.path.join(out, part, "model.safetensors")
        sd = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in load_file(path).items()}
        sd["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
        save_file(sd, path, metadata={"format": "pt"})
    return out


def script_file(folder, path, half, safetensors):
    """Our reproduction of the script writes `path`; a given copy of the original is compared with it."""
    sdxl_script.write(folder, path, half, safetensors)
    if not ORIGINAL_SCRIPT:
        return
    theirs = path + ".original"
    flags = (["--half"] if half else []) + (["--use_safetensors"] if safetensors else [])
    run_checked([sys.executable, ORIGINAL_SCRIPT, "--model_path", folder, "--checkpoint_path", theirs, *flags])
    if safetensors:
        with open(path, "rb") as a, open(theirs, "rb") as b:
            ok, note = a.read() == b.read(), "byte-identical files"
    else:
        x, y = torch.load(path, weights_only=True)["state_dict"], torch.load(theirs, weights_only=True)["state_dict"]
        ok = x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and x[k].shape == y[k].shape and torch.equal(x[k], y[k]) for k in x)
        note = f"{len(x)} tensors equal (state dicts)"
    fact("the script's files", f"our reproduction = {os.path.basename(ORIGINAL_SCRIPT)} ({os.path.basename(path)})", ok, note)
    drop(theirs)


def check_script_files(folder):
    """Files written by diffusers' convert_diffusers_to_original_sdxl.py import bit-identically."""
    orig = load(folder)
    tf4 = transformers4_folder(folder)
    out = os.path.join(W, "script-back")
    for source, form in [(folder, "transformers 5 folder"), (tf4, "transformers 4 folder")]:
        for half, safetensors in [(False, True), (True, True), (False, False), (True, False)]:
            label = f"{form}, {'--half ' if half else ''}{'safetensors' if safetensors else '.ckpt'}"
            stem = f"{VARIANT}-script" + ("-fp16" if half else "")
            if not safetensors:
                # torch.save names the archive's folder after the file: 21 characters make data.pkl's
                # central entry 76 bytes, the size of the zip64 records torch writes after the central
                # directory (the layout the zip crate's offset detection misread; see ckpt.rs).
                stem = (stem + "-" * 21)[:21]
            path = os.path.join(W, stem + (".safetensors" if safetensors else ".ckpt"))
            script_file(source, path, half, safetensors)
            db("convert", "single-file-to-diffusers", "--checkpoint", path, "--out", out, "--force")
            dtype = torch.float16 if half else None
            back = load(out, torch_dtype=dtype) if half else load(out)
            for name, m in models(back).items():
                same("the script's files", f"{label}: from_pretrained {name}", getattr(orig, name), m, dtype)
            drop(out, path)
    drop(tf4)


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def main():
    shutil.rmtree(W, ignore_errors=True)
    os.makedirs(W)
    sample = os.path.join(W, "sample")
    db("convert", "keras-to-diffusers", "--out", sample)  # the embedded tiny sample: its CLIP tokenizer
    global VARIANT
    for VARIANT in VARIANTS:
        run_variant(sample)
    drop(sample)
    print(json.dumps(dict(summary=True, failed=FAILED)), flush=True)
    return 1 if FAILED else 0


def run_variant(sample):
    folder = guarded("build", make, sample)
    if folder is None:
        return
    path, half = os.path.join(W, f"{VARIANT}.safetensors"), os.path.join(W, f"{VARIANT}-fp16.safetensors")
    out = guarded("convert", db, "convert", "diffusers-to-single-file", "--model", folder, "--out", path, "--force")
    if out is not None:
        fact("convert", "diffusers-to-single-file", True, out.strip().splitlines()[-1])
        guarded("diffusers loads our file", check_in_diffusers, folder, path)
        guarded("file side", check_file_side, folder, path)
        guarded("our single-file-to-diffusers", check_import, folder, path)
    if guarded("convert --half", db, "convert", "diffusers-to-single-file", "--model", folder, "--out", half, "--half", "--force") is not None:
        guarded("diffusers loads our file (fp16)", check_in_diffusers, folder, half, True)
    guarded("the script's files", check_script_files, folder)
    drop(folder, path, half)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    DB = os.path.abspath(args[0]) if args else os.path.join(os.path.dirname(HERE), "target", "release", "dreambridge")
    os.makedirs(WORK, exist_ok=True)
    sys.exit(main())
