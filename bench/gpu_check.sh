#!/usr/bin/env bash
# The one script to run when a GPU is lent (< 8 minutes on one H100): bitsandbytes 8/4-bit load + capture,
# bf16 CUDA capture exactness, capture vs bare forward and generate vs HF generate on the gemma-2-2b shape,
# and the streaming overhead. Writes its table to $OUT/gpu_check.md when OUT is set (else bench/results/).
#
# The GPU machine has no network: packages it lacks travel as wheels in .whl/ (git-ignored), made here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d .whl bitsandbytes==0.50.2 transformers==5.24.0
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
out=${OUT:-bench/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 470 $PY bench/gpu_check.py --out "$out/gpu_check.md" "$@"
