#!/usr/bin/env bash
# One prepared run on a lent NVIDIA GPU (the device tool runs it from the repository root):
#   random checkpoints of the real GPT-2 XL / small shapes (written by bench.py), the CUDA tests, then the
#   benchmark on CUDA, 128 new tokens. Tables and raw JSON go under $OUT (default bench-out/gpu). Device time is
#   short (15 minutes a session): check the first table before waiting for the others.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-bench-out/gpu}
mkdir -p "$OUT" bench-out/gpu-runs
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda-tests.txt"
# Each run: its table to $OUT/<name>.md, its raw times to $OUT/<name>.json (8 files come back from the device).
bench() {
  local name=$1; shift
  python benchmarks/bench.py --random-weights --device cuda --max-new-tokens 128 --out "bench-out/gpu-runs/$name" \
    "$@" 2>"bench-out/gpu-runs/$name.err" | tee "$OUT/$name.md" || tail -5 "bench-out/gpu-runs/$name.err"
  cp "bench-out/gpu-runs/$name/bench.json" "$OUT/$name.json"
}
# bf16 with CUDA graphs, all rows (transformers too); then eager bf16 and graphed fp32, ours only.
bench bf16-graphs --dtype bfloat16 --cuda-graphs --lookahead 1 2 4 8 --repeats 2
bench bf16-eager --dtype bfloat16 --lookahead 4 --repeats 2 --no-transformers --no-uncached
bench fp32-graphs --dtype float32 --cuda-graphs --lookahead 1 2 4 8 --repeats 2 --no-transformers --no-uncached
