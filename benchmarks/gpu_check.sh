#!/usr/bin/env bash
# One prepared run on a lent NVIDIA GPU (the device tool runs it from the repository root):
#   random checkpoints of the real GPT-2 XL / small shapes, the CUDA tests, then the benchmark on CUDA in bf16 and
#   fp32, 128 new tokens. Tables and raw JSON go under $OUT (default bench-out/gpu).
#   bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-bench-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda-tests.txt"
for dtype in bfloat16 float32; do
  python benchmarks/bench.py --random-weights --device cuda --dtype "$dtype" --max-new-tokens 128 \
    --lookahead 1 2 4 8 --repeats 3 --out "$OUT/$dtype" 2>"$OUT/bench-$dtype.err" | tee "$OUT/bench-$dtype.md"
done
