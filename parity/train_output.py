"""A folder written by `dreambridge train` loads in diffusers and runs.

    parity/.venv-torch/bin/python parity/train_output.py target/release/dreambridge
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import WORK, record_fact  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402


def main(db):
    tmp = tempfile.mkdtemp(dir=WORK)
    sample, inst, out = (os.path.join(tmp, n) for n in ("sample", "instance", "trained"))
    subprocess.run([db, "convert", "keras-to-diffusers", "--out", sample], check=True, capture_output=True)
    os.makedirs(inst)
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((64, 64, 3)) * 255).astype("uint8")).save(os.path.join(inst, f"{i}.png"))
    subprocess.run([db, "train", "--pretrained-model-name-or-path", sample, "--instance-data-dir", inst, "--instance-prompt", "a photo of sks dog",
                    "--with-prior-preservation", "--class-data-dir", os.path.join(tmp, "class"), "--class-prompt", "a photo of a dog",
                    "--num-class-images", "2", "--sample-steps", "2", "--resolution", "64", "--max-train-steps", "10",
                    "--learning-rate", "1e-3", "--checkpointing-steps", "5", "--output-dir", out], check=True, capture_output=True)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
        img = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np").images
        ok = img.shape == (1, 64, 64, 3) and bool(np.isfinite(img).all())
        record_fact("dreambridge train output", "from_pretrained + run", ok, "10 steps with prior preservation, then 2 diffusers steps")
    except Exception as e:  # the failure is the result
        record_fact("dreambridge train output", "from_pretrained + run", False, repr(e)[:300])


if __name__ == "__main__":
    main(os.path.abspath(sys.argv[1]))
