"""KerasHub Stable Diffusion 3 -> diffusers, proven against both peers: keras-hub 0.32's own
`StableDiffusion3Backbone` (tiny, every weight seeded random) and diffusers' `StableDiffusion3Pipeline`
/ transformers' `CLIPTextModelWithProjection` loading dreambridge's conversion.

Three variants, the three MMDiT kinds of the real presets: "sd3-medium" (no q/k norm, no dual
attention), "sd3.5-medium" (RMS q/k norm, dual attention in blocks 0 and 1 of 3: not all, as the
real model's 0-12 of 24), "sd3.5-large" (RMS q/k norm, no dual attention). MMDiT: 2 heads of 64 (the
real head width), 3 blocks (the last one context-pre-only), patch 2, 16x16 position table, 64x64
images (8x8x16 latents); CLIP-L 32 wide, 2 layers, quick_gelu; CLIP-G 64 wide, 3 layers, gelu; the
VAE with the real block counts (3 per level) on widths 32, 64, 128, 128. Every float weight is
overwritten with seeded random values (`randomize`; one seed per variant), none zero or identity
(keras-hub initialises the CLIP projections to the identity and some kernels to zero, which would
hide a transposed or swapped tensor).

1. keras (`make`, parity/.venv-kerashub, KERAS_BACKEND=jax): per variant, saves
     preset/                 `backbone.save_to_preset` (config.json, model.weights.h5, metadata.json)
     backbone.weights.h5     `backbone.save_weights`
     mmdit.weights.h5        `backbone.diffuser.save_weights` (the keras.io SD3 DreamBooth artifact)
     keras_ref.npz           fixed inputs and keras-hub's outputs: MMDiT, CLIP-L/G penultimate hidden
                             states and pooled projections, VAE encoder (mean, log-variance) and
                             decoder, 2 steps of `denoise_step` with guidance and `decode_step`
   and checks the HDF5 trees: every weight of the model in the file exactly once (sha256), none zero
   or identity, the q/k-norm and dual-attention layers where the variant has them, the preset's
   model.weights.h5 the same tree as save_weights', the MMDiT file the backbone's `mm_di_t` subtree,
   and `StableDiffusion3Backbone.from_preset` reading the preset back bit for bit.
2. torch (`check DREAMBRIDGE`, parity/.venv-torch): per variant converts
     preset/ and backbone.weights.h5 ->        `convert keras-to-diffusers --preset X --out DIR`
     mmdit.weights.h5 (the rest from the first) `convert keras-to-diffusers --preset X --base DIR --out DIR`
   loads every model with `from_pretrained(..., output_loading_info=True)` (no missing, unexpected
   or mismatched key), checks the configs and model_index.json (no text_encoder_3), and compares with
   keras-hub: SD3Transformer2DModel (NCHW; timestep: both take t = 1000 * sigma, see below), CLIP
   `hidden_states[-2]` and `text_embeds`, AutoencoderKL `latent_dist.mean` / `.logvar` and `decode`;
   then `StableDiffusion3Pipeline` (text_encoder_3=None) runs 2 steps at 64x64 from keras-hub's
   prompt embeddings and latents and must give keras-hub's `denoise_step` latents and decoded image.
   The MMDiT-only conversion: transformer equal to keras-hub, every other file bit-identical to --base;
   again with --base's transformer weights negated (so a kept --base transformer would show).

Timestep: keras-hub's MMDiT `timestep` input is (B, 1) and the backbone feeds it
`FlowMatchEulerDiscreteScheduler._sigma_to_timestep(sigma) = sigma * num_train_timesteps`, i.e. in
[0, 1000], into a sinusoidal embedding [cos, sin] with 10000^(-i/128) (mmdit.py TimestepEmbedding);
diffusers' SD3Transformer2DModel takes the same t in [0, 1000] (B,) (Timesteps(256,
flip_sin_to_cos=True, downscale_freq_shift=0): the same embedding). So t goes over unchanged.

Tolerance: max |diff| / max |keras-hub output| <= 1e-4 in f32 (TOL). One known peer difference:
keras-hub's CLIPTextEncoder ends with LayerNormalization(epsilon=1e-6) while its encoder layers use
1e-5, and transformers' CLIP has one `layer_norm_eps` for all (1e-5, diffusers' SD3 value): the
pooled projection is compared as loaded and with transformers' final_layer_norm.eps set to
keras-hub's 1e-6 (the difference is larger the smaller the hidden states; ~5e-6 here).

    KERAS_BACKEND=jax parity/.venv-kerashub/bin/python parity/sd3_parity.py make
    parity/.venv-torch/bin/python parity/sd3_parity.py check target/release/dreambridge

Work files: $PARITY_WORK/sd3 (~120 MB a variant, most of it the CLIP token tables); `check` deletes each conversion once compared.
Exits 1 when a check of this run failed.
"""
import json
import os
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import run_checked, WORK, LogWarnings, drop, record, record_fact, st_digest, tensor_digest  # noqa: E402

