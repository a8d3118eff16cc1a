"""The price of coupled sampling: Chen's rule and the coupled rule side by side, on draft/target pairs of measured
total variation, and with prompt lookup.

Pairs: the target and noisy copies of it (its weights perturbed at several scales: the target as its own draft,
made to disagree more and more), then an independent random draft. TV is measured on the target's own text:
mean over positions of 0.5 * sum |p - q| at the run's temperature. Both rules decode the same prompts (one row
each, K = 4); Chen's rule keeps a draft with probability 1 - TV on average, the coupled rule at least
(1 - TV) / (1 + TV), and exactly P(agree), the chance that the two Gumbel-max tokens under shared noise are one
(estimated per position over --draws noise draws: far less noisy than the end-to-end counts). With prompt lookup a one-hot p keeps x with probability q(x) under either rule: their
acceptance should agree within sampling noise (there at --lookup-temperature, on prompts that repeat, so that the
lookup proposes). Acceptance is kept / decided drafts (the first rejected one of a round ends what the target
tests). Also the time, rules interleaved prompt by prompt.

    python benchmarks/coupled_price.py --target weights/random-gpt2 --out benchmarks/results/coupled-price.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from gpt2_model import GPT2  # noqa: E402
from speculative import autoregressive_sample, logits_to_probs, speculative_sample  # noqa: E402
from speculative_gpt2.drafters import PromptLookupDrafter  # noqa: E402
from speculative_gpt2.machine import hardware_name  # noqa: E402
from speculative_gpt2.packing import can_pack, pack_linears  # noqa: E402
from speculative_gpt2.random_checkpoint import noisy_copy, random_model  # noqa: E402


@torch.inference_mode()
def agreement(target: GPT2, draft: GPT2, prompt: list[int], tokens: list[int], temperature: float,
              draws: int) -> tuple[float, float]:
    """Along prompt + tokens, the mean over positions of the draft's and the target's next-token distributions'
    TV (Chen's rule keeps a draft with probability 1 - TV there), and of the probability that their Gumbel-max
    tokens under shared noise agree (the coupled rule's), estimated over `draws` noise draws."""
    ids = torch.tensor([prompt + tokens])
    q = logits_to_probs(target(ids)[0, len(prompt) - 1 : -1], temperature)
    p = logits_to_probs(draft(ids)[0, len(prompt) - 1 : -1], temperature)
    gen = torch.Generator().manual_seed(len(prompt) + len(tokens))
    agree = 0.0
    for _ in range(draws):
        g = -torch.log(-torch.log(torch.rand(q.shape, generator=gen)))
        agree += ((p.log() + g).argmax(-1) == (q.log() + g).argmax(-1)).float().mean().item() / draws
    return (0.5 * (p - q).abs().sum(-1)).mean().item(), agree


@torch.inference_mode()
def deterministic_keep(target: GPT2, prompt: list[int], tokens: list[int], temperature: float,
                       draws: int) -> tuple[float, float]:
    """A deterministic drafter that proposes, at each position of prompt + tokens, the token that came there (a
    lookup that copied the right continuation): the mean over positions of the chance that it is kept, by Chen's
    rule (q(x), exactly) and by the coupled rule (the Gumbel-max is x; estimated over `draws` noise draws)."""
    ids = torch.tensor([prompt + tokens])
    q = logits_to_probs(target(ids)[0, len(prompt) - 1 : -1], temperature)
    x = torch.tensor(tokens)
    gen = torch.Generator().manual_seed(len(prompt) + len(tokens))
    coupled = sum((((q.log() + -torch.log(-torch.log(torch.rand(q.shape, generator=gen)))).argmax(-1) == x)
                   .float().mean().item() for _ in range(draws))) / draws
    return q[torch.arange(len(x)), x].mean().item(), coupled


def run(target, drafter, prompt, n, rule: str, seed: int, temperature: float, lookahead: int) -> dict:
    options = dict(lookahead=lookahead, temperature=temperature, exact=True)
    started = time.perf_counter()
    if rule == "coupled":
        out = speculative_sample(target, drafter, prompt, n, coupled=True, seed=seed, **options)
    else:
        out = speculative_sample(target, drafter, prompt, n, generator=torch.Generator().manual_seed(seed), **options)
    # Decided: the drafts the target tested (the kept ones and the first rejected one of each round).
    decided = sum(r.kept + (r.kept < r.lookahead) for r in out.rounds)
    return {"kept": out.accepted, "decided": decided, "tokens": len(out.tokens), "passes": out.target_calls,
            "seconds": time.perf_counter() - started}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="weights/random-gpt2", help="a checkpoint folder or preset")
    parser.add_argument("--draft", default=None, help="also a pair with this independent draft checkpoint")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4, 0.8],
                        help="noise scales of the target's noisy copies (times each tensor's std)")
    parser.add_argument("--prompts", type=int, default=12, help="prompts (random token ids) per pair and rule")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--lookahead", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--draws", type=int, default=200, help="noise draws per position for the coupled agreement")
    parser.add_argument("--lookup-temperature", type=float, default=0.1,
                        help="the prompt-lookup rows' temperature: a peaked target that repeats itself")
    parser.add_argument("--out", default=None, help="write the raw results to this JSON file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    target = GPT2.from_pretrained(args.target, download=False)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, target.config.vocab_size, (8,), generator=gen).tolist() for _ in range(args.prompts)]
    drafts = {f"noisy copy {noise}": noisy_copy(target, noise, seed=2) for noise in args.noise}
    if args.draft:
        drafts[f"independent {Path(args.draft).name}"] = GPT2.from_pretrained(args.draft, download=False)
    else:
        drafts["independent random"] = random_model(target.config, seed=3)
    print(f"{args.target}, {hardware_name(torch.device('cpu'))}, torch {torch.__version__}, temperature "
          f"{args.temperature}, K = {args.lookahead}, {args.prompts} prompts x {args.max_new_tokens} tokens")
    # TV on the target's own sampled text, before packing (the full-sequence forward needs no cache).
    texts = [autoregressive_sample(target, p, args.max_new_tokens, temperature=args.temperature,
                                   generator=torch.Generator().manual_seed(i)).tokens for i, p in enumerate(prompts)]
    tv, coupled = {}, {}
    for name, d in drafts.items():
        pairs = [agreement(target, d, p, t, args.temperature, args.draws) for p, t in zip(prompts, texts)]
        tv[name], coupled[name] = (sum(x) / len(pairs) for x in zip(*pairs))
    # On the target's text at the lookup's temperature: at temperature 1 a random target's q is near uniform.
    lookup_texts = [autoregressive_sample(target, p, args.max_new_tokens, temperature=args.lookup_temperature,
                                          generator=torch.Generator().manual_seed(i)).tokens
                    for i, p in enumerate(prompts)]
    kept = [deterministic_keep(target, p, t, args.lookup_temperature, args.draws)
            for p, t in zip(prompts, lookup_texts)]
    lookup = {"chen": sum(c for c, _ in kept) / len(kept), "coupled": sum(c for _, c in kept) / len(kept)}
    print(f"a deterministic drafter proposing the token that came: kept with probability {lookup['chen']:.4f} "
          f"(Chen: q(x)), {lookup['coupled']:.4f} (coupled, over {args.draws} noise draws per position), at "
          f"temperature {args.lookup_temperature}")
    if can_pack(target):
        target = pack_linears(target)
        drafts = {name: pack_linears(d) for name, d in drafts.items()}
    drafts["prompt lookup"] = None
    results = {}
    print(f"{'draft':>24} {'TV':>6} | {'rule':>7} {'kept/decided':>13} {'tokens/pass':>11} {'tokens/s':>8} | "
          f"{'1-TV':>5} {'(1-TV)/(1+TV)':>13} {'P(agree)':>9}")
    for name, draft in drafts.items():
        totals = {rule: {"kept": 0, "decided": 0, "tokens": 0, "passes": 0, "seconds": 0.0}
                  for rule in ("chen", "coupled")}
        temperature = args.temperature if draft is not None else args.lookup_temperature
        for i, prompt in enumerate(prompts):  # the rules interleaved, prompt by prompt
            for rule in totals:
                drafter = PromptLookupDrafter() if draft is None else draft
                fed = prompt if draft is not None else prompt * 3  # a repeated prompt: the lookup finds matches
                for key, value in run(target, drafter, fed, args.max_new_tokens, rule, i, temperature,
                                      args.lookahead).items():
                    totals[rule][key] += value
        results[name] = {"tv": tv.get(name), "coupled_agreement": coupled.get(name), "temperature": temperature,
                         "rules": totals}
        for rule, t in totals.items():
            rate = t["kept"] / t["decided"] if t["decided"] else float("nan")
            bounds = "" if name not in tv else (f"{1 - tv[name]:5.3f} {(1 - tv[name]) / (1 + tv[name]):13.3f} "
                                                f"{coupled[name]:9.3f}")
            print(f"{name:>24} {'' if name not in tv else f'{tv[name]:.3f}':>6} | {rule:>7} {rate:13.3f} "
                  f"{t['tokens'] / t['passes']:11.2f} {t['tokens'] / t['seconds']:8.2f} | {bounds}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "machine": hardware_name(torch.device("cpu")),
                                              "torch": torch.__version__, "deterministic_drafter": lookup,
                                              "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
