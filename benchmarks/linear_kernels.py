"""float32 products of GPT-2 XL's shapes at a few rows: the kernels torch offers on the CPU, GB/s of weight read.

F.linear (MKL on the plain weight, what `transformers` runs), oneDNN on a packed weight (what `pack_linears` makes,
one copy serving every row count), and MKL's packed GEMM (`torch.ops.mkl._mkl_linear`, packed for one row count: a
pass of another count falls back to the plain weight, so serving both would hold two copies). Eight copies of each
weight are cycled so that every product reads its weight from memory, as a pass over 48 layers does. Beside them,
torch's int8 product (`_weight_int8pack_mm`, what speculative_gpt2/int8.py runs) with float32 and with bfloat16
activations, GB/s of its int8 weight.

    python benchmarks/linear_kernels.py --rows 1 2 3 4 5 --out benchmarks/results/linear-kernels-float32.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from speculative_gpt2.int8 import quantize_rows  # noqa: E402
from speculative_gpt2.machine import hardware_name  # noqa: E402

SHAPES = {"attention in": (1600, 4800), "MLP in": (1600, 6400), "MLP out": (6400, 1600), "attention out": (1600, 1600)}
COPIES = 8


def ms_per_product(product, weights, repeats: int) -> float:
    for weight in weights[:3]:
        product(weight)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for weight in weights:
            product(weight)
        times.append((time.perf_counter() - started) * 1e3 / len(weights))
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 5], help="the row counts of the products")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    print(f"{hardware_name(torch.device('cpu'))}, torch {torch.__version__}, float32; GB/s of weight read "
          f"(median of {args.repeats})", flush=True)
    results = []
    for name, (n_in, n_out) in SHAPES.items():
        plain = [torch.randn(n_out, n_in) * 0.02 for _ in range(COPIES)]
        bias = torch.zeros(n_out)
        gb = plain[0].numel() * 4 / 1e9
        onednn = [torch.ops.mkldnn._reorder_linear_weight(w, 2) for w in plain]
        int8 = [quantize_rows(w) for w in plain]
        for rows in args.rows:
            x = torch.randn(1, rows, n_in)
            mkl = [(w, torch.ops.mkl._mkl_reorder_linear_weight(w, rows)) for w in plain]
            kernels = {
                "F.linear": (lambda w: F.linear(x, w, bias), plain),
                "oneDNN packed": (lambda w: torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], ""), onednn),
                "MKL packed for this row count": (lambda wm: torch.ops.mkl._mkl_linear(x.view(rows, n_in), wm[1], wm[0],
                                                                                        bias, rows), mkl),
            }
            int8_products = {
                f"int8, {dtype} activations": (
                    lambda w, dtype=dtype: torch.ops.aten._weight_int8pack_mm(x.view(rows, n_in).to(dtype), *w),
                    [(q, scales.to(dtype)) for q, scales in int8]) for dtype in (torch.float32, torch.bfloat16)}
            row = {"shape": name, "in": n_in, "out": n_out, "rows": rows}
            for kernel, (product, weights) in kernels.items():
                row[kernel] = gb / (ms_per_product(product, weights, args.repeats) / 1e3)
            for kernel, (product, weights) in int8_products.items():  # a quarter of the bytes
                row[kernel] = gb / 4 / (ms_per_product(product, weights, args.repeats) / 1e3)
            results.append(row)
            print(f"{name:>13} {rows} row{'s' if rows > 1 else ' '}: " + ", ".join(
                f"{k} {row[k]:.1f}" for k in kernels | int8_products), flush=True)
    if args.out:
        meta = {"command": "python benchmarks/linear_kernels.py " + " ".join(argv or sys.argv[1:]),
                "hardware": hardware_name(torch.device("cpu")), "torch": torch.__version__}
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
