#!/usr/bin/env bash
# Benchmark (not a test): Stable Diffusion 3 medium at full size, diffusers <-> KerasHub preset,
# against a durable copy of the same bytes, side by side.
#
#   bench/convert_sd3.sh [PAIRS]   (default 3 alternating pairs per case)
#
# The input is a full-size SD3-medium-shaped diffusers folder (SD3Transformer2DModel with 24 blocks
# of width 1536, CLIP-L, OpenCLIP-G, the 16-channel VAE; no T5, as KerasHub's presets) in float16
# as Stability ships SD3 medium, random weights, made once with diffusers/transformers' own classes
# (on the meta device, then filled tensor by tensor) in parity/.venv-torch and cached in
# bench/.cache/sd3/ (5.6 GB). Its KerasHub preset (the reverse case's input) is made from it by
# dreambridge once per run, not timed.
#
# Cases: diffusers -> KerasHub preset, KerasHub preset -> diffusers, KerasHub preset ->
# diffusers --half. Each runs PAIRS times a durable copy of the case's input files (cp + sync) and
# the conversion, alternating which goes first, each from the same state (nothing dirty, page
# cache dropped where allowed, the inputs read back in). The table shows each side's minimum,
# median and maximum, the ratios of medians and of minimums, and dreambridge's peak RSS against the
# largest input file (target: at most a tenth of it).
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=${1:-3}
CACHE=bench/.cache/sd3
mkdir -p "$CACHE"
SRC="$CACHE/diffusers"
if [ ! -f "$SRC/model_index.json" ]; then
    echo "== making a full-size SD3-medium-shaped diffusers folder (random float16) in $SRC"
    rm -rf "$SRC.part"
    parity/.venv-torch/bin/python - "$SRC.part" <<'PY'
import json, os, sys
import numpy as np, torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, SD3Transformer2DModel
from safetensors.numpy import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

out = sys.argv[1]
rng = np.random.default_rng(0)

