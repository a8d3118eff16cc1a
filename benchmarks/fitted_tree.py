"""A tree fitted during the call (tree_search.FittedTree) against one fitted before it on a calibration run and
against the chain: tokens per target pass and decode tokens/s, configurations interleaved prompt by prompt.

The pair: the target and a noisy copy of it (weights perturbed by `--noise` of each tensor's std; 0.2 on the random
GPT-2 small shape is the pair of total variation about 0.13 of benchmarks/trees.py). FittedTree starts each call
afresh ("fresh", as the command line's `--tree auto` does) or carries what it measured in the call before
("carried", a library user passing one object to several calls); the calibrated tree is `best_tree` at the
acceptance by rank of 32 tokens of rounds that try 8 first drafts on the same prompt (what `--tree auto` did before
the fit moved into the call; not timed here). Fresh FittedTrees also fit by costs: the rounds' measured times
(`costs="measured"`, the command line's at temperature 0) and the paper's cost model (`costs=c`, c the draft's
bytes of weights over the target's, the command line's at temperature > 0).

    python benchmarks/fitted_tree.py --target weights/random-gpt2 --out benchmarks/results/fitted-tree.json
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
from speculative import autoregressive_sample, speculative_sample  # noqa: E402
from speculative_gpt2.machine import hardware_name  # noqa: E402
from speculative_gpt2.random_checkpoint import noisy_copy  # noqa: E402
from speculative_gpt2.report import cost_ratio  # noqa: E402
from speculative_gpt2.tree_search import FittedTree, acceptance_by_rank, best_tree  # noqa: E402
from speculative_gpt2.trees import TreeShape  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="weights/random-gpt2", help="a checkpoint folder or preset")
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--prompts", type=int, default=4, help="prompts (random token ids) per configuration")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--out", default=None, help="write the raw results to this JSON file")
    args = parser.parse_args(argv)
    target = GPT2.from_pretrained(args.target)
    draft = noisy_copy(target, args.noise, seed=1)
    carried = FittedTree()
    c = cost_ratio(target, draft)
    results = {name: [] for name in ("chain K=4", "calibrated", "FittedTree fresh", "FittedTree carried",
                                     "FittedTree, measured costs", f"FittedTree, costs c = {c:.2f}")}
    for i in range(args.prompts):
        prompt = torch.randint(0, target.config.vocab_size, (12,), generator=torch.Generator().manual_seed(i)).tolist()
        options = dict(temperature=args.temperature, generator=None)
        calibration = speculative_sample(target, draft, prompt, 32, lookahead=(8,), trace=True, **options)
        calibrated = best_tree(acceptance_by_rank(calibration.trace, 8), 15, 4)
        policies = {"chain K=4": 4, "calibrated": calibrated, "FittedTree fresh": FittedTree(),
                    "FittedTree carried": carried, "FittedTree, measured costs": FittedTree(costs="measured"),
                    f"FittedTree, costs c = {c:.2f}": FittedTree(costs=c)}
        plain = autoregressive_sample(target, prompt, args.max_new_tokens, **options)
        for name, policy in policies.items():
            torch.manual_seed(i)
            start = time.perf_counter()
            out = speculative_sample(target, draft, prompt, args.max_new_tokens, lookahead=policy, **options)
            seconds = time.perf_counter() - start
            decode = seconds - out.prefill_seconds
            same = out.tokens == plain.tokens if args.temperature == 0 else None
            results[name].append({"prompt": i, "tokens_per_pass": len(out.tokens) / len(out.rounds),
                                  "decode_tokens_per_s": len(out.tokens) / decode, "same_as_plain": same,
                                  "nodes_per_pass": statistics.mean(r.nodes for r in out.rounds)})
            print(f"prompt {i} {name:<20} {len(out.tokens) / len(out.rounds):.2f} tokens/pass, "
                  f"{len(out.tokens) / decode:.2f} tokens/s, {statistics.mean(r.nodes for r in out.rounds):.1f} "
                  f"nodes/pass" + ("" if same is None else f", same text as plain: {same}"), flush=True)
    print(f"\n{hardware_name(torch.device('cpu'))}; medians over {args.prompts} prompts:")
    for name, rows in results.items():
        print(f"{name:<20} {statistics.median(r['tokens_per_pass'] for r in rows):.2f} tokens/pass, "
              f"{statistics.median(r['decode_tokens_per_s'] for r in rows):.2f} tokens/s")
    print(f"FittedTree carried, last fit: {carried} parents={','.join(map(str, carried.parents))}, acceptance "
          f"{' '.join(f'{a:.2f}' for a in carried.acceptance())}")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": hardware_name(torch.device("cpu")), "args": vars(args),
                                              "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
