#!/usr/bin/env bash
# The GPU benchmark run, for a machine with an NVIDIA GPU, its driver and the CUDA 13 runtime, and
# python3 with torch (cu13) — no Rust. Prepare on the build machine, then run there:
#
#   scripts/build-cuda.sh --nccl           # -> dist/dreambridge-cuda-sm90.tar.xz
#   bench/gpu_session.sh --fetch-wheels    # -> .whl/: diffusers and what it needs beyond torch's image
#   # copy the repo (with dist/ and .whl/) to the GPU machine, then there:
#   bench/gpu_session.sh [--quick]         # results in $OUT (default bench/.cache/gpu)
#   bench/gpu_session.sh --cpu-dry-run     # the same stages with the CPU build at 64 px, here
#
# Each stage has its own folder under $OUT (log, exit status, JSON) written as soon as it ends and a
# time bound, so a stage that fails or runs out of time loses nothing before it; $OUT/gpu.json
# gathers the keys of bench/results/gpu.json from the stages that finished.
# It runs the GPU correctness check, then the speed switches (the GPU check with them on, and each
# timed off and on in one process), the kernel profile of one UNet call and one training step
# (bench/gpu_profile.sh, switches off and on), then dreambridge and diffusers on the same GPU:
# training steps (bf16, then with gradient checkpointing, then LoRA rank 4) and text-to-image (50
# DDIM steps), printing the ratios. ONLY="stage ..." picks stages when the lease is short.
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
STEPS=10 IMAGES=2 DEVICE=cuda DTYPE=bf16 SIZE=() MODE=gpu SCALE=1
case "${1:-}" in
    --quick) STEPS=3 IMAGES=1 ;;
    # The whole script on the CPU binary at tiny sizes, so that no script bug costs GPU time.
    # (SD 1.5 shapes on 2 CPU cores: the time bounds stretch 8x.)
    --cpu-dry-run) STEPS=1 IMAGES=1 DEVICE=cpu DTYPE=no SIZE=(--resolution 64) MODE=cpu SCALE=8 ;;
esac
OUT=${OUT:-bench/.cache/gpu}
mkdir -p "$OUT"
if [ "$MODE" = cpu ]; then
    cargo build --release -q
    DB=target/release/dreambridge
    PY=${PYTHON:-parity/.venv-torch/bin/python}
    echo "cpu dry run (no GPU)" > "$OUT/gpu.txt"
else
    if [ -d .whl ] && ! python3 -c "import diffusers" 2>/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    tar -C /tmp -xJf dist/dreambridge-cuda-sm*.tar.xz
    DB=$(ls -d /tmp/dreambridge-cuda-sm*/dreambridge | head -n1)
    PY=python3
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
fi
"$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)" | tee "$OUT/versions.txt"
export DREAMBRIDGE=$DB PYTHON=$PY

# One stage: its own folder under $OUT, a wall-clock bound, its log and status kept whatever
# happens to later stages.
# ONLY="stage ..." runs just those stages (the GPU check always runs), for a short device lease.
stage() { # name, seconds, command...
    local name=$1 limit=$(($2 * SCALE)); shift 2
    if [ -n "${ONLY:-}" ] && [[ $name != gpu_check* ]] && [[ " $ONLY " != *" $name "* ]]; then
        echo "== $name: skipped (ONLY=$ONLY)"
        return 0
    fi
    mkdir -p "$OUT/$name"
    echo "== $name (at most ${limit}s): $*"
    local rc=0
    OUT="$OUT/$name" timeout --kill-after=10 "$limit" "$@" > "$OUT/$name/log.txt" 2>&1 || rc=$?
    echo "$rc" > "$OUT/$name/rc"
    tail -n 12 "$OUT/$name/log.txt"
    [ "$rc" = 0 ] || echo "!! $name failed (rc $rc; 124 = out of time)"
    return 0
}
stage gpu_check 90 sh -c '"$0" bench gpu-check --device "$1" --mixed-precision "$2" --json "$OUT/checks.json"' "$DB" "$DEVICE" "$DTYPE"
stage gpu_check_gc 90 sh -c '"$0" bench gpu-check --device "$1" --mixed-precision "$2" --gradient-checkpointing --json "$OUT/checks.json"' "$DB" "$DEVICE" "$DTYPE"
# NCCL at world size 1 (the binary of scripts/build-cuda.sh --nccl; tcp on the CPU dry run).
if [ "$MODE" = cpu ]; then
    stage nccl_smoke 60 bench/nccl_smoke.sh --device cpu --backend tcp
else
    stage nccl_smoke 60 bench/nccl_smoke.sh --device "$DEVICE" --backend nccl