def save(model, folder, file, config):
    os.makedirs(os.path.join(out, folder), exist_ok=True)
    tensors = {}
    for k, v in model.state_dict().items():
        tensors[k] = (rng.standard_normal(tuple(v.shape), dtype=np.float32) * 0.02).astype(np.float16)
    save_file(tensors, os.path.join(out, folder, file), metadata={"format": "pt"})
    with open(os.path.join(out, folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    print(folder, sum(t.size for t in tensors.values()), "parameters", flush=True)

t_cfg = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
             joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
with init_empty_weights():
    m = SD3Transformer2DModel(**t_cfg)
save(m, "transformer", "diffusion_pytorch_model.safetensors", {"_class_name": "SD3Transformer2DModel", **t_cfg})
for folder, cfg in [
    ("text_encoder", dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")),
    ("text_encoder_2", dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280, hidden_act="gelu")),
]:
    config = CLIPTextConfig(**cfg, max_position_embeddings=77, torch_dtype="float16")
    with init_empty_weights():
        m = CLIPTextModelWithProjection(config)
    save(m, folder, "model.safetensors", {**config.to_dict(), "architectures": ["CLIPTextModelWithProjection"]})
v_cfg = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
             block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
             scaling_factor=1.5305, shift_factor=0.0609, sample_size=1024)
with init_empty_weights():
    m = AutoencoderKL(**v_cfg)
save(m, "vae", "diffusion_pytorch_model.safetensors", {"_class_name": "AutoencoderKL", **v_cfg})
os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}, f)
with open(os.path.join(out, "model_index.json"), "w") as f:
    json.dump({"_class_name": "StableDiffusion3Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
               "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
               "text_encoder_3": [None, None], "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
               "tokenizer_3": [None, None], "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}, f)
PY
    mv "$SRC.part" "$SRC"
fi
command -v /usr/bin/time >/dev/null || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
cargo build --release -q
DB=${DREAMBRIDGE_BIN:-target/release/dreambridge}
TMP=$(mktemp -d "$CACHE/run.XXXX")
trap 'rm -rf "$TMP"' EXIT
$DB convert diffusers-to-keras --model "$SRC" --out "$TMP/preset" > /dev/null

measure() { # -> "seconds max_rss_kb" of the command; its stderr goes to $TMP/err
    /usr/bin/time -f "%e %M" -o "$TMP/time" "$@" > /dev/null 2> "$TMP/err"
    cat "$TMP/time"
}
durable_copy() {
    mkdir -p "$TMP/copy"
    for f in "$@"; do cp "$f" "$TMP/copy/$(echo "$f" | tr / _)"; done
    sync "$TMP"/copy/*
}
CAN_DROP=1
sync
echo 3 > /proc/sys/vm/drop_caches 2> /dev/null || { CAN_DROP=0; echo "note: cannot drop the page cache here; runs start from whatever it holds"; }
fresh_start() {
    sync
    if [ "$CAN_DROP" = 1 ]; then echo 3 > /proc/sys/vm/drop_caches; fi
    cat "$@" > /dev/null
}
stats() { sort -g | awk '{ v[NR] = $1 } END { printf "%s %s %s\n", v[1], v[int((NR + 1) / 2)], v[NR] }'; }
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"

ROWS=()
run_case() { # label, output, "input files", dreambridge args...
    local label=$1 out=$2 inputs=$3
    shift 3
    local bytes largest
    bytes=$(stat -c %s $inputs | awk '{ s += $1 } END { print s }')
    largest=$(stat -c %s $inputs | sort -g | tail -1)
    : > "$TMP/cp.txt"
    : > "$TMP/db.txt"
    for i in $(seq "$PAIRS"); do
        for who in $( [ $((i % 2)) = 1 ] && echo "cp db" || echo "db cp"); do
            fresh_start $inputs
            if [ "$who" = cp ]; then
                export -f durable_copy
                measure bash -c 'TMP=$0; durable_copy "$@"' "$TMP" $inputs >> "$TMP/cp.txt"
                rm -rf "$TMP/copy"
            else
                measure $DB convert "$@" --out "$out" >> "$TMP/db.txt"
                rm -rf "$out"
            fi
        done
    done
    local c d dk
    read -r -a c < <(cut -d' ' -f1 "$TMP/cp.txt" | stats)
    read -r -a d < <(cut -d' ' -f1 "$TMP/db.txt" | stats)
    dk=$(cut -d' ' -f2 "$TMP/db.txt" | sort -g | tail -1)
    ROWS+=("$(awk -v l="$label" -v b="$bytes" -v c0="${c[0]}" -v c1="${c[1]}" -v c2="${c[2]}" -v d0="${d[0]}" -v d1="${d[1]}" -v d2="${d[2]}" -v dk="$dk" -v lg="$largest" 'BEGIN {
        printf "%-32s %6.2f %5.1f %6.1f %6.1f %7.1f %6.1f %6.1f %7.2f %7.2f %7.0f %5.1f%%", l, b / 1e9, c0, c1, c2, d0, d1, d2, d1 / c1, d0 / c0, dk / 1024, 100 * dk * 1024 / lg
    }')")
    ROWS+=("$(printf '%-32s cp: %s  dreambridge: %s' '' "$(cut -d' ' -f1 "$TMP/cp.txt" | tr '\n' ' ')" "$(cut -d' ' -f1 "$TMP/db.txt" | tr '\n' ' ')")")
}

SRC_FILES=$(ls "$SRC"/*/*.safetensors | tr '\n' ' ')
run_case "diffusers -> KerasHub preset" "$TMP/o" "$SRC_FILES" diffusers-to-keras --model "$SRC"
run_case "KerasHub preset -> diffusers" "$TMP/o" "$TMP/preset/model.weights.h5" keras-to-diffusers --preset "$TMP/preset"
run_case "KerasHub preset -> diffusers --half" "$TMP/o" "$TMP/preset/model.weights.h5" keras-to-diffusers --half --preset "$TMP/preset"

echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
printf "\n%-32s %6s %20s %22s %15s %7s %6s\n" "$PAIRS alternating pairs" "GB in" "cp + sync (s)" "dreambridge (s)" "ratio of" "peak" "of"
printf "%-32s %6s %5s %6s %6s %7s %6s %6s %7s %7s %7s %6s\n" "" "" "min" "median" "max" "min" "median" "max" "medians" "minimums" "RSS MB" "largest"
for r in "${ROWS[@]}"; do echo "$r"; done
echo
echo "peak RSS: the largest of the runs, against the case's largest input file (target: at most 10 %)."
