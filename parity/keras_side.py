"""The KerasCV side of the parity suite (runs in the Keras 2 venv, and `k3` in the Keras 3 venv).

    keras_side.py make sd1|sd2     build real KerasCV models, random weights, save .h5 + outputs
    keras_side.py reverse          load dreambridge-written .h5 files into keras_cv and compare
    keras_side.py k3               Keras 3: save .weights.h5 from the legacy files, load ours back
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import h5py  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import WORK, perturbed, record, record_fact, timestep_embedding  # noqa: E402
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
    io = {}
    for i, name in enumerate(parts(version)):
        rng = np.random.default_rng(100 + i)
        model = build(name, version)
        model.set_weights([perturbed(tuple(w.shape), w.name, rng) for w in model.weights])
        model.save_weights(os.path.join(out, f"{name}.h5"))
        x = inputs(name, version, rng)
        io.update({f"{name}_in{j}": a for j, a in enumerate(x)})
        io[f"{name}_out"] = model.predict(x, verbose=0)
        print(f"  built {version} {name}: {model.count_params():,} params", flush=True)
        del model
    np.savez(os.path.join(out, "keras_io.npz"), **io)


def h5_tensors(path):
    """Every tensor of a legacy file in layer_names / weight_names order (as Keras loads them)."""
    with h5py.File(path) as f:
        names = [n.decode() if isinstance(n, bytes) else n for n in f.attrs["layer_names"]]
        out = []
        for n in names:
            for w in f[n].attrs["weight_names"]:
                out.append(f[n][w.decode() if isinstance(w, bytes) else w][()])
        return out


REVERSE_FILES = {"unet": "diffusion_model.h5", "text_encoder": "text_encoder.h5", "image_encoder": "image_encoder.h5", "decoder": "decoder.h5"}


def reverse():
    """diffusers -> keras: (a) the round trip of our own conversion is bit-exact; (b) models made
    by diffusers/transformers themselves, converted, run in keras_cv like they ran in torch."""
    for name in parts("sd1"):
        a = h5_tensors(os.path.join(WORK, "sd1", f"{name}.h5"))
        b = h5_tensors(os.path.join(WORK, "sd1", "keras_back", REVERSE_FILES[name]))
        same = len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))
        record_fact("round trip h5->st->h5", name, same, f"{len(a)} tensors bit-identical" if same else "tensors differ")
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


def k3():
    """Keras 3 (keras_cv 0.9): writes .weights.h5 for dreambridge, and loads dreambridge's legacy .h5."""
    import keras

    out = os.path.join(WORK, "k3")
    os.makedirs(out, exist_ok=True)
    io = np.load(os.path.join(WORK, "sd1", "keras_io.npz"))
    for name in parts("sd1"):
        x = [io[k] for k in sorted(k for k in io.files if k.startswith(f"{name}_in"))]
        model = build(name, "sd1")
        model.load_weights(os.path.join(WORK, "sd1", f"{name}.h5"))
        model.save_weights(os.path.join(out, f"{name}.weights.h5"))
        theirs = build(name, "sd1")
        theirs.load_weights(os.path.join(WORK, "sd1", "keras_back", REVERSE_FILES[name]))
        record(f"keras {keras.__version__} loads ours", name, io[f"{name}_out"], theirs.predict(x, verbose=0), 5e-5, "dreambridge legacy .h5 in Keras 3")
        del model, theirs


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        make(sys.argv[2])
    elif cmd == "reverse":
        reverse()
    elif cmd == "k3":
        k3()
    else:
        sys.exit(f"unknown command {cmd}")
