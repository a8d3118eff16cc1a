"""Token trees against chains: tokens per target pass and decode speed at the same draft depth.

Pairs of measured total variation, as benchmarks/coupled_price.py makes them: the target and noisy copies of it
(its weights perturbed by 0.05, 0.2 and 0.8 of each tensor's std; on the random GPT-2 small shape at temperature 1,
TV about 0.04, 0.13 and 0.33). For each depth (the draft passes a round makes), the chain of that many drafts and
trees of that depth decode the same prompts, configurations interleaved prompt by prompt; greedy or sampled.
With --best N ..., each pair also gets the best tree of N nodes for each depth (Sequoia's dynamic program,
speculative_gpt2/tree_search.py), fitted to the ranks kept in a calibration run of a tree 8 wide on other prompts.

    python benchmarks/trees.py --target weights/random-gpt2 --out benchmarks/results/trees-small.json
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
from speculative import speculative_sample  # noqa: E402
from speculative_gpt2.machine import hardware_name  # noqa: E402
from speculative_gpt2.packing import can_pack, pack_linears  # noqa: E402
from speculative_gpt2.random_checkpoint import noisy_copy  # noqa: E402
from speculative_gpt2.tree_search import acceptance_by_rank, best_tree, expected_kept  # noqa: E402
from speculative_gpt2.trees import ExpandingTree, TreeShape  # noqa: E402

SHAPES = {2: [2, (2, 2), (3, 2), (4, 2), (6, 2)], 3: [3, (2, 2, 2), (3, 2, 1), (4, 2, 2)],
          4: [4, (2, 2, 2, 2), (3, 2, 2, 1), (4, 2, 2, 1), (3, 3, 2, 1), (4, 3, 2, 1)]}
# Trees grown where the draft is most confident (trees.ExpandingTree): width children, `expand` nodes given children
# per depth.
for _depth in SHAPES:
    SHAPES[_depth] += [ExpandingTree(_depth, 3, 1), ExpandingTree(_depth, 3, 2), ExpandingTree(_depth, 4, 2)]


CALIBRATION_WIDTH = 8  # the ranks whose acceptance a calibration run measures


def label(shape) -> str:
    if isinstance(shape, ExpandingTree):
        return f"expanding {shape.width}/{shape.expand}"
    if isinstance(shape, TreeShape):
        return f"best, {len(shape.parents)} nodes"
    return f"chain K={shape}" if isinstance(shape, int) else "tree " + "x".join(map(str, shape))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="weights/random-gpt2", help="a checkpoint folder or preset")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.05, 0.2, 0.8],
                        help="noise scales of the target's noisy copies (times each tensor's std)")
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 3, 4], choices=sorted(SHAPES))
    parser.add_argument("--prompts", type=int, default=4, help="prompts (random token ids) per configuration")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--best", type=int, nargs="*", default=[],
                        help="node budgets of best trees fitted to each pair's measured acceptance (e.g. 8 15)")
    parser.add_argument("--out", default=None, help="write the raw results to this JSON file")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    target = GPT2.from_pretrained(args.target, download=False)
    drafts = {noise: noisy_copy(target, noise, seed=2).to(dtype) for noise in args.noise}
    target = target.to(dtype)
    if can_pack(target):
        target, drafts = pack_linears(target), {noise: pack_linears(d) for noise, d in drafts.items()}
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, target.config.vocab_size, (8,), generator=gen).tolist() for _ in range(args.prompts)]
    print(f"{args.target}, {args.dtype}, {hardware_name(torch.device('cpu'))}, torch {torch.__version__}, "
          f"temperature {args.temperature}, {args.prompts} prompts x {args.max_new_tokens} tokens", flush=True)
    calibration = [torch.randint(0, target.config.vocab_size, (8,), generator=gen).tolist() for _ in prompts]
    results, fitted = [], {}
    for noise, draft in drafts.items():
        speculative_sample(target, draft, prompts[0], 8, lookahead=(2, 2))  # warm-up
        if args.best:  # the ranks kept below the pending token, on prompts that are not the measured ones
            traces = [round for i, prompt in enumerate(calibration) for round in speculative_sample(
                target, draft, prompt, args.max_new_tokens, lookahead=(CALIBRATION_WIDTH,), trace=True,
                temperature=args.temperature, generator=torch.Generator().manual_seed(1000 + i)).trace]
            acceptance = acceptance_by_rank(traces, CALIBRATION_WIDTH)
            fitted[noise] = acceptance
            print(f"noise {noise}: acceptance by rank " + " ".join(f"{a:.3f}" for a in acceptance), flush=True)
        for depth in args.depths:
            fits = {str(shape): shape for shape in (best_tree(acceptance, n, depth) for n in args.best if n >= depth)}
            shapes = SHAPES[depth] + list(fits.values())  # one of each: two budgets may fit the same tree
            for shape in shapes[len(SHAPES[depth]):]:
                print(f"  best tree of {len(shape.parents)} nodes, depth {depth}: {shape} (predicted "
                      f"{1 + expected_kept(shape, acceptance):.2f} tokens/pass; the chain "
                      f"{1 + expected_kept(TreeShape((1,) * depth), acceptance):.2f})", flush=True)
            runs = {label(shape): {"tokens": 0, "passes": 0, "seconds": []} for shape in shapes}
            for i, prompt in enumerate(prompts):  # configurations interleaved, prompt by prompt
                for shape in shapes:
                    started = time.perf_counter()
                    out = speculative_sample(target, draft, prompt, args.max_new_tokens, lookahead=shape,
                                             temperature=args.temperature,
                                             generator=torch.Generator().manual_seed(i))
                    run = runs[label(shape)]
                    run["seconds"].append(time.perf_counter() - started)
                    run["tokens"] += len(out.tokens)
                    run["passes"] += out.target_calls
            chain = runs[label(depth)]
            for name, run in runs.items():
                row = {"noise": noise, "depth": depth, "config": name, "tokens": run["tokens"],
                       "target_passes": run["passes"], "tokens_per_pass": run["tokens"] / run["passes"],
                       "tokens_per_second": run["tokens"] / sum(run["seconds"]),
                       "median_call_seconds": statistics.median(run["seconds"])}
                row["per_pass_over_chain"] = row["tokens_per_pass"] / (chain["tokens"] / chain["passes"])
                row["speed_over_chain"] = row["tokens_per_second"] / (chain["tokens"] / sum(chain["seconds"]))
                if isinstance(shape := next((x for x in shapes if label(x) == name), None), (TreeShape, ExpandingTree)):
                    row["shape"] = str(shape)
                results.append(row)
                print(f"noise {noise:<5} depth {depth} {name:>15}: {row['tokens_per_pass']:.2f} tokens/pass "
                      f"({row['per_pass_over_chain']:.2f}x the chain), {row['tokens_per_second']:.1f} tokens/s "
                      f"({row['speed_over_chain']:.2f}x)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "machine": hardware_name(torch.device("cpu")),
                                             "torch": torch.__version__, "acceptance_by_rank": fitted,
                                             "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
