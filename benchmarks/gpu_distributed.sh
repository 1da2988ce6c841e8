#!/usr/bin/env bash
# FSDP2 and DeepSpeed ZeRO-3 unlearning on one GPU machine, against one plain GPU process (under 8 minutes on one
# H100): a ~100M-parameter Llama built from a config (no download), recipe ga+klr+gnm, 30 steps, full model and LoRA,
# 1 process each and as many as the GPUs allow. Writes gpu_distributed.json and gpu_distributed.md (losses and their
# difference from the single-GPU run, peak memory per process, wall time, sharding, success) into $OUT, or into
# benchmarks/results when OUT is unset. What each case runs: benchmarks/gpu_distributed.py.
#
#   benchmarks/gpu_distributed.sh                              # on the GPU machine
#   OUT=/tmp/bench benchmarks/gpu_distributed.sh --steps 20    # extra flags go to gpu_distributed.py
#   GNM_BENCH_DRY_RUN=1 benchmarks/gpu_distributed.sh          # CPU plumbing check: tiny model, 2 CPU processes
#
# Needs the package with its deepspeed extra (pip install -e '.[deepspeed]'); PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
OUT=${OUT:-benchmarks/results}
export TOKENIZERS_PARALLELISM=false
# DeepSpeed JIT-builds small extensions on first use; keep them between runs.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${HOME:-/tmp}/.cache/gnm_torch_extensions}

flags=(--out "$OUT")
if [[ -n "${GNM_BENCH_DRY_RUN:-}" ]]; then
    flags+=(--dry-run --budget 900 --case-timeout 300)
fi
# The script keeps its own time budget (skipping later cases); this is the hard stop, results so far are on disk.
exec timeout --signal=TERM 480 "$PYTHON" benchmarks/gpu_distributed.py "${flags[@]}" "$@"
