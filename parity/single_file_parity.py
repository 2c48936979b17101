"""Single-file checkpoints (the original Stable Diffusion "LDM" layout of AUTOMATIC1111 and ComfyUI)
against diffusers' own single-file loader, on tiny SD1 and SD2 pipelines made by diffusers and
transformers with seeded random weights (every LayerNorm/GroupNorm weight and bias randomized too):

1. `convert diffusers-to-single-file` (f32 and `--half`): `StableDiffusionPipeline.from_single_file(file,
   config=folder)` gives the UNet, VAE and text encoder of `from_pretrained(folder)` bit for bit (the
   fp16 file: the f32 weights cast to fp16, and the folder's `fp16` variant);
2. both pipelines run 2 steps at 64x64 to the same image;
3. key accounting: diffusers' converters (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
   `convert_ldm_clip_checkpoint` / `convert_open_clip_checkpoint`) read every key of our file, and
   every element of it lands exactly once in the state dict they build, whose keys are the model's;
4. torch-written files (`torch.save` with and without the `state_dict` wrapper, `save_file`, also one
   whose first byte is 0x80, pickle's PROTO opcode, as in 1 of 32 safetensors files), with what
   real checkpoints carry besides (schedule buffers, SD1 `position_ids`, OpenCLIP's whole tower with
   `text_projection` and `logit_scale`), import with `convert single-file-to-diffusers`, with and
   without `--base`, to the original tensors; without `--base` the derived configs run the same images;
5. EMA: `--ema` takes the UNet from `model_ema.*`, without it the live weights (diffusers'
   `extract_ema=True` agrees);
6. a pickle naming `os.system` is refused, nothing runs, no folder is written;
7. v-prediction SD2: the `.yaml` sidecar, and `prediction_type` from it or from `--prediction-type`;
8. a full-size SD1.5-config pipeline (random init) through check 1 in f32 (skipped by `--tiny-only`).

    PARITY_WORK=/tmp/pw parity/.venv-torch/bin/python parity/single_file_parity.py [DREAMBRIDGE] [--tiny-only]

Work files: $PARITY_WORK/single_file; the tiny checks' files are deleted before the full-size one,
and its ~8.5 GB (folder and file) when it ends (PARITY_KEEP=1 keeps the tiny ones). Exits 1 when a
check of this run failed.
"""
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import traceback

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import WORK, LogWarnings, drop, record, record_fact  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

torch.set_grad_enabled(False)
W = os.path.join(WORK, "single_file")
PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", 1: "cond_stage_model.transformer.", 2: "cond_stage_model.model."}
COMPONENTS = ("unet", "vae", "text_encoder")
FAILED = []  # this run's failed checks (common.record* only append to results.jsonl)


def fact(check, component, ok, note):
    if not ok:
        FAILED.append(f"{check} / {component}")
    return record_fact(check, component, ok, note)


def compare(check, component, ref, got, tol, note=""):
    ok = record(check, component, ref, got, tol, note)
    if not ok:
        FAILED.append(f"{check} / {component}")
    return ok


def guarded(check):
    """Runs one numbered check; an exception is recorded as its failure and the suite goes on."""
    def wrap(fn):
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # the failure is the result
                traceback.print_exc()
                fact(check, "ran to the end", False, f"{type(e).__name__}: {e}"[:400])
        return run
    return wrap


def db(*args, ok=True):
    """Runs dreambridge; with ok=True a non-zero exit raises with its stderr."""
    p = subprocess.run([DB, *map(str, args)], capture_output=True, text=True)
    if ok and p.returncode != 0:
        raise RuntimeError(f"dreambridge {' '.join(map(str, args))} exited {p.returncode}: {p.stderr.strip()[-1500:]}")
    return p


def scheduler(prediction="epsilon"):
    """SD's DDIM (the config dreambridge embeds), so a folder without --base runs the same."""
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading", prediction_type=prediction)


