#!/usr/bin/env bash
# The CUDA checks, for a session that is lent a GPU: the CUDA tests and the GEMM benchmark, in
# under 5 minutes. Writes results under ${OUT:-benchmarks/results}.
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
# the GPU machine has its own torch: install the package without touching it
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -1 || true
python -m pip install -q pytest 2>&1 | tail -1 || true
timeout 180 python -m pytest -q tests/test_cuda.py tests/test_lower_int_gemm.py -x 2>&1 | tee "$OUT/gpu_tests.txt" | tail -5
timeout 120 python benchmarks/bench_gemm.py --device cuda --out "$OUT/gemm_cuda.json"
