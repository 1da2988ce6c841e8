#!/usr/bin/env bash
# Speed and memory benchmark (a)-(e) of benchmarks/speed.py on one GPU: its gpu preset (a ~100M-parameter Llama
# built from a config for training, evaluation and negatives; ~300M for peak memory), under 8 minutes on one H100.
# Writes speed.json into $OUT (benchmarks/results when OUT is unset) after every measurement, and prints the table.
#
#   benchmarks/gpu_speed.sh                          # on the GPU machine
#   OUT=/tmp/bench benchmarks/gpu_speed.sh --only a,b   # extra flags go to speed.py
#   GNM_BENCH_DRY_RUN=1 benchmarks/gpu_speed.sh      # CPU dry run: the gpu preset's code at the smoke sizes
#
# PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
OUT=${OUT:-benchmarks/results}
export TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"

flags=(--preset gpu --output "$OUT/speed.json")
if [[ -n "${GNM_BENCH_DRY_RUN:-}" ]]; then
    flags+=(--tiny)
fi
# speed.py writes its JSON after each measurement; this is the hard stop, what was measured stays on disk.
exec timeout --signal=TERM 470 "$PYTHON" benchmarks/speed.py "${flags[@]}" "$@"