def unet_config(sd, full=False):
    widths = [320, 640, 1280, 1280] if full else [32, 64, 96, 96]  # c1 != c2 == c3, as SD's (shortcuts where widths change)
    # SD2: mappings/unet_sd2.toml [config] (sample_size 96, upcast_attention), for either prediction type
    return dict(sample_size=96 if sd == 2 else 64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=widths,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=768 if full else 32,
                # diffusers' attention_head_dim is the number of heads: 8 for SD1; SD2 has 64-wide heads
                # (mappings/unet_sd2.toml [heads]: 8-wide on widths that are not multiples of 64)
                attention_head_dim=8 if sd == 1 else [w // 8 for w in widths], norm_num_groups=32, norm_eps=1e-5,
                flip_sin_to_cos=True, freq_shift=0, act_fn="silu", downsample_padding=1, mid_block_scale_factor=1,
                center_input_sample=False, use_linear_projection=sd == 2, upcast_attention=sd == 2)


def text_config(sd, full=False):
    d = 768 if full else 32
    return CLIPTextConfig(vocab_size=49408, hidden_size=d, intermediate_size=4 * d if full else 64,
                          num_hidden_layers=12 if full else (2 if sd == 1 else 3),
                          num_attention_heads=d // 64 if full else d // 4,  # mappings/text_encoder_sd1.toml [heads]
                          max_position_embeddings=77, hidden_act="quick_gelu" if sd == 1 else "gelu", layer_norm_eps=1e-5,
                          projection_dim=768 if sd == 1 else 512, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def vae_config(full=False):
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                block_out_channels=[128, 256, 512, 512] if full else [32, 64, 96, 96], layers_per_block=2, latent_channels=4,
                norm_num_groups=32, act_fn="silu", sample_size=512, scaling_factor=0.18215)


def randomize(model, seed):
    """Every parameter ~N(0, 0.05), norm weights 1 + N(0, 0.05): a swapped weight/bias or norm shows."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(0.05 * torch.randn(p.shape, generator=g))
    for m in model.modules():
        if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and m.weight is not None:
            m.weight += 1


def make_pipeline(name, sd, prediction="epsilon", full=False, seed=0):
    """Saves a StableDiffusionPipeline to W/name (f32; tiny ones also get the fp16 variant)."""
    folder = os.path.join(W, name)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(sd, full))
    text = CLIPTextModel(text_config(sd, full))
    vae = AutoencoderKL(**vae_config(full))
    if not full:
        for i, m in enumerate((unet, text, vae)):
            randomize(m, seed * 10 + i)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=TOKENIZER, unet=unet, scheduler=scheduler(prediction),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    if not full:  # the fp16 variant, saved aside so that the folder's configs stay f32
        aside = folder + ".fp16"
        pipe.to(torch.float16).save_pretrained(aside, variant="fp16")
        for c in COMPONENTS:
            for f in os.listdir(os.path.join(aside, c)):
                if ".fp16." in f:
                    shutil.copy(os.path.join(aside, c, f), os.path.join(folder, c, f))
        shutil.rmtree(aside)
    del pipe, unet, text, vae
    gc.collect()
    return folder


def weights(model):
    """A model's parameters (buffers such as position_ids, which the model makes itself, left out)."""
    buffers = {n for n, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k not in buffers}


def same_weights(check, component, ref, got, note=""):
    """Same key set and torch.equal (dtype included) for every tensor."""
    ref, got = (weights(m) if isinstance(m, torch.nn.Module) else m for m in (ref, got))
    missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
    differ, worst = [], 0.0
    for k in sorted(set(ref) & set(got)):
        a, b = ref[k], got[k]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            differ.append(f"{k} ({b.dtype} {tuple(b.shape)} vs {a.dtype} {tuple(a.shape)})")
            if a.shape == b.shape:
                worst = max(worst, float((a.double() - b.double()).abs().max()))
    ok = not (missing or extra or differ)
    text = f"{len(ref)} tensors, bit-identical" if ok else (
        f"{len(missing)} missing {missing[:2]}, {len(extra)} extra {extra[:2]}, {len(differ)} differ {differ[:2]} (max abs diff {worst:.2e})")
    return fact(check, component, ok, (note + "; " if note else "") + text)


def load_folder(folder, dtype=torch.float32, variant=None):
    return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=dtype, variant=variant, safety_checker=None)


def load_single(path, folder, dtype=torch.float32, **kwargs):
    with LogWarnings("diffusers", "transformers") as w:
        pipe = StableDiffusionPipeline.from_single_file(path, config=folder, local_files_only=True, torch_dtype=dtype, **kwargs)
    return pipe, w.key_warnings()


