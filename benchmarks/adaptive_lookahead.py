"""Simulate `AdaptiveLookahead` against every fixed K, with a measured cost model and i.i.d. acceptance.

Each round proposes K drafts, keeps each with probability alpha until the first rejection, emits one more token,
and costs K * t_draft + t_verify(K + 1). The policies under test are the real ones of lookahead.py, fed the same
`Round`s they get in `speculative_sample`.

    python benchmarks/adaptive_lookahead.py                       # the GPT-2 XL / small fp32 costs below
    python benchmarks/adaptive_lookahead.py --costs bench-out/bench.json
"""

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from the checkout
from speculative_gpt2.lookahead import AdaptiveLookahead, FixedLookahead, LookaheadPolicy, Round, interpolate  # noqa: E402

# GPT-2 XL 1-row and (K+1)-row passes (weights [out, in], before GPT2.prepare's oneDNN copies) and the GPT-2 small
# 1-row pass, fp32, ms: medians of 4 interleaved rounds on a 2-core AMD EPYC (AVX2), torch 2.13 (README, "Results").
XL_SMALL_FP32 = {"target_ms": 677.8, "draft_ms": 63.2, "verify_ms": {"2": 646.2, "3": 812.2, "5": 808.6, "9": 1150.2}}


def verify_cost(costs: dict, rows: int) -> float:
    """t_verify(rows), linear between measured sizes (1 row: the target's pass), the last slope beyond them."""
    points = {1: costs["target_ms"], **{int(k): v for k, v in costs["verify_ms"].items()}}
    return interpolate(points, rows, extend_slope=True)


def simulate(policy: LookaheadPolicy, alpha: float, costs: dict, n_tokens: int = 3000, seed: int = 0) -> float:
    """Tokens per second of a lookahead policy."""
    rng = random.Random(seed)
    tokens, ms = 0, 0.0
    while tokens < n_tokens:
        K = policy.choose()
        kept = 0
        while kept < K and rng.random() < alpha:
            kept += 1
        round = Round(K, kept, K * costs["draft_ms"], verify_cost(costs, K + 1))
        policy.update(round)
        tokens += kept + 1
        ms += round.draft_ms + round.verify_ms
    return 1e3 * tokens / ms


def compare(alpha: float, costs: dict, max_fixed: int = 12, seed: int = 0) -> dict:
    """Tokens/s of every fixed K and of the adaptive policy, on the same random acceptances."""
    fixed = {K: simulate(FixedLookahead(K), alpha, costs, seed=seed) for K in range(1, max_fixed + 1)}
    auto = simulate(AdaptiveLookahead(), alpha, costs, seed=seed)
    best = max(fixed, key=fixed.get)
    return {"alpha": alpha, "best_K": best, "best": fixed[best], "auto": auto, "ratio": auto / fixed[best]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--costs", help="a bench.json whose measured costs to use (default: XL/small fp32 above)")
    args = parser.parse_args()
    costs = json.loads(Path(args.costs).read_text())["costs"] if args.costs else XL_SMALL_FP32
    print("| alpha | best fixed K | tokens/s (best K) | tokens/s (auto) | auto / best |")
    print("|---:|---:|---:|---:|---:|")
    for alpha in (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0):
        r = compare(alpha, costs)
        print(f"| {alpha:.2f} | {r['best_K']} | {r['best']:.3f} | {r['auto']:.3f} | {r['ratio']:.3f} |")
