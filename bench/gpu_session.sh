#!/usr/bin/env bash
# The GPU benchmark run, for a machine with an NVIDIA GPU, its driver and the CUDA 13 runtime, and
# python3 with torch (cu13) — no Rust. Prepare on the build machine, then run there:
#
#   scripts/build-cuda.sh                  # -> dist/dreambridge-cuda-sm90.tar.xz
#   bench/gpu_session.sh --fetch-wheels    # -> .whl/: diffusers and what it needs beyond torch's image
#   # copy the repo (with dist/ and .whl/) to the GPU machine, then there:
#   bench/gpu_session.sh [--quick]         # results in $OUT (default bench/.cache/gpu)
#
# It runs the GPU correctness check, then dreambridge and diffusers on the same GPU: training steps
# (bf16, then with gradient checkpointing, then LoRA rank 4) and text-to-image (50 DDIM steps), printing the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1 peft==0.21.2 transformers==5.23.0 accelerate==1.15.0 importlib_metadata
    ls .whl
    exit 0
fi
STEPS=10 IMAGES=2
[ "${1:-}" = "--quick" ] && STEPS=3 IMAGES=1
OUT=${OUT:-bench/.cache/gpu}
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import diffusers" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
tar -C /tmp -xJf dist/dreambridge-cuda-sm*.tar.xz
DB=$(ls -d /tmp/dreambridge-cuda-sm*/dreambridge | head -n1)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
set -x
"$DB" bench gpu-check --device cuda --mixed-precision bf16 --json "$OUT/gpu_check.json"
"$DB" bench gpu-check --device cuda --mixed-precision bf16 --gradient-checkpointing --json "$OUT/gpu_check_gc.json"
export DREAMBRIDGE=$DB PYTHON=python3 OUT
bench/vs_diffusers.sh train --device cuda --mixed-precision bf16 --steps "$STEPS"
bench/vs_diffusers.sh train --device cuda --mixed-precision bf16 --steps "$STEPS" --gradient-checkpointing
bench/vs_diffusers.sh generate --device cuda --mixed-precision bf16 --images "$IMAGES"
# Last, and not fatal: diffusers' LoRA side needs peft (and transformers) importable there.
bench/vs_diffusers.sh train --device cuda --mixed-precision bf16 --steps "$STEPS" --lora-rank 4 || echo "LoRA comparison failed (is peft importable?)"
