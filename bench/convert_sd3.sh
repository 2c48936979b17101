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
RSS_OF=largest
. bench/lib.sh
need_time
cargo build --release -q
DB=${DREAMBRIDGE_BIN:-target/release/dreambridge}
TMP=$(mktemp -d "$CACHE/run.XXXX")
trap 'rm -rf "$TMP"' EXIT
$DB convert diffusers-to-keras --model "$SRC" --out "$TMP/preset" > /dev/null

can_drop_caches
echo "load average before: $(load_average)"

SRC_FILES=$(ls "$SRC"/*/*.safetensors | tr '\n' ' ')
run_case "diffusers -> KerasHub preset" "$TMP/o" "$SRC_FILES" diffusers-to-keras --model "$SRC"
run_case "KerasHub preset -> diffusers" "$TMP/o" "$TMP/preset/model.weights.h5" keras-to-diffusers --preset "$TMP/preset"
run_case "KerasHub preset -> diffusers --half" "$TMP/o" "$TMP/preset/model.weights.h5" keras-to-diffusers --half --preset "$TMP/preset"

echo "load average after: $(load_average)"
print_rows
echo
echo "peak RSS: the largest of the runs, against the case's largest input file (target: at most 10 %)."
