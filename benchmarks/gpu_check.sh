#!/usr/bin/env bash
# The GPU check of issue 13, prepared to run as ONE command on one H100 (≤ 8 minutes, no network):
#   1. the CUDA tests on tiny models (pytest -m gpu);
#   2. the LLaMA-2-7B-shaped preparation on CUDA with bf16 weights (benchmarks/gpu_prepare.py): time and
#      torch.cuda.max_memory_allocated per stage, against the paper's 232 s and 17,098 MB on one A800.
# The machine's python3 (3.12) has torch, transformers, peft, accelerate, safetensors, numpy and scipy but not
# pydantic, zarr or datasets: run `bash benchmarks/gpu_wheels.sh` here first, then, through the device tool,
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Results land in $OUT (gpu-tests.log, gpu-prepare.log, gpu_prepare.json).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
timeout 120 python3 -m pytest -q -m gpu tests/tlora/test_stream.py -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log" \
  || echo "gpu tests failed (see gpu-tests.log)"
timeout 420 python3 benchmarks/gpu_prepare.py --folder /tmp/llama2-7b-shape --out "$out/gpu_prepare.json" 2>&1 \
  | tee "$out/gpu-prepare.log"
