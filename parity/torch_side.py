"""The diffusers/transformers side of the parity suite (runs in the torch venv).

    torch_side.py check sd1|sd2    strict loading + forward parity of dreambridge's conversion
    torch_side.py pipeline [DIR..] StableDiffusionPipeline.from_pretrained runs (sd1/pipe f32, sd1/pipe16
                                   fp16 variant, sample; default all three)
    torch_side.py make_torch       diffusers/transformers-made random SD1 models (for the reverse check)
    torch_side.py digest DIR OUT   per-tensor digests of a pipeline folder's weights (DIR may then go)
    torch_side.py same A B         two pipeline folders hold bit-identical tensors (A: a folder or a digest file)
"""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import WORK, record, record_fact, st_digest  # noqa: E402
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.models import activations  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

torch.set_grad_enabled(False)
NHWC = (0, 2, 3, 1)
NCHW = (0, 3, 1, 2)

UNET_SD1 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, act_fn="silu")
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
           block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32, act_fn="silu",
           sample_size=512, scaling_factor=0.18215)


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def strict(check, component, info):
    if not isinstance(info, dict):
        return record_fact(check, component, False, f"no loading info returned ({type(info).__name__})")
    bad = {k: list(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs") and len(v)}
    record_fact(check, component, not bad, "no missing/unexpected/mismatched keys" if not bad else str(bad)[:300])


def tanh_geglu(enabled):
    """KerasCV's GEGLU uses tanh-GELU; patching diffusers' GEGLU isolates that from the mapping."""
    if not hasattr(tanh_geglu, "orig"):
        tanh_geglu.orig = activations.GEGLU.gelu
    activations.GEGLU.gelu = (lambda self, gate: torch.nn.functional.gelu(gate, approximate="tanh")) if enabled else tanh_geglu.orig


def unet_forward(unet, io):
    out = unet(t(io["unet_in0"].transpose(NCHW)), 500, encoder_hidden_states=t(io["unet_in2"])).sample
    return out.numpy().transpose(NHWC)


def vae_encode(vae, x):
    return (vae.encode(t(x.transpose(NCHW))).latent_dist.mean * 0.18215).numpy().transpose(NHWC)


def vae_decode(vae, z):
    return vae.decode(t(z.transpose(NCHW)) / 0.18215).sample.numpy().transpose(NHWC)


def check(version):
    pipe = os.path.join(WORK, version, "pipe")
    io = np.load(os.path.join(WORK, version, "keras_io.npz"))
    unet, info = UNet2DConditionModel.from_pretrained(pipe, subfolder="unet", output_loading_info=True)
    strict(f"{version} load strict", "unet", info)
    tanh_geglu(False)
    record(f"{version} keras->diffusers", "unet", io["unet_out"], unet_forward(unet, io), 5e-4, "KerasCV tanh-GEGLU vs exact GELU")
    tanh_geglu(True)
    record(f"{version} keras->diffusers", "unet (tanh GEGLU)", io["unet_out"], unet_forward(unet, io), 5e-5, "diffusers GEGLU patched to tanh")
    tanh_geglu(False)
    del unet
    text, info = CLIPTextModel.from_pretrained(pipe, subfolder="text_encoder", output_loading_info=True)
    strict(f"{version} load strict", "text_encoder", info)
    ids = t(io["text_encoder_in0"].astype(np.int64))
    tol = 5e-5 if version == "sd1" else 5e-4
    note = "" if version == "sd1" else "keras-cv >= 0.6.4 TextEncoderV2 uses tanh-GELU"
    record(f"{version} keras->diffusers", "text_encoder", io["text_encoder_out"], text(ids).last_hidden_state.numpy(), tol, note)
    if version == "sd2":
        text = CLIPTextModel.from_pretrained(pipe, subfolder="text_encoder", hidden_act="gelu_pytorch_tanh")
        record(f"{version} keras->diffusers", "text_encoder (tanh)", io["text_encoder_out"], text(ids).last_hidden_state.numpy(), 5e-5, "HF activation patched to tanh")
    if version == "sd1":
        vae, info = AutoencoderKL.from_pretrained(pipe, subfolder="vae", output_loading_info=True)
        strict(f"{version} load strict", "vae", info)
        record(f"{version} keras->diffusers", "image_encoder", io["image_encoder_out"], vae_encode(vae, io["image_encoder_in0"]), 5e-5, "latent_dist.mean * 0.18215")
        record(f"{version} keras->diffusers", "decoder", io["decoder_out"], vae_decode(vae, io["decoder_in0"]), 5e-5, "decode(z / 0.18215)")


PIPELINES = {"sd1/pipe": {}, "sd1/pipe16": {"variant": "fp16"}, "sample": {}}


def pipeline(folders=()):
    for folder in folders or PIPELINES:
        kw = PIPELINES[folder]
        path = os.path.join(WORK, folder)
        try:
            pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32, **kw)
            img = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                       generator=torch.Generator().manual_seed(0)).images
            ok = img.shape == (1, 64, 64, 3) and np.all(np.isfinite(img))
            record_fact("from_pretrained + run", f"{folder} {kw.get('variant', 'f32')}", ok, f"2 steps at 64x64, image {img.shape}")
        except Exception as e:  # the failure is the result
            record_fact("from_pretrained + run", f"{folder} {kw.get('variant', 'f32')}", False, repr(e)[:300])


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def make_torch():
    """SD1 components made and saved by diffusers/transformers themselves (their own key names,
    unprefixed CLIP keys as transformers 5 writes them), with reference outputs."""
    out = os.path.join(WORK, "torch_sd1")
    rng = np.random.default_rng(7)
    torch.manual_seed(7)
    io = {}
    unet = perturb(UNet2DConditionModel(**UNET_SD1), 1)
    unet.save_pretrained(os.path.join(out, "unet"))
    io["unet_in0"] = rng.standard_normal((1, 8, 8, 4), dtype=np.float32)
    from common import timestep_embedding
    io["unet_in1"] = timestep_embedding(500)
    io["unet_in2"] = rng.standard_normal((1, 77, 768), dtype=np.float32)
    io["unet_out"] = unet_forward(unet, io)
    tanh_geglu(True)
    io["unet_out_tanh"] = unet_forward(unet, io)  # KerasCV's GEGLU: isolates the mapping
    tanh_geglu(False)
    del unet
    text = perturb(CLIPTextModel(CLIPTextConfig(**CLIP_L)), 2)
    text.save_pretrained(os.path.join(out, "text_encoder"))
    io["text_encoder_in0"] = np.array([[49406, 320, 1125, 539, 48136, 1929, 49407] + [49407] * 70], dtype=np.int32)
    io["text_encoder_in1"] = np.arange(77, dtype=np.int32)[None]
    io["text_encoder_out"] = text(t(io["text_encoder_in0"].astype(np.int64))).last_hidden_state.numpy()
    vae = perturb(AutoencoderKL(**VAE), 3)
    vae.save_pretrained(os.path.join(out, "vae"))
    io["image_encoder_in0"] = rng.uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
    io["image_encoder_out"] = vae_encode(vae, io["image_encoder_in0"])
    io["decoder_in0"] = rng.standard_normal((1, 8, 8, 4), dtype=np.float32) * 0.18215
    io["decoder_out"] = vae_decode(vae, io["decoder_in0"])
    np.savez(os.path.join(out, "torch_io.npz"), **io)


WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors")


def digest(folder, out):
    """Per-tensor digests (dtype, shape, sha256) of a folder's weights, so that `same` can compare a
    folder made later with this one after it is deleted."""
    with open(out, "w") as f:
        json.dump({w: st_digest(os.path.join(folder, w)) for w in WEIGHT_FILES}, f)


def same(a, b):
    """Same keys, dtypes, shapes and bits in each weights file (a: a folder or a `digest` file)."""
    if os.path.isfile(a):
        with open(a) as f:
            ref = json.load(f)
    else:
        ref = {w: st_digest(os.path.join(a, w)) for w in WEIGHT_FILES}
    for f in WEIGHT_FILES:
        x, y = ref[f], st_digest(os.path.join(b, f))
        ok = x.keys() == y.keys() and all(x[k] == y[k] for k in x)
        record_fact("keras3 .weights.h5 -> st", f.split("/")[0], ok, f"{len(x)} tensors identical to the legacy-file conversion" if ok else "differ")


if __name__ == "__main__":
    cmd = sys.argv[1]
    {"check": lambda: check(sys.argv[2]), "pipeline": lambda: pipeline(sys.argv[2:]), "make_torch": make_torch,
     "digest": lambda: digest(sys.argv[2], sys.argv[3]), "same": lambda: same(sys.argv[2], sys.argv[3])}[cmd]()
