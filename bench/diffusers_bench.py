"""The PyTorch diffusers side of `dreambridge bench`: the same work on the same shapes.

    python bench/diffusers_bench.py train    [--device cuda] [--resolution 512] [--steps 10] [--warmup 3]
                                             [--mixed-precision bf16|no] [--gradient-checkpointing] [--lora-rank R] [--json F]
    python bench/diffusers_bench.py generate [--device cuda] [--resolution 512] [--steps 50] [--images 2]
                                             [--mixed-precision bf16|no] [--json F]

train: UNet2DConditionModel from bench/sd15/unet.json (random init, f32 master weights, SDPA
attention), one instance + one class sample, per-sample timesteps, bf16 autocast, MSE +
prior-preservation MSE, backward, clip_grad_norm_(1.0), torch.optim.AdamW(lr 5e-6, wd 1e-2),
zero_grad — what diffusers' examples/dreambooth/train_dreambooth.py does per step. With --lora-rank,
what train_dreambooth_lora.py does: the UNet frozen and cast to the compute dtype, a PEFT LoRA
(gaussian init, alpha = rank) on to_q/to_k/to_v/to_out.0, the adapters in f32, AdamW on them only.
generate: StableDiffusionPipeline from the three configs (weights in the compute dtype), DDIM,
guidance 7.5; prompt encoding is inside the timed region.

Peak memory is measured as dreambridge measures it: GPU: the driver's used memory (total - free)
sampled every millisecond, above the phase's start; CPU: the process's peak RSS (VmHWM after
clearing it). torch's own max_memory_allocated/reserved are reported beside it.
"""

import argparse
import json
import os
import statistics
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def config(name):
    with open(os.path.join(HERE, "sd15", name + ".json")) as f:
        return json.load(f)


