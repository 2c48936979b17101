"""The KerasCV side of the parity suite (runs in the Keras 2 venv, and `k3*` in the Keras 3 venv).

    keras_side.py make sd1|sd2     build real KerasCV models, random weights, save .h5 + outputs
                                   + h5_digest.json (the round trip compares with it once the .h5 are gone)
    keras_side.py roundtrip        dreambridge's .h5 written back from our diffusers folder (sd1/keras_back;
                                   run.sh converts k3/pipe, proven bit-identical to sd1/pipe by `same`)
                                   against the digest of KerasCV's files: bit-identical
    keras_side.py reverse          diffusers/transformers-made models converted by dreambridge, in keras_cv
    keras_side.py k3save           Keras 3: load the legacy files, save .weights.h5 (k3/)
    keras_side.py k3load           Keras 3: load dreambridge's legacy .h5 (sd1/keras_back), compare outputs
    keras_side.py k3               both k3 steps
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import WORK, h5_digest, h5_tensors, perturbed, record, record_fact, tensor_digest, timestep_embedding  # noqa: E402
from keras_cv.src.models.stable_diffusion.decoder import Decoder  # noqa: E402
from keras_cv.src.models.stable_diffusion.diffusion_model import DiffusionModel, DiffusionModelV2  # noqa: E402
from keras_cv.src.models.stable_diffusion.image_encoder import ImageEncoder  # noqa: E402
from keras_cv.src.models.stable_diffusion.text_encoder import TextEncoder, TextEncoderV2  # noqa: E402

UNET_HW = 64  # image size; the UNet runs at 8x8 latents to keep CPU time small


def build(name, version):
    if name == "unet":
        return (DiffusionModel if version == "sd1" else DiffusionModelV2)(UNET_HW, UNET_HW, 77, download_weights=False)
    if name == "text_encoder":
        return (TextEncoder if version == "sd1" else TextEncoderV2)(77, download_weights=False)
    if name == "image_encoder":
        return ImageEncoder(download_weights=False)
    return Decoder(UNET_HW, UNET_HW, download_weights=False)


def inputs(name, version, rng):
    """Fixed inputs, NHWC as KerasCV takes them."""
    if name == "unet":
        ctx = 768 if version == "sd1" else 1024
        return [rng.standard_normal((1, 8, 8, 4), dtype=np.float32), timestep_embedding(500), rng.standard_normal((1, 77, ctx), dtype=np.float32)]
    if name == "text_encoder":
        tokens = np.array([[49406, 320, 1125, 539, 48136, 1929, 49407] + [49407] * 70], dtype=np.int32)
        return [tokens, np.arange(77, dtype=np.int32)[None]]
    if name == "image_encoder":
        return [rng.uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)]
    return [rng.standard_normal((1, 8, 8, 4), dtype=np.float32) * 0.18215]


def parts(version):
    return ["unet", "text_encoder", "image_encoder", "decoder"] if version == "sd1" else ["unet", "text_encoder"]


def make(version):
    out = os.path.join(WORK, version)
    os.makedirs(out, exist_ok=True)
    io, digests = {}, {}
    for i, name in enumerate(parts(version)):
        rng = np.random.default_rng(100 + i)
        model = build(name, version)
        model.set_weights([perturbed(tuple(w.shape), w.name, rng) for w in model.weights])
        model.save_weights(os.path.join(out, f"{name}.h5"))
        digests[name] = h5_digest(os.path.join(out, f"{name}.h5"))
        x = inputs(name, version, rng)
        io.update({f"{name}_in{j}": a for j, a in enumerate(x)})
        io[f"{name}_out"] = model.predict(x, verbose=0)
        print(f"  built {version} {name}: {model.count_params():,} params", flush=True)
        del model
    np.savez(os.path.join(out, "keras_io.npz"), **io)
    with open(os.path.join(out, "h5_digest.json"), "w") as f:
        json.dump(digests, f)


REVERSE_FILES = {"unet": "diffusion_model.h5", "text_encoder": "text_encoder.h5", "image_encoder": "image_encoder.h5", "decoder": "decoder.h5"}


def roundtrip():
    """diffusers -> keras (a): the round trip of our own conversion is bit-exact. KerasCV's files are
    gone by now (disk): their per-tensor digests (dtype, shape, sha256, in load order) stand in."""
    with open(os.path.join(WORK, "sd1", "h5_digest.json")) as f:
        digests = json.load(f)
    for name in parts("sd1"):
        a = digests[name]
        b = [tensor_digest(t) for t in h5_tensors(os.path.join(WORK, "sd1", "keras_back", REVERSE_FILES[name]))]
        same = len(a) == len(b) and a == b
        record_fact("round trip h5->st->h5", name, same, f"{len(a)} tensors bit-identical" if same else "tensors differ")


def reverse():
    """diffusers -> keras (b): models made by diffusers/transformers themselves, converted, run in
    keras_cv like they ran in torch."""
    io = np.load(os.path.join(WORK, "torch_sd1", "torch_io.npz"))
    for name in parts("sd1"):
        model = build(name, "sd1")
        model.load_weights(os.path.join(WORK, "torch_sd1_keras", REVERSE_FILES[name]))
        x = [io[k] for k in sorted(k for k in io.files if k.startswith(f"{name}_in"))]
        got = model.predict(x, verbose=0)
        if name == "unet":
            record("torch model -> keras_cv", "unet (tanh GEGLU)", io["unet_out_tanh"], got, 5e-5, "vs diffusers with KerasCV's tanh GEGLU")
            record("torch model -> keras_cv", name, io["unet_out"], got, 1e-3, "tanh vs exact GEGLU (perturbed weights)")
        else:
            record("torch model -> keras_cv", name, io[f"{name}_out"], got, 5e-5, "diffusers-made weights, loaded by keras_cv")
        del model


def k3save():
    """Keras 3 (keras_cv 0.9) loads KerasCV's legacy files and writes .weights.h5 for dreambridge."""
    out = os.path.join(WORK, "k3")
    os.makedirs(out, exist_ok=True)
    for name in parts("sd1"):
        model = build(name, "sd1")
        model.load_weights(os.path.join(WORK, "sd1", f"{name}.h5"))
        model.save_weights(os.path.join(out, f"{name}.weights.h5"))
        del model


def k3load():
    """Keras 3 (keras_cv 0.9) loads dreambridge's legacy .h5 and runs KerasCV's inputs to its outputs."""
    import keras

    io = np.load(os.path.join(WORK, "sd1", "keras_io.npz"))
    for name in parts("sd1"):
        x = [io[k] for k in sorted(k for k in io.files if k.startswith(f"{name}_in"))]
        theirs = build(name, "sd1")
        theirs.load_weights(os.path.join(WORK, "sd1", "keras_back", REVERSE_FILES[name]))
        record(f"keras {keras.__version__} loads ours", name, io[f"{name}_out"], theirs.predict(x, verbose=0), 5e-5, "dreambridge legacy .h5 in Keras 3")
        del theirs


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        make(sys.argv[2])
    elif cmd == "roundtrip":
        roundtrip()
    elif cmd == "reverse":
        reverse()
    elif cmd == "k3save":
        k3save()
    elif cmd == "k3load":
        k3load()
    elif cmd == "k3":
        k3save()
        k3load()
    else:
        sys.exit(f"unknown command {cmd}")
