#!/usr/bin/env bash
# The NCCL smoke test for a machine with one GPU (a 2-rank NCCL run needs two GPUs): the binary
# from `scripts/build-cuda.sh --nccl` trains the embedded tiny sample for 3 steps twice, once alone
# and once as rank 0 of a world of 1 through `--dist-backend nccl` (libnccl loads, rank 0 makes the
# NCCL id and hands it over its TCP rendezvous, ncclCommInitRank, one ncclAllReduce per step in
# device memory). Summing over one rank is exact, so the two UNets must be bit-identical.
#
#   bench/nccl_smoke.sh [--device cuda] [--backend nccl]     (DREAMBRIDGE: the binary)
#   bench/nccl_smoke.sh --device cpu --backend tcp           (the same script on the CPU build)
#
# Writes $OUT/nccl.json: {"backend", "device", "identical", "max_abs_diff", "seconds_alone", "seconds_ranked"}.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda BACKEND=nccl
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift ;;
        --backend) BACKEND=$2; shift ;;
        *) echo "usage: $0 [--device D] [--backend nccl|tcp]" >&2; exit 2 ;;
    esac
    shift
done
DB=${DREAMBRIDGE:-target/release/dreambridge}
PY=${PYTHON:-python3}
OUT=${OUT:-bench/.cache/nccl}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
mkdir -p "$OUT"
"$DB" convert keras-to-diffusers --out "$W/sample"
"$DB" generate --model "$W/sample" --prompt "a dog" --steps 2 --size 64 --num-images 2 --device "$DEVICE" --out "$W/instance"
train() { # output, extra flags...
    local out=$1; shift
    "$DB" train --pretrained_model_name_or_path "$W/sample" --instance_data_dir "$W/instance" \
        --instance_prompt "a photo of sks dog" --resolution 64 --train_batch_size 1 --max_train_steps 3 \
        --learning_rate 1e-3 --lr_warmup_steps 0 --report_to none --seed 1 --device "$DEVICE" --output_dir "$out" "$@"
}
t0=$(date +%s.%N)
train "$W/alone"
t1=$(date +%s.%N)
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 \
    train "$W/ranked" --dist-backend "$BACKEND" --dist-port "${DIST_PORT:-29611}" 2>&1 | tee "$W/ranked.log"
t2=$(date +%s.%N)
grep -q "rank 0 of 1: joining" "$W/ranked.log" || { echo "the ranked run did not join a collective" >&2; exit 1; }
"$PY" - "$W" "$OUT/nccl.json" "$BACKEND" "$DEVICE" "$t0" "$t1" "$t2" <<'PY'
import json, struct, sys
w, out, backend, device, t0, t1, t2 = sys.argv[1:]
alone_s, ranked_s = float(t1) - float(t0), float(t2) - float(t1)

def tensors(path):  # safetensors without the package: 8-byte header length, JSON header, data
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    body = raw[8 + n:]
    return {k: body[v["data_offsets"][0]:v["data_offsets"][1]] for k, v in header.items() if k != "__metadata__"}

a = tensors(f"{w}/alone/unet/diffusion_pytorch_model.safetensors")
b = tensors(f"{w}/ranked/unet/diffusion_pytorch_model.safetensors")
assert a.keys() == b.keys()
diff = 0.0
for k in a:
    xs, ys = struct.unpack(f"<{len(a[k]) // 4}f", a[k]), struct.unpack(f"<{len(b[k]) // 4}f", b[k])
    diff = max(diff, max(abs(x - y) for x, y in zip(xs, ys)))
result = {"backend": backend, "device": device, "identical": diff == 0.0, "max_abs_diff": diff,
          "seconds_alone": round(alone_s, 2), "seconds_ranked": round(ranked_s, 2)}
json.dump(result, open(out, "w"), indent=1)
print(json.dumps(result))
sys.exit(0 if diff == 0.0 else 1)
PY
