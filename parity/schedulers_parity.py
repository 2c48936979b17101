"""dreambridge's samplers against diffusers' schedulers, step by step: the same initial sample,
model outputs and (for ancestral sampling) noise; timesteps, init_noise_sigma, every scaled model
input and every sample after a step compared.

    schedulers_parity.py [DB]
"""
import json
import os
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import WORK, record, record_fact  # noqa: E402

DB = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "dreambridge")
OUT = os.path.join(WORK, "schedulers")

# What dreambridge writes (and SD 1.x ships: leading spacing, offset 1), and a config that names
# only the schedule, so each scheduler's own default spacing applies.
SD_CONFIG = {"_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
             "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None}
BARE = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000}


def run(cls_name, config, steps, label):
    import diffusers
    import diffusers.schedulers.scheduling_ddpm as ddpm
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea

    cls = getattr(diffusers, cls_name)
    sched = cls.from_config(config)
    sched.set_timesteps(steps)
    rng = np.random.default_rng(len(label))
    shape = (1, 4, 8, 8)
    x0 = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) * float(sched.init_noise_sigma)
    n = len(sched.timesteps)
    outs = [torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) for _ in range(n)]
    noises = [torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) for _ in range(n)]
    inputs = {"sample": x0, **{f"model_output_{i}": o for i, o in enumerate(outs)}, **{f"noise_{i}": z for i, z in enumerate(noises)}}
    os.makedirs(OUT, exist_ok=True)
    inp, cfg, res = (os.path.join(OUT, f"{label}.{k}") for k in ("in.safetensors", "json", "out.safetensors"))
    save_file({k: v.contiguous() for k, v in inputs.items()}, inp)
    with open(cfg, "w") as f:
        json.dump(dict(config), f)
    # diffusers draws the ancestral noise itself: hand it ours, step by step.
    queue = list(noises)
    real = ea.randn_tensor
    ea.randn_tensor = ddpm.randn_tensor = lambda *a, **k: queue.pop(0)
    x, scaled, samples = x0.clone(), [], []
    try:
        for i, t in enumerate(sched.timesteps):
            s_in = sched.scale_model_input(x, t)
            scaled.append(s_in)
            if cls_name not in ("EulerAncestralDiscreteScheduler", "DDPMScheduler"):
                queue.pop(0)
            x = sched.step(outs[i], t, x).prev_sample
            samples.append(x)
    finally:
        ea.randn_tensor = ddpm.randn_tensor = real
    r = subprocess.run([DB, "sampler-steps", "--scheduler", cls_name, "--config", cfg, "--steps", str(steps), "--inputs", inp, "--out", res], capture_output=True, text=True)
    if r.returncode != 0:
        record_fact(label, "dreambridge", False, r.stderr.strip().splitlines()[-1])
        return False
    ours = load_file(res)
    ok = record_fact(label, "timesteps", np.array_equal(ours["timesteps"].numpy(), sched.timesteps.numpy().astype(np.float32)),
                     f"{n} steps, first {float(sched.timesteps[0])}, last {float(sched.timesteps[-1])}") is None or True
    ok &= np.array_equal(ours["timesteps"].numpy(), sched.timesteps.numpy().astype(np.float32))
    ok &= record(label, "init_noise_sigma", [float(sched.init_noise_sigma)], ours["init_noise_sigma"].numpy(), 1e-6)
    ok &= record(label, "scaled inputs", torch.stack(scaled).numpy(), np.stack([ours[f"scaled_{i}"].numpy() for i in range(n)]), 1e-5)
    worst = max(float((ours[f"sample_{i}"] - samples[i]).abs().max() / samples[i].abs().max()) for i in range(n))
    ok &= record(label, "samples, every step", torch.stack(samples).numpy(), np.stack([ours[f"sample_{i}"].numpy() for i in range(n)]), 1e-5, f"worst single step rel {worst:.1e}")
    return ok


def main():
    ok = True
    for cls_name, steps in [("DPMSolverMultistepScheduler", 25), ("EulerAncestralDiscreteScheduler", 30), ("DDIMScheduler", 50), ("DDPMScheduler", 25)]:
        short = {"DPMSolverMultistepScheduler": "dpm++", "EulerAncestralDiscreteScheduler": "euler_a", "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm"}[cls_name]
        for cfg_name, cfg in [("sd", SD_CONFIG), ("bare", BARE)]:
            for pred in ["epsilon", "v_prediction"]:
                for spacing in ([None, "trailing"] if cfg_name == "bare" else [None]):
                    c = dict(cfg, prediction_type=pred)
                    if spacing:
                        c["timestep_spacing"] = spacing
                    label = f"{short} {cfg_name}{'-' + spacing if spacing else ''} {pred[:3]}"
                    ok &= bool(run(cls_name, c, steps, label.replace(" ", "_")))
    print(f"\nscheduler parity: {'all pass' if ok else 'FAILURES'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
