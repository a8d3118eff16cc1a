"""What a token tree's passes cost against a chain's, on the real shapes: the target's verification of each tree (one
pass of 1 + nodes rows) and the draft's growth (one pass per depth, of each depth's nodes), against plain decoding's
1-row pass; then, with tokens per target pass measured by benchmarks/trees.py, what each configuration would
decode per second. Each pass is timed on plain and on oneDNN-packed weights (each layout twice, alternating, after a
warm-up) and counted at the faster, as a run lays its models out for its own row counts (speculative_gpt2/packing.py,
lay_out); the trees of the JSON given (fixed widths and fitted parents) are measured beside the built-in shapes.

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
from speculative_gpt2.packing import can_pack, pack_linears, unpack_linears  # noqa: E402
from speculative_gpt2.trees import TreeShape, tree_pass  # noqa: E402

SHAPES = [(1,), (1, 1), (1, 1, 1), (1, 1, 1, 1), (2, 2), (3, 2), (4, 2), (6, 2), (8,), (2, 2, 2), (3, 2, 1),
          (4, 2, 2), (2, 2, 2, 2), (3, 2, 2, 1)]
CONTEXT = 100  # tokens of text before the tree


@torch.inference_mode()
def pass_ms(model, shape: TreeShape | None, rows: int, repeats: int, first: int = 0) -> float:
    """Median ms of one pass of `rows` places of `shape`'s tree (None: a plain 1-row step) after CONTEXT tokens."""
    depth = shape.max_lookahead if shape else 0
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


def layout_ms(models: dict, shapes: dict[str, TreeShape], repeats: int, layout: str) -> dict:
    """Every pass this benchmark times, with the models in one layout ("plain" or "packed"): the 1-row step of
    each, the target's verification of each tree, and the draft's pass over each depth's nodes but the last's."""
    ms = {}
    for role, model in models.items():
        if can_pack(model):
            (pack_linears if layout == "packed" else unpack_linears)(model)
        pass_ms(model, None, 1, 2)  # warm-up: a layout's first passes fault its weights' pages in
        ms[(role, "step")] = pass_ms(model, None, 1, repeats)
    for name, shape in shapes.items():
        ms[("target", name)] = pass_ms(models["target"], shape, 1 + shape.nodes(shape.max_lookahead), repeats)
        for d in range(1, shape.max_lookahead):
            first, count = 1 + shape.nodes(d - 1), shape.nodes(d) - shape.nodes(d - 1)
            ms[("draft", name, d)] = pass_ms(models["draft"], shape, count, repeats, first=first)
    return ms


def name_of(shape: TreeShape) -> str:
    """benchmarks/trees.py's name for a fixed shape ("chain K=4", "tree 3x2"); fitted trees keep theirs."""
    if set(shape.widths) == {1}:
        return f"chain K={len(shape.widths)}"
    return "tree " + "x".join(map(str, shape.widths))


def measured_shapes(rows: list[dict]) -> dict[str, TreeShape]:
    """The fixed and fitted trees of benchmarks/trees.py's results, by its names (expanding trees change shape
    every round and are left out)."""
    shapes = {}
    for row in rows:
        if row["config"].startswith("tree "):
            shapes[row["config"]] = TreeShape(tuple(int(w) for w in row["config"][5:].split("x")))
        elif row["config"].startswith("chain K="):
            shapes[row["config"]] = TreeShape((1,) * int(row["config"][8:]))
        elif str(row.get("shape", "")).startswith("parents="):
            shapes[row["config"]] = TreeShape.of_parents([int(p) for p in row["shape"][8:].split(",")])
    return shapes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="weights/random-gpt2-xl")
    parser.add_argument("--draft", default="weights/random-gpt2")
    parser.add_argument("--dtype", default="bfloat16" if native_bfloat16() else "float32",
                        choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tokens-per-pass", nargs="*", default=[],
                        help="benchmarks/trees.py's JSON files: project tokens/s from their tokens per target pass")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    models = {role: GPT2.from_pretrained(path, dtype=dtype, download=False)
              for role, path in (("target", args.target), ("draft", args.draft))}
    measured = []
    for path in args.tokens_per_pass:
        run = json.loads(Path(path).read_text())
        measured += [{**row, "temperature": run["args"].get("temperature", 1.0)} for row in run["results"]]
    shapes = {name_of(shape): shape for shape in map(TreeShape, SHAPES)} | measured_shapes(measured)
    print(f"{args.target} / {args.draft}, {args.dtype}, {hardware_name(torch.device('cpu'))}, torch "
          f"{torch.__version__}; ms per pass after {CONTEXT} tokens (median of {args.repeats}; each layout twice, "
          f"alternating, the faster)", flush=True)
    # Each layout twice, alternating, its passes at the faster of the two: this host's load moves between them.
    by_layout = {}
    for _ in range(2):
        for layout in ["plain", "packed"] if can_pack(models["target"]) else ["plain"]:
            ms = layout_ms(models, shapes, args.repeats, layout)
            by_layout[layout] = {key: min(t, by_layout.get(layout, ms)[key]) for key, t in ms.items()}
    # A run lays each model out for its own row counts (packing.lay_out): every pass at its faster layout.
    fastest = {key: min(ms[key] for ms in by_layout.values()) for key in next(iter(by_layout.values()))}
    step = {role: fastest[(role, "step")] for role in models}
    print(f"plain 1-row step: target {step['target']:.1f} ms, draft {step['draft']:.1f} ms", flush=True)
    costs = {}
    for name, shape in shapes.items():
        verify = fastest[("target", name)]
        # The draft's passes: the pending token (1 row), then each depth but the last, its nodes.
        drafting = step["draft"] + sum(fastest[("draft", name, d)] for d in range(1, shape.max_lookahead))
        costs[name] = {"nodes": shape.nodes(shape.max_lookahead), "verify_ms": verify, "draft_ms": drafting,
                       "round_in_steps": (verify + drafting) / step["target"],
                       "verify_ms_by_layout": {layout: ms[("target", name)] for layout, ms in by_layout.items()}}
        print(f"{name:>16}: {costs[name]['nodes']:>2} nodes, verification {verify:.1f} ms "
              f"({verify / step['target']:.2f} steps; "
              + ", ".join(f"{layout} {ms[('target', name)]:.1f}" for layout, ms in by_layout.items())
              + f"), drafting {drafting:.1f} ms; a round costs {costs[name]['round_in_steps']:.2f} plain steps",
              flush=True)
    projected = []
    for row in measured:
        if row["config"] in costs:
            speedup = row["tokens_per_pass"] / costs[row["config"]]["round_in_steps"]
            projected.append({**{k: row[k] for k in ("temperature", "noise", "depth", "config", "tokens_per_pass")},
                              "projected_speedup_over_plain": speedup})
            print(f"temperature {row['temperature']}, noise {row['noise']:<5} {row['config']:>16}: "
                  f"{row['tokens_per_pass']:.2f} tokens per pass -> {speedup:.2f}x plain decoding (projected)",
                  flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "machine": hardware_name(torch.device("cpu")),
                                             "torch": torch.__version__, "step_ms": step,
                                             "step_ms_by_layout": {layout: {role: ms[(role, "step")] for role in models}
                                                                   for layout, ms in by_layout.items()},
                                             "costs": costs,
                                             "projected": projected}, indent=1) + "\n")


if __name__ == "__main__":
    main()
