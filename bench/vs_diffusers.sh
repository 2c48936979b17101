#!/usr/bin/env bash
# Benchmark (not a test): dreambridge and PyTorch diffusers doing the same work on the same device
# in one run, and the ratios.
#
#   bench/vs_diffusers.sh train    [flags]   # SD 1.5 UNet training steps (instance + class, AdamW)
#   bench/vs_diffusers.sh generate [flags]   # text-to-image, 50 DDIM steps
#
# Flags go to both sides: --device cpu|cuda, --resolution N, --steps N, --warmup N,
# --mixed-precision no|fp16|bf16, --gradient-checkpointing, --allow-tf32 (train), --images N (generate).
# DREAMBRIDGE: the binary (default target/release/dreambridge, built if missing; on the GPU machine
# the launcher from scripts/build-cuda.sh). PYTHON: a python with torch + diffusers (default
# parity/.venv-torch/bin/python, else python3). Results: $OUT (default bench/.cache/results).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: $0 train|generate [flags]}; shift
DB=${DREAMBRIDGE:-target/release/dreambridge}
if [ -z "${DREAMBRIDGE:-}" ] && [ ! -x "$DB" ]; then cargo build --release -q; fi
PY=${PYTHON:-$( [ -x parity/.venv-torch/bin/python ] && echo parity/.venv-torch/bin/python || echo python3 )}
OUT=${OUT:-bench/.cache/results}
mkdir -p "$OUT"
stamp=$(date +%Y%m%d-%H%M%S)
ours="$OUT/$what-dreambridge-$stamp.json"
theirs="$OUT/$what-diffusers-$stamp.json"

echo "== dreambridge bench $what $*"
"$DB" bench "$what" --json "$ours" "$@"
echo "== diffusers ($PY) $what $*"
PYTHONWARNINGS=ignore "$PY" bench/diffusers_bench.py "$what" --json "$theirs" "$@"
"$PY" - "$what" "$ours" "$theirs" <<'PY'
import json, subprocess, sys
what, ours, theirs = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
a, b = ours[what], theirs[what]
key = "step" if what == "train" else "image"
rows = [(f"{key} time, median (ms)", a[key]["median_ms"], b[key]["median_ms"]),
        (f"{key} time, mean (ms)", a[key]["mean_ms"], b[key]["mean_ms"]),
        ("peak memory (GiB)", a["peak_memory_bytes"] / 2**30, b["peak_memory_bytes"] / 2**30)]
rows.append(("images/s", a["images_per_s"], b["images_per_s"]) if what == "train" else ("UNet steps/s", a["unet_steps_per_s"], b["unet_steps_per_s"]))
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except OSError:
    gpu = ""
print(f"\n{what}: {a['device']} {a['compute_dtype']} {a['resolution']}px; {gpu or 'no GPU'}; diffusers {theirs['versions']['diffusers']}, torch {theirs['versions']['torch']}")
print(f"{'':34}{'dreambridge':>14}{'diffusers':>14}{'ratio':>10}")
for name, x, y in rows:
    print(f"{name:34}{x:14.2f}{y:14.2f}{x / y:10.2f}")
print("(ratio = dreambridge / diffusers: below 1 is faster or smaller, except images/s and steps/s where above 1 is faster)")
for c in ours.get("gpu_check", []):
    print(f"gpu check {c['compute_dtype']}: worst gradient rel L2 {c['worst_grad_rel_l2']:.1e}, loss rel {c['loss_rel_diff']:.1e}: {'PASS' if c['passed'] else 'FAIL'}")
PY
