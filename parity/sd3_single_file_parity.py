"""Stability AI's SD3 single file (`sd3_medium_incl_clips.safetensors` / `sd3.5_*.safetensors`: the
MMDiT under `model.diffusion_model.`, CLIP-L/G under `text_encoders.clip_{l,g}.transformer.`, T5 under
`text_encoders.t5xxl.transformer.`, the VAE under `first_stage_model.`) against diffusers' own
single-file loader, on tiny SD3 pipelines built by diffusers / transformers with every float tensor
(weights, norms, the position table) set to seeded random values, none zero or identity.

Three variants, the three MMDiT kinds: "sd3-medium" (no q/k norm; with a tiny T5 encoder and
tokenizer), "sd3.5-medium" (RMS q/k norm, dual attention in blocks 0 and 1 of 3), "sd3.5-large"
(RMS q/k norm). MMDiT: 3 blocks, 2 heads of 64, patch 2, 16x16 position table; CLIP-L 64 wide,
CLIP-G 128 wide (heads of 64, so configs derived from the weights alone match); a small VAE (SD3's width pattern) with
16 latent channels and no quant convs.

1. `convert diffusers-to-single-file` (f32): diffusers' `SD3Transformer2DModel.from_single_file(file,
   config=folder, subfolder="transformer")`, `AutoencoderKL.from_single_file(file, config=folder,
   subfolder="vae")` and `StableDiffusion3Pipeline.from_single_file(file, config=folder, ...)` (its
   CLIPs, and T5 where the file has it) give every tensor of the original models bit for bit. One
   documented exception: diffusers' loader always puts the identity in CLIP-L's `text_projection`
   (Stability's SD3 does not project CLIP-L's pooled output); that tensor is checked to be the
   identity there and compared bit for bit in our own import (check 3).
2. Key accounting: diffusers' `convert_sd3_transformer_checkpoint_to_diffusers` pops every MMDiT key
   of our file (none left over).
3. `convert single-file-to-diffusers` of the same file (the T5 variant with `--base` for T5's config
   and tokenizer, the others without a base: configs derived from the weights) loads with
   `StableDiffusion3Pipeline.from_pretrained` and every model's tensors equal the original's bit for
   bit; the derived transformer config agrees with the original on every field the weights fix.
4. `--half`: the fp16 file loads in diffusers to the original weights cast to fp16, bit for bit.
5. diffusers' model-type detection (`infer_diffusers_model_type`) names our files `sd3`,
   `sd35_medium` and `sd35_large`. It keys on real sizes (a 9216-wide first context norm, i.e. width
   1536; a 192- or 384-wide position grid; a 38th block), so these are MMDiT-only pipelines of those
   sizes (fp16, 2 blocks of width 1536; 38 tiny blocks), not the tiny ones above.

    parity/.venv-torch/bin/python parity/sd3_single_file_parity.py DREAMBRIDGE

Work files: $PARITY_WORK/sd3_single_file (deleted as checks finish unless PARITY_KEEP=1). Prints a JSON
line per check; exits 1 when a check failed.
"""
import gc
import json
import os
import shutil
import sys
import traceback

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import run_checked, WORK, LogWarnings, drop, record_fact  # noqa: E402
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast  # noqa: E402

torch.set_grad_enabled(False)
W = os.path.join(WORK, "sd3_single_file")
# name: (qk_norm, dual_attention_layers, t5, seed)
VARIANTS = {
    "sd3-medium": (None, (), True, 40),
    "sd3.5-medium": ("rms_norm", (0, 1), False, 41),
    "sd3.5-large": ("rms_norm", (), False, 42),
}
FAILED = []
DB = None
TOKENIZER = None


def fact(check, component, ok, note=""):
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


def randomize(model, seed):
    """Every float tensor of the state dict (parameters and the position table) random: ~N(0, 0.05),
    norm weights (LayerNorm, RMSNorm, T5's layer norms) 1 + N(0, 0.05). None zero, none identity."""
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    new = {}
    for k, v in sd.items():
        if not v.is_floating_point():
            continue
        x = 0.05 * torch.randn(v.shape, generator=g)
        if ("norm" in k or "layer_norm" in k) and k.endswith("weight") and v.dim() == 1:
            x += 1
        new[k] = x.to(v.dtype)
    model.load_state_dict(new, strict=False)


