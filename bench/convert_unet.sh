#!/usr/bin/env bash
# Benchmark (not a test): convert a full-size KerasCV SD1 UNet .h5 (3.4 GB, 686 tensors) to
# diffusers safetensors and compare wall time and peak memory with a plain copy of the same file.
#
#   bench/convert_unet.sh
#
# The input is made once with real keras_cv (DiffusionModel, random init) in parity/.venv-keras
# (`parity/run.sh --setup` creates it) and cached in bench/.cache/.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=bench/.cache
mkdir -p "$CACHE"
UNET="$CACHE/unet_sd1.h5"
if [ ! -f "$UNET" ]; then
    echo "== building a full-size KerasCV DiffusionModel and saving $UNET"
    TF_CPP_MIN_LOG_LEVEL=3 parity/.venv-keras/bin/python - "$UNET" <<'PY' 2>&1 | { grep -v "^WARNING\|Using TensorFlow" || true; }
import sys
from keras_cv.src.models.stable_diffusion.diffusion_model import DiffusionModel
import os
part = sys.argv[1][: -len(".h5")] + ".part.h5"  # Keras picks the format from the suffix
DiffusionModel(512, 512, 77, download_weights=False).save_weights(part)
os.replace(part, sys.argv[1])
PY
fi
command -v /usr/bin/time >/dev/null || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
cargo build --release -q
TMP=$(mktemp -d "$CACHE/run.XXXX")
trap 'rm -rf "$TMP"' EXIT
cat "$UNET" > /dev/null # both runs start from a warm page cache

measure() { # label, command... -> "seconds max_rss_kb"
    /usr/bin/time -f "%e %M" -o "$TMP/time" "$@" > /dev/null 2>&1
    cat "$TMP/time"
}
read -r cp_s cp_kb < <(measure cp "$UNET" "$TMP/copy.h5")
rm -f "$TMP/copy.h5"
# dreambridge fsyncs its output before the atomic rename; so does this copy.
read -r cs_s cs_kb < <(measure sh -c 'cp "$1" "$2" && sync "$2"' sh "$UNET" "$TMP/copy.h5")
rm -f "$TMP/copy.h5"
read -r db_s db_kb < <(measure target/release/dreambridge convert keras-to-diffusers --unet "$UNET" --out "$TMP/pipe")
size=$(stat -c %s "$UNET")
out=$(stat -c %s "$TMP/pipe/unet/diffusion_pytorch_model.safetensors")
awk -v cs="$cp_s" -v ck="$cp_kb" -v ss="$cs_s" -v sk="$cs_kb" -v ds="$db_s" -v dk="$db_kb" -v size="$size" -v out="$out" 'BEGIN {
    printf "\n%-28s %10s %14s\n", "", "wall (s)", "peak RSS (MB)"
    printf "%-28s %10.2f %14.1f\n", "cp (plain file copy)", cs, ck / 1024
    printf "%-28s %10.2f %14.1f\n", "cp + sync (durable copy)", ss, sk / 1024
    printf "%-28s %10.2f %14.1f\n", "dreambridge convert (UNet)", ds, dk / 1024
    printf "%-28s %10.2f %14.2f\n", "ratio dreambridge / cp", ds / cs, dk / ck
    printf "%-28s %10.2f %14.2f\n", "ratio dreambridge / cp+sync", ds / ss, dk / sk
    printf "\ninput %.2f GB, output %.2f GB; dreambridge peak RSS = %.1f%% of the file size\n", size / 1e9, out / 1e9, 100 * dk * 1024 / size
}'
