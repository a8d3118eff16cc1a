"""Speculative sampling for GPT-2: a drafter proposes, the large target model verifies.

Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling", Algorithm 2.
Notation of the paper, kept everywhere below: q is the TARGET model's distribution, p the DRAFT's.

The target keeps a KV cache; its *pending* token is the last committed token, not yet in its cache. The drafter
is a small GPT-2 by default, or any object with the three methods of speculative_gpt2/drafters.py (prompt lookup
is built in). After a prefill of the prompt minus its last token, every round of `speculative_sample` does:

  1. draft     `drafter.propose`    up to K tokens x1..xK, with their draft distributions p (a small model samples
                                    them one at a time; a deterministic proposer's p is one-hot);
  2. verify    `target(...)`        the target scores its pending token and x1..xK in ONE pass: q at K+1 places;
  3. accept    `accept_or_resample` keep xi with probability min(1, q(xi)/p(xi)); at the first rejection emit a
                                    sample from norm(max(0, q - p)) instead; if all K are kept, emit a bonus
                                    token sampled from q at position K+1;
  4. roll back `KVCache.crop`       the target's cache forgets the rejected positions (an integer, nothing is
                                    copied); `drafter.commit` tells the drafter what was committed.

Every round emits between 1 and K+1 tokens, and the output is distributed exactly as sampling from q.

Both decoders take a batch of prompts of any lengths (`Batch`): one target pass per round serves every row, each
row at its own positions in the caches (`KVCache.lengths`), with its own drafts, verdicts, rollback and EOS. A
finished row keeps its place in the passes' fixed shapes, parked at position 0, and is never read again.
At temperature 0 both distributions are one-hot, so the output is the target's greedy output.
`autoregressive_sample` is the plain one-token-per-pass decoder beside it, for timing and for the tests.
Token for token in every dtype when every target pass has one shape (`GPT2.fixed_pass_rows`); otherwise 1-row
and (K+1)-row passes round differently, which flips near-ties often in bfloat16 and rarely in float32.

The samplers change nothing outside the call: they do not touch the models' weights (fast weight copies are
the caller's choice, `GPT2.prepare`), and K comes from a policy object the caller may pass (speculative_gpt2/lookahead.py).
Argument checks are at the end of the file; the command line is speculative_gpt2/cli.py (`python speculative.py
--help`, or the `speculative-gpt2` command).
"""

from __future__ import annotations

if __name__ == "__main__":  # the command line; before the imports below, so that a Ctrl-C while torch loads ends
    # quietly too (speculative_gpt2/command.py)
    import sys

    from speculative_gpt2.command import main

    sys.exit(main())

import copy
import math
import time
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from numbers import Integral, Real
from typing import Callable

import torch

from gpt2_model import GPT2, KVCache
from speculative_gpt2.drafters import (BatchDrafter, Drafter, EachRow, ModelDrafter, PromptLookupDrafter,
                                      Proposal, Sampling)
from speculative_gpt2.hardware import Clock, DeviceClock, synchronize
from speculative_gpt2.lookahead import AdaptiveLookahead, FixedLookahead, LookaheadPolicy, Round

__all__ = ["Generation", "Origin", "Round", "TraceRound", "AdaptiveLookahead", "FixedLookahead", "logits_to_probs",
           "sample", "accept_or_resample", "residual_distribution", "speculative_sample", "autoregressive_sample",
           "Drafter", "ModelDrafter", "PromptLookupDrafter", "Proposal"]


class Origin(str, Enum):
    """Where a new token came from. A str, so that `origin == "draft"` holds."""

    DRAFT = "draft"  # a draft token the target kept
    RESAMPLED = "resampled"  # drawn from norm(max(0, q - p)) at a rejection
    BONUS = "bonus"  # drawn from q after all K drafts were kept
    TARGET = "target"  # plain decoding: one target pass for this token

    def __str__(self) -> str:
        return self.value


