#!/usr/bin/env bash
# Benchmark (not a test): conversion against a durable copy of the same bytes, side by side.
#
#   bench/convert_unet.sh [PAIRS] [CASES]   (default 5 pairs per case; CASES: a grep pattern
#                                            over the case labels, default all)
#
# Inputs are full-size SD1 models made once with real keras_cv (random init, `save_weights`) in
# parity/.venv-keras (`parity/run.sh --setup` creates it) and cached in bench/.cache/: the UNet
# (3.44 GB, 686 tensors) and the text encoder, VAE encoder and decoder (a whole pipeline, 4.4 GB).
#
# Cases: KerasCV -> diffusers (UNet alone, UNet --half, whole pipeline, whole pipeline --half),
# diffusers -> KerasCV (UNet alone, whole pipeline), and the whole pipeline to and from one
# single-file checkpoint (diffusers -> single file, KerasCV -> single file, single file ->
# diffusers, single file -> KerasCV). Every case runs PAIRS times a durable copy of the case's
# input files (cp + sync, the floor for moving those bytes) and the conversion, alternating which
# goes first. Every run, either side, starts from the same state: nothing dirty (sync), the page
# cache dropped, then only the case's inputs read back into it. dreambridge fsyncs every file it
# writes before the atomic rename of its output folder, so both sides end with the bytes on disk.
#
# A disk shared with other machines is noisy: the table shows every side's minimum, median and
# maximum, and two ratios, of the medians and of the minimums. Neither side's outliers enter the
# other's figure. Run it on an idle machine (the load average is printed before and after).
#
# DREAMBRIDGE_PROFILE=1 is set for the conversions: the phase seconds of the median run follow.
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=${1:-5}
CASES=${2:-.}
CACHE=bench/.cache
mkdir -p "$CACHE"
KERAS=(unet_sd1.h5 text_encoder_sd1.h5 image_encoder.h5 decoder.h5)
missing=0
for f in "${KERAS[@]}"; do [ -f "$CACHE/$f" ] || missing=1; done
if [ "$missing" = 1 ]; then
    echo "== building full-size KerasCV SD1 models with keras_cv and saving them in $CACHE"
    TF_CPP_MIN_LOG_LEVEL=3 parity/.venv-keras/bin/python - "$CACHE" <<'PY' 2>&1 | { grep -v "^WARNING\|Using TensorFlow" || true; }
import os, sys
from keras_cv.src.models.stable_diffusion.decoder import Decoder
from keras_cv.src.models.stable_diffusion.diffusion_model import DiffusionModel
from keras_cv.src.models.stable_diffusion.image_encoder import ImageEncoder
from keras_cv.src.models.stable_diffusion.text_encoder import TextEncoder
cache = sys.argv[1]
for name, make in [("unet_sd1", lambda: DiffusionModel(512, 512, 77, download_weights=False)),
                   ("text_encoder_sd1", lambda: TextEncoder(77, download_weights=False)),
                   ("image_encoder", lambda: ImageEncoder(download_weights=False)),
                   ("decoder", lambda: Decoder(64, 64, download_weights=False))]:
    path = os.path.join(cache, name + ".h5")
    if os.path.exists(path):
        continue
    part = os.path.join(cache, name + ".part.h5")  # Keras picks the format from the suffix
    make().save_weights(part)
    os.replace(part, path)
PY
fi
PROFILE=1
. bench/lib.sh
need_time
# DREAMBRIDGE_BIN: another build to measure (an older commit's, for a before/after).
cargo build --release -q
DB=${DREAMBRIDGE_BIN:-target/release/dreambridge}
TMP=$(mktemp -d "$CACHE/run.XXXX")
trap 'rm -rf "$TMP"' EXIT
C=$CACHE

# The diffusers folders the reverse cases start from (made once per run, not timed).
$DB convert keras-to-diffusers --unet "$C/unet_sd1.h5" --out "$TMP/src_unet" > /dev/null 2>&1
$DB convert keras-to-diffusers --unet "$C/unet_sd1.h5" --text-encoder "$C/text_encoder_sd1.h5" \
    --vae-encoder "$C/image_encoder.h5" --vae-decoder "$C/decoder.h5" --out "$TMP/src_pipe" > /dev/null 2>&1
PIPE_IN=(--unet "$C/unet_sd1.h5" --text-encoder "$C/text_encoder_sd1.h5" --vae-encoder "$C/image_encoder.h5" --vae-decoder "$C/decoder.h5")

can_drop_caches
echo "load average before: $(load_average)"

run_case "keras -> diffusers, UNet" "$TMP/o" "$C/unet_sd1.h5" keras-to-diffusers --unet "$C/unet_sd1.h5"
run_case "keras -> diffusers, UNet --half" "$TMP/o" "$C/unet_sd1.h5" keras-to-diffusers --half --unet "$C/unet_sd1.h5"
run_case "diffusers -> keras, UNet" "$TMP/o" "$TMP/src_unet/unet/diffusion_pytorch_model.safetensors" diffusers-to-keras --model "$TMP/src_unet"
PIPE_FILES="$C/unet_sd1.h5 $C/text_encoder_sd1.h5 $C/image_encoder.h5 $C/decoder.h5"
run_case "keras -> diffusers, pipeline" "$TMP/o" "$PIPE_FILES" keras-to-diffusers "${PIPE_IN[@]}"
run_case "keras -> diffusers, pipeline --half" "$TMP/o" "$PIPE_FILES" keras-to-diffusers --half "${PIPE_IN[@]}"
SRC_FILES=$(ls "$TMP"/src_pipe/*/*.safetensors | tr '\n' ' ')
run_case "diffusers -> keras, pipeline" "$TMP/o" "$SRC_FILES" diffusers-to-keras --model "$TMP/src_pipe"
run_case "diffusers -> single file" "$TMP/o.safetensors" "$SRC_FILES" diffusers-to-single-file --model "$TMP/src_pipe"
run_case "keras -> single file" "$TMP/o.safetensors" "$PIPE_FILES" keras-to-single-file "${PIPE_IN[@]}"
if echo "single file -> diffusers, single file -> keras" | grep -q -e "$CASES"; then
    $DB convert diffusers-to-single-file --model "$TMP/src_pipe" --out "$TMP/src.safetensors" > /dev/null 2>&1
fi
run_case "single file -> diffusers" "$TMP/o" "$TMP/src.safetensors" single-file-to-diffusers --checkpoint "$TMP/src.safetensors"
run_case "single file -> keras" "$TMP/o" "$TMP/src.safetensors" single-file-to-keras --checkpoint "$TMP/src.safetensors"

echo "load average after: $(load_average)"
print_rows
largest=$(stat -c %s "$C/unet_sd1.h5")
echo
echo "peak RSS is the largest of the runs; the target is at most 10 % of the largest tensor file ($(awk -v b="$largest" 'BEGIN { printf "%.0f MB", b / 1e6 / 10 }'))."
