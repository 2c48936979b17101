#!/usr/bin/env bash
# The parity suite: dreambridge's conversions proven against the peers, KerasCV (Keras 2 and 3)
# and diffusers/transformers, on real full-size models with random weights. CPU only.
#
#   parity/run.sh           everything (creates the three venvs on first use, ~8 GB)
#   parity/run.sh --setup   only create the venvs
#
# Prints a results table and exits non-zero if any check fails. Work files: parity/work/.
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
step() { echo; echo "== $*"; }
quiet() { grep -v "^WARNING\|absl\|Using TensorFlow\|warn" || true; } # TF start-up noise; keeps the exit status of what it filters

step "KerasCV: real SD1 and SD2 models, random weights, saved with save_weights"
$KERAS make sd1 2>&1 | quiet
$KERAS make sd2 2>&1 | quiet

step "dreambridge: keras -> diffusers"
S="$W/sd1"
$DB convert keras-to-diffusers --unet "$S/unet.h5" --text-encoder "$S/text_encoder.h5" \
    --vae-encoder "$S/image_encoder.h5" --vae-decoder "$S/decoder.h5" --out "$S/pipe"
$DB convert keras-to-diffusers --unet "$S/unet.h5" --text-encoder "$S/text_encoder.h5" \
    --vae-encoder "$S/image_encoder.h5" --vae-decoder "$S/decoder.h5" --out "$S/pipe16" --half
$DB convert keras-to-diffusers --unet "$W/sd2/unet.h5" --text-encoder "$W/sd2/text_encoder.h5" --out "$W/sd2/pipe"
$DB convert keras-to-diffusers --out "$W/sample" # the embedded tiny sample

step "diffusers/transformers: strict loading and forward parity"
$TORCH check sd1
$TORCH check sd2
$TORCH pipeline

step "reverse: diffusers -> keras_cv"
$TORCH make_torch
$DB convert diffusers-to-keras --model "$W/torch_sd1" --out "$W/torch_sd1_keras"
$DB convert diffusers-to-keras --model "$S/pipe" --out "$S/keras_back"
$KERAS reverse 2>&1 | quiet

step "Keras 3: .weights.h5 in, legacy .h5 out"
$KERAS3 k3 2>&1 | quiet
$DB convert keras-to-diffusers --unet "$W/k3/unet.weights.h5" --text-encoder "$W/k3/text_encoder.weights.h5" \
    --vae-encoder "$W/k3/image_encoder.weights.h5" --vae-decoder "$W/k3/decoder.weights.h5" --out "$W/k3/pipe"
$TORCH same "$S/pipe" "$W/k3/pipe"

step "Training models (Candle) against diffusers/transformers"
"$P/.venv-torch/bin/python" "$P/models_parity.py" "$DB"

step "dreambridge train output in diffusers"
"$P/.venv-torch/bin/python" "$P/train_output.py" "$DB"

step "train_dreambooth.py's flags: LR schedules (get_scheduler), TensorBoard files (EventAccumulator), CLIPTokenizer, masked CLIPTextModel, saved folders"
"$P/.venv-torch/bin/python" "$P/train_flags_parity.py" "$DB"

step "8-bit AdamW (--use_8bit_adam) against bitsandbytes' AdamW8bit, step by step"
"$P/.venv-torch/bin/python" "$P/adam8bit_parity.py" "$DB" || adam8bit_rc=$?
step "Data parallel under torchrun --no-python: 2 CPU ranks against one process of the whole batch"
"$P/.venv-torch/bin/python" "$P/torchrun_parity.py" "$DB" || torchrun_rc=$?
step "LoRA files: dreambridge's in diffusers (load_lora_weights, fuse_lora), peft's in dreambridge"
"$P/.venv-torch/bin/python" "$P/lora_parity.py" "$DB"

step "Single-file checkpoints (original SD layout): dreambridge's in diffusers' from_single_file, torch-written ones in dreambridge"
# Exits 1 when a check failed (the table shows which); the suite goes on to the report either way.
"$P/.venv-torch/bin/python" "$P/single_file_parity.py" "$DB" || single_file_rc=$?

step "KerasCV's other forms at full size: TF checkpoint, SavedModel (push_to_hub_keras), .keras; textual inversion"
$P/.venv-keras/bin/python $P/tf_formats.py make 2>&1 | quiet
$P/.venv-keras3/bin/python $P/tf_formats.py make3 2>&1 | quiet
DB="$DB" "$P/.venv-torch/bin/python" "$P/tf_formats.py" check || tf_formats_rc=$?

step "Samplers: DDIM, DPM-Solver++ (multistep) and Euler ancestral against diffusers' schedulers, step by step"
"$P/.venv-torch/bin/python" "$P/schedulers_parity.py" "$DB" || schedulers_rc=$?

step "Metrics: dreambridge eval against a transformers implementation of DINO, CLIP-I, CLIP-T (full-size random models)"
"$P/.venv-torch/bin/python" "$P/eval_parity.py" "$DB" || eval_rc=$?

step "Hub: the loopback emulator against the official huggingface_hub client"
"$P/.venv-torch/bin/python" "$P/hub_fidelity.py" "$DB"

echo
"$P/.venv-torch/bin/python" "$P/report.py" "$W/results.jsonl" "$(( $(date +%s) - start ))"
exit "$(( ${single_file_rc:-0} | ${tf_formats_rc:-0} | ${schedulers_rc:-0} | ${eval_rc:-0} | ${adam8bit_rc:-0} | ${torchrun_rc:-0} ))" # a crash that recorded no row still fails the suite
