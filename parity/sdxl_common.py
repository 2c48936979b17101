"""The tiny random-weight SDXL pipeline of the SDXL parity scripts (single file, LoRA), built by
diffusers / transformers themselves."""
import os

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


def randomize(model, seed):
    """Every float tensor random: ~N(0, 0.05), norm weights 1 + N(0, 0.05). None zero, none identity."""
    g = torch.Generator().manual_seed(seed)
    new = {}
    for k, v in model.state_dict().items():
        if not v.is_floating_point():
            continue
        x = 0.05 * torch.randn(v.shape, generator=g)
        if "norm" in k and k.endswith("weight") and v.dim() == 1:
            x += 1
        new[k] = x.to(v.dtype)
    model.load_state_dict(new, strict=False)


def clip_config(width, layers, act, projection):
    return CLIPTextConfig(vocab_size=1000, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=width // 64,
                          max_position_embeddings=77, hidden_act=act, projection_dim=projection, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                          pad_token_id=1)


def make_sdxl(folder, sample, depths, g_layers):
    """A tiny SDXL pipeline saved to `folder` (the tokenizers from the embedded sample's CLIP
    tokenizer in `sample`): UNet of 3 levels (64, 128, 128 wide; no attention at the first level,
    transformer depths `depths`, heads of 64), text-time conditioning with 8-wide time embeddings;
    CLIP-L 64 wide, 2 layers; OpenCLIP-G 128 wide, `g_layers` layers, projection 96; a 4-level VAE.
    Every float tensor random (see `randomize`)."""
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 128),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(1, 2, 2),
                                transformer_layers_per_block=depths, cross_attention_dim=64 + 128, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 96,
                                norm_num_groups=32)
    randomize(unet, 50)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        block_out_channels=[32, 64, 128, 128], layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=64,
                        scaling_factor=0.13025)
    randomize(vae, 51)
    te = CLIPTextModel(clip_config(64, 2, "quick_gelu", 64))
    randomize(te, 52)
    te2 = CLIPTextModelWithProjection(clip_config(128, g_layers, "gelu", 96))
    randomize(te2, 53)
    tok = CLIPTokenizer.from_pretrained(os.path.join(sample, "tokenizer"))
    tok2 = CLIPTokenizer.from_pretrained(os.path.join(sample, "tokenizer"), pad_token="!")
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2, unet=unet, scheduler=sched).save_pretrained(folder)
    return folder