W = os.path.join(WORK, "sd3")
TOL = 1e-4
# name: (mmdit_qk_norm, mmdit_dual_attention_indices, seed)
VARIANTS = {
    "sd3-medium": (None, None, 30),
    "sd3.5-medium": ("rms_norm", (0, 1), 35),
    "sd3.5-large": ("rms_norm", None, 36),
}
LAYERS = 3
STEPS, GUIDANCE = 2, 4.0
FAILED = []  # this run's failed checks (common.record* only append to results.jsonl)


def fact(check, component, ok, note=""):
    if not ok:
        FAILED.append(f"{check} / {component}")
    return record_fact(check, component, ok, note)


def compare(check, component, ref, got, tol=TOL, note=""):
    try:
        ok = record(check, component, ref, got, tol, note)
    except AssertionError as e:  # shapes differ
        return fact(check, component, False, str(e))
    if not ok:
        FAILED.append(f"{check} / {component}")
    return ok


def guarded(fn):
    """Runs one check of a variant; an exception is recorded as its failure and the suite goes on."""
    def run(check, *args):
        try:
            return fn(check, *args)
        except Exception as e:  # the failure is the result
            traceback.print_exc()
            fact(check, "ran to the end", False, f"{type(e).__name__}: {e}"[:400])
    return run


# ============================================ keras side ============================================

def build(variant, clip_head_dim=None):
    """The tiny backbone; `clip_head_dim=64` gives CLIPs of SD3's head width (1 and 2 heads), for
    the single file, whose CLIP head counts are width / 64."""
    from keras_hub.models import CLIPTextEncoder, StableDiffusion3Backbone
    from keras_hub.src.models.vae.vae_backbone import VAEBackbone

    qk, dual, _ = VARIANTS[variant]
    (dl, hl), (dg, hg) = ((64, 1), (128, 2)) if clip_head_dim == 64 else ((32, 2), (64, 2))
    clip_l = CLIPTextEncoder(vocabulary_size=49408, embedding_dim=dl, hidden_dim=dl, num_layers=2, num_heads=hl, intermediate_dim=2 * dl,
                             intermediate_activation="quick_gelu", intermediate_output_index=-2, name="clip_l")
    clip_g = CLIPTextEncoder(vocabulary_size=49408, embedding_dim=dg, hidden_dim=dg, num_layers=3, num_heads=hg, intermediate_dim=2 * dg,
                             intermediate_activation="gelu", intermediate_output_index=-2, name="clip_g")
    vae = VAEBackbone([32, 64, 128, 128], [2, 2, 2, 2], [128, 128, 64, 32], [3, 3, 3, 3], name="vae")
    return StableDiffusion3Backbone(
        mmdit_patch_size=2, mmdit_hidden_dim=128, mmdit_num_layers=LAYERS, mmdit_num_heads=2, mmdit_position_size=16,
        mmdit_qk_norm=qk, mmdit_dual_attention_indices=dual, vae=vae, clip_l=clip_l, clip_g=clip_g, image_shape=(64, 64, 3))


