#!/usr/bin/env bash
# The one script to run when a device is lent (< 8 minutes on one H100/H200): the throughput bound (bare
# forward, pinned device-to-host copy, fsync'd disk write in the experiment folder, capture in memory and to
# disk), fused projection and live chat when their benches exist, generate vs HF generate, bf16 capture
# exactness and bitsandbytes. Writes its table to $OUT/gpu_check.md when OUT is set (else bench/results/).
# Extra arguments go to bench/gpu_check.py (e.g. --device cpu to check the script where no GPU is lent).
#
# The GPU machine has no network: packages it lacks travel as wheels in .whl/ (git-ignored), made here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d .whl bitsandbytes==0.50.2 transformers==5.24.0
set -uo pipefail
cd "$(dirname "$0")/.."
# the repo root on the path: the machine gets a copy of the tree, not the editable install
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
out=${OUT:-bench/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
# the whole check stays inside the device time a task is lent (GPU_CHECK_TIMEOUT seconds)
timeout "${GPU_CHECK_TIMEOUT:-470}" $PY -m bench.gpu_check --out "$out/gpu_check.md" "$@"
