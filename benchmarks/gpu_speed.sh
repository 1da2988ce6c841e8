#!/usr/bin/env bash
# Speed and memory benchmark (a)-(e) of benchmarks/speed.py on one GPU: its gpu preset (a ~100M-parameter Llama
# built from a config for training, the packed-vs-padded step memory, evaluation and negatives; ~300M for the
# reference's peak memory). Writes speed.json into $OUT (benchmarks/results when OUT is unset) after every
# measurement, and prints the table; a run cut by the hard stop below keeps what it measured (not yet timed on a GPU
# since (a) runs the padded and the packed trainer side by side: run `--only a,b` first where time is short).
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