def randomize(model, seed):
    """Every float weight random, none zero or identity (keras-hub's CLIPProjection starts as the
    identity, some kernels as zeros): kernels ~N(0, 1/fan_in), norm gammas / RMS scales 1 + 0.1N,
    betas and biases 0.05N, embedding tables 0.5N. Kernels at N(0, 0.05) instead leave the attention
    logits so small that the softmax is nearly uniform: q/k heads swapped, or q_norm for k_norm, then
    moved the outputs by only 1e-5 to 4e-5 of their size, under TOL (measured); at 1/fan_in they move
    them by 1e-2 and more."""
    rng = np.random.default_rng(seed)
    n = 0
    for v in model.weights:
        if "float" not in str(v.dtype):
            continue
        shape, leaf = tuple(v.shape), v.path.rsplit("/", 1)[-1]
        x = rng.standard_normal(shape)
        if leaf in ("gamma", "scale"):
            x = 1 + 0.1 * x
        elif leaf in ("beta", "bias"):
            x = 0.05 * x
        elif leaf == "embeddings":
            x = 0.5 * x
        else:  # kernels; the CLIP q/k/v EinsumDense kernels are (hidden, heads, head_dim): fan-in hidden
            fan_in = shape[0] if any(f"/{k}/" in v.path for k in ("query", "key", "value")) else int(np.prod(shape[:-1]))
            x = x / np.sqrt(fan_in)
        v.assign(x.astype(str(v.dtype)))
        n += 1
    return n


def token_ids(rng, bos=49406, eos=49407):
    """Random ids below EOS; row 0: EOS at 9 then EOS padding (CLIP-L's tokenizer), row 1: EOS at 30
    then 0 padding (CLIP-G's `!`). CLIPProjection pools at argmax (the first EOS)."""
    ids = rng.integers(1, eos - 1, size=(2, 77)).astype("int32")
    ids[:, 0] = bos
    ids[0, 9:] = eos
    ids[1, 30] = eos
    ids[1, 31:] = 0
    return ids


def h5_layout(path):
    """[(h5 path, keras name path, array)] of every dataset of a Keras 3 .weights.h5 file; the keras
    name path joins the `name` attribute of each enclosing layer's `vars` group (the file's group
    names are class-based: mm_di_t_block_1, dense_2, ...)."""
    import h5py

    out = []
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if not isinstance(obj, h5py.Dataset):
                return
            parts, names = name.split("/"), []
            for i in range(1, len(parts)):
                vars_group = "/".join(parts[:i]) + "/vars"
                if vars_group in f and "name" in f[vars_group].attrs and vars_group != "/".join(parts[:i + 1]):
                    names.append(str(f[vars_group].attrs["name"]))
            names.append(str(f["/".join(parts[:-1])].attrs.get("name", "")) + ":" + parts[-1])
            out.append((name, "/".join(names), obj[()]))
        f.visititems(visit)
    return out


def degenerate(a):
    """'zero' / 'identity' when the tensor is one keras-hub's initialisers make, else ''."""
    if not np.any(a):
        return "zero"
    if a.ndim == 2 and a.shape[0] == a.shape[1] and np.array_equal(a, np.eye(a.shape[0], dtype=a.dtype)):
        return "identity"
    if a.ndim == 1 and np.all(a == 1):
        return "ones"
    return ""