@dataclass
class Generation:
    """What a sampling call produced, and how.

    `tokens` are the new tokens (never the prompt); `origins[i]` says where `tokens[i]` came from (an `Origin`).
    `rounds` holds one `Round` per target pass of speculative sampling: K proposed (fewer when an EOS among the
    kept drafts ended the output), drafts kept, and the measured ms of its draft and verification passes.
    `draft_calls` counts the tokens the drafter proposed (an EOS may drop some): for a model drafter one forward
    pass each; a prompt lookup makes no pass. Call counts exclude the prefill; `seconds` includes it,
    `prefill_seconds` is its share. `trace` holds a `TraceRound` per round when the call asked for it.
    """

    tokens: list[int] = field(default_factory=list)
    origins: list[Origin] = field(default_factory=list)
    rounds: list[Round] = field(default_factory=list)
    target_calls: int = 0
    draft_calls: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    trace: list[TraceRound] | None = None

    def commit_round(self, drafts: list[int], round: Round, next_token: int, eos_token_id: int | None) -> list[int]:
        """Records a round that kept drafts[:round.kept] and then emitted `next_token`; returns the committed tokens.

        An EOS ends the output: what follows it is dropped and not counted as proposed or accepted.
        """
        kept, K = round.kept, len(drafts)
        new = drafts[:kept] + [next_token]
        # With no drafts (the last token of a call) the round is a plain target step.
        last = Origin.TARGET if K == 0 else Origin.BONUS if kept == K else Origin.RESAMPLED
        origins = [Origin.DRAFT] * kept + [last]
        if eos_token_id in new:
            end = new.index(eos_token_id) + 1
            new, origins = new[:end], origins[:end]
            if end <= kept:  # the EOS was a kept draft: the drafts after it were never needed
                round = Round(end, end, round.draft_ms, round.verify_ms)
        self.tokens += new
        self.origins += origins
        self.rounds.append(round)
        return new

    @property
    def accepted_per_round(self) -> list[int]:
        return [r.kept for r in self.rounds]

    @property
    def lookahead_per_round(self) -> list[int]:
        return [r.lookahead for r in self.rounds]

    @property
    def accepted(self) -> int:
        return sum(r.kept for r in self.rounds)

    @property
    def proposed(self) -> int:
        return sum(r.lookahead for r in self.rounds)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / proposed draft tokens, or None when nothing was proposed."""
        return self.accepted / self.proposed if self.proposed else None

    @property
    def tokens_per_target_call(self) -> float:
        return len(self.tokens) / self.target_calls if self.target_calls else 0.0

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """New tokens per second after the prefill."""
        decode = self.seconds - self.prefill_seconds
        return len(self.tokens) / decode if decode > 0 else 0.0


@dataclass(frozen=True)
class TraceRound:
    """One round's numbers, to watch the algorithm work (`speculative_sample(..., trace=True)`).

    `drafts` x1..xK with `p` = p(xi) and `q` = q(xi); `r` the uniform draws (None at temperature 0, where a draft
    is kept iff it is the target's argmax); `kept` drafts kept; then `next_token`, drawn from norm(max(0, q - p))
    after a rejection or from q after all K were kept, with `next_probability` under that distribution; `source`
    the drafter's word on where the drafts came from, if it gave one (a lookup: the position it copied from). As in
    the Generation, a kept EOS ends the round: `drafts` stop at it and `next_token` is None (nothing came after it).
    """

    drafts: list[int]
    p: list[float]
    q: list[float]
    r: list[float] | None
    kept: int
    next_token: int | None
    next_probability: float | None
    draft_ms: float
    verify_ms: float
    source: str | None = None

    @property
    def acceptance_probabilities(self) -> list[float]:
        """min(1, q(xi) / p(xi)) for each draft."""
        return [min(1.0, q / p) if p > 0 else 1.0 for p, q in zip(self.p, self.q)]

    @property
    def next_origin(self) -> Origin | None:
        """Where `next_token` came from; None when a kept EOS ended the round before it."""
        K = len(self.drafts)
        if self.next_token is None:
            return None
        return Origin.TARGET if K == 0 else Origin.BONUS if self.kept == K else Origin.RESAMPLED


def trace_round(drafts: torch.Tensor, p: torch.Tensor, q: torch.Tensor, r: torch.Tensor | None, round: Round,
                next_token: int | None, source: str | None = None) -> TraceRound:
    """A round's numbers read back from the device (only when tracing: extra transfers), as the Generation
    committed it: `round` and `next_token` after an EOS cut (see `Generation.commit_round`)."""
    K, kept = round.lookahead, round.kept
    drafts, p, q, r = drafts[:K], p[:K], q[: K + 1], None if r is None else r[:K]
    rows = torch.arange(K, device=drafts.device)
    probability = None
    if next_token is not None:
        p_next = p[kept] if kept < K else torch.zeros_like(q[kept])  # as in accept_or_resample: the bonus is from q
        residual = residual_distribution(q[kept], p_next)
        probability = (residual[next_token] / residual.sum()).item()
    return TraceRound(drafts=drafts.tolist(), p=p[rows, drafts].tolist(), q=q[rows, drafts].tolist(),
                      r=None if r is None else r.tolist(), kept=kept, next_token=next_token,
                      next_probability=probability, draft_ms=round.draft_ms, verify_ms=round.verify_ms,
                      source=source)


# ----------------------------------------------------------------------------------------------------------
# One processing of logits for both models: the accept/reject rule is only exact on the same processed p and q.


def logits_to_probs(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """Float32 probabilities (..., V) from logits (..., V): temperature, then top-k, then top-p.

    Temperature 0 gives the one-hot distribution of the argmax (no division by a tiny temperature); a temperature
    so small that it underflows gives its limit, uniform over the tied maxima.
    """
    logits = logits.float()  # compare probabilities in float32 whatever the models' dtype
    if temperature == 0:
        one_hot = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        # A row with a NaN or +inf logit gives NaN probabilities, as it does at any other temperature, so that the
        # samplers' one check per round (`_broken_model`) catches a broken model whatever the temperature.
        return torch.where((logits.isnan() | logits.isposinf()).any(-1, keepdim=True), float("nan"), one_hot)
    # Subtracting the maximum first keeps a tiny temperature from overflowing to inf - inf = NaN; the maxima stay
    # exactly 0 even where the temperature underflows to 0 in float32 (0 / 0).
    shifted = logits - logits.amax(-1, keepdim=True)
    scaled = torch.where(shifted == 0, 0.0, shifted / temperature)
    # Top-k chosen on the logits, not the scaled values: a huge temperature flattens those to equal values, and
    # the k most likely tokens must still be the ones kept.
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p is not None and top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p: a token stays when the mass
        # strictly before it is below top_p, so the token that crosses the threshold (and the first) is kept.
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        removed = mass_before >= top_p
        removed[..., 0] = False  # the most likely token always stays, even for a top_p that underflows float32
        sorted_probs = sorted_probs.masked_fill(removed, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of `probs` (..., V); rows need not be normalised. A one-hot row gives its token."""
    flat = probs.reshape(-1, probs.shape[-1])
    # A NaN row (a broken model) would make multinomial fail inside torch before the round's check can name the
    # model: sample it uniformly instead; the round then raises a clear error.
    flat = torch.where(flat.isfinite().all(-1, keepdim=True), flat, 1.0)
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def greedy_or_sample(probs: torch.Tensor, temperature: float, generator) -> torch.Tensor:
    """The argmax at temperature 0 (the rows are one-hot; the generator is left untouched), else a sample."""
    return probs.argmax(-1) if temperature == 0 else sample(probs, generator)


# ----------------------------------------------------------------------------------------------------------
# The steps of a round


def accept_or_resample(drafts: torch.Tensor, p: torch.Tensor, q: torch.Tensor, r: torch.Tensor | None,
                       counts: torch.Tensor, temperature: float,
                       generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3, for every row of a batch: how many drafts the target keeps (B,), and the token that follows them (B,).

    drafts (B, K), p (B, K, V) draft probabilities, q (B, K+1, V) target probabilities at the same positions plus
    one, r (B, K) uniform draws in [0, 1) (None at temperature 0); row b proposed its first counts[b] drafts (the
    rest is padding, whose p must be 0). Keep xi if r_i < q(xi)/p(xi), i.e. with probability min(1, q(xi)/p(xi));
    at the first rejection, the next token is sampled from norm(max(0, q_i - p_i)); if all are kept it is the
    bonus token, sampled from q at the row's last draft + 1. Everything stays on the device: the caller reads the
    results back in one transfer.
    """
    B, K = drafts.shape
    if temperature == 0:
        keep = drafts == q[:, :K].argmax(-1)  # one-hot p and q: kept iff it is the target's greedy choice
    else:
        keep = r < q[:, :K].gather(-1, drafts[..., None])[..., 0] / p.gather(-1, drafts[..., None])[..., 0]
    keep &= torch.arange(K, device=drafts.device) < counts[:, None]  # padding is never kept
    kept = keep.int().cumprod(1).sum(1)  # (B,): length of each row's kept prefix
    # A zero row appended to p makes row `kept` of max(0, q - p) equal to q there when every proposed draft was
    # kept (p is 0 past a row's drafts): the bonus needs no branch.
    rows = torch.arange(B, device=drafts.device)
    p_next = torch.cat([p, p.new_zeros(B, 1, p.shape[2])], 1)[rows, kept]  # (B, V)
    q_next = q[rows, kept]  # (B, V)
    return kept, greedy_or_sample(residual_distribution(q_next, p_next), temperature, generator)


def residual_distribution(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """norm(max(0, q - p)), unnormalised (`sample` does not need it): where a rejected draft is replaced from."""
    residual = (q - p).clamp_min(0)  # (..., V)
    # Floating point can round q - p to zero everywhere when q = p; then a rejection had probability ~0
    # and q itself is the right distribution.
    return torch.where(residual.sum(-1, keepdim=True) > 0, residual, q)


# ----------------------------------------------------------------------------------------------------------
# The two decoders


class Batch:
    """The rows being decoded together: their committed tokens on the device and on the host, and their Generations.

    `ids` (B, W) holds row b's committed tokens in ids[b, :lengths[b]] (prompts left-aligned, zeros after). A row
    is active until it emits the EOS or its `max_new_tokens`; then it is finished (in `commit`) and its passes are
    parked: it still fills its place in the batch's fixed shapes, at positions from 0, and nothing of it is read.
    """

    def __init__(self, prompts: list[torch.Tensor], max_new_tokens: int, eos_token_id: int | None, trace: bool,
                 on_finished: Callable[[int, Generation], None] | None, start_time: float):
        self.max_new_tokens, self.eos_token_id, self.on_finished = max_new_tokens, eos_token_id, on_finished
        self.start_time = start_time
        self.lengths = [len(p) for p in prompts]
        # Every position a row can reach: what the caches are made for (the same in both decoders, so that their
        # passes attend over caches of one shape).
        self.max_len = max(self.lengths) + max_new_tokens
        self.ids = prompts[0].new_zeros(len(prompts), self.max_len)
        for b, p in enumerate(prompts):
            self.ids[b, : len(p)] = p
        self.outs = [Generation(trace=[] if trace else None) for _ in prompts]
        self.active = [True] * len(prompts)

    @property
    def rows(self) -> list[int]:
        return [b for b, active in enumerate(self.active) if active]

    def remaining(self, b: int) -> int:
        return self.max_new_tokens - len(self.outs[b].tokens)

    def pending_at(self) -> list[int]:
        """Where each row's pending token (its last committed one) is: parked rows at position 0."""
        return [n - 1 if active else 0 for n, active in zip(self.lengths, self.active)]

    def prefill(self, model: GPT2, cache: KVCache) -> None:
        """Every prompt minus its last token, in one pass: shorter rows are padded, and cropped back after."""
        longest = max(self.lengths) - 1
        if longest > 0:
            model(self.ids[:, :longest], cache=cache)
            cache.crop(self.pending_at())

    def commit(self, b: int, new: list[int], tokens: torch.Tensor) -> None:
        """Row b committed `new`, which `tokens` (a device tensor of at least len(new)) holds too: copied from it,
        on the device, with no transfer from the host. Finishes the row at an EOS or at its token budget."""
        n = self.lengths[b]
        self.ids[b, n : n + len(new)] = tokens[: len(new)]
        self.lengths[b] += len(new)
        if new[-1] == self.eos_token_id or self.remaining(b) == 0:
            self.active[b] = False
            self.outs[b].seconds = time.perf_counter() - self.start_time
            if self.on_finished is not None:
                self.on_finished(b, self.outs[b])


@torch.inference_mode()
def speculative_sample(target: GPT2, draft: GPT2 | Drafter, prompt, max_new_tokens: int, *,
                       lookahead: int | LookaheadPolicy = 4, temperature: float = 0.0, top_k: int | None = None,
                       top_p: float | None = None, eos_token_id: int | None = None,
                       generator: torch.Generator | None = None,
                       on_tokens: Callable[[list[int]], None] | None = None, clock: Clock | None = None,
                       trace: bool = False,
                       on_finished: Callable[[int, Generation], None] | None = None) -> Generation | list[Generation]:
    """Samples `max_new_tokens` tokens from `target`, with `draft` proposing up to `lookahead` tokens per round.

    `draft` is a small GPT2 (wrapped in a `ModelDrafter`) or any drafter (speculative_gpt2/drafters.py), such as
    `PromptLookupDrafter()`. The output is distributed exactly as `autoregressive_sample(target, ...)` with the same
    temperature, top-k and top-p (token for token at temperature 0). `prompt` is a list of ids or a 1-D integer
    tensor; or a batch: a list of such prompts, of any lengths (or a 2-D tensor), decoded together, one target pass
    per round and one draft pass per draft step for all rows, each row exactly as if alone (a drafter that is not
    a model is copied per row). `lookahead` is K, or a policy that chooses K every round and learns from each
    (`AdaptiveLookahead()`, which keeps what it learned across calls; `"auto"` is a fresh one per call; see
    speculative_gpt2/lookahead.py). A row stops after `eos_token_id` if it produces it.
    `on_tokens` is called with the tokens each round commits (one prompt only); `on_finished(row, generation)` once
    per prompt, as soon as it is done. `clock` times the rounds' steps (default: the device's). With `trace`, each
    Generation's `trace` holds every round's numbers (`TraceRound`: the drafts, their p and q, the draws r, the
    verdict, the resampled or bonus token); off, it costs nothing. Returns a `Generation`, or a list of one per
    prompt of a batch.
    """
    check_options(max_new_tokens, temperature, top_k, top_p, eos_token_id, generator)
    policy = _lookahead_policy(lookahead)
    prompts, batched = _prompts(prompt, on_tokens)
    drafter = _batch_drafter(draft, len(prompts))
    prompts = check_models_and_prompts(prompts, max_new_tokens, generator, eos_token_id, target=target,
                                       draft=getattr(drafter, "model", None))
    start_time = time.perf_counter()
    device = prompts[0].device
    clock = clock or DeviceClock(device)
    begun = clock.mark()
    process = partial(logits_to_probs, temperature=temperature, top_k=top_k, top_p=top_p)
    batch = Batch(prompts, max_new_tokens, eos_token_id, trace, on_finished, start_time)
    B, V = len(prompts), target.config.vocab_size
    target_cache = target.new_cache(B, max_len=batch.max_len)
    batch.prefill(target, target_cache)  # each row's last prompt token is then pending for the target
    drafter.start(prompts, batch.max_len, Sampling(process, partial(greedy_or_sample, temperature=temperature,
                                                                    generator=generator), V))
    prefilled = clock.mark()
    while rows := batch.rows:
        # A round emits at most K + 1 tokens per row: no row drafts more than it still needs (which also keeps its
        # positions inside the caches, made for the longest prompt + max_new_tokens).
        K = min(check_lookahead(policy.choose(), target.pass_rows), max(batch.remaining(b) for b in rows) - 1,
                min(batch.max_len - batch.lengths[b] for b in rows))
        started = clock.mark()
        # Step 1, draft: up to K tokens per row with their p (B, K, V), zero past a row's `counts[b]` drafts.
        if K > 0:
            drafts, p, counts, sources = drafter.propose(batch.ids, batch.lengths, K, batch.active)
            counts = [min(c, batch.remaining(b) - 1) if batch.active[b] else 0 for b, c in enumerate(counts)]
            K = max(counts)  # a lookup may find nothing anywhere: the round is then a plain target step
            drafts, p = drafts[:, :K], p[:, :K]
        else:
            drafts, p = batch.ids.new_empty(B, 0), torch.empty(B, 0, V, device=device)
            counts, sources = [0] * B, [None] * B
        drafted = clock.mark()
        # Step 2, verify: each row's pending token and its drafts, scored in one pass: q at K + 1 positions.
        target_cache.crop(batch.pending_at())
        pending = batch.ids.gather(1, torch.tensor(batch.pending_at(), device=device)[:, None])  # (B, 1)
        q = process(target(torch.cat([pending, drafts], 1), cache=target_cache))  # (B, K + 1, V)
        verified = clock.mark()
        # Step 3, accept or resample: `kept` drafts per row, then one resampled (or bonus) token.
        r = torch.rand(B, K, generator=generator, device=device) if temperature > 0 else None
        kept, next_token = accept_or_resample(drafts, p, q, r, torch.tensor(counts, device=device), temperature,
                                              generator)
        finite = torch.stack([p.isfinite().all(), q.isfinite().all()])  # NaN rows: a broken model
        synced = torch.cat([drafts.flatten(), kept, next_token, finite]).tolist()  # the round's one host sync
        draft_ids, kept_counts, next_ids = synced[: B * K], synced[B * K : B * K + B], synced[B * K + B : -2]
        _broken_model({"draft model": synced[-2], "target model": synced[-1]}, len(batch.outs[rows[0]].tokens))
        draft_ms, verify_ms = clock.ms(started, drafted), clock.ms(drafted, verified)
        committed = [None] * B
        for b in rows:
            out, k = batch.outs[b], counts[b]
            round = Round(k, kept_counts[b], draft_ms * k / K if K else 0.0, verify_ms)
            new = out.commit_round(draft_ids[b * K : b * K + k], round, next_ids[b], eos_token_id)
            out.target_calls += 1
            out.draft_calls += k
            if trace:  # the round as committed: an EOS among the kept drafts cuts it
                r_b = None if r is None else r[b]
                last = out.rounds[-1]
                out.trace.append(trace_round(drafts[b], p[b], q[b], r_b, last,
                                             next_ids[b] if len(new) > last.kept else None, sources[b]))
            if k > 0:
                policy.update(round)
            if on_tokens is not None:
                on_tokens(new)
            batch.commit(b, new, torch.cat([drafts[b, : kept_counts[b]], next_token[b : b + 1]]))
            committed[b] = new if batch.active[b] else None
        # Step 4, roll back: each row's target cache keeps the committed prefix it holds (`crop` before the next
        # pass); `drafter.commit` tells the drafter what every row committed.
        drafter.commit(committed)
    synchronize(device)
    for out in batch.outs:
        out.prefill_seconds = clock.ms(begun, prefilled) / 1e3
    return batch.outs if batched else batch.outs[0]


@torch.inference_mode()
def autoregressive_sample(model: GPT2, prompt, max_new_tokens: int, *, temperature: float = 0.0,
                          top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                          generator: torch.Generator | None = None, use_cache: bool = True,
                          on_tokens: Callable[[list[int]], None] | None = None,
                          on_finished: Callable[[int, Generation], None] | None = None) -> Generation | list[Generation]:
    """Plain decoding: one forward pass of `model` per new token (per new token of every row, for a batch of
    prompts, as in `speculative_sample`). `use_cache=False` recomputes the whole sequence every step (the uncached
    baseline of the toyllm blog post; one prompt only). Returns a `Generation`, or a list of one per prompt."""
    check_options(max_new_tokens, temperature, top_k, top_p, eos_token_id, generator)
    prompts, batched = _prompts(prompt, on_tokens)
    if batched and not use_cache:
        raise ValueError("use_cache=False (the uncached baseline) decodes one prompt: pass one, not a batch")
    prompts = check_models_and_prompts(prompts, max_new_tokens, generator, eos_token_id, target=model)
    start_time = time.perf_counter()
    device = prompts[0].device
    clock = DeviceClock(device)
    begun = clock.mark()
    batch = Batch(prompts, max_new_tokens, eos_token_id, False, on_finished, start_time)
    cache = model.new_cache(len(prompts), max_len=batch.max_len) if use_cache else None
    if use_cache:
        batch.prefill(model, cache)  # as in speculative_sample
    prefilled = clock.mark()
    while rows := batch.rows:
        if use_cache:
            cache.crop(batch.pending_at())
            fed = batch.ids.gather(1, torch.tensor(batch.pending_at(), device=device)[:, None])  # (B, 1)
        else:
            fed = batch.ids[:, : batch.lengths[0]]
        probs = logits_to_probs(model(fed, cache=cache)[:, -1], temperature, top_k, top_p)  # (B, V)
        token = greedy_or_sample(probs, temperature, generator)  # (B,)
        *tokens, finite = torch.cat([token, probs.isfinite().all().view(1)]).tolist()  # the step's one host sync
        _broken_model({"model": finite}, len(batch.outs[rows[0]].tokens))
        for b in rows:
            out = batch.outs[b]
            out.tokens.append(tokens[b])
            out.origins.append(Origin.TARGET)
            out.target_calls += 1
            if on_tokens is not None:
                on_tokens(out.tokens[-1:])
            batch.commit(b, out.tokens[-1:], token[b : b + 1])
    synchronize(device)
    for out in batch.outs:
        out.prefill_seconds = clock.ms(begun, prefilled) / 1e3
    return batch.outs if batched else batch.outs[0]


def _broken_model(finite: dict[str, bool], position: int) -> None:
    for name, ok in finite.items():
        if not ok:
            raise ValueError(f"the {name} produced NaN or infinite logits (at new token {position}): its weights "
                             f"are broken or overflow in this dtype; check the checkpoint, or try float32")


# ----------------------------------------------------------------------------------------------------------
# Argument checks: one-line ValueErrors naming the parameter, before any model runs.


def check_options(max_new_tokens, temperature, top_k, top_p, eos_token_id=None, generator=None) -> None:
    """Raises ValueError for sampling options of the wrong type or out of range."""
    check_integer("max_new_tokens", max_new_tokens, minimum=1)
    check_real("temperature", temperature, minimum=0)
    if top_k is not None:
        check_integer("top_k", top_k, minimum=1)
    if top_p is not None and not (check_real("top_p", top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (or None), got {top_p!r}")
    if eos_token_id is not None:
        check_integer("eos_token_id", eos_token_id, minimum=0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator (or None), got {type(generator).__name__}")


def check_integer(name: str, value, minimum: int | None = None) -> bool:
    """Python and numpy integers are integers; bools and floats are not."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return True


def check_real(name: str, value, minimum: float | None = None) -> bool:
    """A finite int or float (numpy's too); bools, strings and None are not."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return True


def check_lookahead(K, pass_rows: int | None = None) -> int:
    """A K that a lookahead policy chose: an integer >= 1, whose verification (K + 1 rows) fits the target's
    fixed passes (`GPT2.fixed_pass_rows`), if it has them: a longer pass would break exactness silently."""
    if isinstance(K, bool) or not isinstance(K, Integral) or K < 1:
        raise ValueError(f"the lookahead policy chose K={K!r}: it must choose an integer >= 1")
    if pass_rows is not None and K + 1 > pass_rows:
        raise ValueError(f"K={K} needs verification passes of {K + 1} rows, but the target's passes are fixed at "
                         f"{pass_rows} rows: use target.fixed_pass_rows({K + 1}) or a K of at most {pass_rows - 1}")
    return int(K)


def _batch_drafter(draft, batch_size: int) -> BatchDrafter:
    """A GPT2 becomes a ModelDrafter (batched passes); a batch drafter is taken as it is; any other drafter (start,
    propose and commit) drafts for one row: itself for one prompt, a deep copy of it per row for a batch."""
    if isinstance(draft, GPT2):
        return ModelDrafter(draft)
    if isinstance(draft, (ModelDrafter, EachRow)):
        return draft
    if not all(callable(getattr(draft, move, None)) for move in ("start", "propose", "commit")):
        raise ValueError(f"draft must be a GPT2 model or a drafter (start, propose and commit methods, see "
                         f"speculative_gpt2/drafters.py), got {type(draft).__name__}")
    return EachRow([draft] if batch_size == 1 else [copy.deepcopy(draft) for _ in range(batch_size)])


def _lookahead_policy(lookahead) -> LookaheadPolicy:
    if callable(getattr(lookahead, "choose", None)) and callable(getattr(lookahead, "update", None)):
        return lookahead
    if isinstance(lookahead, str) and lookahead == "auto":  # as on the command line: a fresh policy for this call
        return AdaptiveLookahead()
    if isinstance(lookahead, bool) or not isinstance(lookahead, Integral) or lookahead < 1:
        raise ValueError(f"lookahead must be an integer >= 1, 'auto', or a policy such as AdaptiveLookahead(), "
                         f"got {lookahead!r}")
    return FixedLookahead(int(lookahead))


def _prompts(prompt, on_tokens) -> tuple[list, bool]:
    """The prompts of a call, and whether they came as a batch: a list or tuple of prompts, or a 2-D tensor or
    array; anything else is one prompt."""
    rows = getattr(prompt, "ndim", None) == 2 or (
        isinstance(prompt, (list, tuple)) and len(prompt) > 0
        and all(isinstance(p, (list, tuple)) or getattr(p, "ndim", 0) >= 1 for p in prompt))
    if rows and on_tokens is not None:
        raise ValueError("on_tokens streams one prompt: with a batch, use on_finished(row, generation)")
    if rows and len(prompt) == 0:
        raise ValueError("the batch is empty: give at least one prompt")
    return (list(prompt), True) if rows else ([prompt], False)


def check_models_and_prompts(prompts: list, max_new_tokens: int, generator, eos_token_id, *, target: GPT2,
                             draft: GPT2 | None = None) -> list[torch.Tensor]:
    """`check_models_and_prompt` for every prompt of a batch; an error names the prompt's index."""
    if len(prompts) == 1:
        return [check_models_and_prompt(prompts[0], max_new_tokens, generator, eos_token_id, target=target,
                                        draft=draft)]
    checked = []
    for i, prompt in enumerate(prompts):
        try:
            checked.append(check_models_and_prompt(prompt, max_new_tokens, generator, eos_token_id, target=target,
                                                   draft=draft))
        except ValueError as e:
            raise ValueError(f"prompt {i} of the batch: {e}") from None
    return checked


def check_models_and_prompt(prompt, max_new_tokens: int, generator, eos_token_id, *, target: GPT2,
                            draft: GPT2 | None = None) -> torch.Tensor:
    """Raises ValueError for models or a prompt that do not fit together; returns the prompt as a 1-D LongTensor
    on the models' device. `draft` is the draft model, if the drafter has one."""
    models = {"target": target} if draft is None else {"target": target, "draft": draft}
    for name, model in models.items():
        if not isinstance(model, GPT2):
            raise ValueError(f"{name} must be a GPT2 model, got {type(model).__name__}")
    devices = {m.wte.weight.device for m in models.values()}
    if len(devices) > 1:
        raise ValueError(f"the models are on different devices ({', '.join(map(str, devices))}): move both to one")
    vocab_sizes = {m.config.vocab_size for m in models.values()}
    if len(vocab_sizes) > 1:
        raise ValueError(f"the models have different vocabulary sizes {sorted(vocab_sizes)}: they must share one")
    device, vocab_size = devices.pop(), vocab_sizes.pop()
    prompt = _token_list(prompt)
    if not prompt:
        raise ValueError("prompt is empty: give at least one token id")
    if not all(0 <= t < vocab_size for t in prompt):
        raise ValueError(f"prompt must hold token ids in [0, {vocab_size})")
    if eos_token_id is not None and eos_token_id >= vocab_size:
        raise ValueError(f"eos_token_id={eos_token_id} is not a token id of the models (vocabulary {vocab_size})")
    context = min(m.config.n_positions for m in models.values())
    if len(prompt) + max_new_tokens > context:
        raise ValueError(f"prompt ({len(prompt)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                         f"context of {context} positions: shorten one of them")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"the generator is on {generator.device} but the models are on {device}: make it there")
    return torch.tensor(prompt, dtype=torch.long, device=device)


def _token_list(prompt) -> list[int]:
    """The prompt as a list of ints: from a list or tuple of integers, or a 1-D integer tensor or array."""
    if isinstance(prompt, str):
        raise ValueError("prompt is text: encode it first, e.g. prompt = load_tokenizer().encode(text)")
    if isinstance(prompt, torch.Tensor) or hasattr(prompt, "__array__"):  # a tensor or a numpy array
        dtype = prompt.dtype
        integer = (not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
                   if isinstance(prompt, torch.Tensor) else getattr(dtype, "kind", "") in ("i", "u"))
        if prompt.ndim != 1 or not integer:
            raise ValueError(f"prompt must be a 1-D array of token ids, got shape {list(prompt.shape)}, {prompt.dtype}")
        return [int(t) for t in prompt.tolist()]
    if not isinstance(prompt, (list, tuple)):
        raise ValueError(f"prompt must be a list of token ids or a 1-D tensor, got {type(prompt).__name__}")
    if not all(isinstance(t, Integral) and not isinstance(t, bool) for t in prompt):
        raise ValueError("prompt must hold integer token ids")
    return [int(t) for t in prompt]

