#!/usr/bin/env bash
# The Python packages that the GPU machine's image lacks, or holds in versions older than setup.cfg asks, as wheels in
# .whl/ (ignored by git), for benchmarks/gpu_proof.sh to install there: that machine reaches no package index. The
# versions are those installed here (the ones the test suite passes with); the GPU machine's own torch, CUDA
# libraries and large binary packages (numpy, pyarrow, pandas, matplotlib, ...) are used as they are.
#
#   benchmarks/gpu_wheels.sh          # needs the package installed here with its deepspeed extra
#
# DeepSpeed and rouge-score publish no wheels: they are built here (pure Python: DeepSpeed builds its ops on first
# use). About 41 MB in all; a device call carries 64 MiB with the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
DEST=.whl
version() { "$PYTHON" -m pip show "$1" | awk '/^Version:/ {print $2}'; }
# What the GPU machine's image provides and this must not replace (its CUDA build of torch and what is built for it).
PROVIDED='^(nvidia|cuda)-|^(torch|triton|numpy|pandas|pyarrow|matplotlib|pillow|fonttools|kiwisolver|contourpy|sympy|networkx|mpmath|cycler|pyparsing|python-dateutil|tzdata)=='
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux1_x86_64)

rm -rf "$DEST" && mkdir -p "$DEST"
requirements=()
for name in transformers trl peft accelerate datasets tokenizers huggingface_hub nltk pydantic hjson absl-py pyyaml tqdm; do
    requirements+=("$name==$(version "$name")")
done
# The closure of those requirements for the GPU machine's Python (3.12, x86-64 Linux), resolved from the index's
# metadata alone (nothing downloaded), less what the image provides; then only those wheels are downloaded.
report=$(mktemp)
"$PYTHON" -m pip install -q --dry-run --ignore-installed --report "$report" --target "$(mktemp -d)" "${PLATFORM[@]}" \
    "${requirements[@]}"
mapfile -t closure < <("$PYTHON" -c 'import json, re, sys
for item in json.load(open(sys.argv[1]))["install"]:
    metadata = item["metadata"]
    print(re.sub(r"[-_.]+", "-", metadata["name"]).lower() + "==" + metadata["version"])' "$report" | grep -v -E "$PROVIDED")
rm -f "$report"
"$PYTHON" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$DEST" "${closure[@]}"
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" \
    "deepspeed==$(version deepspeed)" "rouge-score==$(version rouge-score)"
ls "$DEST" | sed 's/-[0-9].*//' | sort | uniq -d | grep . && { echo "two versions of one package in $DEST" >&2; exit 1; }
du -sh "$DEST"
