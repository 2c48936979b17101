#!/usr/bin/env bash
# Benchmark (not a test): a full-size SDXL base single file <-> diffusers folder, against a durable
# copy of the same bytes, side by side, with peak memory.
#
#   bench/convert_sdxl.sh [PAIRS]   (default 3 alternating pairs per case)
#
# The input is a full-size SDXL-base-shaped diffusers folder (UNet2DConditionModel widths 320/640/1280,
# transformer depth 2 and 10 at levels 1 and 2 (none at level 0) and 10 in the middle, context 2048,
# text-time conditioning of 2816 inputs; CLIP-L 12 layers of 768; OpenCLIP-G 32 layers of 1280 with its
# 1280 projection; the VAE 128/256/512/512) in float16 as Stability ships SDXL, random weights, made
# once with diffusers'/transformers' own classes (on the meta device, then filled tensor by tensor)
# in parity/.venv-torch, and its single file (6.9 GB, Stability's names) made from it by dreambridge,
# both cached in bench/.cache/sdxl/ (13.9 GB; `rm -rf bench/.cache/sdxl` when done).
#
# Cases: single file -> diffusers and diffusers -> single file. Each runs PAIRS times a durable
# copy of the case's input files (cp + sync) and the conversion, alternating which goes first, each
# from the same state (bench/lib.sh). Peak RSS is shown against the case's input bytes, which are
# the single file's size either way (target: at most a tenth).
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=${1:-3}
CACHE=bench/.cache/sdxl
mkdir -p "$CACHE"
SRC="$CACHE/diffusers"
FILE="$CACHE/sdxl_base.safetensors"
. bench/lib.sh
need_time
if [ ! -f "$SRC/model_index.json" ]; then
    echo "== making a full-size SDXL-base-shaped diffusers folder (random float16) in $SRC"
    rm -rf "$SRC.part"
    parity/.venv-torch/bin/python - "$SRC.part" <<'PY'
import json, os, sys
import numpy as np
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.numpy import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

out = sys.argv[1]
rng = np.random.default_rng(0)

def save(model, folder, file, config):
    os.makedirs(os.path.join(out, folder), exist_ok=True)
    tensors = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            tensors[k] = (rng.standard_normal(tuple(v.shape), dtype=np.float32) * 0.02).astype(np.float16)
    save_file(tensors, os.path.join(out, folder, file), metadata={"format": "pt"})
    with open(os.path.join(out, folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    print(folder, sum(t.size for t in tensors.values()), "parameters", flush=True)

u_cfg = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
             down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[5, 10, 20],
             transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048, use_linear_projection=True,
             addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32)
with init_empty_weights():
    m = UNet2DConditionModel(**u_cfg)
save(m, "unet", "diffusion_pytorch_model.safetensors", {"_class_name": "UNet2DConditionModel", **u_cfg})
for folder, cls, cfg in [
    ("text_encoder", CLIPTextModel, dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")),
    ("text_encoder_2", CLIPTextModelWithProjection, dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280, hidden_act="gelu")),
]:
    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **cfg, torch_dtype="float16")
    with init_empty_weights():
        m = cls(config)
    save(m, folder, "model.safetensors", {**config.to_dict(), "architectures": [cls.__name__]})
v_cfg = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
             block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, scaling_factor=0.13025, sample_size=1024, force_upcast=True)
with init_empty_weights():
    m = AutoencoderKL(**v_cfg)
save(m, "vae", "diffusion_pytorch_model.safetensors", {"_class_name": "AutoencoderKL", **v_cfg})
os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump({"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading"}, f)
with open(os.path.join(out, "model_index.json"), "w") as f:
    json.dump({"_class_name": "StableDiffusionXLPipeline", "scheduler": ["diffusers", "EulerDiscreteScheduler"],
               "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
               "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"], "force_zeros_for_empty_prompt": True}, f)
PY
    mv "$SRC.part" "$SRC"
fi
cargo build --release -q
DB=${DREAMBRIDGE_BIN:-target/release/dreambridge}
if [ ! -f "$FILE" ]; then
    echo "== writing its single file with dreambridge: $FILE"
    $DB convert diffusers-to-single-file --model "$SRC" --out "$FILE"
fi
TMP=$(mktemp -d "$CACHE/run.XXXX")
trap 'rm -rf "$TMP"' EXIT

can_drop_caches
echo "load average before: $(load_average)"
SRC_FILES=$(ls "$SRC"/*/*.safetensors | tr '\n' ' ')
run_case "SDXL single file -> diffusers" "$TMP/o" "$FILE" single-file-to-diffusers --checkpoint "$FILE"
run_case "SDXL diffusers -> single file" "$TMP/o.safetensors" "$SRC_FILES" diffusers-to-single-file --model "$SRC"
echo "load average after: $(load_average)"
print_rows
echo
$DB inspect "$FILE" > "$TMP/inspect"
echo "single file $(stat -c %s "$FILE" | awk '{ printf "%.2f GB", $1 / 1e9 }'), $(grep -m1 -o 'SDXL base ([^)]*)' "$TMP/inspect" || true)"
echo "peak RSS: the largest of the runs, against the case's input bytes (target: at most 10 %)."
