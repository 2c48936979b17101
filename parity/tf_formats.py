"""KerasCV weights in TensorFlow's and Keras 3's other forms, at full size, against the .h5 path.

    tf_formats.py make     (Keras 2 venv)  full-size KerasCV TextEncoder and DiffusionModel, random
                           weights: .h5, TF checkpoint (save_weights without .h5), SavedModel
                           (huggingface_hub.save_pretrained_keras, what push_to_hub_keras uploads);
                           a textual-inversion TextEncoder (vocabulary 49409)
    tf_formats.py make3    (Keras 3 venv)  the same TextEncoder as a .keras archive
    tf_formats.py check    (torch venv)    dreambridge converts every form; each diffusers file equals
                           the .h5 conversion bit for bit and loads strictly in transformers/diffusers
                           with the same outputs; the textual-inversion pipeline's tokenizer maps the
                           placeholder to its new id and load_textual_inversion accepts our file.
                           Disk: each source and each conversion is deleted once compared, the text
                           encoder's forms before the UNet's (two 3.4 GB sources and one 3.4 GB
                           conversion are then all that is on disk); the UNet's .h5 conversion is kept
                           as per-tensor digests.
"""
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import WORK, drop, perturbed, record, record_fact, st_digest  # noqa: E402

OUT = os.path.join(WORK, "tf_formats")
DB = os.environ.get("DB", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "dreambridge"))


def make():
    from huggingface_hub import save_pretrained_keras
    from keras_cv.src.models.stable_diffusion.diffusion_model import DiffusionModel
    from keras_cv.src.models.stable_diffusion.text_encoder import TextEncoder

    os.makedirs(OUT, exist_ok=True)
    for i, (name, model) in enumerate([("text_encoder", TextEncoder(77, download_weights=False)), ("unet", DiffusionModel(64, 64, 77, download_weights=False))]):
        rng = np.random.default_rng(200 + i)
        model.set_weights([perturbed(tuple(w.shape), w.name, rng) for w in model.weights])
        model.save_weights(os.path.join(OUT, f"{name}.h5"))
        model.save_weights(os.path.join(OUT, f"{name}_ckpt", "ckpt"))
        if name == "text_encoder":
            save_pretrained_keras(model, os.path.join(OUT, "text_encoder_savedmodel"))
    ti = TextEncoder(77, vocab_size=49409, download_weights=False)
    rng = np.random.default_rng(300)
    ti.set_weights([perturbed(tuple(w.shape), w.name, rng) for w in ti.weights])
    ti.save_weights(os.path.join(OUT, "text_encoder_ti.h5"))
    print("made", sorted(os.listdir(OUT)))


def make3():
    from keras_cv.src.models.stable_diffusion.text_encoder import CLIPEncoderLayer, TextEncoder

    # KerasCV's CLIPEncoderLayer takes its activation as a function, which Keras cannot serialize.
    CLIPEncoderLayer.get_config = lambda self: {"name": self.name, "embed_dim": self.clip_attn.embed_dim, "num_heads": self.clip_attn.num_heads}
    model = TextEncoder(77, download_weights=False)
    model.load_weights(os.path.join(OUT, "text_encoder.h5"))  # Keras 3 reads the legacy file
    model.save(os.path.join(OUT, "text_encoder.keras"))
    print("made text_encoder.keras")


def fact(check, component, ok, note):
    record_fact(check, component, ok, note)
    return bool(ok)