class PeakMemory:
    def __init__(self, device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = self._used()
            self.peak = self.baseline
            self.stop = False
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass

    def _used(self):
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def _poll(self):
        while not self.stop:
            self.peak = max(self.peak, self._used())
            time.sleep(0.001)

    def finish(self):
        if self.device.type == "cuda":
            self.stop = True
            self.thread.join()
            return {
                "peak_memory_bytes": self.peak - self.baseline,
                "peak_memory_kind": "peak GPU memory in use (driver: total - free), above the phase's start",
                "torch_max_memory_allocated": torch.cuda.max_memory_allocated(self.device),
                "torch_max_memory_reserved": torch.cuda.max_memory_reserved(self.device),
            }
        with open("/proc/self/status") as f:
            kb = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
        return {"peak_memory_bytes": kb * 1024, "peak_memory_kind": "peak RSS of the process"}


def timing(ms):
    return {"median_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms), "min_ms": min(ms)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_train(a, device, dtype):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(0)
    memory = PeakMemory(device)
    unet = UNet2DConditionModel.from_config(config("unet")).to(device)
    unet.set_attn_processor(AttnProcessor2_0())  # torch SDPA (flash / memory-efficient kernels)
    lr = 5e-6
    if a.lora_rank:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.to(dtype)
        unet.add_adapter(LoraConfig(r=a.lora_rank, lora_alpha=a.lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # diffusers' cast_training_params
        lr = 5e-4
    if a.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    side = a.resolution // 8
    latents = torch.randn(2, 4, side, side, device=device)
    context = torch.randn(2, 77, 768, device=device)
    times, losses = [], []
    for i in range(a.warmup + a.steps):
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (2,), device=device)
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            noisy = sched.add_noise(latents, noise, t)
            pred = unet(noisy, t, context).sample
        pred, prior_pred = pred.float().chunk(2)
        target, prior_target = noise.chunk(2)
        loss = torch.nn.functional.mse_loss(pred, target) + 1.0 * torch.nn.functional.mse_loss(prior_pred, prior_target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        sync(device)
        if i >= a.warmup:
            times.append((time.perf_counter() - start) * 1e3)
    step = timing(times)
    return {
        "device": str(device),
        "compute_dtype": str(dtype).replace("torch.", ""),
        "resolution": a.resolution,
        "batch": 2,
        "parameters": sum(p.numel() for p in params),
        "lora_rank": a.lora_rank,
        "gradient_checkpointing": a.gradient_checkpointing,
        "steps": a.steps,
        "step": step,
        "images_per_s": 2 / (step["median_ms"] / 1e3),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        **memory.finish(),
    }


def bench_generate(a, device, dtype):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    memory = PeakMemory(device)
    te = config("text_encoder")
    text_encoder = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in te.items() if k != "architectures"}))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(config("vae")),
        text_encoder=text_encoder,
        tokenizer=None,
        unet=UNet2DConditionModel.from_config(config("unet")),
        scheduler=DDIMScheduler.from_config(config("scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    # Token ids of a prompt and of "" (start, end, padding), as the tokenizer would give them.
    ids = torch.full((2, 77), 49407, dtype=torch.long, device=device)
    ids[:, 0] = 49406
    ids[1, 1:8] = torch.tensor([320, 1125, 539, 48136, 1929, 530, 320])
    times = []
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.inference_mode():
        for i in range(a.warmup + a.images):
            sync(device)
            start = time.perf_counter()
            embeds = pipe.text_encoder(ids)[0]
            image = pipe(
                prompt_embeds=embeds[1:2],
                negative_prompt_embeds=embeds[0:1],
                height=a.resolution,
                width=a.resolution,
                num_inference_steps=a.steps,
                guidance_scale=7.5,
                generator=generator,
                output_type="np",
            ).images
            assert image.shape == (1, a.resolution, a.resolution, 3)
            sync(device)
            if i >= a.warmup:
                times.append((time.perf_counter() - start) * 1e3)
    t = timing(times)
    return {
        "device": str(device),
        "compute_dtype": str(dtype).replace("torch.", ""),
        "resolution": a.resolution,
        "steps": a.steps,
        "images": a.images,
        "image": t,
        "unet_steps_per_s": a.steps / (t["median_ms"] / 1e3),
        **memory.finish(),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["train", "generate"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"])
    p.add_argument("--allow-tf32", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--json")
    a = p.parse_args()
    device = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = a.allow_tf32  # torch's default: off (cuDNN convs: on)
    mp = a.mixed_precision if a.mixed_precision != "auto" else ("bf16" if device.type == "cuda" else "no")
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mp]
    if a.what == "train":
        a.steps = a.steps or 10
        a.warmup = 3 if a.warmup is None else a.warmup
        report = {"model": "sd15", "train": bench_train(a, device, dtype)}
        r = report["train"]
        print(f"diffusers train step  {r['device']} {r['compute_dtype']} {r['resolution']}px batch 2 ("
              f"{'LoRA rank %d, ' % r['lora_rank'] if r['lora_rank'] else ''}{r['parameters']} params"
              f"{', gradient checkpointing' if r['gradient_checkpointing'] else ''}): {r['step']['median_ms']:.1f} ms/step median "
              f"({r['step']['mean_ms']:.1f} mean, {r['step']['min_ms']:.1f} min) over {r['steps']} steps, {r['images_per_s']:.2f} images/s, "
              f"peak memory {r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_kind']}); loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}")
    else:
        a.steps = a.steps or 50
        a.warmup = 1 if a.warmup is None else a.warmup
        report = {"generate": bench_generate(a, device, dtype)}
        r = report["generate"]
        print(f"diffusers text-to-image  {r['device']} {r['compute_dtype']} {r['resolution']}px, {r['steps']} DDIM steps with guidance: "
              f"{r['image']['median_ms']:.0f} ms/image median over {r['images']} images, {r['unet_steps_per_s']:.2f} UNet steps/s, "
              f"peak memory {r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_kind']})")
    report["versions"] = {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                          "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    if a.json:
        with open(a.json + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(a.json + ".tmp", a.json)


if __name__ == "__main__":
    main()
