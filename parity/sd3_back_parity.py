"""diffusers SD3 -> KerasHub, proven in keras-hub 0.32 itself: tiny `StableDiffusion3Backbone`s of each
MMDiT variant (parity/sd3_parity.py's, seeded random weights; the sd3.5-medium one also in bfloat16,
as SD3.5's presets ship) are saved by keras-hub (`save_to_preset`), converted by dreambridge to a
diffusers folder and back to a KerasHub preset and an MMDiT-only `.weights.h5`; then keras-hub:

* `StableDiffusion3Backbone.from_preset(back)` holds every weight of the original bit for bit, in
  the original's dtype (so Keras -> diffusers -> Keras is bit-identical, bf16 included);
* `backbone.diffuser.load_weights(back_mmdit.weights.h5)` on a zeroed backbone gives the original
  MMDiT weights bit for bit;
* through Stability's single file (`diffusers-to-single-file`, then `single-file-to-keras`; CLIPs
  of head width 64, as the file's head counts are width / 64), the same;
* written as Keras shards (`--max-shard-size`, 1 MiB here), the same through keras-hub's and
  Keras' sharded readers (`model.weights.json`, `<name>.weights.json`);
* `StableDiffusion3TextToImage.from_preset(back)` generates from a prompt (1 step, 64x64) and its
  image equals the original preset's.
The bf16 diffusers folder itself is checked on the torch side: every tensor bf16, and diffusers'
`from_pretrained(torch_dtype=torch.bfloat16)` loads it strictly.

    parity/.venv-torch/bin/python parity/sd3_back_parity.py DREAMBRIDGE
"""
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import run_checked, WORK, drop, record_fact  # noqa: E402

KERAS_PY = os.path.join(HERE, ".venv-kerashub", "bin", "python")
# (variant, dtype, --max-shard-size in GB or None, through Stability's single file): one case
# writes Keras shards of 1 MiB; the last goes diffusers -> single file -> KerasHub.
CASES = [("sd3-medium", "float32", None, False), ("sd3.5-medium", "float32", None, False), ("sd3.5-large", "float32", None, False),
         ("sd3.5-medium", "bfloat16", None, False), ("sd3.5-large", "float32", 2.0 ** -10, False), ("sd3.5-medium", "float32", None, True)]


def keras_make(work, variant, dtype, clip_head_dim):
    import keras

    keras.config.set_dtype_policy(dtype)
    import sd3_parity

    backbone = sd3_parity.build(variant, int(clip_head_dim) or None)
    sd3_parity.randomize(backbone, sd3_parity.VARIANTS[variant][2])
    backbone.save_to_preset(os.path.join(work, "preset"))
    print(json.dumps({"weights": len(backbone.weights), "dtypes": sorted({str(w.dtype) for w in backbone.weights})}))


def keras_verify(work, mmdit_file):
    import keras
    from keras_hub.models import StableDiffusion3Backbone, StableDiffusion3TextToImage

    out = {}
    a = StableDiffusion3Backbone.from_preset(os.path.join(work, "preset"))
    b = StableDiffusion3Backbone.from_preset(os.path.join(work, "back"))
    pairs = list(zip(a.weights, b.weights))
    same = [w.path == v.path and str(w.dtype) == str(v.dtype) and np.array_equal(np.asarray(w.value), np.asarray(v.value)) for w, v in pairs]
    out["preset"] = {"weights": len(a.weights), "back_weights": len(b.weights), "identical": int(sum(same)), "dtype": str(b.weights[0].dtype),
                     "first_bad": next((w.path for (w, _), ok in zip(pairs, same) if not ok), None)}
    for v in b.diffuser.weights:
        v.assign(np.zeros(v.shape, dtype=str(v.dtype)))
    b.diffuser.load_weights(os.path.join(work, mmdit_file))
    mm = [np.array_equal(np.asarray(w.value), np.asarray(v.value)) for w, v in zip(a.diffuser.weights, b.diffuser.weights)]
    out["mmdit"] = {"weights": len(mm), "identical": int(sum(mm))}
    # The converted preset as a task (its preprocessor and tokenizer assets included), against the
    # original backbone with the same preprocessor (keras-hub's save_to_preset of a bare backbone
    # writes none).
    back = StableDiffusion3TextToImage.from_preset(os.path.join(work, "back"), image_shape=(64, 64, 3))
    original = StableDiffusion3TextToImage(backbone=StableDiffusion3Backbone.from_preset(os.path.join(work, "preset")), preprocessor=back.preprocessor)
    images = []
    for t2i in [original, back]:
        keras.utils.set_random_seed(0)
        images.append(np.asarray(t2i.generate("a photo of a sks dog", num_steps=1, guidance_scale=2.0, seed=0)))
    out["generate"] = {"shape": list(images[1].shape), "identical": bool(np.array_equal(images[0], images[1]))}
    print("RESULT " + json.dumps(out))


