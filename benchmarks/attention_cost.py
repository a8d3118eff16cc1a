"""What buffer-independent attention costs per target pass: GPT-2 XL's attention (25 heads of 64, 48 layers) as
the model runs it now (`attend`: float32 sums, one block of 256 keys after another, over the blocks up to the pass's
last position, on the cache as the model stores it: float32 on the CPU) against the fused
`scaled_dot_product_attention` over the whole buffer in the model's dtype that it replaced (whose rounding moves
with the buffer's length: docs/design.md, "The KV cache"). Medians of interleaved repeats, in ms
per pass (one layer's time x 48); the new tokens sit at the given position of a buffer of that position + 256
new tokens + 7 slots of room (a CLI run's).

    python benchmarks/attention_cost.py --out benchmarks/results/attention-cost.json
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
from gpt2_model import KVCache, attend  # noqa: E402
from speculative_gpt2.machine import hardware_name  # noqa: E402

N_HEAD, HEAD_SIZE, N_LAYER = 25, 64, 48


def layer_ms(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--positions", type=int, nargs="+", default=[16, 240, 700])
    parser.add_argument("--shapes", nargs="+", default=["1x1", "1x8", "8x8"], help="batch x new tokens")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    print(f"{hardware_name(torch.device('cpu'))}, torch {torch.__version__}: ms per XL pass (48 layers)")
    print(f"{'dtype':>9} {'BxT':>5} {'position':>8} | {'fused, buffer':>13} {'attend, span':>12} {'ratio':>6}")
    results = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for shape in args.shapes:
            B, T = map(int, shape.split("x"))
            for position in args.positions:
                buffer = position + 256 + 7
                slots = KVCache.slots(buffer)
                k, v = (torch.randn(B, N_HEAD, slots, HEAD_SIZE).to(dtype) for _ in range(2))
                stored_k, stored_v = k.float(), v.float()  # what the model's cache holds on the CPU
                q = torch.randn(B, N_HEAD, T, HEAD_SIZE).to(dtype)
                positions = torch.arange(position, position + T).expand(B, T)
                span = min(slots, KVCache.slots(position + T))
                whole = (positions[:, :, None] >= torch.arange(buffer))[:, None]
                spanned = (positions[:, :, None] >= torch.arange(span))[:, None]
                fused, blocked = [], []
                for _ in range(args.repeats):  # interleaved
                    fused += layer_ms(lambda: F.scaled_dot_product_attention(
                        q, k[:, :, :buffer], v[:, :, :buffer], attn_mask=whole), 1)
                    blocked += layer_ms(lambda: attend(q, stored_k[:, :, :span], stored_v[:, :, :span],
                                                       spanned).to(dtype), 1)
                old, new = N_LAYER * statistics.median(fused), N_LAYER * statistics.median(blocked)
                results.append({"dtype": dtype_name, "batch": B, "new_tokens": T, "position": position,
                                "fused_buffer_ms": old, "attend_span_ms": new})
                print(f"{dtype_name:>9} {shape:>5} {position:>8} | {old:13.1f} {new:12.1f} {new / old:6.2f}",
                      flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": hardware_name(torch.device("cpu")),
                                              "torch": torch.__version__, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
