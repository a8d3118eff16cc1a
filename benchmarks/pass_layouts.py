"""The target's weights unpacked (F.linear) and packed for oneDNN (`pack_linears`, CPU float32), per pass and end to
end where nothing repeats, in one process.

Per pass: the median time of a cached pass of 1, 5 and 9 new tokens (plain decoding; verification at K = 4 and 8)
in each, interleaved. "packed for 1 row" is oneDNN's other blocked layout (`pack(w, rows=1)`), which serves 1-row
products only about as well and few-row ones worse (docs/bench-drafters.md, "oneDNN").

End to end, where nothing repeats: temperature 1, seed 0, so that the random target's nearly flat distribution
gives text without a repeated token (checked: the lookup proposes nothing in any round). Rows, interleaved: plain
decoding and prompt lookup (K = 4), each with the target in each layout; speedups against packed plain decoding.

    python benchmarks/pass_layouts.py --target weights/random-gpt2-xl --dtype float32
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
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench import pass_ms  # noqa: E402
from gpt2_model import GPT2  # noqa: E402
from speculative_gpt2 import packing  # noqa: E402
from speculative_gpt2.packing import pack_linears, unpack_linears  # noqa: E402
from speculative import autoregressive_sample, speculative_sample  # noqa: E402
from speculative_gpt2.cli import DEFAULT_PROMPT  # noqa: E402
from speculative_gpt2.drafters import PromptLookupDrafter  # noqa: E402
from speculative_gpt2.machine import hardware_name  # noqa: E402
from speculative_gpt2.tokenizer import load_tokenizer  # noqa: E402


def unpacked(model: GPT2) -> GPT2:
    """Every product through F.linear, on the weights [out, in]."""
    return unpack_linears(model)


def packed_for_rows(rows: int):
    def lay_out(model: GPT2) -> GPT2:
        return pack_linears(unpack_linears(model), rows)
    return lay_out


LAYOUTS = {"F.linear": unpacked, "pack_linears": packed_for_rows(packing.PACK_ROWS),
           "packed for 1 row": packed_for_rows(1)}
BASELINE = "pack_linears"  # the end-to-end speedups are against plain decoding in this layout


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="weights/random-gpt2-xl")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--layouts", nargs="+", default=["F.linear", "pack_linears"], choices=list(LAYOUTS),
                        help="the target's layouts to time, per pass and (for prompt lookup) end to end")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 5, 9])
    parser.add_argument("--pass-repeats", type=int, default=5, help="timed passes per layout and row count")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved end-to-end runs per row (0: none)")
    parser.add_argument("--out", default=None, help="write the raw times to this JSON file")
    args = parser.parse_args(argv)

    target = GPT2.from_pretrained(args.target, dtype=getattr(torch, args.dtype))
    prompt = load_tokenizer().encode(DEFAULT_PROMPT)
    layouts = {name: LAYOUTS[name] for name in args.layouts}
    passes = {name: {rows: [] for rows in args.rows} for name in layouts}
    for _ in range(args.pass_repeats):  # interleaved: a slow spell of the shared machine hits every layout
        for name, lay_out in layouts.items():
            lay_out(target)
            for rows in args.rows:
                passes[name][rows].append(pass_ms(target, len(prompt), rows, repeats=1))

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"{args.target}, {args.dtype}, {hardware_name(torch.device('cpu'))}, torch {torch.__version__}, {when}")
    print(f"\nPer pass, median of {args.pass_repeats} (ms):\n")
    print("| layout | " + " | ".join(f"{r} row{'s' * (r > 1)}" for r in args.rows) + " |")
    print("|---|" + "---:|" * len(args.rows))
    for name, by_rows in passes.items():
        print(f"| {name} | " + " | ".join(f"{statistics.median(t):.1f}" for t in by_rows.values()) + " |", flush=True)

    def plain(lay_out):
        gen = torch.Generator().manual_seed(0)
        return autoregressive_sample(lay_out(target), prompt, args.max_new_tokens, temperature=1.0, generator=gen)

    def lookup(lay_out):
        gen = torch.Generator().manual_seed(0)
        return speculative_sample(lay_out(target), PromptLookupDrafter(), prompt, args.max_new_tokens, lookahead=4,
                                  temperature=1.0, generator=gen)

    runs = {f"{method}, {name}": (lambda fn=fn, lay_out=lay_out: fn(lay_out))
            for method, fn in (("plain decoding", plain), ("lookup", lookup)) for name, lay_out in LAYOUTS.items()
            if name in layouts or (method, name) == ("plain decoding", BASELINE)}
    e2e = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            e2e[name].append(fn())
            print(f"{name}: {e2e[name][-1].seconds:.2f} s", file=sys.stderr, flush=True)
    if args.repeats:
        plain_tokens = e2e[f"plain decoding, {BASELINE}"][0].tokens
        base = statistics.median(g.seconds for g in e2e[f"plain decoding, {BASELINE}"])
        print(f"\nEnd to end, {args.max_new_tokens} new tokens, temperature 1 (seed 0), K = 4, "
              f"median of {args.repeats}:\n")
        print(f"| run | seconds | speedup vs plain ({BASELINE}) | target passes | drafts proposed | same tokens |")
        print("|---|---:|---:|---:|---:|---|")
        for name, gens in e2e.items():
            seconds = statistics.median(g.seconds for g in gens)
            g = gens[0]
            same = all(x.tokens == plain_tokens for x in gens)
            print(f"| {name} | {seconds:.2f} | {base / seconds:.3f} | {g.target_calls} | {g.proposed} | "
                  f"{'yes' if same else 'no'} |")
        repeated = len(plain_tokens) + len(prompt) - len(set(plain_tokens + prompt))
        print(f"\nPlain decoding's output repeats {repeated} token(s) of prompt + output.")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "args": vars(args), "passes_ms": passes,
            "e2e_seconds": {name: [g.seconds for g in gens] for name, gens in e2e.items()}}, indent=1))


if __name__ == "__main__":
    main()
