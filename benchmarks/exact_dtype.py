"""Benchmark of exact mode (`GPT2.fixed_pass_rows`): what it costs plain decoding, and that speculative sampling
is no slower than before it, in one run.

1. Pass cost: ms of one cached target pass of 1 row (plain decoding) and of the fixed pass shapes (4 to 16 rows),
   per dtype, on the prepared weights (`GPT2.prepare`).
2. Plain decoding, 1-row passes against exact mode (passes of 8 rows, the CLI's): tokens/s per dtype.
3. Speculative sampling, K = 4 and the adaptive lookahead, before (the code of --before, a checkout) and after
   (exact mode off and on), interleaved repetitions, medians.

    python benchmarks/exact_dtype.py --target /work/ckpt/random-gpt2-xl --draft /work/ckpt/random-gpt2 \
        --before /tmp/checkout-before --json docs/bench-exact-dtype.json
"""

from __future__ import annotations

import argparse
import importlib.util
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
from speculative_gpt2.hardware import hardware_name  # noqa: E402
from speculative_gpt2.lookahead import AdaptiveLookahead  # noqa: E402
from speculative_gpt2.tokenizer import load_tokenizer  # noqa: E402


def load_before(folder: Path):
    """speculative.py and gpt2_model.py of another checkout, as modules beside this one's."""
    saved = sys.modules.pop("gpt2_model")
    try:
        modules = {}
        for name in ("gpt2_model", "speculative"):
            spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
            modules[name] = sys.modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(modules[name])
        return modules["gpt2_model"], modules["speculative"]
    finally:
        sys.modules["gpt2_model"], sys.modules["speculative"] = saved, speculative


def as_class(model: GPT2, cls) -> GPT2:
    """The same modules and weights, with another checkout's GPT2 methods (forward, new_cache)."""
    other = object.__new__(cls)
    other.__dict__ = model.__dict__.copy()
    return other


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
    parser.add_argument("--before", type=Path, default=None, help="a checkout of the code to compare against")
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
        target = GPT2.from_pretrained(args.target, dtype=dtype, download=False).prepare()
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
                target.fixed_pass_rows(rows)
                runs[name].append(speculative.autoregressive_sample(target, prompt, n).decode_tokens_per_second)
        target.fixed_pass_rows(None)
        results["plain_tokens_per_s"][dtype_name] = {k: statistics.median(v) for k, v in runs.items()}
        print(dtype_name, "plain decoding tokens/s:", results["plain_tokens_per_s"][dtype_name], flush=True)
        if dtype != torch.bfloat16:
            del target
            continue
        # 3. Speculative sampling before and after, interleaved (bfloat16).
        draft = GPT2.from_pretrained(args.draft, dtype=dtype, download=False).prepare()
        variants = {}
        if args.before is not None:
            old_model, old_speculative = load_before(args.before)
            old_target, old_draft = as_class(target, old_model.GPT2), as_class(draft, old_model.GPT2)
            variants["before"] = (old_speculative.speculative_sample, old_target, old_draft, None)
        variants["after, exact off"] = (speculative.speculative_sample, target, draft, None)
        variants["after, exact on"] = (speculative.speculative_sample, target, draft, "exact")
        runs, chosen = {}, {}  # tokens/s, and mean K proposed per round, of every run
        for _ in range(args.repeats):
            for K in (4, "auto"):
                for name, (sample, t, d, exact) in variants.items():
                    max_lookahead = 7 if exact else 12  # the CLI's choice in exact mode: passes of 8 rows
                    target.fixed_pass_rows((K if K != "auto" else max_lookahead) + 1 if exact else None)
                    policy = AdaptiveLookahead(max_lookahead=max_lookahead) if K == "auto" else K
                    out = sample(t, d, prompt, n, lookahead=policy)
                    runs.setdefault(f"K={K}, {name}", []).append(out.decode_tokens_per_second)
                    chosen.setdefault(f"K={K}, {name}", []).append(out.proposed / max(len(out.rounds), 1))
        target.fixed_pass_rows(None)
        results["speculative_tokens_per_s"][dtype_name] = {k: statistics.median(v) for k, v in runs.items()}
        results["speculative_runs"], results["speculative_mean_K"] = runs, chosen
        print(dtype_name, "speculative tokens/s:", results["speculative_tokens_per_s"][dtype_name], flush=True)
        del target, draft
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
