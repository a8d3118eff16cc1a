"""Benchmark of exact mode (the samplers' `exact`, speculative_gpt2/exact.py): what it costs, in one run.

1. Pass cost: ms of one cached target pass of 1 row (plain decoding) and of the fixed pass shapes (4 to 16 rows),
   per dtype, on packed weights (`pack_linears`, CPU float32).
2. Plain decoding, 1-row passes against exact mode (passes of 8 rows, the CLI's): tokens/s per dtype.
3. Speculative sampling, K = 4 and the adaptive lookahead, exact mode off and on (bfloat16), interleaved
   repetitions, medians.

    python benchmarks/exact_dtype.py --target weights/random-gpt2-xl --draft weights/random-gpt2 \
        --json benchmarks/results/exact-dtype.json
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
sys.path.insert(0, str(ROOT))  # run as a script from the checkout
from gpt2_model import GPT2  # noqa: E402
import speculative  # noqa: E402
from speculative_gpt2.cli import DEFAULT_PROMPT  # noqa: E402
from speculative_gpt2.machine import hardware_name  # noqa: E402
from speculative_gpt2.lookahead import AdaptiveLookahead  # noqa: E402
from speculative_gpt2.packing import pack_linears  # noqa: E402
from speculative_gpt2.tokenizer import load_tokenizer  # noqa: E402


@torch.inference_mode()
def pass_ms(model: GPT2, tokens: int, repeats: int) -> float:
    """Median ms of one cached pass of `tokens` new tokens after a 20-token prefix."""
    cache = model.new_cache(max_len=20 + tokens)
    model(torch.arange(20)[None], cache=cache)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        model(torch.arange(tokens)[None], cache=cache)
        times.append(1e3 * (time.perf_counter() - started))
        cache.crop(20)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft", required=True)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    prompt = load_tokenizer().encode(DEFAULT_PROMPT)
    n = args.new_tokens
    results = {"machine": hardware_name(torch.device("cpu")), "torch": torch.__version__, "new_tokens": n,
               "command": " ".join(sys.argv),
               "prompt": DEFAULT_PROMPT, "pass_ms": {}, "plain_tokens_per_s": {}, "speculative_tokens_per_s": {}}
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        target = pack_linears(GPT2.from_pretrained(args.target, dtype=dtype, download=False))
        # 1. One pass of each shape.
        ms = {}
        for rows in (1, 4, 5, 8, 12, 16):
            ms[rows] = pass_ms(target, rows, repeats=5)
        results["pass_ms"][dtype_name] = ms
        print(dtype_name, "ms per pass by rows:", {k: round(v, 1) for k, v in ms.items()}, flush=True)
        # 2. Plain decoding: 1-row passes against exact mode, interleaved.
        runs = {"1-row": [], "exact 8 rows": []}
        for _ in range(args.repeats):
            for name, rows in (("1-row", None), ("exact 8 rows", 8)):
                out = speculative.autoregressive_sample(target, prompt, n, exact=rows)
                runs[name].append(out.decode_tokens_per_second)
        results["plain_tokens_per_s"][dtype_name] = {k: statistics.median(v) for k, v in runs.items()}
        print(dtype_name, "plain decoding tokens/s:", results["plain_tokens_per_s"][dtype_name], flush=True)
        if dtype != torch.bfloat16:
            del target
            continue
        # 3. Speculative sampling before and after, interleaved (bfloat16).
        draft = pack_linears(GPT2.from_pretrained(args.draft, dtype=dtype, download=False))
        runs, chosen = {}, {}  # tokens/s, and mean K proposed per round, of every run
        for _ in range(args.repeats):
            for K in (4, "auto"):
                for name, exact in (("exact off", False), ("exact on", True)):
                    max_lookahead = 7 if exact else 12  # the CLI's choice in exact mode: passes of 8 rows
                    policy = AdaptiveLookahead(max_lookahead=max_lookahead) if K == "auto" else K
                    out = speculative.speculative_sample(target, draft, prompt, n, lookahead=policy, exact=exact)
                    runs.setdefault(f"K={K}, {name}", []).append(out.decode_tokens_per_second)
                    chosen.setdefault(f"K={K}, {name}", []).append(out.proposed / max(len(out.rounds), 1))
        results["speculative_tokens_per_s"][dtype_name] = {k: statistics.median(v) for k, v in runs.items()}
        results["speculative_runs"], results["speculative_mean_K"] = runs, chosen
        print(dtype_name, "speculative tokens/s:", results["speculative_tokens_per_s"][dtype_name], flush=True)
        del target, draft
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
