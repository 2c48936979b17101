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
command -v /usr/bin/time >/dev/null || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
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

measure() { # -> "seconds max_rss_kb" of the command; its stderr goes to $TMP/err
    /usr/bin/time -f "%e %M" -o "$TMP/time" "$@" > /dev/null 2> "$TMP/err"
    cat "$TMP/time"
}
durable_copy() { # files... -> copies them into $TMP/copy and syncs each
    mkdir -p "$TMP/copy"
    for f in "$@"; do cp "$f" "$TMP/copy/"; done
    sync "$TMP"/copy/*
}

# Every run starts alike (see the top); without the right to drop caches, say so.
CAN_DROP=1
sync
echo 3 > /proc/sys/vm/drop_caches 2> /dev/null || { CAN_DROP=0; echo "note: cannot drop the page cache here; runs start from whatever it holds"; }
fresh_start() { # input files...
    sync
    if [ "$CAN_DROP" = 1 ]; then echo 3 > /proc/sys/vm/drop_caches; fi
    cat "$@" > /dev/null
}
stats() { # seconds on stdin -> "min median max"
    sort -g | awk '{ v[NR] = $1 } END { printf "%s %s %s\n", v[1], v[int((NR + 1) / 2)], v[NR] }'
}
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"

ROWS=()
run_case() { # label, output folder, "input files", dreambridge args...
    local label=$1 out=$2 inputs=$3
    shift 3
    echo "$label" | grep -q -e "$CASES" || return 0
    local bytes
    bytes=$(stat -c %s $inputs | awk '{ s += $1 } END { print s }')
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
                read -r s kb < <(DREAMBRIDGE_PROFILE=1 measure $DB convert "$@" --out "$out")
                echo "$s $kb $(grep '^profile:' "$TMP/err" | sed 's/^profile: //')" >> "$TMP/db.txt"
                rm -rf "$out"
            fi
        done
    done
    local c d dk prof
    read -r -a c < <(cut -d' ' -f1 "$TMP/cp.txt" | stats)
    read -r -a d < <(cut -d' ' -f1 "$TMP/db.txt" | stats)
    dk=$(cut -d' ' -f2 "$TMP/db.txt" | sort -g | tail -1)
    prof=$(awk -v m="${d[1]}" '$1 == m { $1 = ""; $2 = ""; print; exit }' "$TMP/db.txt")
    ROWS+=("$(awk -v l="$label" -v b="$bytes" -v c0="${c[0]}" -v c1="${c[1]}" -v c2="${c[2]}" -v d0="${d[0]}" -v d1="${d[1]}" -v d2="${d[2]}" -v dk="$dk" 'BEGIN {
        printf "%-34s %6.2f %5.2f %6.2f %6.2f %7.2f %6.2f %6.2f %7.2f %7.2f %7.0f %5.1f%%", l, b / 1e9, c0, c1, c2, d0, d1, d2, d1 / c1, d0 / c0, dk / 1024, 100 * dk * 1024 / b
    }')")
    ROWS+=("$(printf '%-34s cp: %s  dreambridge: %s' '' "$(cut -d' ' -f1 "$TMP/cp.txt" | tr '\n' ' ')" "$(cut -d' ' -f1 "$TMP/db.txt" | tr '\n' ' ')")")
    ROWS+=("$(printf '%-34s profile:%s' '' "$prof")")
}

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

echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
printf "\n%-34s %6s %20s %22s %15s %7s %6s\n" "$PAIRS alternating pairs" "GB in" "cp + sync (s)" "dreambridge (s)" "ratio of" "peak" "of"
printf "%-34s %6s %5s %6s %6s %7s %6s %6s %7s %7s %7s %6s\n" "" "" "min" "median" "max" "min" "median" "max" "medians" "minimums" "RSS MB" "input"
for r in "${ROWS[@]}"; do echo "$r"; done
largest=$(stat -c %s "$C/unet_sd1.h5")
echo
echo "peak RSS is the largest of the runs; the target is at most 10 % of the largest tensor file ($(awk -v b="$largest" 'BEGIN { printf "%.0f MB", b / 1e6 / 10 }'))."
