#!/usr/bin/env bash
# The GPU path, checked in one short run on a machine with a CUDA GPU (the `device` tool's, or yours):
# the GPU tests, then the serving benchmark on CUDA at concurrency 1, 8 and 32. Results go to out/gpu/.
# Until this has run and its figures are in docs/benchmarks.md, the README calls the GPU path unverified.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p out/gpu
nvidia-smi | tee out/gpu/nvidia-smi.txt
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'; print(torch.cuda.get_device_name(0))"
"$PY" -m pytest -q tests/test_gpu.py 2>&1 | tee out/gpu/tests.txt
"$PY" bench/serve_bench.py --device cuda --concurrency 1,8,32 --requests 64 --batch-size 32 \
    --output out/gpu/benchmarks.md --json out/gpu/serve_bench.json --logs out/gpu 2>&1 | tee out/gpu/bench.txt