fi
if [ "$(cat "$OUT/gpu_check/rc")" = 0 ] && [ "$(cat "$OUT/gpu_check_gc/rc")" = 0 ]; then
    # The speed switches (src/switches.rs), each timed off and on in alternation in one process.
    # A switch is turned on by default only after the GPU check has passed with it on.
    stage check_switches_on 120 env DREAMBRIDGE_CAST_WEIGHTS_ONCE=1 DREAMBRIDGE_CUDA_KEEP_POOL=1 sh -c '"$0" bench gpu-check --device "$1" --mixed-precision "$2" --json "$OUT/checks.json"' "$DB" "$DEVICE" "$DTYPE"
    stage switch_cast_weights_once 150 "$DB" bench generate --device "$DEVICE" --mixed-precision "$DTYPE" --steps 20 --images 2 --warmup 1 "${SIZE[@]}" --compare cast-weights-once --json "$OUT/switch_cast_weights_once/generate.json"
    stage switch_keep_pool_memory 120 "$DB" bench train --device "$DEVICE" --mixed-precision "$DTYPE" --steps 4 --warmup 2 --skip-check "${SIZE[@]}" --compare keep-pool-memory --json "$OUT/switch_keep_pool_memory/train.json"
    # Kernel time against wall time of one UNet call and one training step (Nsight Compute),
    # with the switches off, then on.
    if [ "$MODE" = cpu ]; then
        echo "== profile, profile_switches_on: skipped on the CPU (Nsight Compute needs a GPU)"
    else
        stage profile 240 bench/gpu_profile.sh "$OUT/profile" switches-off
        stage profile_switches_on 240 env DREAMBRIDGE_CAST_WEIGHTS_ONCE=1 DREAMBRIDGE_CUDA_KEEP_POOL=1 bench/gpu_profile.sh "$OUT/profile_switches_on" switches-on
    fi
    stage train 150 bench/vs_diffusers.sh train --device "$DEVICE" --mixed-precision "$DTYPE" --steps "$STEPS" "${SIZE[@]}"
    stage train_gc 150 bench/vs_diffusers.sh train --device "$DEVICE" --mixed-precision "$DTYPE" --steps "$STEPS" --gradient-checkpointing "${SIZE[@]}"
    stage generate 120 bench/vs_diffusers.sh generate --device "$DEVICE" --mixed-precision "$DTYPE" --images "$IMAGES" "${SIZE[@]}"
    # diffusers' LoRA side needs peft (and transformers) importable there.
    stage train_lora 100 bench/vs_diffusers.sh train --device "$DEVICE" --mixed-precision "$DTYPE" --steps "$STEPS" --lora-rank 4 "${SIZE[@]}"
else
    echo "!! the GPU check failed: nothing is timed"
fi
# bench/results/gpu.json's keys from whatever stages finished.
"$PY" - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
def pair(stage, what):
    files = {side: sorted(glob.glob(f"{out}/{stage}/{what}-{side}-*.json")) for side in ("dreambridge", "diffusers")}
    if not all(files.values()):
        return None
    return {side: json.load(open(f[-1]))[what] for side, f in files.items()}
def checks(stage):
    path = f"{out}/{stage}/checks.json"
    return json.load(open(path)) if os.path.exists(path) else None
res = {"gpu": open(f"{out}/gpu.txt").read().strip(), "versions": open(f"{out}/versions.txt").read().strip()}
found = [c for s in ("gpu_check", "gpu_check_gc") for c in (checks(s) or [])]
res["gpu_check_ok"] = bool(found) and all(c["passed"] for c in found) and all(checks(s) for s in ("gpu_check", "gpu_check_gc"))
res["gpu_check"] = found
for key, stage, what, field, scale in [
    ("train_ms", "train", "train", "step", None), ("train_peak_gib", "train", "train", None, 2**30),
    ("train_gc_ms", "train_gc", "train", "step", None), ("train_gc_peak_gib", "train_gc", "train", None, 2**30),
    ("generate_s", "generate", "generate", "image", 1e3), ("generate_peak_gib", "generate", "generate", None, 2**30),
    ("train_lora_ms", "train_lora", "train", "step", None), ("train_lora_peak_gib", "train_lora", "train", None, 2**30),
]:
    p = pair(stage, what)
    if p is None:
        res[key] = None
    elif field:
        res[key] = {side: r[field]["median_ms"] / (scale or 1) for side, r in p.items()}
    else:
        res[key] = {side: r["peak_memory_bytes"] / scale for side, r in p.items()}
def compare(stage, what):
    path = f"{out}/{stage}/{what}.json"
    return json.load(open(path))[what].get("compare") if os.path.exists(path) else None
res["switches"] = {s: compare(s, w) for s, w in (("switch_cast_weights_once", "generate"), ("switch_keep_pool_memory", "train"))}
res["switches_gpu_check"] = checks("check_switches_on")
res["profile"] = {s: json.load(open(f"{out}/{s}/phases.json")) for s in ("profile", "profile_switches_on") if os.path.exists(f"{out}/{s}/phases.json")}
res["nccl_smoke"] = json.load(open(f"{out}/nccl_smoke/nccl.json")) if os.path.exists(f"{out}/nccl_smoke/nccl.json") else None
res["stages"] = {s: open(f"{out}/{s}/rc").read().strip() for s in sorted(os.listdir(out)) if os.path.exists(f"{out}/{s}/rc")}
json.dump(res, open(f"{out}/gpu.json", "w"), indent=2)
print(json.dumps({k: v for k, v in res.items() if k != "gpu_check"}, indent=2))
PY
