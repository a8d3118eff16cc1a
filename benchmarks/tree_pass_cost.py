"""What a token tree's passes cost against a chain's, on the real shapes: the target's verification of each tree (one
pass of 1 + nodes rows) and the draft's growth (one pass per depth, of each depth's nodes), against plain decoding's
1-row pass; then, with tokens per target pass measured by benchmarks/trees.py, what each configuration would
decode per second.

    python benchmarks/tree_pass_cost.py --target weights/random-gpt2-xl --draft weights/random-gpt2 \\
        --tokens-per-pass benchmarks/results/trees-small-float32-t1.json --out benchmarks/results/tree-pass-cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from gpt2_model import GPT2  # noqa: E402
from speculative_gpt2.machine import hardware_name, native_bfloat16  # noqa: E402
from speculative_gpt2.packing import can_pack, pack_linears  # noqa: E402
from speculative_gpt2.trees import TreeShape, tree_pass  # noqa: E402

SHAPES = [(1,), (1, 1), (1, 1, 1), (1, 1, 1, 1), (2, 2), (3, 2), (4, 2), (6, 2), (2, 2, 2), (3, 2, 1), (4, 2, 2),
          (2, 2, 2, 2), (3, 2, 2, 1)]
CONTEXT = 100  # tokens of text before the tree


@torch.inference_mode()
def pass_ms(model, shape: TreeShape | None, rows: int, repeats: int, first: int = 0) -> float:
    """Median ms of one pass of `rows` places of `shape`'s tree (None: a plain 1-row step) after CONTEXT tokens."""
    depth = len(shape.widths) if shape else 0
    cache = model.new_cache(1, max_len=CONTEXT + 1, room=shape.nodes(depth) if shape else 0)
    model(torch.zeros(1, CONTEXT, dtype=torch.long), cache)
    times = []
    for _ in range(repeats):
        cache.crop(CONTEXT)
        idx = torch.zeros(1, rows, dtype=torch.long)
        started = time.perf_counter()
        if shape is None:
            model(idx, cache)
        else:
            cache.lengths = [CONTEXT + first]
            tree_pass(model, shape.layout(depth, 1, idx.device), idx, cache, first=first)
        times.append(1e3 * (time.perf_counter() - started))
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="weights/random-gpt2-xl")
    parser.add_argument("--draft", default="weights/random-gpt2")
    parser.add_argument("--dtype", default="bfloat16" if native_bfloat16() else "float32",
                        choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tokens-per-pass", default=None,
                        help="benchmarks/trees.py's JSON: project tokens/s from its tokens per target pass")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    models = {role: GPT2.from_pretrained(path, dtype=dtype, download=False)
              for role, path in (("target", args.target), ("draft", args.draft))}
    models = {role: pack_linears(m) if can_pack(m) else m for role, m in models.items()}
    print(f"{args.target} / {args.draft}, {args.dtype}, {hardware_name(torch.device('cpu'))}, torch "
          f"{torch.__version__}; ms per pass after {CONTEXT} tokens (median of {args.repeats})", flush=True)
    step = {role: pass_ms(m, None, 1, args.repeats) for role, m in models.items()}
    print(f"plain 1-row step: target {step['target']:.1f} ms, draft {step['draft']:.1f} ms", flush=True)
    costs = {}
    for widths in SHAPES:
        shape = TreeShape(widths)
        N = shape.nodes(len(widths))
        verify = pass_ms(models["target"], shape, 1 + N, args.repeats)
        # The draft's passes: the pending token (1 row), then each depth but the last, its nodes.
        drafting = step["draft"]
        for depth in range(1, len(widths)):
            first, count = 1 + shape.nodes(depth - 1), shape.nodes(depth) - shape.nodes(depth - 1)
            drafting += pass_ms(models["draft"], shape, count, args.repeats, first=first)
        name = f"chain K={len(widths)}" if set(widths) == {1} else "tree " + "x".join(map(str, widths))
        costs[name] = {"nodes": N, "verify_ms": verify, "draft_ms": drafting,
                       "round_in_steps": (verify + drafting) / step["target"]}
        print(f"{name:>16}: {N:>2} nodes, verification {verify:.1f} ms ({verify / step['target']:.2f} steps), "
              f"drafting {drafting:.1f} ms; a round costs {costs[name]['round_in_steps']:.2f} plain steps", flush=True)
    projected = []
    if args.tokens_per_pass:
        measured = json.loads(Path(args.tokens_per_pass).read_text())
        for row in measured["results"]:
            if row["config"] in costs:
                speedup = row["tokens_per_pass"] / costs[row["config"]]["round_in_steps"]
                projected.append({**{k: row[k] for k in ("noise", "depth", "config", "tokens_per_pass")},
                                  "projected_speedup_over_plain": speedup})
                print(f"noise {row['noise']:<5} {row['config']:>16}: {row['tokens_per_pass']:.2f} tokens per pass -> "
                      f"{speedup:.2f}x plain decoding (projected)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "machine": hardware_name(torch.device("cpu")),
                                             "torch": torch.__version__, "step_ms": step, "costs": costs,
                                             "projected": projected}, indent=1) + "\n")


if __name__ == "__main__":
    main()
