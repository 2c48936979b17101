#!/usr/bin/env bash
# Benchmark (not a test): a full-size SD 1.5 diffusers pipeline (UNet, text encoder, VAE: 4.3 GB
# f32, 1,131 tensors) -> one single-file checkpoint in the original layout, and back, each beside
# a durable copy of the same bytes (cp + sync), with peak memory.
#
#   bench/convert_single_file.sh
#
# The pipeline is made once with diffusers/transformers (random init from bench/sd15/*.json) in
# parity/.venv-torch (`parity/run.sh --setup` creates it) and cached in bench/.cache/.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=bench/.cache
mkdir -p "$CACHE"
PIPE="$CACHE/sd15-pipeline"
cargo build --release -q
DB=target/release/dreambridge
if [ ! -f "$PIPE/model_index.json" ]; then
    echo "== building a full-size SD 1.5 pipeline (random weights) in $PIPE"
    rm -rf "$PIPE.part" "$CACHE/sample-tokenizer"
    $DB convert keras-to-diffusers --out "$CACHE/sample-tokenizer" > /dev/null 2>&1
    parity/.venv-torch/bin/python - "$PIPE.part" "$CACHE/sample-tokenizer" <<'PY'
import json, sys, torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
torch.manual_seed(0)
cfg = lambda name: json.load(open(f"bench/sd15/{name}.json"))
unet = UNet2DConditionModel.from_config(cfg("unet"))
vae = AutoencoderKL.from_config(cfg("vae"))
text = CLIPTextModel(CLIPTextConfig(**cfg("text_encoder")))
tok = CLIPTokenizer.from_pretrained(sys.argv[2] + "/tokenizer")
pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=DDIMScheduler.from_config(cfg("scheduler")),
                               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
pipe.save_pretrained(sys.argv[1])
PY
    mv "$PIPE.part" "$PIPE"
fi
. bench/lib.sh
need_time
TMP=$(mktemp -d "$CACHE/run.XXXX")
trap 'rm -rf "$TMP"' EXIT
WEIGHTS=("$PIPE/unet/diffusion_pytorch_model.safetensors" "$PIPE/text_encoder/model.safetensors" "$PIPE/vae/diffusion_pytorch_model.safetensors")
cat "${WEIGHTS[@]}" > /dev/null # warm page cache for every run
# dreambridge fsyncs its output before the atomic rename; so does the copy.
read -r cp_s cp_kb < <(measure sh -c 'cat "$@" > "$0" && sync "$0"' "$TMP/copy" "${WEIGHTS[@]}")
rm -f "$TMP/copy"
read -r ex_s ex_kb < <(measure $DB convert diffusers-to-single-file --model "$PIPE" --out "$TMP/sd15.safetensors")
size=$(stat -c %s "$TMP/sd15.safetensors")
cat "$TMP/sd15.safetensors" > /dev/null
read -r cp2_s cp2_kb < <(measure sh -c 'cp "$1" "$2" && sync "$2"' sh "$TMP/sd15.safetensors" "$TMP/copy")
rm -f "$TMP/copy"
read -r im_s im_kb < <(measure $DB convert single-file-to-diffusers --checkpoint "$TMP/sd15.safetensors" --base "$PIPE" --out "$TMP/back")
parity/.venv-torch/bin/python - "$PIPE" "$TMP/back" <<'PY' # every tensor back bit for bit
import sys, torch
from safetensors.torch import load_file
for w in ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"]:
    # transformers 5 saves CLIP keys without `text_model.`; dreambridge writes them with it.
    bare = lambda d: {k.removeprefix("text_model."): v for k, v in d.items()}
    a, b = bare(load_file(f"{sys.argv[1]}/{w}")), bare(load_file(f"{sys.argv[2]}/{w}"))
    bad = [k for k in a if k not in b or not torch.equal(a[k], b[k])]
    assert a.keys() == b.keys() and not bad, f"round trip differs: {w}: {bad[:3]}"
PY
awk -v cs="$cp_s" -v ck="$cp_kb" -v es="$ex_s" -v ek="$ex_kb" -v c2="$cp2_s" -v c2k="$cp2_kb" -v is="$im_s" -v ik="$im_kb" -v size="$size" 'BEGIN {
    printf "\n%-42s %10s %14s\n", "", "wall (s)", "peak RSS (MB)"
    printf "%-42s %10.2f %14.1f\n", "cat 3 weight files + sync (durable copy)", cs, ck / 1024
    printf "%-42s %10.2f %14.1f\n", "dreambridge diffusers-to-single-file", es, ek / 1024
    printf "%-42s %10.2f\n", "ratio export / durable copy", es / cs
    printf "%-42s %10.2f %14.1f\n", "cp single file + sync (durable copy)", c2, c2k / 1024
    printf "%-42s %10.2f %14.1f\n", "dreambridge single-file-to-diffusers", is, ik / 1024
    printf "%-42s %10.2f\n", "ratio import / durable copy", is / c2
    printf "\nsingle file %.2f GB; round trip bit-identical; export peak RSS = %.1f%% of the file\n", size / 1e9, 100 * ek * 1024 / size
}'
