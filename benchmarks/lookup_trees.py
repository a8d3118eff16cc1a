"""Prompt lookup's token trees against its chain: tokens per target pass and decode speed at the same K.

`PromptLookupDrafter(matches=M)` proposes what followed the M latest earlier occurrences of the last tokens, merged
into a trie (up to M * K nodes, one target pass); M = 1 is the chain. On the random GPT-2 XL shape with GPT-2's
scaled residual projections (weights/random-gpt2-xl-looping, written once), whose greedy text falls into loops, as
prompt lookup needs; prompts of three kinds (prose, a list, code), greedy, configurations interleaved prompt by
prompt, plain decoding beside them.

    python benchmarks/lookup_trees.py --out benchmarks/results/lookup-trees-xl-float32.json
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
from speculative_gpt2.drafters import PromptLookupDrafter  # noqa: E402
from speculative_gpt2.machine import hardware_name  # noqa: E402
from speculative_gpt2.packing import can_pack, pack_linears  # noqa: E402
from speculative_gpt2.random_checkpoint import write_random_checkpoint  # noqa: E402
from speculative_gpt2.tokenizer import load_tokenizer  # noqa: E402

PROMPTS = {
    "prose": "Alan Turing theorized that computers would one day become the most powerful machines on the planet.",
    "list": "Monday: rain. Tuesday: sun. Wednesday: rain. Thursday: wind. Friday: rain. Saturday: sun. Sunday:",
    "code": "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n    return",
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="weights/random-gpt2-xl-looping",
                        help="a checkpoint folder (default: GPT-2 XL's shape, random, looping; written if missing)")
    parser.add_argument("--matches", type=int, nargs="+", default=[1, 2, 4], help="M values (1: the chain)")
    parser.add_argument("--lookahead", type=int, default=4, help="K, the depth of every tree (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=None, help="write the raw results to this JSON file")
    args = parser.parse_args(argv)
    folder = Path(args.target)
    if not (folder / "model.safetensors").exists() and folder.name == "random-gpt2-xl-looping":
        print(f"writing {folder} (once) ...", file=sys.stderr, flush=True)
        write_random_checkpoint("gpt2-xl", folder, seed=0, scaled_residuals=True)
    target = GPT2.from_pretrained(folder, dtype=getattr(torch, args.dtype), download=False)
    target = pack_linears(target) if can_pack(target) else target
    tokenizer = load_tokenizer()
    prompts = {name: tokenizer.encode(text) for name, text in PROMPTS.items()}
    n, K = args.max_new_tokens, args.lookahead
    print(f"{folder}, {args.dtype}, {hardware_name(torch.device('cpu'))}, torch {torch.__version__}, greedy, K={K}, "
          f"{n} new tokens, {args.repeats} repeats", flush=True)
    runs = {"plain": lambda p: autoregressive_sample(target, p, n)}
    for M in args.matches:
        runs[f"lookup M={M}"] = lambda p, M=M: speculative_sample(target, PromptLookupDrafter(matches=M), p, n,
                                                                  lookahead=K)
    autoregressive_sample(target, prompts["prose"], 4)  # warm-up
    raw = {(name, kind): [] for name in runs for kind in prompts}
    for _ in range(args.repeats):
        for kind, prompt in prompts.items():
            for name, run in runs.items():  # interleaved, prompt by prompt
                out = run(prompt)
                raw[name, kind].append({"tokens_per_s": out.tokens_per_second,
                                        "tokens_per_pass": out.tokens_per_target_call, "tokens": out.tokens})
    results = []
    for (name, kind), outs in raw.items():
        same = all(o["tokens"] == raw["plain", kind][0]["tokens"] for o in outs)
        results.append({"run": name, "prompt": kind, "same_text_as_plain": same,
                        "tokens_per_pass": statistics.median(o["tokens_per_pass"] for o in outs),
                        "tokens_per_s": statistics.median(o["tokens_per_s"] for o in outs),
                        "raw_tokens_per_s": [o["tokens_per_s"] for o in outs]})
    print("| run | prompt | tokens per target pass | decode tokens/s | over plain | over the chain | same text |")
    print("|---|---|---:|---:|---:|---:|---|")
    by = {(r["run"], r["prompt"]): r for r in results}
    for r in results:
        plain, chain = by["plain", r["prompt"]], by.get(("lookup M=1", r["prompt"]))
        over_chain = f"{r['tokens_per_s'] / chain['tokens_per_s']:.2f}x" if chain and r["run"] != "plain" else ""
        print(f"| {r['run']} | {r['prompt']} | {r['tokens_per_pass']:.2f} | {r['tokens_per_s']:.2f} | "
              f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f}x | {over_chain} | "
              f"{'yes' if r['same_text_as_plain'] else 'no'} |")
    if args.out:
        meta = {"command": "python benchmarks/lookup_trees.py " + " ".join(argv or sys.argv[1:]),
                "hardware": hardware_name(torch.device("cpu")), "torch": torch.__version__, "dtype": args.dtype,
                "lookahead": K, "max_new_tokens": n, "repeats": args.repeats, "prompts": PROMPTS}
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
