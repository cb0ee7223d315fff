#!/usr/bin/env bash
# The training and search path on a CUDA GPU, through the CLI, by default at the CPU recipe's first-step sizes:
# finetune (4,000 questions, seq 384) -> train-lat (3,000 more) -> search (the CPU recipe's, 3 iterations; 1,000
# search, 2,000 report and 2,000 selection questions), bf16 autocast for training. About 3 min on an H200 (README,
# GPU section). N_FT=all N_LAT=all ITERATIONS=4: the whole train set in both steps, 8.5 min there (measured, 500 s).
# usage: bash scripts/cuda-check.sh SQUAD_TRAIN SQUAD_DEV OUT_DIR [BASE_MODEL_DIR]
# env: DEVICE (cuda), PRECISION (bf16), N_FT (4000 or all), N_LAT (3000 or all), EPOCHS_FT (1), EPOCHS_LAT (1),
#      ITERATIONS (3), N_SEARCH (1000), N_REPORT (2000), N_SELECT (2000),
#      RESUME (0; 1: skip the steps whose output exists and continue an interrupted one from its last save, so a run
#      longer than one command's time limit can be split over several)
set -euo pipefail
if [ $# -lt 3 ]; then echo "usage: $0 SQUAD_TRAIN SQUAD_DEV OUT_DIR [BASE_MODEL_DIR]" >&2; exit 2; fi
train=$1 dev=$2 out=$3 base=${4:-}
device=${DEVICE:-cuda} precision=${PRECISION:-bf16} n_ft=${N_FT:-4000} n_lat=${N_LAT:-3000}
ft_data=() lat_data=()  # questions of the train set's seeded permutation: train-lat takes the ones after finetune's
[ "$n_ft" = all ] || ft_data=(--max-train-examples "$n_ft")
[ "$n_lat" = all ] || lat_data=(--max-train-examples "$n_lat" --train-skip "$([ "$n_ft" = all ] && echo 0 || echo "$n_ft")")
mkdir -p "$out"
mode=--force
[ "${RESUME:-0}" = 1 ] && mode=--resume
step() {  # COMMAND OUT_DIR ARGS...: one CLI step, its summary's last lines and its wall time, or its error and exit 1
    local name=$1 dir=$2 start=$SECONDS
    shift 2
    if [ "$mode" = --resume ] && [ -d "$dir" ]; then echo "## $name: $dir exists, skipped"; return; fi
    if ! toolchain "$name" --out "$dir" "$@" "$mode" 2>>"$out/progress.txt" | tail -4; then
        echo "cuda-check: $name failed: $(tail -n 1 "$out/progress.txt")" >&2
        exit 1
    fi
    echo "## $name: $((SECONDS - start)) s"
}
step finetune "$out/finetuned" --task squad ${base:+--model "$base"} --train-data "$train" --eval-data "$dev" \
    "${ft_data[@]}" --max-eval-examples 1000 --max-seq-length 384 --epochs "${EPOCHS_FT:-1}" --lr 1e-4 \
    --batch-size 32 --device "$device" --precision "$precision"
step train-lat "$out/length-adaptive" --model "$out/finetuned" --train-data "$train" --eval-data "$dev" \
    "${lat_data[@]}" --max-eval-examples 1000 --epochs "${EPOCHS_LAT:-1}" --lr 5e-5 \
    --batch-size 32 --device "$device" --precision "$precision"
step search "$out/search" --model "$out/length-adaptive" --eval-data "$dev" --search-examples "${N_SEARCH:-1000}" \
    --report-examples "${N_REPORT:-2000}" --population 12 --parents 6 --iterations "${ITERATIONS:-3}" --mutations 12 \
    --crossovers 12 --length-drop-ratio-bound 0.35 --min-macs-ratio 0.4 --max-macs-ratio 0.6 --target-macs-ratio 0.55 \
    --select-examples "${N_SELECT:-2000}" --select-top 5 --device "$device"