def db(*args):
    r = subprocess.run([DB, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"dreambridge {' '.join(args)}: {r.stderr.strip().splitlines()[-1]}")


def check():
    import gc
    import shutil

    import torch
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer

    conv = os.path.join(OUT, "converted")
    shutil.rmtree(conv, ignore_errors=True)
    ok = True
    # The text encoder's forms (0.5 GB each) first, the textual inversion, then the UNet's.
    text_forms = [("h5", "text_encoder.h5"), ("TF checkpoint", "text_encoder_ckpt"), ("SavedModel", "text_encoder_savedmodel"), (".keras", "text_encoder.keras")]
    ref, ref_dir = None, None
    for label, path in text_forms:
        src = os.path.join(OUT, path)
        if not os.path.exists(src):
            ok &= fact(f"{label} -> diffusers", "text_encoder", False, f"{path} missing (run make / make3)")
            continue
        out = os.path.join(conv, f"text_encoder-{label.replace(' ', '_').strip('.')}")
        db("convert", "keras-to-diffusers", "--text-encoder", src, "--out", out)
        drop(src)
        got = load_file(os.path.join(out, "text_encoder/model.safetensors"))
        if ref is None:
            ref, ref_dir = got, out
            continue
        same = ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
        ok &= fact(f"{label} -> diffusers", "text_encoder", same, f"{len(got)} tensors bit-identical to the .h5 conversion")
        a, b = CLIPTextModel.from_pretrained(ref_dir, subfolder="text_encoder"), CLIPTextModel.from_pretrained(out, subfolder="text_encoder")
        ids = torch.tensor([[49406, 320, 1125, 539, 48136, 1929, 49407] + [49407] * 70])
        with torch.no_grad():
            ok &= record(f"{label} strict load + forward", "text_encoder", a(ids).last_hidden_state.numpy(), b(ids).last_hidden_state.numpy(), 0.0)
        del a, b, got
        drop(out)
    del ref
    # Textual inversion.
    ti = os.path.join(conv, "ti")
    embeds = os.path.join(conv, "sks_embeds.safetensors")
    db("convert", "keras-to-diffusers", "--text-encoder", os.path.join(OUT, "text_encoder_ti.h5"), "--placeholder-token", "<sks-toy>", "--learned-embeds", embeds, "--out", ti)
    tok = CLIPTokenizer.from_pretrained(ti, subfolder="tokenizer")
    ids = tok("a photo of <sks-toy>").input_ids
    ok &= fact("TI tokenizer", "placeholder", 49408 in ids and tok.convert_tokens_to_ids("<sks-toy>") == 49408, f"ids {ids}")
    te = CLIPTextModel.from_pretrained(ti, subfolder="text_encoder")
    row = te.get_input_embeddings().weight[49408].detach().clone()
    learned = load_file(embeds)
    ok &= fact("TI learned embeds", "file", list(learned) == ["<sks-toy>"] and torch.equal(learned["<sks-toy>"], row), "{token: [768]} equals the converted row")
    # diffusers' load_textual_inversion on a tokenizer/text encoder without the token.
    from diffusers import StableDiffusionPipeline

    base = os.path.join(conv, "text_encoder-h5")
    plain_tok = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    plain_te = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    sample = os.path.join(WORK, "sample")
    if not os.path.exists(os.path.join(sample, "model_index.json")):
        db("convert", "keras-to-diffusers", "--out", sample)
    pipe = StableDiffusionPipeline.from_pretrained(sample, safety_checker=None)
    pipe.load_textual_inversion(embeds, token="<sks-toy>", tokenizer=plain_tok, text_encoder=plain_te)
    new_id = plain_tok.convert_tokens_to_ids("<sks-toy>")
    loaded = plain_te.get_input_embeddings().weight[new_id].detach()
    ok &= fact("load_textual_inversion", "learned embeds", new_id == 49408 and torch.equal(loaded, row), f"token id {new_id}, row equal")
    del te, learned, plain_te, pipe, loaded
    gc.collect()  # nothing may still map a file that is deleted now (its space would stay in use)
    drop(conv, os.path.join(OUT, "text_encoder_ti.h5"))
    # The UNet: its .h5 conversion is kept as digests (dtype, shape, sha256 per tensor), so that at
    # most two 3.4 GB sources and one conversion are on disk at a time.
    ref = None
    for label, path in [("h5", "unet.h5"), ("TF checkpoint", "unet_ckpt/ckpt.index")]:
        src = os.path.join(OUT, path)
        if not os.path.exists(src):
            ok &= fact(f"{label} -> diffusers", "unet", False, f"{path} missing (run make / make3)")
            continue
        out = os.path.join(conv, f"unet-{label.replace(' ', '_').strip('.')}")
        db("convert", "keras-to-diffusers", "--unet", src, "--out", out)
        drop(os.path.join(OUT, path.split("/")[0]))
        got = st_digest(os.path.join(out, "unet/diffusion_pytorch_model.safetensors"))
        drop(out)
        if ref is None:
            ref = got
            continue
        same = ref.keys() == got.keys() and all(ref[k] == got[k] for k in ref)
        ok &= fact(f"{label} -> diffusers", "unet", same, f"{len(got)} tensors bit-identical to the .h5 conversion")
    print(f"\ntf formats parity: {'all pass' if ok else 'FAILURES'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    {"make": make, "make3": make3, "check": check}[sys.argv[1]]()