def sh(args, env=None):
    return run_checked(args, env).stdout


def torch_bf16(check, folder):
    import torch
    from diffusers import SD3Transformer2DModel
    from safetensors import safe_open

    dtypes, f32 = set(), []
    for root, _, files in os.walk(folder):
        for f in files:
            if f.endswith(".safetensors"):
                with safe_open(os.path.join(root, f), framework="pt") as st:
                    for k in st.keys():
                        dtypes.add(str(st.get_slice(k).get_dtype()))
                        if str(st.get_slice(k).get_dtype()) == "F32":
                            f32.append(k)
    # keras-hub keeps its RMS q/k norms in float32 under a bfloat16 policy; they stay float32.
    record_fact(check, "diffusers dtype", dtypes == {"BF16", "F32"} and f32 and all(".norm_" in k for k in f32), f"BF16, and F32 for the {len(f32)} q/k norm scales keras-hub keeps in float32")
    _, info = SD3Transformer2DModel.from_pretrained(os.path.join(folder, "transformer"), torch_dtype=torch.bfloat16, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    record_fact(check, "bf16 strict load", not bad, f"SD3Transformer2DModel {bad or 'no missing/unexpected/mismatched keys'}")


def run(db):
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=HERE)
    me = os.path.abspath(__file__)
    failed = 0
    for variant, dtype, shard_gb, single_file in CASES:
        check = f"sd3 back {variant} {dtype}" + (" sharded" if shard_gb else "") + (" via single file" if single_file else "")
        work = os.path.join(WORK, "sd3_back", f"{variant}-{dtype}-{shard_gb}-{single_file}")
        shard = ["--max-shard-size", str(shard_gb)] if shard_gb else []
        os.makedirs(work, exist_ok=True)
        try:
            sh([KERAS_PY, me, "keras-make", work, variant, dtype, "64" if single_file else "0"], env)
            diff = os.path.join(work, "diffusers")
            sh([db, "convert", "keras-to-diffusers", "--preset", os.path.join(work, "preset"), "--out", diff, "--force"])
            if dtype == "bfloat16":
                torch_bf16(check, diff)
            if single_file:
                one = os.path.join(work, "sd3.safetensors")
                sh([db, "convert", "diffusers-to-single-file", "--model", diff, "--out", one])
                for out in ["back", "back_mmdit.weights.h5"]:
                    sh([db, "convert", "single-file-to-keras", "--checkpoint", one, "--out", os.path.join(work, out), "--force"])
            else:
                sh([db, "convert", "diffusers-to-keras", "--model", diff, "--out", os.path.join(work, "back"), "--force", *shard])
                sh([db, "convert", "diffusers-to-keras", "--model", diff, "--out", os.path.join(work, "back_mmdit.weights.h5"), "--force", *shard])
            mmdit_file = "back_mmdit.weights.h5"
            if shard_gb:
                shards = sorted(f for f in os.listdir(os.path.join(work, "back")) if f.endswith(".weights.h5"))
                ok = os.path.exists(os.path.join(work, "back", "model.weights.json")) and len(shards) > 2 and os.path.exists(os.path.join(work, "back_mmdit.weights.json"))
                failed += not ok
                record_fact(check, "Keras shards written", ok, f"preset: model.weights.json + {len(shards)} shards; MMDiT: back_mmdit.weights.json + shards")
                mmdit_file = "back_mmdit.weights.json"
            line = next(x for x in sh([KERAS_PY, me, "keras-verify", work, mmdit_file], env).splitlines() if x.startswith("RESULT "))
            r = json.loads(line[len("RESULT "):])
            p = r["preset"]
            ok = p["identical"] == p["weights"] == p["back_weights"]
            failed += not ok
            record_fact(check, "from_preset(back)", ok, f"{p['identical']}/{p['weights']} weights bit-identical, dtype {p['dtype']}" + (f"; first differing {p['first_bad']}" if p["first_bad"] else ""))
            m = r["mmdit"]
            ok = m["identical"] == m["weights"]
            failed += not ok
            record_fact(check, "diffuser.load_weights", ok, f"{m['identical']}/{m['weights']} MMDiT weights bit-identical")
            g = r["generate"]
            failed += not g["identical"]
            record_fact(check, "TextToImage.generate", g["identical"], f"image {g['shape']} from the converted preset identical to the original's")
        except Exception as e:
            failed += 1
            record_fact(check, "ran", False, f"{type(e).__name__}: {e}"[:600])
        drop(work)
    print(f"sd3 back parity: {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    cmd = sys.argv[1]
    os.makedirs(WORK, exist_ok=True)
    if cmd == "keras-make":
        keras_make(*sys.argv[2:6])
    elif cmd == "keras-verify":
        keras_verify(sys.argv[2], sys.argv[3])
    else:
        sys.exit(run(os.path.abspath(cmd)))
