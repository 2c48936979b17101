#!/usr/bin/env bash
# The parity suite: dreambridge's conversions proven against the peers, KerasCV (Keras 2 and 3)
# and diffusers/transformers, on real full-size models with random weights. CPU only.
#
#   parity/run.sh           everything (creates the four venvs on first use, ~9 GB)
#   parity/run.sh --setup   only create the venvs
#
# Prints a results table and exits non-zero if any check fails. Work files: parity/work/; each stage
# deletes what no later stage reads (PARITY_KEEP=1 keeps everything, for debugging: tens of GB), and
# the peak disk use of the work files is measured and printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
P=parity
export PARITY_WORK="$PWD/$P/work"
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONWARNINGS=ignore

make_venv() { # name, pip requirements...
    local dir="$P/.venv-$1"; shift
    if [ ! -x "$dir/bin/python" ]; then
        echo "== creating $dir"
        python3 -m venv "$dir"
        "$dir/bin/pip" install -q "$@"
        # keras-cv pulls tensorflow-datasets; its newest tensorflow-metadata needs a protobuf TF forbids.
        case "$1" in tensorflow-cpu*) "$dir/bin/pip" install -q "tensorflow-metadata==1.14.0" ;; esac
    fi
}
make_venv keras "tensorflow-cpu==2.14.1" "keras-cv==0.6.4" "h5py==3.16.0" "huggingface_hub==0.26.5"
make_venv keras3 "tensorflow-cpu==2.17.1" "keras-cv==0.9.0" "h5py==3.16.0"
make_venv kerashub "keras-hub==0.32.0" "keras==3.15.1" "jax[cpu]==0.10.2" "h5py==3.16.0"
make_venv torch "torch==2.15.0" "diffusers==0.42.1" "transformers==5.23.0" "safetensors==0.8.0" "accelerate==1.15.0" "h5py==3.16.0" "peft==0.21.2" "tensorboard==2.21.0" "bitsandbytes==0.50.2"
# Added later: a venv made before gets it on the next run.
"$P/.venv-torch/bin/python" -c "import tensorboard" 2>/dev/null || "$P/.venv-torch/bin/pip" install -q "tensorboard==2.21.0"
"$P/.venv-torch/bin/python" -c "import bitsandbytes" 2>/dev/null || "$P/.venv-torch/bin/pip" install -q "bitsandbytes==0.50.2"
[ "${1:-}" = "--setup" ] && exit 0

start=$(date +%s)
cargo build --release -q
DB="$PWD/target/release/dreambridge"
KERAS="$P/.venv-keras/bin/python $P/keras_side.py"
KERAS3="$P/.venv-keras3/bin/python $P/keras_side.py"
TORCH="$P/.venv-torch/bin/python $P/torch_side.py"
W="$PARITY_WORK"
rm -rf "$W" && mkdir -p "$W"
quiet() { grep -v "^WARNING\|absl\|Using TensorFlow\|warn" || true; } # TF start-up noise; keeps the exit status of what it filters

# What each stage leaves in $W for later ones (-> who reads it); everything else it wrote is deleted
# before it ends. results.jsonl (-> report.py) always stays. f32 sizes; GB = 1e9 bytes.
#   sd1          sd1/*.h5 4.3 GB (-> sd1-conv, keras3), sd1/keras_io.npz (-> check sd1, k3load), sd1/h5_digest.json (-> roundtrip)
#   sd1-conv     sd1's files, sd1/pipe.digest.json (-> keras3 `same`), sample/ (tiny; -> tf-formats); sd1/pipe16, sd1/pipe deleted
#   keras3       k3/pipe 4.3 GB (-> reverse), sd1/keras_io.npz, sd1/h5_digest.json, sample/; sd1/*.h5, k3/*.weights.h5 deleted
#   reverse      nothing (k3/pipe, sd1/ with keras_back, torch_sd1/, torch_sd1_keras/ deleted)
#   sd2          nothing (sd2/*.h5, sd2/pipe deleted)
#   models, train-output, train-flags, adam8bit, torchrun, lora: nothing (their tmp*/ and adam8bit/ deleted)
#   sd3          nothing (sd3/, sd3_back/, sd3_lora/ deleted; tiny models, ~0.5 GB at most)
#   single-file  nothing (single_file/, sdxl_single_file/, sdxl_lora/ deleted; the script drops its tiny files before the full-size SD1.5 check)
#   tf-formats   nothing (tf_formats/ deleted; the script drops each form once compared); sample/ deleted
#   schedulers, eval, hub: nothing (schedulers/, eval/, tmp*/ deleted)
drop() { # paths under $W (globs allowed) that no later stage reads
    [ -z "${PARITY_KEEP:-}" ] || return 0
    local p
    for p in "$@"; do rm -rf -- "${W:?}"/$p; done
}

