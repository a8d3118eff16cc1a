"""What a prefill pays for the LM head: a pass over a prompt's rows that fills the KV cache with and without the
logits (`model(idx, cache=cache, logits=False)`, what the samplers' prefill runs), passes alternating, medians.

    python benchmarks/prefill.py --models weights/random-gpt2 weights/random-gpt2-xl \
        --out benchmarks/results/prefill-lm-head.json
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
from speculative_gpt2.machine import hardware_name  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["weights/random-gpt2", "weights/random-gpt2-xl"])
    parser.add_argument("--rows", type=int, nargs="+", default=[9, 200], help="the prompt's rows (its length - 1)")
    parser.add_argument("--repeats", type=int, default=5, help="passes of each kind; the first of each is a warm-up")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    results = []
    for name in args.models:
        model = GPT2.from_pretrained(name)
        for rows in args.rows:
            idx = torch.randint(0, model.config.vocab_size, (1, rows), generator=torch.Generator().manual_seed(0))
            ms = {True: [], False: []}
            with torch.inference_mode():
                for _ in range(args.repeats):
                    for logits in (True, False):
                        cache = model.new_cache(1, max_len=rows + 1)
                        start = time.perf_counter()
                        model(idx, cache=cache, logits=logits)
                        ms[logits].append((time.perf_counter() - start) * 1e3)
            with_head, without = statistics.median(ms[True][1:]), statistics.median(ms[False][1:])
            results.append({"model": name, "rows": rows, "with_lm_head_ms": with_head, "without_ms": without})
            print(f"{name}, {rows} rows: with the LM head {with_head:.1f} ms, without {without:.1f} ms "
                  f"({with_head / without:.2f}x)", flush=True)
        del model
    machine = hardware_name(torch.device("cpu"))
    print(machine)
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
