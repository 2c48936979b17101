"""Data-parallel training launched by torch's own launcher: `torchrun --standalone
--nproc_per_node=2 --no-python dreambridge train ...` on the CPU (the TCP backend).

    torchrun_parity.py [DB]

What is checked:
- REAL LAUNCHER: torchrun (torch.distributed.run) starts both ranks with its variables (RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, its agent's store on MASTER_PORT); the ranks
  meet on MASTER_PORT + 1, train, and exit 0, which torchrun reports as success.
- 2 ranks x batch 1 against 1 process x batch 2 (diffusers' loss and update arithmetic is the
  same either way): the UNet weights, relative to the largest change training made.
- Rank 0 alone writes; the folder loads in diffusers (UNet2DConditionModel.from_pretrained).
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image
from safetensors.numpy import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import WORK, record, record_fact  # noqa: E402

DB = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "dreambridge"))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def train_flags(tmp, out, batch):
    return ["train", "--pretrained_model_name_or_path", f"{tmp}/sample", "--instance_data_dir", f"{tmp}/instance",
            "--instance_prompt", "a photo of sks dog", "--with_prior_preservation", "--class_data_dir", f"{tmp}/class",
            "--class_prompt", "a photo of a dog", "--num_class_images", "2", "--sample_steps", "2", "--resolution", "64",
            "--train_batch_size", str(batch), "--max_train_steps", "4", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
            # Adam's epsilon keeps weights with rounding-level gradients still (see tests/distributed.rs).
            "--adam_epsilon", "1e-4", "--report_to", "none", "--device", "cpu", "--seed", "5", "--output_dir", out]


def main():
    tmp = tempfile.mkdtemp(dir=WORK)
    subprocess.run([DB, "convert", "keras-to-diffusers", "--out", f"{tmp}/sample"], check=True, capture_output=True)
    os.makedirs(f"{tmp}/instance")
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((64, 64, 3)) * 255).astype("uint8")).save(f"{tmp}/instance/{i}.png")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["HDF5_USE_FILE_LOCKING"] = "FALSE"
    one = subprocess.run([DB] + train_flags(tmp, f"{tmp}/one", 2), env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    launched = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "--no-python", DB] + train_flags(tmp, f"{tmp}/ranks", 1),
                              env=env, capture_output=True, text=True, timeout=600)
    log = launched.stdout + launched.stderr
    ok_launch = launched.returncode == 0 and "rank 1 trained 4 steps; rank 0 writes" in log and "rank 0 of 2: joining" in log
    record_fact("torchrun --no-python", "2 CPU ranks (tcp)", ok_launch, "exit 0, both ranks joined" if ok_launch else log[-1500:])
    if not ok_launch:
        sys.exit(1)
    key = "unet/diffusion_pytorch_model.safetensors"
    a, b, base = (load_file(f"{tmp}/{d}/{key}") for d in ("ranks", "one", "sample"))
    diff = np.concatenate([(a[k] - b[k]).ravel() for k in sorted(a)])
    moved = np.concatenate([(b[k] - base[k]).ravel() for k in sorted(a)])
    ok = record("torchrun 2x1 vs 1x2", "UNet weight change", moved, moved + diff, 5e-4, "4 AdamW steps, prior preservation")
    try:
        from diffusers import UNet2DConditionModel
        UNet2DConditionModel.from_pretrained(f"{tmp}/ranks/unet", local_files_only=True)
        loads = True
    except Exception as e:  # the failure is the result
        loads, log = False, repr(e)[:300]
    written = sorted(os.listdir(f"{tmp}/ranks"))
    record_fact("torchrun --no-python", "rank 0's folder in diffusers", loads and "model_index.json" in written, f"{len(written)} entries")
    sys.exit(0 if ok and loads else 1)


if __name__ == "__main__":
    main()
