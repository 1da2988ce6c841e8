#!/usr/bin/env bash
# Issue 14's GPU checks in one run of under 9 minutes (benchmarks/gpu_proof.py says what each one does): the
# recipes through `gnm unlearn` against fp32 on the CPU, `gnm evaluate` on the GPU against the CPU, FSDP2 and
# ZeRO-3 against a plain run, speed.py --preset gpu. Writes gpu_proof.json, gpu_proof.md and gpu_logs.tar.gz into
# $OUT (benchmarks/results/gpu_proof when OUT is unset) after every check, and prints the summary.
#
#   benchmarks/gpu_wheels.sh                     # here, once: the packages the GPU machine lacks, into .whl/
#   benchmarks/gpu_proof.sh                      # there: installs .whl/ into /tmp/site when it is present, then runs
#   benchmarks/gpu_proof.sh --only speed         # rerun only what failed (extra flags go to gpu_proof.py)
#   GNM_BENCH_DRY_RUN=1 benchmarks/gpu_proof.sh  # CPU check of the whole run: every stage's dry run
#
# PYTHON picks the interpreter (python3 on the GPU machine's image).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu_proof}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# DeepSpeed JIT-builds small extensions on first use; keep them between runs.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${HOME:-/tmp}/.cache/gnm_torch_extensions}

if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
    # The GPU machine has no network: the packages its image lacks travel as wheels (benchmarks/gpu_wheels.sh),
    # installed beside its torch; the package itself runs from this checkout.
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

flags=(--out "$OUT")
if [[ -n "${GNM_BENCH_DRY_RUN:-}" ]]; then
    flags+=(--dry-run)
    exec "$PYTHON" benchmarks/gpu_proof.py "${flags[@]}" "$@"
fi
# gpu_proof.py keeps its own budget (510 s, stage by stage); this is the hard stop, what was measured is on disk.
exec timeout --signal=TERM 540 "$PYTHON" benchmarks/gpu_proof.py "${flags[@]}" "$@"