def generate(pipe):
    out = pipe("a photo of an astronaut riding a horse", num_inference_steps=2, height=64, width=64, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    return np.asarray(out, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# 1 + 2: dreambridge's file in diffusers' from_single_file.

def check_in_diffusers(label, folder, path, half, run=True, check="single file in diffusers"):
    dtype = torch.float16 if half else torch.float32
    theirs, warned = load_single(path, folder, dtype)
    fact(check, f"{label}: clean load", not warned, "; ".join(warned)[:300] or "no missing/unexpected-key warnings")
    ref = load_folder(folder)  # f32
    refs = {c: getattr(ref, c) for c in COMPONENTS}
    if half:
        refs = {c: {k: v.to(torch.float16) for k, v in weights(m).items()} for c, m in refs.items()}
        variant = load_folder(folder, torch.float16, "fp16")
        for c in COMPONENTS:
            same_weights(check, f"{label}: {c} = fp16 variant", getattr(variant, c), getattr(theirs, c))
    for c in COMPONENTS:
        same_weights(check, f"{label}: {c}", refs[c], getattr(theirs, c), "vs f32 weights cast to fp16" if half else "")
    if run:
        ours_img = generate(theirs)
        ref_pipe = variant if half else ref
        ref_img = generate(ref_pipe)
        compare("single file pipeline run", f"{label}: 2 steps 64x64", ref_img, ours_img, 0.0,
                "from_single_file vs from_pretrained, same seed; tol 0 = identical")
    return theirs


# ---------------------------------------------------------------------------------------------
# 3: key accounting with diffusers' own converters.

class Reads(dict):
    """A checkpoint dict that records every key read through [], get and pop."""

    def __init__(self, *a):
        super().__init__(*a)
        self.read = set()

    def __getitem__(self, k):
        self.read.add(k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        if k in self:
            self.read.add(k)
        return super().get(k, default)

    def pop(self, k, *default):
        self.read.add(k)
        return super().pop(k, *default)


@guarded("key accounting")
def check_accounting(label, folder, path, sd):
    """Every tensor of our file is replaced by float64 codes (key index * 2^32 + element index), so
    the converters' output says exactly which element of which key each of its elements is."""
    ours = load_file(path)
    keys = sorted(ours)
    codes = {}
    for i, k in enumerate(keys):
        n = ours[k].numel()
        assert n < 2 ** 32
        codes[k] = (torch.arange(n, dtype=torch.float64) + i * 2.0 ** 32).reshape(ours[k].shape)
    ref = load_folder(folder)
    text_model = ref.text_encoder

    def unet(ck):
        return sfu.convert_ldm_unet_checkpoint(ck, dict(ref.unet.config))

    def vae(ck):
        return sfu.convert_ldm_vae_checkpoint(ck, dict(ref.vae.config))

    def text(ck):
        out = sfu.convert_ldm_clip_checkpoint(ck) if sd == 1 else sfu.convert_open_clip_checkpoint(text_model, ck)
        # as create_diffusers_clip_model_from_ldm does for transformers >= 5.6 (no `text_model` wrapper)
        return out if hasattr(text_model, "text_model") else {k.removeprefix("text_model."): v for k, v in out.items()}

    covered = set()
    for component, convert, prefix in [("unet", unet, PREFIX["unet"]), ("vae", vae, PREFIX["vae"]), ("text_encoder", text, PREFIX[sd])]:
        mine = [k for k in keys if k.startswith(prefix)]
        covered |= set(mine)
        ck = Reads(codes)
        out = convert(ck)
        read_ours = ck.read & set(mine)
        # provenance of every element of the converted state dict
        offsets, total = {}, 0
        for k in mine:
            offsets[k] = total
            total += codes[k].numel()
        hits = torch.zeros(total, dtype=torch.int64)
        foreign = 0
        index = {i: k for i, k in enumerate(keys) if k.startswith(prefix)}
        for v in out.values():
            flat = v.reshape(-1).to(torch.float64)
            ki, ei = torch.div(flat, 2.0 ** 32, rounding_mode="floor").long(), torch.remainder(flat, 2.0 ** 32).long()
            for kid in ki.unique().tolist():
                sel = ki == kid
                if kid not in index:
                    foreign += int(sel.sum())
                    continue
                hits.index_add_(0, offsets[index[kid]] + ei[sel], torch.ones(int(sel.sum()), dtype=torch.int64))
        model_keys = set(weights(getattr(ref, component)))
        landed = sum(1 for k in mine if bool((hits[offsets[k]:offsets[k] + codes[k].numel()] > 0).all()))
        once = bool((hits == 1).all()) and foreign == 0
        ok = len(read_ours) == len(mine) and landed == len(mine) and once and set(out) == model_keys
        note = (f"ours {len(mine)} keys, converter read {len(read_ours)}, fully landed {landed}, every element exactly once: {once}; "
                f"converted {len(out)} keys == model's {len(model_keys)}: {set(out) == model_keys}")
        if set(out) != model_keys:
            note += f" (extra {sorted(set(out) - model_keys)[:2]}, missing {sorted(model_keys - set(out))[:2]})"
        if len(read_ours) != len(mine):
            note += f" (unread: {sorted(set(mine) - read_ours)[:3]})"
        fact("key accounting", f"{label}: {component}", ok, note)
    rest = sorted(set(keys) - covered)
    fact("key accounting", f"{label}: nothing else", not rest, f"{len(keys)} keys in the file, {len(rest)} outside the 3 components {rest[:3]}")


# ---------------------------------------------------------------------------------------------
# 4 + 5: torch-written single files into dreambridge.

def with_real_extras(sd_dict, sd):
    """What real checkpoints carry besides the three models."""
    out = dict(sd_dict)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    out["betas"] = betas.float()
    out["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    if sd == 1:
        out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    else:  # OpenCLIP's whole tower: one more block (diffusers drops it), the projection, the logit scale
        p = PREFIX[2] + "transformer.resblocks."
        last = max(int(k[len(p):].split(".")[0]) for k in out if k.startswith(p))
        for k in [k for k in out if k.startswith(f"{p}{last}.")]:
            out[k.replace(f"{p}{last}.", f"{p}{last + 1}.")] = out[k].clone() + 0.01
        d = out[PREFIX[2] + "ln_final.weight"].shape[0]
        out[PREFIX[2] + "text_projection"] = torch.randn(d, d, generator=torch.Generator().manual_seed(5))
        out[PREFIX[2] + "logit_scale"] = torch.tensor(4.6052)
    return out


def header_length(path):
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def save_with_header_low_byte(sd_dict, path, low=0x80):
    """A safetensors file whose header length ends in the byte `low` (0x80 is also pickle's PROTO
    opcode): metadata padding moves the length in steps of 8, as the header is space-padded to 8."""
    save_file(sd_dict, path, metadata={"pad": ""})
    n = header_length(path)
    save_file(sd_dict, path, metadata={"pad": "x" * ((low - n) % 256)})
    assert header_length(path) % 256 == low, header_length(path)


def torch_written(name, sd_dict):
    """The files torch users write: wrapped .ckpt, safetensors, bare .ckpt; and a safetensors file
    whose first byte is 0x80 (its header length ends in 0x80, as for 1 in 32 safetensors files)."""
    base = os.path.join(W, name)
    x, y, z, h = base + "-wrapped.ckpt", base + ".safetensors", base + "-bare.ckpt", base + "-x80.safetensors"
    sd_dict = {k: v.contiguous() for k, v in sd_dict.items()}
    torch.save({"state_dict": sd_dict, "global_step": 875000, "epoch": 3}, x)
    save_file(sd_dict, y)
    torch.save(sd_dict, z)
    save_with_header_low_byte(sd_dict, h)
    return [("torch.save {state_dict} .ckpt", x), ("save_file .safetensors", y), ("bare torch.save .ckpt", z),
            ("save_file, first byte 0x80", h)]


NOT_IN_WEIGHTS = ("sample_size", "upcast_attention")  # a default resolution and an fp16 safeguard: reported, not checked


def config_diff(ref, got):
    """Config fields that differ between two models (names, versions and NOT_IN_WEIGHTS aside)."""
    skip = {"_name_or_path", "_diffusers_version", "_use_default_values", "transformers_version", "dtype", "torch_dtype",
            "architectures", "_commit_hash", "_attn_implementation_autoset", "output_hidden_states", "return_dict", *NOT_IN_WEIGHTS}
    a, b = (m.config.to_dict() if hasattr(m.config, "to_dict") else dict(m.config) for m in (ref, got))
    # the reference's fields only: a field its class does not declare (transformers 5 has no CLIP
    # `dropout`) is kept as an inert attribute
    return {k: (a[k], b.get(k)) for k in a if k not in skip and not k.startswith("_") and a[k] != b.get(k)}


@guarded("torch-written files import")
def check_import(label, folder, exported, sd):
    check = "torch-written files import"
    ref = load_folder(folder)
    ref_img = generate(ref)
    live = load_file(exported)
    sources = [("dreambridge's own file", exported)] + torch_written(f"{label}-torch", with_real_extras(live, sd))
    for i, (what, path) in enumerate(sources):
        for base in (True, False):
            tag = f"{label}, {what}, {'--base' if base else 'no --base'}"
            try:  # each import on its own: one refused file does not hide the others
                out = os.path.join(W, f"{label}-import-{i}-{'base' if base else 'nobase'}")
                db("convert", "single-file-to-diffusers", "--checkpoint", path, "--out", out, "--force", *(["--base", folder] if base else []))
                got = load_folder(out)
            except Exception as e:
                fact(check, f"{tag}: imported", False, f"{type(e).__name__}: {e}"[:400])
                continue
            for c in COMPONENTS:
                same_weights(check, f"{tag}: {c}", getattr(ref, c), getattr(got, c))
            if not base:
                diffs = {c: config_diff(getattr(ref, c), getattr(got, c)) for c in COMPONENTS}
                diffs = {c: d for c, d in diffs.items() if d}
                told = ", ".join(f"{k} {got.unet.config[k]} (original {ref.unet.config[k]})" for k in NOT_IN_WEIGHTS)
                fact(check, f"{tag}: derived configs", not diffs,
                     (str(diffs)[:300] if diffs else "unet, vae, text_encoder configs equal the original's") + f"; not in the weights: {told}")
                if i < 2:
                    compare(check, f"{tag}: pipeline run", ref_img, generate(got), 0.0, "embedded tokenizer + DDIM config vs the original pipeline")
            del got
            gc.collect()


@guarded("EMA")
def check_ema(label, folder, exported):
    check = "EMA"
    live = load_file(exported)
    g = torch.Generator().manual_seed(11)
    unet_keys = [k for k in live if k.startswith(PREFIX["unet"])]
    ema = {k: 0.05 * torch.randn(live[k].shape, generator=g) for k in unet_keys}
    with_ema = dict(live)
    for k in unet_keys:
        with_ema["model_ema." + "".join(k.split(".")[1:])] = ema[k]
    with_ema["model_ema.decay"] = torch.tensor(0.9999)
    with_ema["model_ema.num_updates"] = torch.tensor(875000, dtype=torch.int32)
    path = os.path.join(W, f"{label}-ema.safetensors")
    save_file(with_ema, path)
    swapped = os.path.join(W, f"{label}-ema-as-live.safetensors")  # the EMA values under the live names
    save_file(live | ema, swapped)
    ref = load_folder(folder)
    ema_ref_dir = os.path.join(W, f"{label}-ema-as-live")
    db("convert", "single-file-to-diffusers", "--checkpoint", swapped, "--out", ema_ref_dir, "--base", folder, "--force")
    ema_ref = load_folder(ema_ref_dir)
    changed = sum(not torch.equal(a, b) for a, b in zip(weights(ref.unet).values(), weights(ema_ref.unet).values()))
    fact(check, f"{label}: EMA values differ", changed == len(weights(ref.unet)), f"{changed} of {len(weights(ref.unet))} UNet tensors differ from the live ones")
    for flag in (True, False):
        out = os.path.join(W, f"{label}-ema-{'on' if flag else 'off'}")
        db("convert", "single-file-to-diffusers", "--checkpoint", path, "--out", out, "--base", folder, "--force", *(["--ema"] if flag else []))
        got = load_folder(out)
        same_weights(check, f"{label}: {'--ema: EMA' if flag else 'no --ema: live'} UNet", ema_ref.unet if flag else ref.unet, got.unet)
        for c in ("vae", "text_encoder"):
            same_weights(check, f"{label}: {'--ema' if flag else 'no --ema'}: {c}", getattr(ref, c), getattr(got, c))
    # diffusers' side: extract_ema reaches convert_ldm_unet_checkpoint through the UNet's from_single_file
    try:
        theirs, _ = load_single(path, folder, extract_ema=True)
    except Exception as e:
        fact(check, f"{label}: diffusers extract_ema", True, f"skipped: from_single_file(config=folder, extract_ema=True) raised {e!r}"[:300])
        return
    if all(torch.equal(a, b) for a, b in zip(weights(theirs.unet).values(), weights(ref.unet).values())):
        fact(check, f"{label}: diffusers extract_ema", True, "skipped: diffusers ignores extract_ema with config=folder")
    else:
        same_weights(check, f"{label}: diffusers extract_ema = --ema", theirs.unet, load_folder(os.path.join(W, f"{label}-ema-on")).unet)


# ---------------------------------------------------------------------------------------------
# 6: a pickle that would run a command.

class Payload:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@guarded("malicious pickle")
def check_malicious(exported):
    check = "malicious pickle"
    sd = load_file(exported)
    marker, control = os.path.join(W, "pwned-marker"), os.path.join(W, "pwned-control")
    for f in (marker, control):
        if os.path.exists(f):
            os.remove(f)
    path, control_path = os.path.join(W, "malicious.ckpt"), os.path.join(W, "malicious-control.ckpt")
    torch.save({"state_dict": sd, "global_step": 1, "callback": Payload(f"touch {marker}")}, path)
    torch.save({"state_dict": sd, "callback": Payload(f"touch {control}")}, control_path)
    # control: the payload is real (torch.load without weights_only runs it)
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({control_path!r}, weights_only=False)"], capture_output=True)
    fact(check, "control: the payload runs", os.path.exists(control), "torch.load(weights_only=False) of the same kind of file ran `touch`")
    out = os.path.join(W, "malicious-out")
    p = db("convert", "single-file-to-diffusers", "--checkpoint", path, "--out", out, ok=False)
    msg = (p.stderr + p.stdout).strip()
    names = "posix.system" in msg or "os.system" in msg
    fact(check, "refused", p.returncode != 0 and names, f"exit {p.returncode}; {msg.splitlines()[-1][:220] if msg else 'no message'}")
    fact(check, "nothing ran, nothing written", not os.path.exists(marker) and not os.path.exists(out),
         f"marker created: {os.path.exists(marker)}; output folder created: {os.path.exists(out)}")


# ---------------------------------------------------------------------------------------------
# 7: v-prediction.

def scheduler_prediction(folder):
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        return json.load(f).get("prediction_type")


@guarded("v-prediction")
def check_v(eps_exports):
    check = "v-prediction"
    for path in eps_exports:
        y = os.path.splitext(path)[0] + ".yaml"
        fact(check, f"no sidecar for epsilon ({os.path.basename(path)})", not os.path.exists(y), f"{os.path.basename(y)} exists: {os.path.exists(y)}")
    folder = make_pipeline("sd2v", 2, "v_prediction", seed=3)
    path = os.path.join(W, "sd2v.safetensors")
    db("convert", "diffusers-to-single-file", "--model", folder, "--out", path, "--force")
    sidecar = os.path.splitext(path)[0] + ".yaml"
    text = open(sidecar).read() if os.path.exists(sidecar) else ""
    parsed = yaml.safe_load(text) if text else {}
    param = (parsed or {}).get("model", {}).get("params", {}).get("parameterization")
    fact(check, "export writes the .yaml sidecar", 'parameterization: "v"' in text and param == "v",
         f"{os.path.basename(sidecar)} exists: {bool(text)}; model.params.parameterization = {param!r}")
    theirs, _ = load_single(path, folder)
    same_weights(check, "from_single_file: unet", load_folder(folder).unet, theirs.unet)
    resaved = os.path.join(W, "sd2v-torch.safetensors")  # no metadata: only the sidecar or the flag can tell
    save_file(load_file(path), resaved)
    shutil.copy(sidecar, os.path.splitext(resaved)[0] + ".yaml")

    def imported(rule, what, src, *flags):
        out = os.path.join(W, f"sd2v-import-{len(os.listdir(W))}")
        p = db("convert", "single-file-to-diffusers", "--checkpoint", src, "--out", out, "--force", *flags, ok=False)
        if p.returncode != 0:
            return fact(check, f"{rule}: {what}", False, f"exit {p.returncode}: {p.stderr.strip()[-300:]}")
        got = scheduler_prediction(out)
        with open(os.path.join(out, "unet", "config.json")) as f:
            unet = json.load(f)
        told = {k: unet.get(k) for k in NOT_IN_WEIGHTS}  # the 768-v model's values
        fact(check, f"{rule}: {what}", got == "v_prediction" and told == {"sample_size": 96, "upcast_attention": True},
             f"scheduler prediction_type {got!r}; unet {told}")

    for what, src in [("exported file", path), ("torch-resaved file", resaved)]:
        imported("import, no --base, sidecar", what, src)
    for what, src in [("exported file", path), ("torch-resaved file", resaved)]:
        os.remove(os.path.splitext(src)[0] + ".yaml")
        imported("sidecar deleted, --prediction-type", what, src, "--prediction-type", "v_prediction")


# ---------------------------------------------------------------------------------------------
# 8: full size.

@guarded("full-size SD1.5 single file")
def check_full():
    check = "full-size SD1.5 single file"
    start = time.time()
    free = shutil.disk_usage(W).free / 2 ** 30
    try:
        mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemAvailable:")) / 2 ** 20
    except (OSError, StopIteration):
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 2 ** 30
    if free < 12 or mem < 11:  # two f32 pipelines in memory (8.6 GB), a folder and a file on disk (8.6 GB)
        fact(check, "skipped", True, f"skipped: needs ~12 GB free disk and ~11 GB memory ({free:.0f} GB disk, {mem:.0f} GB memory available)")
        return
    folder, path = os.path.join(W, "sd15-full"), os.path.join(W, "sd15-full.safetensors")
    try:
        make_pipeline("sd15-full", 1, full=True, seed=9)
        db("convert", "diffusers-to-single-file", "--model", folder, "--out", path, "--force")
        size = os.path.getsize(path) / 2 ** 30
        check_in_diffusers("SD1.5 full f32", folder, path, False, check=check)
        fact(check, "time", True, f"{time.time() - start:.0f} s for a {size:.2f} GB file (random init, save, export, two loads, compare, 2 runs)")
    finally:  # ~9 GB
        shutil.rmtree(folder, ignore_errors=True)
        if os.path.exists(path):
            os.remove(path)


# ---------------------------------------------------------------------------------------------

def main(tiny_only):
    global TOKENIZER
    shutil.rmtree(W, ignore_errors=True)
    os.makedirs(W)
    sample = os.path.join(W, "sample")
    db("convert", "keras-to-diffusers", "--out", sample)  # the embedded tiny sample: its tokenizer
    TOKENIZER = CLIPTokenizer.from_pretrained(os.path.join(sample, "tokenizer"))
    eps_exports = []
    for sd in (1, 2):
        label = f"SD{sd}"
        folder = make_pipeline(f"sd{sd}", sd, seed=sd)
        f32, f16 = os.path.join(W, f"sd{sd}.safetensors"), os.path.join(W, f"sd{sd}-fp16.safetensors")
        db("convert", "diffusers-to-single-file", "--model", folder, "--out", f32, "--force")
        db("convert", "diffusers-to-single-file", "--model", folder, "--out", f16, "--half", "--force")
        eps_exports += [f32, f16]
        in_diffusers = guarded("single file in diffusers")(check_in_diffusers)
        in_diffusers(f"{label} f32", folder, f32, False)
        in_diffusers(f"{label} fp16", folder, f16, True)
        check_accounting(label, folder, f32, sd)
        check_import(label, folder, f32, sd)
        check_ema(label, folder, f32)
        gc.collect()
    check_malicious(os.path.join(W, "sd1.safetensors"))
    check_v(eps_exports)
    if tiny_only:
        fact("full-size SD1.5 single file", "skipped", True, "skipped: --tiny-only")
    else:
        # The tiny checks' files (pipelines, exports, imports) are not read again: only the sample's
        # tokenizer folder stays (TOKENIZER came from it).
        gc.collect()
        drop(*(os.path.join(W, n) for n in os.listdir(W) if n != "sample"))
        check_full()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    DB = os.path.abspath(args[0]) if args else os.path.join(os.path.dirname(HERE), "target", "release", "dreambridge")
    os.makedirs(WORK, exist_ok=True)
    t0 = time.time()
    try:
        main("--tiny-only" in sys.argv)
    except Exception as e:  # set-up failed: recorded, so the results table shows it
        traceback.print_exc()
        fact("single-file parity", "set-up", False, f"{type(e).__name__}: {e}"[:400])
    print(f"\nsingle-file parity: {len(FAILED)} failed in {time.time() - t0:.0f} s" + "".join(f"\n  FAIL {f}" for f in FAILED))
    sys.exit(1 if FAILED else 0)
