"""Shared by both sides of the parity suite (plain numpy: imported by the Keras and torch venvs;
h5py and safetensors are imported where used)."""
import hashlib
import json
import logging
import os
import shutil
import subprocess

import numpy as np

WORK = os.environ.get("PARITY_WORK", os.path.join(os.path.dirname(os.path.abspath(__file__)), "work"))
KEEP = bool(os.environ.get("PARITY_KEEP"))  # keep every work file (debugging; needs far more disk)


def drop(*paths):
    """Removes work files no later check reads (files or folders), unless PARITY_KEEP is set. Drop
    references to tensors loaded from them first: safetensors maps files, and a deleted file that is
    still mapped keeps its disk space (and `du` no longer sees it)."""
    if KEEP:
        return
    for p in paths:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.lexists(p):
            os.remove(p)


def tensor_digest(a):
    """[dtype, shape, sha256 of the bytes]: equal digests mean equal dtype, shape and bits, so a file
    compared later can be deleted now."""
    a = np.asarray(a)
    flat = np.ascontiguousarray(a).reshape(-1)  # ascontiguousarray makes a scalar 1-d: the shape is a's
    return [str(a.dtype), list(a.shape), hashlib.sha256(flat.view(np.uint8)).hexdigest()]


def h5_tensors(path):
    """Every tensor of a legacy Keras .h5 file in layer_names / weight_names order (as Keras loads
    them), one at a time."""
    import h5py

    with h5py.File(path) as f:
        names = [n.decode() if isinstance(n, bytes) else n for n in f.attrs["layer_names"]]
        for n in names:
            for w in f[n].attrs["weight_names"]:
                yield f[n][w.decode() if isinstance(w, bytes) else w][()]


def h5_digest(path):
    return [tensor_digest(t) for t in h5_tensors(path)]


def st_digest(path):
    """{key: digest} of a safetensors file, read tensor by tensor (numpy copies: nothing stays mapped)."""
    from safetensors import safe_open

    with safe_open(path, framework="np") as f:
        return {k: tensor_digest(f.get_tensor(k)) for k in f.keys()}


def perturbed(shape, name, rng):
    """Kernels ~N(0, 1/fan_in), gammas 1+0.1N, betas/biases 0.05N, embeddings 0.5N: swapped
    gamma/beta or bias/kernel would be caught by the forward comparison."""
    n = rng.standard_normal(shape, dtype=np.float32)
    if "gamma" in name:
        return 1 + 0.1 * n
    if "beta" in name or "bias" in name:
        return 0.05 * n
    if "embeddings" in name:
        return 0.5 * n
    fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return n / np.float32(np.sqrt(fan_in))


def timestep_embedding(t, dim=320):
    """KerasCV's StableDiffusion._get_timestep_embedding: [cos, sin] with 10000^(-i/half)."""
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(0, half, dtype=np.float32) / half)
    args = np.array([t], dtype=np.float32) * freqs
    return np.concatenate([np.cos(args), np.sin(args)])[None, :].astype(np.float32)


def record(check, component, ref, got, tol, note=""):
    """Appends one comparison to work/results.jsonl and returns whether it passed."""
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    assert ref.shape == got.shape, f"{check}/{component}: shapes {ref.shape} vs {got.shape}"
    max_abs = float(np.max(np.abs(ref - got)))
    max_ref = float(np.max(np.abs(ref)))
    rel = max_abs / max_ref if max_ref else max_abs
    ok = bool(np.all(np.isfinite(got))) and rel <= tol
    row = dict(check=check, component=component, max_abs=max_abs, max_ref=max_ref, rel=rel, tol=tol, ok=ok, note=note)
    with open(os.path.join(WORK, "results.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"  {check:28s} {component:22s} rel {rel:.2e} (tol {tol:.0e}) {'PASS' if ok else 'FAIL'} {note}", flush=True)
    return ok


def record_fact(check, component, ok, note):
    """A yes/no check (strict loading, bit equality, a pipeline run)."""
    row = dict(check=check, component=component, max_abs=None, max_ref=None, rel=None, tol=None, ok=bool(ok), note=note)
    with open(os.path.join(WORK, "results.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"  {check:28s} {component:22s} {'PASS' if ok else 'FAIL'} {note}", flush=True)
    return bool(ok)


class LogWarnings(logging.Handler):
    """Collects what the named libraries log at WARNING and above (e.g. while a model loads)."""

    def __init__(self, *loggers):
        super().__init__(logging.WARNING)
        self.loggers = loggers
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        for name in self.loggers:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc):
        for name in self.loggers:
            logging.getLogger(name).removeHandler(self)

    def key_warnings(self):
        """The messages about weights that were missing, unexpected or unused."""
        words = ("missing", "unexpected", "not used", "not initialized", "newly initialized", "mismatch", "legacy")
        return [m for m in self.messages if any(w in m.lower() for w in words)]


def run_checked(args, env=None):
    """Runs a command (dreambridge, or a script in the other venv) and returns its CompletedProcess
    (text output captured); a non-zero exit raises, naming the command and the end of its stderr."""
    args = [str(a) for a in args]
    p = subprocess.run(args, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {p.returncode}: {p.stderr.strip()[-1500:]}")
    return p
