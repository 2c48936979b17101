"""Oracle for the parity suite: the single file that diffusers' `scripts/convert_diffusers_to_original_sdxl.py`
(huggingface/diffusers on GitHub; the script is not in the pip package) writes from a diffusers SDXL base
folder, reproduced here in our own code, with the same command line:

    python parity/diffusers_sdxl_to_original.py --model_path FOLDER --checkpoint_path OUT [--half] [--use_safetensors]

What that script writes, read from its source:
- UNet (`unet/`): `model.diffusion_model.` + generative-models' names (`input_blocks`, `middle_block`,
  `output_blocks`, `time_embed`, `label_emb.0.0` / `label_emb.0.2` for `add_embedding`, `out`); values unchanged.
- VAE (`vae/`): `first_stage_model.` + the LDM names; the mid-block attention's q, k, v and proj_out
  weights reshaped from diffusers' Linear `[c, c]` to 1x1 convs `[c, c, 1, 1]`.
- CLIP-L (`text_encoder/`): `conditioner.embedders.0.transformer.` + the folder file's own keys, unchanged.
  A folder saved by transformers 5 keeps `CLIPTextModel`'s keys without `text_model.`, so then the file
  has `conditioner.embedders.0.transformer.encoder.layers...` (transformers 4 wrote `text_model.`).
- OpenCLIP-G (`text_encoder_2/`): `conditioner.embedders.1.model.` + OpenCLIP names (`transformer.resblocks`,
  `ln_1`, `mlp.c_fc`, `ln_final`, `positional_embedding`, ...), q/k/v fused into `attn.in_proj_weight` /
  `in_proj_bias` (q, k, v order) and `text_projection` = diffusers' `text_projection.weight` transposed
  (OpenCLIP applies it as `x @ P`). Keys none of its renames knows go through as they are.
- `--half`: every tensor `.half()`, integer buffers included. `--use_safetensors`: safetensors `save_file`
  without metadata; otherwise `torch.save({"state_dict": ...})`, a `.ckpt`.
It reads `*.safetensors` (else `*.bin`) of the four parts and ignores everything else in the folder.

How it was checked: run beside the original script (diffusers main of 2026-08) on both tiny pipelines of
`sdxl_single_file_parity.py`: the safetensors files (f32 and `--half`) came out byte-identical, the `.ckpt`
state dicts equal key for key, dtype and bits. `sdxl_single_file_parity.py` repeats that comparison when
`SDXL_ORIGINAL_SCRIPT` names a copy of the original script.
"""
import argparse
import os
import re

import torch
from safetensors.torch import load_file, save_file

UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# Inside a UNet resnet: diffusers' -> LDM's ResBlock names.
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
LEVELS = 3  # SDXL base: three levels, attention at levels 1 and 2 (down) / 0 and 1 (up)


def _resnet(rest):
    module, _, param = rest.rpartition(".")
    return f"{UNET_RESNET.get(module, module)}.{param}"


def unet_key(k):
    """An SDXL UNet key under generative-models' names (keys of other structures go through as they are)."""
    module, _, param = k.rpartition(".")
    if module in UNET_TOP:
        return f"{UNET_TOP[module]}.{param}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k)
    if m and int(m[1]) < LEVELS:
        i, j = int(m[1]), int(m[3])
        if m[2] == "resnets":
            return f"input_blocks.{3 * i + j + 1}.0.{_resnet(m[4])}"
        if i > 0:
            return f"input_blocks.{3 * i + j + 1}.1.{m[4]}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k)
    if m and int(m[1]) < LEVELS:
        return f"input_blocks.{3 * (int(m[1]) + 1)}.0.op.{m[2]}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k)
    if m and int(m[1]) < LEVELS:
        i, j = int(m[1]), int(m[3])
        if m[2] == "resnets":
            return f"output_blocks.{3 * i + j}.0.{_resnet(m[4])}"
        if i < 2:
            return f"output_blocks.{3 * i + j}.1.{m[4]}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", k)
    if m and int(m[1]) < LEVELS:
        # Levels 0 and 1 have attention, so the upsampler is the third module of the block's last row.
        return f"output_blocks.{3 * int(m[1]) + 2}.2.{m[2]}"
    m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)", k)
    if m:
        return f"middle_block.1.{m[1]}"
    m = re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", k)
    if m:
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    return k


VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key(k):
    """A VAE key under the LDM names, and whether its tensor becomes a 1x1 conv."""
    k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", k)
    if m:
        name = VAE_ATTN[m[2]]
        return f"{m[1]}.mid.attn_1.{name}.{m[3]}", name != "norm" and m[3] == "weight"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", k)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}", False
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k)
    if m:
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}", False
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", k)
    if m:
        return f"encoder.down.{m[1]}.downsample.{m[2]}", False
    # diffusers counts the decoder's levels from the bottom, LDM from the top.
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k)
    if m:
        return f"decoder.up.{3 - int(m[1])}.block.{m[2]}.{m[3]}", False
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", k)
    if m:
        return f"decoder.up.{3 - int(m[1])}.upsample.{m[2]}", False
    return k, False


OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
OPENCLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                "text_model.embeddings.position_embedding.weight": "positional_embedding",
                "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}


def openclip(sd):
    """transformers' CLIPTextModelWithProjection state dict -> OpenCLIP's, q/k/v fused, projection transposed."""
    out, qkv = {}, {}
    for k, v in sd.items():
        if k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
            continue
        if k in OPENCLIP_TOP:
            out[OPENCLIP_TOP[k]] = v
            continue
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k)
        if not m:
            out[k] = v
            continue
        block = f"transformer.resblocks.{m[1]}"
        q = re.fullmatch(r"self_attn\.([qkv])_proj", m[2])
        if q:
            qkv.setdefault((block, m[3]), {})[q[1]] = v
        elif m[2] in OPENCLIP_LAYER:
            out[f"{block}.{OPENCLIP_LAYER[m[2]]}.{m[3]}"] = v
        else:
            out[k] = v
    for (block, param), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"{block}: q, k and v are not all there ({sorted(parts)})")
        out[f"{block}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def read_part(folder, part, stem):
    path = os.path.join(folder, part, f"{stem}.safetensors")
    if os.path.exists(path):
        return load_file(path, device="cpu")
    return torch.load(os.path.join(folder, part, f"{stem}.bin"), map_location="cpu")


def convert(folder, half=False):
    """The state dict the script builds from `folder` (before saving)."""
    sd = {}
    for k, v in read_part(folder, "unet", "diffusion_pytorch_model").items():
        sd["model.diffusion_model." + unet_key(k)] = v
    for k, v in read_part(folder, "vae", "diffusion_pytorch_model").items():
        name, conv = vae_key(k)
        sd["first_stage_model." + name] = v.reshape(*v.shape, 1, 1) if conv and v.dim() != 1 else v
    for k, v in read_part(folder, "text_encoder", "model").items():
        sd["conditioner.embedders.0.transformer." + k] = v
    for k, v in openclip(read_part(folder, "text_encoder_2", "model")).items():
        sd["conditioner.embedders.1.model." + k] = v
    if half:
        sd = {k: v.half() for k, v in sd.items()}
    return sd


def write(folder, path, half=False, use_safetensors=False):
    sd = convert(folder, half)
    if use_safetensors:
        save_file(sd, path)
    else:
        torch.save({"state_dict": sd}, path)
    return sd


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", required=True)
    p.add_argument("--checkpoint_path", required=True)
    p.add_argument("--half", action="store_true")
    p.add_argument("--use_safetensors", action="store_true")
    a = p.parse_args()
    write(a.model_path, a.checkpoint_path, a.half, a.use_safetensors)