def check_h5(variant, backbone, d):
    """The saved files' HDF5 trees against the model."""
    check = f"{variant} keras files"
    weights = [np.asarray(v) for v in backbone.weights]
    want = sorted(tuple(map(str, tensor_digest(w))) for w in weights)
    full = h5_layout(os.path.join(d, "backbone.weights.h5"))
    got = sorted(tuple(map(str, tensor_digest(a))) for _, _, a in full)
    bad = [(p, degenerate(a)) for p, _, a in full if degenerate(a)]
    fact(check, "backbone.weights.h5", got == want and not bad,
         f"{len(full)} datasets, {len(weights)} model weights, each once: {got == want}; zero/identity/ones: {bad[:3]}")

    preset = h5_layout(os.path.join(d, "preset", "model.weights.h5"))
    same = [(p, tensor_digest(a)) for p, _, a in preset] == [(p, tensor_digest(a)) for p, _, a in full]
    cfg = json.load(open(os.path.join(d, "preset", "config.json")))
    qk, dual, _ = VARIANTS[variant]
    c = cfg.get("config", {})
    cfg_ok = (cfg.get("class_name") == "StableDiffusion3Backbone" and c.get("mmdit_qk_norm") == qk
              and list(c.get("mmdit_dual_attention_indices") or []) == list(dual or []))
    fact(check, "preset/", same and cfg_ok,
         f"model.weights.h5 = save_weights' tree and tensors: {same}; config.json {cfg.get('class_name')} qk_norm={c.get('mmdit_qk_norm')} "
         f"dual={c.get('mmdit_dual_attention_indices')}; files {sorted(os.listdir(os.path.join(d, 'preset')))}")

    mm = h5_layout(os.path.join(d, "mmdit.weights.h5"))
    sub = [(p[len("layers/mm_di_t/"):], tensor_digest(a)) for p, _, a in full if p.startswith("layers/mm_di_t/")]
    dw = sorted(tuple(map(str, tensor_digest(np.asarray(v)))) for v in backbone.diffuser.weights)
    mm_ok = [(p, tensor_digest(a)) for p, _, a in mm] == sub and sorted(tuple(map(str, tensor_digest(a))) for _, _, a in mm) == dw
    fact(check, "mmdit.weights.h5", mm_ok, f"{len(mm)} datasets = the diffuser's weights = backbone.weights.h5's layers/mm_di_t subtree: {mm_ok}")

    # Variant structure, by keras layer names: q/k RMS norms and the dual-attention layers.
    def blocks(layer):  # names look like joint_block_0/x_block/q_norm:0
        return sorted({"/".join(n.split("/")[:2]) for _, n, _ in mm if n.rsplit("/", 1)[-1].split(":")[0] == layer})
    found = {layer: blocks(layer) for layer in ("q_norm", "k_norm", "attention_qkv2", "attention_proj2", "q_norm2", "k_norm2")}
    xs = [f"joint_block_{i}/x_block" for i in range(LAYERS)]
    cs = [f"joint_block_{i}/context_block" for i in range(LAYERS)]
    dx = [f"joint_block_{i}/x_block" for i in (dual or ())]
    expect = {"q_norm": sorted(xs + cs) if qk else [], "k_norm": sorted(xs + cs) if qk else [],
              "attention_qkv2": dx, "attention_proj2": dx, "q_norm2": dx if qk else [], "k_norm2": dx if qk else []}
    fact(check, "q/k norm, dual attention", found == expect,
         "; ".join(f"{k}: {len(v)} blocks" + ("" if v == expect[k] else f" (expected {expect[k]}, got {v})") for k, v in found.items()))

    from keras_hub.models import StableDiffusion3Backbone

    back = StableDiffusion3Backbone.from_preset(os.path.join(d, "preset"))
    eq = len(back.weights) == len(backbone.weights) and all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(back.weights, backbone.weights))
    fact(check, "from_preset reads it", eq, f"StableDiffusion3Backbone.from_preset: {len(back.weights)} weights bit-identical: {eq}")
    print(f"  {variant}: {len(full)} datasets in backbone.weights.h5, {len(mm)} in mmdit.weights.h5", flush=True)


def make():
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    assert keras.backend.backend() == "jax", keras.backend.backend()
    os.makedirs(W, exist_ok=True)
    for variant, (qk, dual, seed) in VARIANTS.items():
        try:
            make_variant(variant, seed)
        except Exception as e:
            traceback.print_exc()
            fact(f"{variant} keras files", "ran to the end", False, f"{type(e).__name__}: {e}"[:400])


