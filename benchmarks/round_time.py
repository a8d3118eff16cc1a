"""Where a speculative round's time goes: the target as its own draft (every draft kept, as many passes as plain
decoding) against plain decoding, from each call's own step and round records, the runs alternating.

Each run in the layout the command line gives it (`lay_out(target, 1)` for plain decoding, `lay_out(target, K + 1)`
for speculative sampling, outside the clocks). Per repeat: plain decoding's median 1-row step; the speculative run's
median draft pass (a round's draft time over its drafts), verification and round; what a round costs besides its
passes; the decode speed over plain decoding's; and two predictions of it, (K + 1) / (K + v) with v the verification
in plain steps (draft passes as cheap as plain decoding's steps), and the same from the round's own draft passes.

    python benchmarks/round_time.py --target weights/random-gpt2-xl --out benchmarks/results/round-time.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from gpt2_model import GPT2  # noqa: E402
from speculative import autoregressive_sample, speculative_sample  # noqa: E402
from speculative_gpt2.machine import hardware_name  # noqa: E402
from speculative_gpt2.packing import lay_out  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="weights/random-gpt2-xl")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--lookahead", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    target = GPT2.from_pretrained(args.target, dtype=getattr(torch, args.dtype), download=False)
    prompt, n, K = list(range(100, 110)), args.max_new_tokens, args.lookahead
    print(f"{args.target}, {args.dtype}, {hardware_name(torch.device('cpu'))}, torch {torch.__version__}, greedy, "
          f"K={K}, {n} new tokens", flush=True)
    rows = []
    for repeat in range(args.repeats):
        lay_out(target, 1)
        autoregressive_sample(target, prompt, 2)  # warm-up, in this layout
        plain = autoregressive_sample(target, prompt, n)
        lay_out(target, K + 1)
        speculative_sample(target, target, prompt, 2, lookahead=K)
        spec = speculative_sample(target, target, prompt, n, lookahead=K)
        step = statistics.median(s.ms for s in plain.steps)
        drafted = [r for r in spec.rounds if r.lookahead > 0]
        draft = statistics.median(r.draft_ms / r.lookahead for r in drafted)
        verify = statistics.median(r.verify_ms for r in drafted)
        round_ms = statistics.median(s.ms for s in spec.steps if s.width > 0)
        k = statistics.mean(r.lookahead for r in drafted)
        row = {"plain_step_ms": step, "draft_pass_ms": draft, "verify_ms": verify, "round_ms": round_ms,
               "drafts_per_round": k, "kept_per_round": statistics.mean(r.kept for r in drafted),
               # The median round drafts the median K (the last round may draft fewer).
               "besides_passes_ms": round_ms - statistics.median(r.lookahead for r in drafted) * draft - verify,
               "speed_over_plain": spec.decode_tokens_per_second / plain.decode_tokens_per_second,
               "predicted_plain_steps": (k + 1) / (k + verify / step),
               "predicted_own_passes": (k + 1) * step / (k * draft + verify)}
        rows.append(row)
        print(f"repeat {repeat + 1}: " + ", ".join(f"{key} {value:.3f}" for key, value in row.items()), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "machine": hardware_name(torch.device("cpu")),
                                              "torch": torch.__version__, "repeats": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