def clip(width, layers, act, seed):
    m = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                                                   num_attention_heads=width // 64, max_position_embeddings=77, hidden_act=act,
                                                   projection_dim=width, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1))
    randomize(m, seed)
    return m


def t5_tokenizer():
    return T5TokenizerFast(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581a", -1.0), ("a", -2.0)], extra_ids=0)


def make(name):
    qk, dual, t5, seed = VARIANTS[name]
    folder = os.path.join(W, name)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=64, num_attention_heads=2,
                                        joint_attention_dim=96, caption_projection_dim=128, pooled_projection_dim=64 + 128, out_channels=16,
                                        pos_embed_max_size=16, dual_attention_layers=dual, qk_norm=qk)
    randomize(transformer, seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        block_out_channels=[32, 64, 128, 128], layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=64,
                        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    randomize(vae, seed + 1)
    parts = dict(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                 text_encoder=clip(64, 2, "quick_gelu", seed + 2), tokenizer=TOKENIZER,
                 text_encoder_2=clip(128, 3, "gelu", seed + 3), tokenizer_2=TOKENIZER_2, text_encoder_3=None, tokenizer_3=None)
    if t5:
        enc = T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_ff=48, d_kv=16, num_layers=2, num_heads=2, feed_forward_proj="gated-gelu",
                                      relative_attention_num_buckets=8, is_encoder_decoder=False, use_cache=False))
        randomize(enc, seed + 4)
        parts.update(text_encoder_3=enc, tokenizer_3=t5_tokenizer())
    StableDiffusion3Pipeline(**parts).save_pretrained(folder)
    return folder


def state(model):
    """A model's tensors (integer buffers such as position_ids, which models make themselves, left out)."""
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def same(check, component, ref, got, dtype=None, expect_identity=(), only=None, keep_f32=()):
    """Same key set, dtype, shape and bits (ref cast to `dtype` first); `expect_identity` keys must be
    the identity in `got` instead; `only`: compare these keys alone; `keep_f32`: modules the loader
    keeps in f32 under fp16 (ref cast to fp16 and back)."""
    ref, got = state(ref) if isinstance(ref, torch.nn.Module) else ref, state(got) if isinstance(got, torch.nn.Module) else got
    if only is not None:
        ref, got = {k: v for k, v in ref.items() if k in only}, {k: v for k, v in got.items() if k in only}
    missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
    differ = []
    for k in sorted(set(ref) & set(got)):
        a, b = ref[k], got[k]
        if k in expect_identity:
            if not torch.equal(b.float(), torch.eye(b.shape[0])):
                differ.append(f"{k} (not the identity)")
            continue
        if dtype is not None:
            a = a.to(dtype)
            if any(m in k.split(".") for m in keep_f32):
                a = a.to(b.dtype)
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            differ.append(f"{k} ({b.dtype} {tuple(b.shape)} vs {a.dtype} {tuple(a.shape)})")
    ok = not (missing or extra or differ)
    note = f"{len(ref)} tensors bit-identical" + (f" ({', '.join(expect_identity)}: the identity, as diffusers' loader sets it)" if expect_identity else "")
    if not ok:
        note = f"{len(missing)} missing {missing[:3]}, {len(extra)} extra {extra[:3]}, {len(differ)} differ {differ[:3]}"
    return fact(check, component, ok, note)


def load(folder):
    """from_pretrained; a folder without T5 says so (save_pretrained leaves text_encoder_3 out of model_index)."""
    index = json.load(open(os.path.join(folder, "model_index.json")))
    t5 = index.get("text_encoder_3", [None, None])[0] is not None
    kwargs = {} if t5 else dict(text_encoder_3=None, tokenizer_3=None)
    return StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32, **kwargs)