def make_variant(variant, seed):
    from keras import ops

    d = os.path.join(W, variant)
    drop(d)
    os.makedirs(d)
    backbone = build(variant)
    n = randomize(backbone, seed)
    print(f"  {variant}: {n} weights randomized, {backbone.count_params()} parameters", flush=True)
    backbone.save_to_preset(os.path.join(d, "preset"))
    backbone.save_weights(os.path.join(d, "backbone.weights.h5"))
    backbone.diffuser.save_weights(os.path.join(d, "mmdit.weights.h5"))

    rng = np.random.default_rng(seed + 1000)
    x = {
        "latent": rng.standard_normal((2, 8, 8, 16)).astype("float32"),  # NHWC
        "context": rng.standard_normal((2, 154, 4096)).astype("float32"),
        "pooled": rng.standard_normal((2, 96)).astype("float32"),
        "timestep": np.array([[937.5], [212.25]], dtype="float32"),  # t = 1000 sigma, as the backbone feeds it
        "ids_l": token_ids(rng),
        "ids_g": token_ids(rng),
        "image": rng.uniform(-1, 1, (2, 64, 64, 3)).astype("float32"),
        "z": rng.standard_normal((2, 8, 8, 16)).astype("float32"),
        "noise": rng.standard_normal((1, 8, 8, 16)).astype("float32"),
        "neg_ids_l": token_ids(rng),
        "neg_ids_g": token_ids(rng),
    }
    ref = {}
    ref["mmdit"] = np.asarray(backbone.diffuser({"latent": x["latent"], "context": x["context"],
                                                 "pooled_projection": x["pooled"], "timestep": x["timestep"]}, training=False))
    for name, proj in (("clip_l", backbone.clip_l_projection), ("clip_g", backbone.clip_g_projection)):
        ids = x["ids_" + name[-1]]
        out = getattr(backbone, name)({"token_ids": ids}, training=False)
        ref[name + "_penultimate"] = np.asarray(out["intermediate_output"])
        ref[name + "_last"] = np.asarray(out["sequence_output"])  # after the final LayerNorm
        ref[name + "_pooled"] = np.asarray(proj(out["sequence_output"], ids, training=False))
    moments = np.asarray(backbone.vae.encoder(x["image"], training=False))
    ref["vae_mean"], ref["vae_logvar"] = moments[..., :16], np.clip(moments[..., 16:], -30.0, 20.0)
    ref["vae_decode"] = np.asarray(backbone.vae.decoder(x["z"], training=False))

    # Sampling: keras-hub's own encode_text_step / denoise_step / decode_step (as
    # StableDiffusion3TextToImage.generate_step runs them), 2 steps with guidance.
    emb = backbone.encode_text_step({"clip_l": x["ids_l"][:1], "clip_g": x["ids_g"][:1]},
                                    {"clip_l": x["neg_ids_l"][:1], "clip_g": x["neg_ids_g"][:1]})
    for k, e in zip(("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"), emb):
        x[k] = np.asarray(e)
    backbone.configure_scheduler(STEPS)
    latents = ops.convert_to_tensor(x["noise"])
    for step in range(STEPS):
        latents = backbone.denoise_step(latents, emb, step, STEPS, GUIDANCE)
    ref["denoised"] = np.asarray(latents)
    ref["decoded"] = np.asarray(backbone.decode_step(latents))
    ref["sigmas"] = np.asarray(backbone.scheduler.sigmas)
    meta = dict(shift=backbone.shift, num_train_timesteps=backbone.num_train_timesteps, vae_scale=backbone.vae.scale,
                vae_shift=backbone.vae.shift, steps=STEPS, guidance=GUIDANCE)
    np.savez(os.path.join(d, "keras_ref.npz"), meta=json.dumps(meta), **x, **{"ref_" + k: v for k, v in ref.items()})
    print(f"  {variant}: reference outputs " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in ref.items()), flush=True)
    check_h5(variant, backbone, d)


# ============================================ torch side ============================================

def db(*args):
    return run_checked([DB, *args])


def nchw(a):
    return np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2)))


def nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


