"""Speed of this checkout against another commit's code, on the same weights, in one run.

Each round runs a worker process per version (the commit's tree, extracted with `git archive`, and this one), in
alternating order, so that load on a shared machine hits both alike; a worker loads the target, lays out its weights
for the CPU as that version does (`prepare()` before the packing module, `pack_linears` after, `lay_out` for each
run's passes since), warms up, and times
plain decoding and speculative sampling with K = 4 (the target as its own draft; prompt lookup) at temperature 0, a
method's warm-up and repeats one after another (a version that lays out its weights per run changes them once, not
before every run).
The table gives medians over rounds and the ratio after / before (tokens per second: above 1 is faster now).

    python benchmarks/before_after.py --before HEAD~1 --target weights/random-gpt2-xl --dtypes float32 bfloat16 \
        --json benchmarks/results/before-after.json
"""

from __future__ import annotations

import argparse
import io
import os
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("plain", "speculative, target itself, K=4", "speculative, ngram, K=4")

# Runs in a version's tree (its folder first on sys.path): prints one JSON object of tokens/s per method.
WORKER = r"""
import json, sys, time
import torch
from gpt2_model import GPT2
from speculative import autoregressive_sample, speculative_sample
from speculative_gpt2.drafters import PromptLookupDrafter
target_path, dtype, n, repeats = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
target = GPT2.from_pretrained(target_path, dtype=dtype, download=False)
if hasattr(target, "prepare"):
    target.prepare()
else:
    from speculative_gpt2 import packing
    if not hasattr(packing, "lay_out"):
        packing.pack_linears(target)
def laid_out(rows):  # the layout this version runs passes of `rows` rows in, where it chooses one per run
    if not hasattr(target, "prepare") and hasattr(packing, "lay_out"):
        packing.lay_out(target, rows)
    return target
prompt = [40, 1101, 257, 1310, 286, 262, 1578, 290, 1110, 13, 383, 1578, 290]
runs = {
    "plain": lambda m: autoregressive_sample(laid_out(1), prompt, m),
    "speculative, target itself, K=4": lambda m: speculative_sample(laid_out(5), target, prompt, m, lookahead=4),
    "speculative, ngram, K=4": lambda m: speculative_sample(laid_out(5), PromptLookupDrafter(), prompt, m,
                                                            lookahead=4),
}
result = {name: [] for name in runs}
for name, run in runs.items():  # a method's runs together: each row count's layout made once, as one command does
    run(8)  # warm-up: allocations and kernel choices, untimed
    for _ in range(repeats):
        result[name].append(run(n).decode_tokens_per_second)
print(json.dumps(result))
"""


def extract(commit: str) -> Path:
    """The commit's tree (the code only) in a new temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="before-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "speculative.py", "gpt2_model.py",
                              "speculative_gpt2"], check=True, capture_output=True).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(folder, filter="data")
    return folder


def run_worker(tree: Path, target: str, dtype: str, n: int, repeats: int) -> dict:
    result = subprocess.run([sys.executable, "-c", WORKER, target, dtype, str(n), str(repeats)], cwd=tree,
                            check=True, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(tree)))
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, metavar="COMMIT", help="the code to compare against")
    parser.add_argument("--target", required=True, help="a checkpoint folder (random weights of the XL shape)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2, help="worker pairs per dtype, order alternating")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each method within a worker")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    trees = {"before": extract(args.before), "after": ROOT}
    from speculative_gpt2.machine import hardware_name  # noqa: E402 (this checkout's, for the report)
    import torch

    results = {"before": args.before, "machine": hardware_name(torch.device("cpu")), "torch": torch.__version__,
               "command": " ".join(sys.argv), "max_new_tokens": args.max_new_tokens, "runs": {}}
    for dtype in args.dtypes:
        runs = {version: {m: [] for m in METHODS} for version in trees}
        for i in range(args.rounds):
            for version in (("before", "after") if i % 2 == 0 else ("after", "before")):
                got = run_worker(trees[version], str(Path(args.target).resolve()), dtype, args.max_new_tokens,
                                 args.repeats)
                for method, values in got.items():
                    runs[version][method] += values
                print(f"{dtype} round {i + 1} {version}: " + ", ".join(
                    f"{m} {statistics.median(v):.2f}" for m, v in got.items()), flush=True)
        results["runs"][dtype] = runs
    print(f"\n{results['machine']}, torch {results['torch']}, {args.max_new_tokens} new tokens, decode tokens/s "
          f"(median of {args.rounds * args.repeats}); before = {args.before}")
    print("| dtype | method | before | after | after / before |\n|---|---|---:|---:|---:|")
    for dtype, runs in results["runs"].items():
        for method in METHODS:
            before, after = (statistics.median(runs[v][method]) for v in ("before", "after"))
            print(f"| {dtype} | {method} | {before:.2f} | {after:.2f} | {after / before:.3f} |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