def check_in_diffusers(name, folder, path, half=False):
    check = f"{name}: diffusers loads our file" + (" (fp16)" if half else "")
    dtype = torch.float16 if half else torch.float32
    orig = load(folder)
    with LogWarnings("diffusers", "transformers") as w:
        t = SD3Transformer2DModel.from_single_file(path, config=folder, subfolder="transformer", local_files_only=True, torch_dtype=dtype)
        vae = AutoencoderKL.from_single_file(path, config=folder, subfolder="vae", local_files_only=True, torch_dtype=dtype)
    same(check, "SD3Transformer2DModel.from_single_file", orig.transformer, t, dtype)
    same(check, "AutoencoderKL.from_single_file", orig.vae, vae, dtype)
    has_t5 = orig.text_encoder_3 is not None
    kwargs = {} if has_t5 else dict(text_encoder_3=None, tokenizer_3=None)
    with LogWarnings("diffusers", "transformers") as w2:
        pipe = StableDiffusion3Pipeline.from_single_file(path, config=folder, local_files_only=True, torch_dtype=dtype, **kwargs)
    same(check, "pipeline text_encoder (CLIP-L)", orig.text_encoder, pipe.text_encoder, dtype, expect_identity=("text_projection.weight",))
    same(check, "pipeline text_encoder_2 (CLIP-G)", orig.text_encoder_2, pipe.text_encoder_2, dtype)
    same(check, "pipeline transformer", orig.transformer, pipe.transformer, dtype)
    same(check, "pipeline vae", orig.vae, pipe.vae, dtype)
    if has_t5:
        # T5 keeps its `wo` layers in f32 under fp16 (`_keep_in_fp32_modules`); the tied
        # `encoder.embed_tokens` must be in the file (diffusers' loader does not tie it to `shared`).
        same(check, "pipeline text_encoder_3 (T5)", orig.text_encoder_3, pipe.text_encoder_3, dtype,
             keep_f32=tuple(T5EncoderModel._keep_in_fp32_modules or ()))
    warnings = [m for m in w.messages + w2.messages if "unexpected" in m.lower() or "missing" in m.lower() or "not used" in m.lower()]
    fact(check, "no key warnings", not warnings, "; ".join(warnings)[:400] or "none")


def check_accounting(name, path):
    ck = sfu.load_single_file_checkpoint(path, local_files_only=True)
    mmdit = {k: v for k, v in ck.items() if k.startswith("model.diffusion_model.")}
    n = len(mmdit)
    converted = sfu.convert_sd3_transformer_checkpoint_to_diffusers(mmdit)
    fact(f"{name}: key accounting", "convert_sd3_transformer_checkpoint_to_diffusers", not mmdit,
         f"{n} MMDiT keys -> {len(converted)} diffusers tensors; left over: {sorted(mmdit)[:3]}")
    prefixes = ("model.diffusion_model.", "text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer.", "text_encoders.t5xxl.transformer.",
                "first_stage_model.")
    stray = [k for k in ck if not k.startswith(prefixes)]
    fact(f"{name}: key accounting", "prefixes", not stray, f"{len(ck)} keys, outside the five prefixes: {stray[:3]}")


def check_import(name, folder, path, t5):
    check = f"{name}: our single-file-to-diffusers"
    out = os.path.join(W, f"{name}-back")
    args = ["convert", "single-file-to-diffusers", "--checkpoint", path, "--out", out, "--force"]
    if t5:
        args += ["--base", folder]
    log = db(*args)
    orig = load(folder)
    with LogWarnings("diffusers", "transformers") as w:
        back = load(out)
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2") + (("text_encoder_3",) if t5 else ()):
        same(check, part, getattr(orig, part), getattr(back, part))
    if not t5:
        fact(check, "no T5", back.text_encoder_3 is None and json.load(open(os.path.join(out, "model_index.json")))["text_encoder_3"] == [None, None],
             "model_index text_encoder_3 [null, null]")
    a, b = dict(orig.transformer.config), dict(back.transformer.config)
    fields = ["num_layers", "num_attention_heads", "attention_head_dim", "patch_size", "in_channels", "out_channels", "joint_attention_dim",
              "caption_projection_dim", "pooled_projection_dim", "pos_embed_max_size", "dual_attention_layers", "qk_norm"]
    diff = {f: (a.get(f), b.get(f)) for f in fields if (tuple(a.get(f)) if isinstance(a.get(f), (list, tuple)) else a.get(f)) != (tuple(b.get(f)) if isinstance(b.get(f), (list, tuple)) else b.get(f))}
    fact(check, "transformer config", not diff, f"{len(fields)} fields agree" if not diff else f"differ: {diff}")
    for part in ("text_encoder", "text_encoder_2"):
        ca, cb = getattr(orig, part).config, getattr(back, part).config
        cdiff = {f: (getattr(ca, f), getattr(cb, f)) for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act", "projection_dim")
                 if getattr(ca, f) != getattr(cb, f)}
        fact(check, f"{part} config", not cdiff, "hidden_size, layers, heads, intermediate_size, hidden_act, projection_dim agree" if not cdiff else f"differ: {cdiff}")
    warnings = [m for m in w.messages if "unexpected" in m.lower() or "missing" in m.lower() or "not used" in m.lower()]
    fact(check, "no key warnings", not warnings, "; ".join(warnings)[:400] or log.strip().splitlines()[-1])
    del orig, back
    gc.collect()
    drop(out)