def strict(check, component, cls, folder, **kw):
    """from_pretrained with the loading report: no missing, unexpected or mismatched key, no warning
    about weights (transformers and diffusers log what the report may not list)."""
    import torch

    with LogWarnings("transformers", "diffusers") as log:
        model, info = cls.from_pretrained(folder, output_loading_info=True, dtype=torch.float32, **kw)
    bad = {k: list(v)[:4] for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs") and len(v)}
    warn = log.key_warnings()
    dtypes = sorted({str(p.dtype) for p in model.state_dict().values()})
    ok = not bad and not warn and dtypes == ["torch.float32"]
    fact(check, f"{component} strict load", ok,
         f"{cls.__name__}: {len(model.state_dict())} tensors {dtypes}" + (f"; {bad}" if bad else "") + (f"; {warn[:2]}" if warn else ""))
    return model.eval()


@guarded
def check_folder(check, variant, out, ref, meta, full=True):
    """A converted folder against keras-hub's outputs; with full=False only the transformer (and the
    pipeline run)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    qk, dual, _ = VARIANTS[variant]
    # ---- transformer
    tr = strict(check, "transformer", SD3Transformer2DModel, os.path.join(out, "transformer"))
    c = tr.config
    want = dict(in_channels=16, out_channels=16, patch_size=2, num_layers=LAYERS, attention_head_dim=64, num_attention_heads=2,
                joint_attention_dim=4096, caption_projection_dim=128, pooled_projection_dim=96, pos_embed_max_size=16,
                qk_norm=qk, dual_attention_layers=tuple(dual or ()))
    have = {k: (tuple(c[k]) if isinstance(c[k], (list, tuple)) else c[k]) for k in want}
    fact(check, "transformer config", have == want, "" if have == want else f"expected {want}, got {have}")
    with torch.no_grad():
        y = tr(hidden_states=torch.from_numpy(nchw(ref["latent"])), encoder_hidden_states=torch.from_numpy(ref["context"]),
               pooled_projections=torch.from_numpy(ref["pooled"]), timestep=torch.from_numpy(ref["timestep"][:, 0])).sample
    compare(check, "MMDiT", ref["ref_mmdit"], nhwc(y), note="t in [0, 1000] both sides; 2 latents, 154 context tokens")
    if full:
        # ---- text encoders
        for sub, name in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
            te = strict(check, sub, CLIPTextModelWithProjection, os.path.join(out, sub))
            ids = torch.from_numpy(ref["ids_" + name[-1]].astype(np.int64))
            with torch.no_grad():
                o = te(ids, output_hidden_states=True)
            compare(check, f"{name} hidden_states[-2]", ref[f"ref_{name}_penultimate"], o.hidden_states[-2].numpy())
            eps = te.config.layer_norm_eps
            compare(check, f"{name} text_embeds", ref[f"ref_{name}_pooled"], o.text_embeds.numpy(),
                    note=f"as loaded: final LayerNorm eps {eps:g} (keras-hub 1e-6)")
            te.text_model.final_layer_norm.eps = 1e-6
            with torch.no_grad():
                o = te(ids)
            compare(check, f"{name} text_embeds eps", ref[f"ref_{name}_pooled"], o.text_embeds.numpy(),
                    note="final_layer_norm.eps = 1e-6 as keras-hub's")
            compare(check, f"{name} last_hidden eps", ref[f"ref_{name}_last"], o.last_hidden_state.numpy(),
                    note="after the final LayerNorm, eps 1e-6")
            tok = CLIPTokenizer.from_pretrained(os.path.join(out, sub.replace("text_encoder", "tokenizer")))
            t = tok("a photo of sks dog", padding="max_length", max_length=77).input_ids
            fact(check, f"{sub.replace('text_encoder', 'tokenizer')}", len(tok) == te.config.vocab_size == 49408 and t[0] == 49406 and len(t) == 77,
                 f"CLIPTokenizer: {len(tok)} tokens, pad {tok.pad_token!r}, ids {t[:7]}...")
        # ---- VAE
        vae = strict(check, "vae", AutoencoderKL, os.path.join(out, "vae"))
        vc = vae.config
        vwant = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=meta["vae_scale"],
                     shift_factor=meta["vae_shift"], block_out_channels=(32, 64, 128, 128), layers_per_block=2)
        vhave = {k: (tuple(vc[k]) if isinstance(vc[k], (list, tuple)) else vc[k]) for k in vwant}
        fact(check, "vae config", vhave == vwant and vae.quant_conv is None and vae.post_quant_conv is None,
             "" if vhave == vwant else f"expected {vwant}, got {vhave}")
        with torch.no_grad():
            dist = vae.encode(torch.from_numpy(nchw(ref["image"]))).latent_dist
            dec = vae.decode(torch.from_numpy(nchw(ref["z"]))).sample
        compare(check, "VAE encoder mean", ref["ref_vae_mean"], nhwc(dist.mean))
        compare(check, "VAE encoder logvar", ref["ref_vae_logvar"], nhwc(dist.logvar))
        compare(check, "VAE decoder", ref["ref_vae_decode"], nhwc(dec))
        # ---- scheduler, model_index
        sch = FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(out, "scheduler"))
        sok = sch.config.shift == meta["shift"] and sch.config.num_train_timesteps == meta["num_train_timesteps"]
        fact(check, "scheduler", sok, f"FlowMatchEulerDiscreteScheduler shift {sch.config.shift}, {sch.config.num_train_timesteps} steps")
    index = json.load(open(os.path.join(out, "model_index.json")))
    te3 = index.get("text_encoder_3")
    iok = (index.get("_class_name") == "StableDiffusion3Pipeline" and te3 in (None, [None, None])
           and not os.path.exists(os.path.join(out, "text_encoder_3"))
           and index.get("transformer") == ["diffusers", "SD3Transformer2DModel"]
           and index.get("text_encoder") == index.get("text_encoder_2") == ["transformers", "CLIPTextModelWithProjection"])
    fact(check, "model_index.json", iok, f"{index.get('_class_name')}, text_encoder_3 {te3}, folders {sorted(e for e in os.listdir(out) if os.path.isdir(os.path.join(out, e)))}")

    # ---- the pipeline: 2 steps from keras-hub's embeddings and noise, with guidance
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    t = lambda k: torch.from_numpy(ref[k])  # noqa: E731
    with torch.no_grad():
        lat = pipe(prompt_embeds=t("prompt_embeds"), negative_prompt_embeds=t("negative_prompt_embeds"),
                   pooled_prompt_embeds=t("pooled_prompt_embeds"), negative_pooled_prompt_embeds=t("negative_pooled_prompt_embeds"),
                   latents=torch.from_numpy(nchw(ref["noise"])), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   height=64, width=64, output_type="latent").images
        sigmas = pipe.scheduler.sigmas.numpy()
        img = pipe.vae.decode(lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    compare(check, "pipeline sigmas", ref["ref_sigmas"], sigmas, note=f"{STEPS} steps, shift {pipe.scheduler.config.shift}")
    compare(check, "pipeline 2 steps", ref["ref_denoised"], nhwc(lat),
            note=f"StableDiffusion3Pipeline (text_encoder_3=None), 64x64, guidance {GUIDANCE}, vs keras-hub denoise_step")
    compare(check, "pipeline decode", ref["ref_decoded"], nhwc(img), note="latents / scaling_factor + shift_factor, vs decode_step")
    with torch.no_grad():  # and from a prompt, as a user runs it
        run = pipe("a photo of sks dog", num_inference_steps=STEPS, height=64, width=64, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    fact(check, "pipeline from a prompt", tuple(run.shape) == (1, 16, 8, 8) and bool(torch.isfinite(run).all()),
         f"StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None): latents {tuple(run.shape)}")


def same_as_base(check, out, base):
    """Every file but the transformer's bit-identical to --base's (safetensors by tensor digest)."""
    diffs, n = [], 0
    for root, _, files in os.walk(base):
        rel = os.path.relpath(root, base)
        if rel.split(os.sep)[0] == "transformer":
            continue
        for f in files:
            a, b = os.path.join(root, f), os.path.join(out, rel, f)
            n += 1
            if not os.path.exists(b):
                diffs.append(f"{rel}/{f} missing")
            elif f.endswith(".safetensors"):
                if st_digest(a) != st_digest(b):
                    diffs.append(f"{rel}/{f}")
            elif f != "model_index.json" and open(a, "rb").read() != open(b, "rb").read():
                diffs.append(f"{rel}/{f}")
    fact(check, "rest = --base", not diffs, f"{n} files of --base compared: " + (", ".join(diffs[:4]) if diffs else "identical"))


@guarded
def other_base(check, variant, d, base, ref):
    """--base's transformer equals the MMDiT file's weights in the check above, so a converter that
    kept --base's transformer would pass it: here --base's transformer has every weight negated, and
    the conversion must still give keras-hub's MMDiT."""
    import shutil

    import torch
    from diffusers import SD3Transformer2DModel

    other, out = os.path.join(d, "base_negated"), os.path.join(d, "from_mmdit_negated")
    drop(other)
    shutil.copytree(base, other)
    tr = SD3Transformer2DModel.from_pretrained(os.path.join(base, "transformer"), dtype=torch.float32)
    with torch.no_grad():
        for p in tr.parameters():
            p.neg_()
    shutil.rmtree(os.path.join(other, "transformer"))
    tr.save_pretrained(os.path.join(other, "transformer"))
    db("convert", "keras-to-diffusers", "--preset", os.path.join(d, "mmdit.weights.h5"), "--base", other, "--out", out, "--force")
    tr = strict(check, "transformer (--base negated)", SD3Transformer2DModel, os.path.join(out, "transformer"))
    with torch.no_grad():
        y = tr(hidden_states=torch.from_numpy(nchw(ref["latent"])), encoder_hidden_states=torch.from_numpy(ref["context"]),
               pooled_projections=torch.from_numpy(ref["pooled"]), timestep=torch.from_numpy(ref["timestep"][:, 0])).sample
    compare(check, "MMDiT (--base negated)", ref["ref_mmdit"], nhwc(y), note="--base's transformer weights negated: the MMDiT comes from the file")
    drop(other, out)


def check(variant):
    d = os.path.join(W, variant)
    ref = dict(np.load(os.path.join(d, "keras_ref.npz")))
    meta = json.loads(str(ref.pop("meta")))
    base = os.path.join(d, "from_preset")
    ran = {}
    for src, label in (("preset", "preset/"), ("backbone.weights.h5", "backbone.weights.h5")):
        out = os.path.join(d, "from_" + src.split(".")[0])
        check_name = f"{variant} {label}"
        try:
            db("convert", "keras-to-diffusers", "--preset", os.path.join(d, src), "--out", out, "--force")
            ran[src] = out
        except Exception as e:
            fact(check_name, "convert", False, f"{e}"[:400])
            continue
        check_folder(check_name, variant, out, ref, meta)
    if "preset" in ran and "backbone.weights.h5" in ran:
        a, b = ran["preset"], ran["backbone.weights.h5"]
        same = all(st_digest(os.path.join(a, p, f)) == st_digest(os.path.join(b, p, f))
                   for p in os.listdir(a) if os.path.isdir(os.path.join(a, p))
                   for f in os.listdir(os.path.join(a, p)) if f.endswith(".safetensors"))
        fact(f"{variant} backbone.weights.h5", "= preset's tensors", same, "every safetensors file's tensors bit-identical to the preset's conversion")
        drop(b)
    check_name = f"{variant} mmdit.weights.h5"
    if "preset" in ran:
        out = os.path.join(d, "from_mmdit")
        try:
            db("convert", "keras-to-diffusers", "--preset", os.path.join(d, "mmdit.weights.h5"), "--base", base, "--out", out, "--force")
        except Exception as e:
            fact(check_name, "convert", False, f"{e}"[:400])
        else:
            check_folder(check_name, variant, out, ref, meta, False)
            try:
                same_as_base(check_name, out, base)
            except Exception as e:
                fact(check_name, "rest = --base", False, f"{type(e).__name__}: {e}"[:400])
            drop(out)
        other_base(check_name, variant, d, base, ref)
    else:
        fact(check_name, "convert", False, "not run: no --base (the preset's conversion failed)")
    drop(base)


def check_all():
    import torch

    import diffusers
    import transformers

    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_grad_enabled(False)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    for variant in VARIANTS:
        if not os.path.exists(os.path.join(W, variant, "keras_ref.npz")):
            fact(f"{variant} keras files", "keras_ref.npz", False, "missing: the keras side (make) did not run or failed")
            continue
        try:
            check(variant)
        except Exception as e:
            traceback.print_exc()
            fact(f"{variant}", "ran to the end", False, f"{type(e).__name__}: {e}"[:400])


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    os.makedirs(WORK, exist_ok=True)
    t0 = time.time()
    if cmd == "make":
        make()
    elif cmd == "check":
        DB = os.path.abspath(sys.argv[2]) if len(sys.argv) > 2 else os.path.join(os.path.dirname(HERE), "target", "release", "dreambridge")
        check_all()
    else:
        sys.exit(f"usage: {sys.argv[0]} make | check [DREAMBRIDGE]")
    print(f"\nsd3 parity ({cmd}): {len(FAILED)} failed in {time.time() - t0:.0f} s" + "".join(f"\n  FAIL {f}" for f in FAILED))
    sys.exit(1 if FAILED else 0)
