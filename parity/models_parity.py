"""Forward parity of dreambridge's training models (Candle) with diffusers/transformers on the same
random weights: tiny UNets (conv and linear projections, SD1- and SD2-style heads) and CLIP text
towers (quick_gelu and gelu), saved by the peers' own save_pretrained.

    parity/.venv-torch/bin/python parity/models_parity.py target/release/dreambridge
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import WORK, record, record_fact  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

torch.set_grad_enabled(False)


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def run(db, component, folder, inputs):
    src, out = os.path.join(folder, "in.safetensors"), os.path.join(folder, "out.safetensors")
    save_file({k: v.contiguous() for k, v in inputs.items()}, src)
    subprocess.run([db, "forward", component, "--model", folder, "--inputs", src, "--out", out], check=True)
    return load_file(out)["out"].numpy()


def unet_case(db, name, linear, heads, seed):
    folder = tempfile.mkdtemp(dir=WORK)
    unet = perturb(UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[32, 64, 64],
                                        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                                        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=24,
                                        attention_head_dim=heads, norm_num_groups=8, use_linear_projection=linear), seed)
    unet.save_pretrained(os.path.join(folder, "unet"))
    g = torch.Generator().manual_seed(seed)
    x = {"sample": torch.randn(2, 4, 16, 16, generator=g), "timesteps": torch.tensor([17.0, 803.0]), "context": torch.randn(2, 7, 24, generator=g)}
    ref = unet(x["sample"], x["timesteps"], encoder_hidden_states=x["context"]).sample.numpy()
    record("candle model vs diffusers", name, ref, run(db, "unet", folder, x), 1e-4, "per-sample timesteps 17, 803")


def clip_case(db, act, seed):
    folder = tempfile.mkdtemp(dir=WORK)
    cfg = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         max_position_embeddings=77, hidden_act=act, projection_dim=32, bos_token_id=0, eos_token_id=2)
    text = perturb(CLIPTextModel(cfg), seed)
    text.save_pretrained(os.path.join(folder, "text_encoder"))
    ids = torch.tensor([[49406 % 1000, 320, 999, 12, 5] + [7] * 72])
    ref = text(ids).last_hidden_state.numpy()
    record("candle model vs transformers", f"text encoder {act}", ref, run(db, "text-encoder", folder, {"input_ids": ids}), 1e-4, "77 tokens")


def vae_case(db, seed):
    folder = tempfile.mkdtemp(dir=WORK)
    vae = perturb(AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                                block_out_channels=[16, 32, 32], layers_per_block=2, latent_channels=4, norm_num_groups=8), seed)
    vae.save_pretrained(os.path.join(folder, "vae"))
    g = torch.Generator().manual_seed(seed)
    image, latents = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.randn(2, 4, 8, 8, generator=g)
    record("candle model vs diffusers", "vae encode (mean)", vae.encode(image).latent_dist.mean.numpy(), run(db, "vae-encode", folder, {"image": image}), 1e-4)
    record("candle model vs diffusers", "vae decode", vae.decode(latents).sample.numpy(), run(db, "vae-decode", folder, {"latents": latents}), 1e-4)


def train_step_case(db, seed):
    """Same weights, batch, noise and timesteps through one diffusers-style training step
    (train_dreambooth.py's prior-preservation loss, clip_grad_norm_ 1.0, torch AdamW) and ours."""
    from diffusers import DDPMScheduler
    folder = tempfile.mkdtemp(dir=WORK)
    torch.manual_seed(seed)
    unet = perturb(UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
                                        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                                        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8), seed)
    unet.save_pretrained(os.path.join(folder, "unet"))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    x = {"latents": torch.randn(2, 4, 16, 16, generator=g), "noise": torch.randn(2, 4, 16, 16, generator=g),
         "timesteps": torch.tensor([50.0, 700.0]), "context": torch.randn(2, 7, 24, generator=g)}
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    with torch.enable_grad():
        noisy = sched.add_noise(x["latents"], x["noise"], x["timesteps"].long())
        pred = unet(noisy, x["timesteps"].long(), encoder_hidden_states=x["context"]).sample
        pred, pred_prior = torch.chunk(pred, 2, dim=0)
        target, target_prior = torch.chunk(x["noise"], 2, dim=0)
        loss = torch.nn.functional.mse_loss(pred.float(), target.float()) + 1.0 * torch.nn.functional.mse_loss(pred_prior.float(), target_prior.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        grads = {k: p.grad.clone() for k, p in unet.named_parameters()}
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        opt.step()
    src, out = os.path.join(folder, "in.safetensors"), os.path.join(folder, "out.safetensors")
    save_file({k: v.contiguous() for k, v in x.items()}, src)
    subprocess.run([db, "forward", "train-step", "--model", folder, "--inputs", src, "--out", out], check=True)
    ours = load_file(out)
    record("training step vs diffusers", "loss", np.array([loss.item()]), ours["loss"].numpy(), 1e-5)
    after = unet.state_dict()
    upd_ref = np.concatenate([(after[k] - before[k]).numpy().ravel() for k in sorted(after)])
    upd_ours = np.concatenate([(ours[k] - before[k]).numpy().ravel() for k in sorted(after)])
    # Adam's first update is lr*g/(|g|+eps): for |g| near eps (1e-8) float noise in g moves it a lot,
    # so the update is compared in L2 over all elements and elementwise where |g| > 1e-6.
    l2 = float(np.linalg.norm(upd_ref - upd_ours) / np.linalg.norm(upd_ref))
    record_fact("training step vs diffusers", "AdamW update (L2 rel)", l2 < 1e-3, f"{l2:.2e} over {upd_ref.size} weights (tol 1e-3)")
    sure = np.concatenate([np.abs(grads[k].numpy().ravel()) > 1e-6 for k in sorted(after)])
    record("training step vs diffusers", "AdamW update |g|>1e-6", upd_ref[sure], upd_ours[sure], 1e-3, f"{sure.mean():.1%} of the weights")


if __name__ == "__main__":
    db = os.path.abspath(sys.argv[1])
    unet_case(db, "unet (SD1-style)", False, 8, 1)
    unet_case(db, "unet (SD2-style)", True, [1, 2, 2], 2)
    clip_case(db, "quick_gelu", 3)
    clip_case(db, "gelu", 4)
    vae_case(db, 5)
    train_step_case(db, 6)