# Disk use: a sampler records the largest `du -sb $W` (every 2 s, niced) and the stage it fell in;
# each stage's end adds its own reading. Both go to $MON, outside $W.
MON=$(mktemp -d "${TMPDIR:-/tmp}/parity-disk.XXXXXX")
gb() { awk -v b="${1:-0}" 'BEGIN { printf "%.1f", b / 1e9 }'; }
set_stage() { echo "$1" >"$MON/stage.tmp" && mv "$MON/stage.tmp" "$MON/stage"; }
set_stage start
sampler() {
    set +e +o pipefail
    local peak=0 size
    while kill -0 "$$" 2>/dev/null; do # stops with the suite, even if its trap never ran
        size=$(nice -n 19 du -sb "$W" 2>/dev/null | cut -f1)
        if [ -n "$size" ] && [ "$size" -gt "$peak" ]; then
            peak=$size
            echo "$peak $(cat "$MON/stage")" >"$MON/peak.tmp" && mv "$MON/peak.tmp" "$MON/peak"
        fi
        sleep 2
    done
}
sampler &
SAMPLER=$!
stop_sampler() {
    kill "$SAMPLER" 2>/dev/null || true
    wait "$SAMPLER" 2>/dev/null || true
}
disk_peak() { # the peak line (after stop_sampler)
    local bytes where
    read -r bytes where < <(cat "$MON/peak" "$MON/ends" 2>/dev/null | sort -n -k1,1 | tail -n 1) || true
    echo "peak disk use of work files: $(gb "${bytes:-0}") GB (during stage: ${where:-unknown}; GB = 1e9 bytes, du -sb of $W)"
}
on_exit() {
    [ -n "${DISK_DONE:-}" ] || { stop_sampler; stage_end; echo; disk_peak; }
    rm -rf "$MON"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
STAGE=""
stage_end() { # one line: what the stage leaves on disk
    [ -n "$STAGE" ] || return 0
    local size
    size=$(du -sb "$W" 2>/dev/null | cut -f1) || true
    echo "${size:-0} $STAGE" >>"$MON/ends"
    echo "   [disk] $STAGE leaves $(gb "$size") GB of work files"
}
step() { # short stage name, description
    stage_end
    STAGE=$1
    set_stage "$1"
    shift
    echo
    echo "== $*"
}

# SD1, in an order that keeps at most two full-size copies (8.5 GB) on disk: the pipeline folder
# is kept as digests for the Keras 3 comparison, KerasCV's .h5 as digests for the round trip, and
# the round trip starts from k3/pipe (the `same` check proves it bit-identical to sd1/pipe).
step sd1 "KerasCV: real SD1 models, random weights, saved with save_weights"
$KERAS make sd1 2>&1 | quiet

step sd1-conv "dreambridge: keras -> diffusers (SD1 f32 and --half, the embedded sample); diffusers/transformers: strict loading, forward parity, from_pretrained runs"
S="$W/sd1"
$DB convert keras-to-diffusers --unet "$S/unet.h5" --text-encoder "$S/text_encoder.h5" \
    --vae-encoder "$S/image_encoder.h5" --vae-decoder "$S/decoder.h5" --out "$S/pipe16" --half
$DB convert keras-to-diffusers --out "$W/sample" # the embedded tiny sample
$TORCH pipeline sd1/pipe16 sample
drop sd1/pipe16
$DB convert keras-to-diffusers --unet "$S/unet.h5" --text-encoder "$S/text_encoder.h5" \
    --vae-encoder "$S/image_encoder.h5" --vae-decoder "$S/decoder.h5" --out "$S/pipe"
$TORCH check sd1
$TORCH pipeline sd1/pipe
$TORCH digest "$S/pipe" "$S/pipe.digest.json" # what keras3's `same` compares with
drop sd1/pipe

step keras3 "Keras 3: .weights.h5 in, legacy .h5 out"
$KERAS3 k3save 2>&1 | quiet
drop "sd1/*.h5" # the round trip compares with sd1/h5_digest.json
$DB convert keras-to-diffusers --unet "$W/k3/unet.weights.h5" --text-encoder "$W/k3/text_encoder.weights.h5" \
    --vae-encoder "$W/k3/image_encoder.weights.h5" --vae-decoder "$W/k3/decoder.weights.h5" --out "$W/k3/pipe"
drop "k3/*.weights.h5"
$TORCH same "$S/pipe.digest.json" "$W/k3/pipe"

step reverse "reverse: diffusers -> keras_cv"
$DB convert diffusers-to-keras --model "$W/k3/pipe" --out "$S/keras_back"
drop k3
$KERAS roundtrip 2>&1 | quiet
$KERAS3 k3load 2>&1 | quiet
drop sd1
$TORCH make_torch
$DB convert diffusers-to-keras --model "$W/torch_sd1" --out "$W/torch_sd1_keras"
drop torch_sd1/unet torch_sd1/text_encoder torch_sd1/vae # torch_io.npz stays for keras_cv
$KERAS reverse 2>&1 | quiet
drop torch_sd1 torch_sd1_keras

step sd2 "KerasCV SD2 -> diffusers: strict loading and forward parity"
$KERAS make sd2 2>&1 | quiet
$DB convert keras-to-diffusers --unet "$W/sd2/unet.h5" --text-encoder "$W/sd2/text_encoder.h5" --out "$W/sd2/pipe"
drop "sd2/*.h5"
$TORCH check sd2
drop sd2

step models "Training models (Candle) against diffusers/transformers"
"$P/.venv-torch/bin/python" "$P/models_parity.py" "$DB"
drop "tmp*"

step train-output "dreambridge train output in diffusers"
"$P/.venv-torch/bin/python" "$P/train_output.py" "$DB"
drop "tmp*"

step train-flags "train_dreambooth.py's flags: LR schedules (get_scheduler), TensorBoard files (EventAccumulator), CLIPTokenizer, masked CLIPTextModel, saved folders"
"$P/.venv-torch/bin/python" "$P/train_flags_parity.py" "$DB"
drop "tmp*"

step adam8bit "8-bit AdamW (--use_8bit_adam) against bitsandbytes' AdamW8bit, step by step"
"$P/.venv-torch/bin/python" "$P/adam8bit_parity.py" "$DB" || adam8bit_rc=$?
drop adam8bit
step torchrun "Data parallel under torchrun --no-python: 2 CPU ranks against one process of the whole batch"
"$P/.venv-torch/bin/python" "$P/torchrun_parity.py" "$DB" || torchrun_rc=$?
drop "tmp*"
step lora "LoRA files: dreambridge's in diffusers (load_lora_weights, fuse_lora), peft's in dreambridge"
"$P/.venv-torch/bin/python" "$P/lora_parity.py" "$DB"
drop "tmp*"

step single-file "Single-file checkpoints (original SD layout): dreambridge's in diffusers' from_single_file, torch-written ones in dreambridge; SDXL LoRA files (kohya LDM numbering, PEFT) in diffusers' load_lora_weights and fuse_lora"
# Exits 1 when a check failed (the table shows which); the suite goes on to the report either way.
"$P/.venv-torch/bin/python" "$P/single_file_parity.py" "$DB" || single_file_rc=$?
"$P/.venv-torch/bin/python" "$P/sdxl_single_file_parity.py" "$DB" || single_file_rc=$?
"$P/.venv-torch/bin/python" "$P/sdxl_lora_parity.py" "$DB" || single_file_rc=$?
drop single_file sdxl_single_file sdxl_lora

step sd3 "Stable Diffusion 3: KerasHub (keras-hub 0.32, jax) presets, backbones and MMDiT-only files -> diffusers, the way back in keras-hub itself (bf16, shards), LoRA both ways; Stability's single file in diffusers' from_single_file"
KERAS_BACKEND=jax "$P/.venv-kerashub/bin/python" "$P/sd3_parity.py" make 2>&1 | quiet || sd3_rc=$?
"$P/.venv-torch/bin/python" "$P/sd3_parity.py" check "$DB" || sd3_rc=$?
"$P/.venv-torch/bin/python" "$P/sd3_back_parity.py" "$DB" || sd3_rc=$?
"$P/.venv-torch/bin/python" "$P/sd3_lora_parity.py" run "$DB" || sd3_rc=$?
"$P/.venv-torch/bin/python" "$P/sd3_single_file_parity.py" "$DB" || sd3_rc=$?
drop sd3 sd3_back sd3_lora sd3_single_file

step tf-formats "KerasCV's other forms at full size: TF checkpoint, SavedModel (push_to_hub_keras), .keras; textual inversion"
$P/.venv-keras/bin/python $P/tf_formats.py make 2>&1 | quiet
$P/.venv-keras3/bin/python $P/tf_formats.py make3 2>&1 | quiet
DB="$DB" "$P/.venv-torch/bin/python" "$P/tf_formats.py" check || tf_formats_rc=$?
drop tf_formats sample

step schedulers "Samplers: DDIM, DPM-Solver++ (multistep) and Euler ancestral against diffusers' schedulers, step by step"
"$P/.venv-torch/bin/python" "$P/schedulers_parity.py" "$DB" || schedulers_rc=$?
drop schedulers

step eval "Metrics: dreambridge eval against a transformers implementation of DINO, CLIP-I, CLIP-T (full-size random models)"
"$P/.venv-torch/bin/python" "$P/eval_parity.py" "$DB" || eval_rc=$?
drop eval

step hub "Hub: the loopback emulator against the official huggingface_hub client"
"$P/.venv-torch/bin/python" "$P/hub_fidelity.py" "$DB"
drop "tmp*"

stop_sampler
stage_end
disk=$(disk_peak)
DISK_DONE=1
echo
"$P/.venv-torch/bin/python" "$P/report.py" "$W/results.jsonl" "$(( $(date +%s) - start ))" "$disk" || report_rc=$?
exit "$(( ${report_rc:-0} | ${single_file_rc:-0} | ${tf_formats_rc:-0} | ${schedulers_rc:-0} | ${eval_rc:-0} | ${adam8bit_rc:-0} | ${torchrun_rc:-0} | ${sd3_rc:-0} ))" # a crash that recorded no row still fails the suite
