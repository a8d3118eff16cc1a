"""What the command line reports beyond the texts: the runs it makes, and why a run was slower than plain decoding.

Shared by the single-prompt report (cli.py) and the prompts-file summary (prompts_file.py).
"""

from __future__ import annotations

import torch

from speculative_gpt2.lookahead import break_even_alpha, estimated_alpha, predicted_speedup
from speculative_gpt2.machine import resolve_dtype
from speculative_gpt2.records import Generation, Origin

# The runs, in the order they are made; EXACT is plain decoding in the passes speculative sampling is compared in.
NAIVE, UNCACHED, EXACT, SPECULATIVE = "naive", "uncached", "exact", "speculative"


def parted(tokens: list[int], other: list[int]) -> int:
    """The index of the first new token where two outputs differ."""
    return next((i for i, (a, b) in enumerate(zip(tokens, other)) if a != b), min(len(tokens), len(other)))


def why_slower(spec: Generation, naive: Generation, *, auto: bool, dtype: torch.dtype, device) -> list[str]:
    """When speculative sampling was slower than plain decoding, or well below what its measured pass costs
    predict, one or two lines that say why from the measured figures, and what to try; otherwise none."""
    drafted = [r for r in spec.rounds if r.lookahead > 0]
    if not drafted or naive.target_calls == 0:
        return []
    measured = spec.tokens_per_second / naive.tokens_per_second
    K = round(sum(r.lookahead for r in drafted) / len(drafted))
    t_target = 1e3 * (naive.seconds - naive.prefill_seconds) / naive.target_calls  # a 1-row pass, in the loop
    t_draft = sum(r.draft_ms for r in drafted) / sum(r.lookahead for r in drafted)
    t_verify = sum(r.verify_ms for r in drafted) / len(drafted)
    alpha = estimated_alpha(spec.accepted, spec.origins.count(Origin.RESAMPLED))
    predicted = predicted_speedup(alpha, K, t_draft, t_verify, t_target)
    if measured >= 1 and measured >= 0.8 * predicted:
        return []
    need = break_even_alpha(K, t_draft, t_verify, t_target)
    costs = (f"at K={K} a round costs {K} draft passes ({t_draft / t_target:.2f} of a target pass each) and a "
             f"{K + 1}-token verification ({t_verify / t_target:.2f} target passes)")
    # The prediction assumes K drafts in every round; a drafter may propose fewer, or none (prompt lookup without a
    # match). Only time that the rounds' passes do not account for is blamed on the machine.
    decode_seconds = spec.seconds - spec.prefill_seconds
    busy = decode_seconds - sum(r.draft_ms + r.verify_ms for r in spec.rounds) / 1e3 > 0.2 * decode_seconds
    if need is None:
        lines = [f"why: {costs}: that is more than the {K + 1} plain passes a round can save, so no acceptance "
                 f"rate breaks even (measured alpha {alpha:.2f})"]
    elif alpha < need:
        lines = [f"why: {costs}: breaking even needs each draft kept with probability alpha >= {need:.2f}; "
                 f"measured alpha {alpha:.2f}"]
    elif busy:
        lines = [f"why: measured {measured:.2f}x where these pass costs and alpha {alpha:.2f} predict "
                 f"{predicted:.2f}x: time went outside the passes (a busy machine, threads waiting for each other)"]
    elif spec.proposed < K * len(spec.rounds):
        lines = [f"why: measured {measured:.2f}x where alpha {alpha:.2f} with K={K} drafts in every round would give "
                 f"{predicted:.2f}x: the drafter proposed {spec.proposed / len(spec.rounds):.2f} per round "
                 f"({len(spec.rounds) - len(drafted)} of {len(spec.rounds)} rounds none), "
                 f"{spec.tokens_per_target_call:.2f} tokens per target pass"]
    else:
        lines = [f"why: measured {measured:.2f}x where these pass costs and alpha {alpha:.2f} predict "
                 f"{predicted:.2f}x: the rounds kept fewer drafts than alpha says on average "
                 f"({spec.tokens_per_target_call:.2f} tokens per target pass)"]
    tries = [] if auto else ["--lookahead auto (it lowers K when drafts are rejected)"]
    if alpha < 0.5:
        tries.append("a draft that agrees more with the target (random weights never agree)")
    if dtype != torch.bfloat16 and resolve_dtype("auto", device) == torch.bfloat16:
        tries.append("--dtype bfloat16 (native on this hardware: cheaper passes)")
    if need is not None and alpha >= need and busy:
        tries.append("--threads with the number of idle cores")
    return lines + ([f"try: {'; '.join(tries)}"] if tries else [])


def cost_ratio(target, draft) -> float:
    """c, a draft pass's cost in target passes, taken as the ratio of parameter counts: decoding reads every
    weight once per pass. A number of the models, not a measurement, so a run's K sequence can be reproduced.
    Without a draft model (prompt lookup) it is 0: a lookup reads no weights."""
    if draft is None:
        return 0.0
    return sum(p.numel() for p in draft.parameters()) / sum(p.numel() for p in target.parameters())
