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
At temperature 0 both distributions are one-hot, so the output is the target's greedy output.
`autoregressive_sample` is the plain one-token-per-pass decoder beside it, for timing and for the tests.
Token for token in every dtype when every target pass has one shape (`GPT2.fixed_pass_rows`); otherwise 1-row
and (K+1)-row passes round differently, which flips near-ties often in bfloat16 and rarely in float32.

The samplers change nothing outside the call: they do not touch the models' weights (a fast weight layout is
the caller's choice, `GPT2.prepare_for`), and K comes from a policy object the caller may pass (speculative_gpt2/lookahead.py).
Argument checks are at the end of the file; the command line is speculative_gpt2/cli.py (`python speculative.py
--help`, or the `speculative-gpt2` command).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from numbers import Integral, Real
from typing import Callable

import torch

from gpt2_model import GPT2
from speculative_gpt2.drafters import Drafter, ModelDrafter, PromptLookupDrafter, Proposal, Sampling
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
                       temperature: float, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: how many drafts the target keeps (0-d), and the token that follows them.

    drafts (K,), p (K, V) draft probabilities, q (K+1, V) target probabilities at the same positions plus one,
    r (K,) uniform draws in [0, 1) (None at temperature 0). Keep xi if r_i < q(xi)/p(xi), i.e. with probability
    min(1, q(xi)/p(xi)); at the first rejection, the next token is sampled from norm(max(0, q_i - p_i)); if all
    are kept it is the bonus token, sampled from q_K. Everything stays on the device: the caller reads both back
    in one transfer.
    """
    K = drafts.shape[0]
    if temperature == 0:
        keep = drafts == q[:K].argmax(-1)  # one-hot p and q: kept iff it is the target's greedy choice
    else:
        rows = torch.arange(K, device=drafts.device)
        keep = r < q[rows, drafts] / p[rows, drafts]  # r < 1, so min(1, .) is implied
    kept = keep.int().cumprod(0).sum()  # length of the kept prefix
    # A zero row appended to p makes row K of max(0, q - p) equal to q_K: the bonus needs no branch.
    p_next = torch.cat([p, p.new_zeros(1, p.shape[1])]).index_select(0, kept.view(1))[0]
    q_next = q.index_select(0, kept.view(1))[0]
    return kept, greedy_or_sample(residual_distribution(q_next, p_next), temperature, generator)


def residual_distribution(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """norm(max(0, q - p)), unnormalised (`sample` does not need it): where a rejected draft is replaced from."""
    residual = (q - p).clamp_min(0)
    # Floating point can round q - p to zero everywhere when q = p; then a rejection had probability ~0
    # and q itself is the right distribution.
    return torch.where(residual.sum() > 0, residual, q)


# ----------------------------------------------------------------------------------------------------------
# The two decoders


@torch.inference_mode()
def speculative_sample(target: GPT2, draft: GPT2 | Drafter, prompt, max_new_tokens: int, *,
                       lookahead: int | LookaheadPolicy = 4, temperature: float = 0.0, top_k: int | None = None,
                       top_p: float | None = None, eos_token_id: int | None = None,
                       generator: torch.Generator | None = None,
                       on_tokens: Callable[[list[int]], None] | None = None, clock: Clock | None = None,
                       trace: bool = False) -> Generation:
    """Samples `max_new_tokens` tokens from `target`, with `draft` proposing up to `lookahead` tokens per round.

    `draft` is a small GPT2 (wrapped in a `ModelDrafter`) or any drafter (speculative_gpt2/drafters.py), such as
    `PromptLookupDrafter()`. The output is distributed exactly as `autoregressive_sample(target, ...)` with the same
    temperature, top-k and top-p (token for token at temperature 0). `prompt` is a list of ids or a 1-D integer
    tensor (batch size 1, as in the paper). `lookahead` is K, or a policy that chooses K every round and learns from
    each (`AdaptiveLookahead()`, which keeps what it learned across calls; `"auto"` is a fresh one per call; see
    speculative_gpt2/lookahead.py). Generation stops after `eos_token_id` if it is produced.
    `on_tokens` is called with the tokens each round commits. `clock` times the rounds' steps (default: the
    device's). With `trace`, the Generation's `trace` holds every round's numbers (`TraceRound`: the drafts, their
    p and q, the draws r, the verdict, the resampled or bonus token); off, it costs nothing. Returns a `Generation`.
    """
    check_options(max_new_tokens, temperature, top_k, top_p, eos_token_id, generator)
    policy = _lookahead_policy(lookahead)
    drafter = _drafter(draft)
    prompt = check_models_and_prompt(prompt, max_new_tokens, generator, eos_token_id, target=target,
                                     draft=getattr(drafter, "model", None))
    start_time = time.perf_counter()
    device = prompt.device
    clock = clock or DeviceClock(device)
    begun = clock.mark()
    process = partial(logits_to_probs, temperature=temperature, top_k=top_k, top_p=top_p)
    max_len = len(prompt) + max_new_tokens
    target_cache = target.new_cache(max_len=max_len)
    ids = torch.cat([prompt, prompt.new_empty(max_new_tokens)])  # the committed tokens, on the device
    length = len(prompt)  # how many of them are committed
    # Prefill: the prompt minus its last token, which is then pending for the target.
    if length > 1:
        target(prompt[None, :-1], cache=target_cache)
    drafter.start(prompt, max_len, Sampling(process, partial(greedy_or_sample, temperature=temperature,
                                                             generator=generator), target.config.vocab_size))
    prefilled = clock.mark()
    out = Generation(trace=[] if trace else None)
    while len(out.tokens) < max_new_tokens:
        # A round emits at most K + 1 tokens: draft no more than are still needed (this also keeps every
        # position inside the caches, which are sized for prompt + max_new_tokens).
        K = min(check_lookahead(policy.choose(), target.pass_rows), max_new_tokens - len(out.tokens) - 1)
        started = clock.mark()
        # Step 1, draft: up to K tokens with their p. None (the last token, or no proposal): a plain target step.
        if K > 0:
            drafts, p, source = _checked_proposal(drafter.propose(ids[:length], K), K, target.config.vocab_size)
        else:
            drafts, p, source = prompt.new_empty(0), torch.empty(0, target.config.vocab_size, device=device), None
        K = len(drafts)
        out.draft_calls += K
        drafted = clock.mark()
        # Step 2, verify: the target's pending token and the K drafts, scored in one pass: q at K + 1 positions.
        verify_input = torch.cat([ids[length - 1 : length], drafts])[None]  # (1, K + 1)
        q = process(target(verify_input, cache=target_cache)[0])  # (K + 1, V)
        out.target_calls += 1
        verified = clock.mark()
        # Step 3, accept or resample: `kept` drafts, then one resampled (or bonus) token.
        r = torch.rand(K, generator=generator, device=device) if temperature > 0 else None
        kept, next_token = accept_or_resample(drafts, p, q, r, temperature, generator)
        finite = torch.stack([p.isfinite().all(), q.isfinite().all()])  # NaN rows: a broken model
        synced = torch.cat([drafts, kept.view(1), next_token.view(1), finite]).tolist()  # the round's one host sync
        *draft_ids, kept_count, next_id, draft_ok, target_ok = synced
        _broken_model({"draft model": draft_ok, "target model": target_ok}, len(out.tokens))
        round = Round(K, kept_count, clock.ms(started, drafted), clock.ms(drafted, verified))
        new = out.commit_round(draft_ids, round, next_id, eos_token_id)
        if trace:  # the round as committed: an EOS among the kept drafts cuts it
            committed = out.rounds[-1]
            out.trace.append(trace_round(drafts, p, q, r, committed, next_id if len(new) > committed.kept else None,
                                          source))
        if K > 0:
            policy.update(round)
        # Commit on the device too, from the device's own tensors: no copy of a Python list per round.
        ids[length : length + round.kept] = drafts[: round.kept]
        ids[length + round.kept] = next_token
        length += len(new)
        if on_tokens is not None:
            on_tokens(new)
        if new[-1] == eos_token_id:
            break
        # Step 4, roll back: the target's cache keeps the committed prefix it holds; the last token stays pending.
        target_cache.crop(min(target_cache.length, length - 1))
        drafter.commit(new)
    synchronize(device)
    out.seconds = time.perf_counter() - start_time
    out.prefill_seconds = clock.ms(begun, prefilled) / 1e3
    return out


@torch.inference_mode()
def autoregressive_sample(model: GPT2, prompt, max_new_tokens: int, *, temperature: float = 0.0,
                          top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                          generator: torch.Generator | None = None, use_cache: bool = True,
                          on_tokens: Callable[[list[int]], None] | None = None) -> Generation:
    """Plain decoding: one forward pass of `model` per new token. `use_cache=False` recomputes the whole
    sequence every step (the uncached baseline of the toyllm blog post). Returns a `Generation`."""
    check_options(max_new_tokens, temperature, top_k, top_p, eos_token_id, generator)
    prompt = check_models_and_prompt(prompt, max_new_tokens, generator, eos_token_id, target=model)
    start_time = time.perf_counter()
    clock = DeviceClock(prompt.device)
    begun = clock.mark()
    cache = model.new_cache(max_len=len(prompt) + max_new_tokens) if use_cache else None
    ids = torch.cat([prompt, prompt.new_empty(max_new_tokens)])  # the committed tokens, on the device
    length = len(prompt)
    if use_cache and length > 1:
        model(prompt[None, :-1], cache=cache)  # prefill, as in speculative_sample
    prefilled = clock.mark()
    out = Generation()
    while len(out.tokens) < max_new_tokens:
        fed = ids[None, length - 1 : length] if use_cache else ids[None, :length]
        probs = logits_to_probs(model(fed, cache=cache)[0, -1], temperature, top_k, top_p)
        token = greedy_or_sample(probs, temperature, generator)
        ids[length] = token
        length += 1
        out.target_calls += 1
        token, finite = torch.stack([token, probs.isfinite().all()]).tolist()  # the token's one host sync
        _broken_model({"model": finite}, len(out.tokens))
        out.tokens.append(token)
        out.origins.append(Origin.TARGET)
        if on_tokens is not None:
            on_tokens(out.tokens[-1:])
        if out.tokens[-1] == eos_token_id:
            break
    synchronize(prompt.device)
    out.seconds = time.perf_counter() - start_time
    out.prefill_seconds = clock.ms(begun, prefilled) / 1e3
    return out


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


def _drafter(draft) -> Drafter:
    """A GPT2 is wrapped in a ModelDrafter; anything with the three methods of a Drafter is taken as it is."""
    if isinstance(draft, GPT2):
        return ModelDrafter(draft)
    if not all(callable(getattr(draft, move, None)) for move in ("start", "propose", "commit")):
        raise ValueError(f"draft must be a GPT2 model or a drafter (start, propose and commit methods, see "
                         f"speculative_gpt2/drafters.py), got {type(draft).__name__}")
    return draft


def _checked_proposal(proposal, lookahead: int, vocab_size: int) -> Proposal:
    """A drafter's proposal, checked for what would otherwise fail deep inside the round."""
    drafts, p, *source = proposal
    if drafts.dim() != 1 or len(drafts) > lookahead or drafts.dtype != torch.long:
        raise ValueError(f"the drafter proposed {list(drafts.shape)} {drafts.dtype} tokens for K={lookahead}: "
                         f"propose a 1-D long tensor of at most K tokens")
    if p.shape != (len(drafts), vocab_size):
        raise ValueError(f"the drafter's p has shape {list(p.shape)}: give one distribution over the {vocab_size} "
                         f"tokens per draft, ({len(drafts)}, {vocab_size}) (one_hot(tokens, V) for fixed tokens)")
    return Proposal(drafts, p, *source)


def _lookahead_policy(lookahead) -> LookaheadPolicy:
    if callable(getattr(lookahead, "choose", None)) and callable(getattr(lookahead, "update", None)):
        return lookahead
    if isinstance(lookahead, str) and lookahead == "auto":  # as on the command line: a fresh policy for this call
        return AdaptiveLookahead()
    if isinstance(lookahead, bool) or not isinstance(lookahead, Integral) or lookahead < 1:
        raise ValueError(f"lookahead must be an integer >= 1, 'auto', or a policy such as AdaptiveLookahead(), "
                         f"got {lookahead!r}")
    return FixedLookahead(int(lookahead))


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


if __name__ == "__main__":
    import sys

    from speculative_gpt2.cli import main

    sys.exit(main())