def check_detection():
    """Detection-sized MMDiT-only pipelines: diffusers' infer_diffusers_model_type on our files."""
    for name, kwargs, want in [
        ("detect-sd3", dict(num_layers=2, attention_head_dim=64, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192), "sd3"),
        ("detect-sd35-medium", dict(num_layers=2, attention_head_dim=64, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                                    dual_attention_layers=(0,), qk_norm="rms_norm"), "sd35_medium"),
        ("detect-sd35-large", dict(num_layers=38, attention_head_dim=32, num_attention_heads=2, caption_projection_dim=64, pos_embed_max_size=16,
                                   qk_norm="rms_norm"), "sd35_large"),
    ]:
        def run():
            folder, path = os.path.join(W, name), os.path.join(W, f"{name}.safetensors")
            t = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, out_channels=16, joint_attention_dim=64, pooled_projection_dim=64,
                                      **kwargs).to(torch.float16)
            StableDiffusion3Pipeline(transformer=t, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, text_encoder=None, tokenizer=None,
                                     text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None).save_pretrained(folder)
            del t
            gc.collect()
            db("convert", "diffusers-to-single-file", "--model", folder, "--out", path, "--force")
            with safe_open(path, framework="pt") as f:
                keys = list(f.keys())
                probe = {k: f.get_slice(k) for k in keys}
            ck = {k: _Shape(v.get_shape()) for k, v in probe.items()}
            got = sfu.infer_diffusers_model_type(ck)
            fact("diffusers model-type detection", name, got == want, f"infer_diffusers_model_type: {got!r} (want {want!r}; {len(keys)} keys)")
            drop(folder, path)
        guarded(f"diffusers model-type detection ({name})", run)


class _Shape:
    """A tensor stand-in with its shape only: detection reads shapes, not values."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def main():
    global TOKENIZER, TOKENIZER_2
    shutil.rmtree(W, ignore_errors=True)
    os.makedirs(W)
    sample = os.path.join(W, "sample")
    db("convert", "keras-to-diffusers", "--out", sample)  # the embedded tiny sample: its CLIP tokenizer
    TOKENIZER = CLIPTokenizer.from_pretrained(os.path.join(sample, "tokenizer"))
    TOKENIZER_2 = CLIPTokenizer.from_pretrained(os.path.join(sample, "tokenizer"), pad_token="!")
    for name, (_, _, t5, _) in VARIANTS.items():
        folder = guarded(f"{name}: build", make, name)
        if folder is None:
            continue
        path, half = os.path.join(W, f"{name}.safetensors"), os.path.join(W, f"{name}-fp16.safetensors")
        out = guarded(f"{name}: convert", db, "convert", "diffusers-to-single-file", "--model", folder, "--out", path, "--force")
        if out is None:
            continue
        fact(f"{name}: convert", "diffusers-to-single-file", True, out.strip().splitlines()[-1])
        guarded(f"{name}: diffusers loads our file", check_in_diffusers, name, folder, path)
        guarded(f"{name}: key accounting", check_accounting, name, path)
        guarded(f"{name}: our single-file-to-diffusers", check_import, name, folder, path, t5)
        if guarded(f"{name}: convert --half", db, "convert", "diffusers-to-single-file", "--model", folder, "--out", half, "--half", "--force") is not None:
            guarded(f"{name}: diffusers loads our file (fp16)", check_in_diffusers, name, folder, half, True)
        gc.collect()
        drop(folder, path, half)
    check_detection()
    drop(sample)
    print(json.dumps(dict(summary=True, failed=FAILED)), flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    DB = os.path.abspath(args[0]) if args else os.path.join(os.path.dirname(HERE), "target", "release", "dreambridge")
    os.makedirs(WORK, exist_ok=True)
    sys.exit(main())
