"""Speculative sampling for GPT-2: a drafter proposes, the large target model verifies (Chen et al. 2023,
"Accelerating Large Language Model Decoding with Speculative Sampling", Algorithm 2). Notation of the paper, kept
everywhere below: q is the TARGET model's distribution, p the DRAFT's.

The target keeps a KV cache; its *pending* token is the last committed token, not yet in its cache. The drafter
is a small GPT-2 (`ModelDrafter`) or any object with the methods of speculative_gpt2/drafters.py (prompt lookup is
built in). After a prefill of the prompt minus its last token, every round of `speculative_sample` does:

  1. draft     `drafter.propose`     up to K tokens x1..xK with their draft distributions p (one-hot if fixed);
  2. verify    `verify`              the target scores its pending token and x1..xK in ONE pass: q at K+1 places;
  3. accept    `rule`                what the target keeps of the drafts, and the token that follows: by default
                                     Chen et al.'s rule (`chen`, speculative_gpt2/rules.py): keep xi with
                                     probability min(1, q(xi)/p(xi)); at the first rejection emit a sample from
                                     norm(max(0, q - p)); if all K are kept, a bonus token from q;
  4. commit,   `batch.commit`,       the kept drafts and that token join the text; both caches forget the
     roll back `crop`, `commit`      rejected positions (an integer per row, nothing copied).

Every round emits 1 to K+1 tokens, distributed exactly as sampling from q; at temperature 0, the target's greedy
tokens (in every dtype with `exact`, speculative_gpt2/exact.py). Step 3 is one function (rules.py): `coupled=True`
compares Gumbel-max tokens there (coupling.py), giving the plain sampler's text for a seed; `lookahead=(3, 2)` drafts
a token tree, scored in one pass and decided by the tree rule (trees.py). `autoregressive_sample` is plain decoding.
Both take a batch of prompts (`Batch`), one target pass per round for every row; records, argument checks and the
command line live in speculative_gpt2/.
"""

from __future__ import annotations

if __name__ == "__main__":  # the command line, before torch loads: a Ctrl-C then ends quietly (command.py)
    from speculative_gpt2.command import main

    raise SystemExit(main())

import time
from functools import partial
from typing import Callable

import torch

from gpt2_model import GPT2, KVCache
from speculative_gpt2.arguments import (batch_of_prompts, check_finite, check_lookahead, check_models_and_prompts,
                                        check_options)
from speculative_gpt2.coupling import GumbelNoise, check_coupling, gumbel_max
from speculative_gpt2.cuda_graphs import CUDAGraphRunner
from speculative_gpt2.drafters import (BatchDrafter, BatchProposal, Drafter, PerRowDrafters, PromptLookupDrafter,
                                      Proposal, Sampling, refuse_bad_proposal)
from speculative_gpt2.exact import fixed_rows_pass, pass_rows
from speculative_gpt2.lookahead import AdaptiveLookahead, FixedLookahead, LookaheadPolicy
from speculative_gpt2.machine import Clock, DeviceClock, synchronize
from speculative_gpt2.records import Generation, Origin, Readback, Round, Step, TraceRound
from speculative_gpt2.rules import (Chance, DraftTree, Verdict, check_rule, chen, path_tokens, recursive_rejection,
                                    refuse_bad_verdict, residual, sample, verdict_checks)
from speculative_gpt2.trees import (TreePolicy, check_tree, drafts_trees, grow, lookahead_policy, nodes, prune, settle,
                                    tree_of, tree_shape, verify_pass)

__all__ = ["Generation", "Origin", "Round", "TraceRound", "AdaptiveLookahead", "FixedLookahead", "logits_to_probs",
           "sample", "chen", "recursive_rejection", "residual", "DraftTree", "Verdict", "Chance", "speculative_sample",
           "autoregressive_sample", "Drafter", "ModelDrafter", "PromptLookupDrafter", "Proposal"]


# ----------------------------------------------------------------------------------------------------------
# One processing of logits for both models: the accept/reject rule is only exact on the same processed p and q.


def logits_to_probs(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """Float32 probabilities (..., V) from logits (..., V): temperature, then top-k, then top-p. Temperature 0 gives
    the argmax one-hot (no division by a tiny temperature); one that underflows, uniform over the tied maxima."""
    logits = logits.float()  # compare probabilities in float32 whatever the models' dtype
    if temperature == 0:
        one_hot = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        # A NaN or +inf logit gives NaN probabilities, as at any other temperature: the round's check sees it.
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


def draw_tokens(probs: torch.Tensor, positions: list[int] | None = None, *, temperature: float, generator,
                noise: GumbelNoise | None) -> torch.Tensor:
    """One token per row of probs (B, V) at positions (B,): coupled noise's Gumbel-max there; else (or without
    positions: a drafter that gives none) the argmax at temperature 0, a sample otherwise."""
    if noise is not None and positions is not None:
        return gumbel_max(probs, noise.at(positions, 1)[:, 0])
    return Chance(temperature, generator).token(probs)


# ----------------------------------------------------------------------------------------------------------
# The paper's drafter: a small GPT-2


class ModelDrafter:
    """A small GPT-2 samples K drafts autoregressively from p (or a token tree, trees.py), for all rows at once,
    with its own KV cache of each row's committed tokens; `commit` rolls it back to the committed prefix it holds,
    an integer per row (finished rows: 0)."""

    def __init__(self, model: GPT2, shape: TreePolicy | None = None):
        self.model, self.shape = model, shape  # a shape: it drafts a token tree (speculative_gpt2/trees.py)

    def start(self, prompts: list[torch.Tensor], max_len: int, sampling: Sampling) -> None:
        self.sampling, self.lengths = sampling, [len(p) for p in prompts]
        self.cache = self.model.new_cache(len(prompts), max_len=max_len, room=nodes(self.shape))
        prefill(partial(fixed_rows_pass, self.model, rows=None), self.cache,
                torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True), self.lengths)

    def propose(self, ids: torch.Tensor, lengths: list[int], lookahead: int, active: list[bool]) -> BatchProposal:
        # Feed every row's committed tokens not yet in its cache (1, or more after a round that kept drafts) in one
        # pass of one shape: rows with fewer feed their last cached ones again.
        T = max(n - c for n, c, a in zip(lengths, self.cache.lengths, active) if a)
        starts = [n - T if a else 0 for n, a in zip(lengths, active)]
        self.cache.crop(starts)
        x = ids.gather(1, torch.tensor(starts, device=ids.device)[:, None] + torch.arange(T, device=ids.device))
        drafts, p, counts = [], [], [lookahead if a else 0 for a in active]
        if self.shape is not None:  # a tree of `lookahead` levels, a draft pass per level
            tree = grow(self.model, self.shape, lookahead, self.cache, self.sampling, self.model(x, self.cache)[:, -1])
            return BatchProposal(tree.tokens, tree.p, counts, [None] * len(active), tree=tree)
        for _ in range(lookahead):
            p_i = self.sampling.process(self.model(x, cache=self.cache)[:, -1])  # (B, V)
            # (B, 1) at each row's position (coupled noise); the last draft is not fed: pending if it is kept
            x = self.sampling.draw(p_i, [n + len(drafts) for n in lengths])[:, None]
            drafts.append(x[:, 0])
            p.append(p_i)
        return BatchProposal(torch.stack(drafts, 1), torch.stack(p, 1), counts, [None] * len(active))

    def commit(self, new: list[list[int] | None]) -> None:
        """Roll back: each row's cache keeps its committed tokens but the new pending one; finished rows none."""
        self.lengths = [n + len(t) if t is not None else 0 for n, t in zip(self.lengths, new)]
        self.cache.crop([min(c, max(n - 1, 0)) for c, n in zip(self.cache.lengths, self.lengths)])


# ----------------------------------------------------------------------------------------------------------
# The two decoders


def prefill(run: Callable, cache: KVCache, ids: torch.Tensor, lengths: list[int]) -> None:
    """Every row's prompt (ids[b, :lengths[b]]) minus its last token, in one pass `run(idx, cache, logits=False)`:
    shorter rows are padded, and cropped back after. Each row's last prompt token is then pending."""
    if max(lengths) > 1:
        run(ids[:, : max(lengths) - 1], cache, logits=False)  # only the keys and values: no LM head
        cache.crop([n - 1 for n in lengths])


class Batch:
    """The rows decoded together: `ids` (B, W) holds row b's committed tokens in ids[b, :lengths[b]]; `outs` their
    Generations. A row is active until its EOS or `max_new_tokens`; then it is finished (in `commit`) and parked at
    position 0: it keeps its place in the passes' fixed shapes, and nothing of it is read."""

    def __init__(self, prompts: list[torch.Tensor], max_new_tokens: int, eos_token_id: int | None, trace: bool,
                 on_tokens: Callable | None, batched: bool, on_finished: Callable[[int, Generation], None] | None):
        self.max_new_tokens, self.eos_token_id, self.on_finished = max_new_tokens, eos_token_id, on_finished
        self.on_tokens, self.batched = on_tokens, batched
        self.start_time = time.perf_counter()
        self.lengths = [len(p) for p in prompts]
        # Every position a row can reach: the caches' length in both decoders (passes of one shape in both).
        self.max_len = max(self.lengths) + max_new_tokens
        self.ids = prompts[0].new_zeros(len(prompts), self.max_len)
        for b, p in enumerate(prompts):
            self.ids[b, : len(p)] = p
        self.outs = [Generation(trace=[] if trace else None) for _ in prompts]
        self.active = [True] * len(prompts)

    @property
    def rows(self) -> list[int]:  # the active rows
        return [b for b, active in enumerate(self.active) if active]

    def remaining(self, b: int) -> int:  # tokens row b may still emit
        return self.max_new_tokens - len(self.outs[b].tokens)

    def most_drafts(self) -> int:
        """A round's K at most: no row drafts more than it still needs, or writes past the caches' positions."""
        active = self.rows
        return min(max(self.remaining(b) for b in active) - 1, min(self.max_len - self.lengths[b] for b in active))

    def pending_at(self) -> list[int]:
        """Where each row's pending token (its last committed one) is: parked rows at position 0."""
        return [n - 1 if active else 0 for n, active in zip(self.lengths, self.active)]

    def pending(self) -> torch.Tensor:  # each row's pending token, (B, 1)
        return self.ids.gather(1, torch.tensor(self.pending_at(), device=self.ids.device)[:, None])

    def draft(self, drafter: BatchDrafter, K: int, V: int) -> tuple:
        """Step 1 for every row: K drafts with their p as a `DraftTree` (a chain, or a drafter's tree) with
        nothing past what a row still needs (counts[b] levels); each row's source line; the proposal's checks."""
        B = len(self.active)
        if K == 0:  # the last token of a call: a plain target step
            empty = self.ids.new_empty(B, 0)
            return DraftTree.chain(empty, torch.empty(B, 0, V, device=empty.device), [0] * B), [0] * B, [None] * B, []
        drafts, p, counts, sources, checks, tree, parents = drafter.propose(self.ids, self.lengths, K, self.active)
        counts = [min(c, self.remaining(b) - 1) if self.active[b] else 0 for b, c in enumerate(counts)]
        checks, k = [] if checks is None else list(checks), max(counts)  # a lookup may find nothing: a plain step
        if tree is None and parents is None:  # a chain
            return DraftTree.chain(drafts[:, :k], p[:, :k], counts), counts, sources, checks
        return prune(  # a token tree (a model drafter's, or rows' from parents), nothing deeper than counts[b]
            tree if tree is not None else tree_of(drafts, p, parents), counts), counts, sources, checks

    def stream(self, b: int, new: list[int]) -> None:
        """Hands row b's new tokens to `on_tokens`: on_tokens(new) for one prompt, on_tokens(b, new) for a batch."""
        if self.on_tokens is not None:
            self.on_tokens(b, new) if self.batched else self.on_tokens(new)

    def commit(self, b: int, new: list[int], tokens: torch.Tensor) -> list[int] | None:
        """Row b committed `new`, which `tokens` (a device tensor of at least len(new)) holds too: copied from it,
        on the device, with no transfer from the host. Finishes the row at an EOS or at its token budget. Returns
        `new`, or None if the row is now finished."""
        n = self.lengths[b]
        self.ids[b, n : n + len(new)] = tokens[: len(new)]
        self.lengths[b] += len(new)
        if new[-1] == self.eos_token_id or self.remaining(b) == 0:
            self.active[b] = False
            self.outs[b].seconds = time.perf_counter() - self.start_time
            if self.on_finished is not None:
                self.on_finished(b, self.outs[b])
        return new if self.active[b] else None

    def timed(self, rows: list[int], width: int, began: float) -> None:
        """A step of `width` drafts per row that began at `began` (perf_counter) is over: its rows record it. The
        step's host sync came before, so its passes are done."""
        step = Step(width, 1e3 * (time.perf_counter() - began))
        for b in rows:
            self.outs[b].steps.append(step)

    def finish(self, device, clock: Clock, begun, prefilled) -> None:  # the prefill's time, once the device is done
        synchronize(device)
        for out in self.outs:
            out.prefill_seconds = clock.ms(begun, prefilled) / 1e3


@torch.inference_mode()
def speculative_sample(target: GPT2, draft: GPT2 | Drafter, prompt, max_new_tokens: int, *,
                       lookahead: int | str | LookaheadPolicy = 4, temperature: float = 0.0,
                       top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                       generator: torch.Generator | None = None, exact: bool | int = False, coupled: bool = False,
                       seed: int | list[int] | None = None, rule: Callable | None = None,
                       on_tokens: Callable | None = None, clock: Clock | None = None, trace=False,
                       on_finished: Callable[[int, Generation], None] | None = None) -> Generation | list[Generation]:
    """Samples `max_new_tokens` tokens from `target`, with `draft` proposing up to `lookahead` tokens per round.

    `draft` is a small GPT2 or any drafter (speculative_gpt2/drafters.py), e.g. `PromptLookupDrafter()`. The output
    is distributed exactly as `autoregressive_sample(target, ...)`'s with the same temperature, top-k and top-p
    (token for token at temperature 0; in every dtype with `exact`: True pads every target pass to K + 1 rows, an
    integer to that many, speculative_gpt2/exact.py). `coupled=True` samples every token as the Gumbel-max of its
    distribution with noise fixed by `seed` (an integer, or one per prompt) and the token's position: the same text
    as `autoregressive_sample(..., coupled=True, seed=...)` whatever K, drafter or batch (with `exact` in dtypes
    whose rounding moves with the pass shape). `prompt` is a list of ids or a 1-D integer tensor, or a batch of
    them (any lengths), each row decoded as if alone. `lookahead` is K, "auto", a policy (lookahead.py), or a
    token tree's widths per depth, e.g. (3, 2) (trees.py). `rule` decides what is kept each round: `chen`, `coupled`
    with `coupled=True`, `recursive_rejection` for trees, or your own (rules.py). `on_tokens(new)` streams one
    prompt's tokens (a batch's: `on_tokens(row, new)`); `on_finished(row, generation)` reports each prompt when
    done; `trace` records every round (`TraceRound`). Returns a `Generation`, or a list of them."""
    check_options(max_new_tokens, temperature, top_k, top_p, eos_token_id, generator)
    policy = lookahead_policy(lookahead)  # K, "auto", a policy, or a token tree's widths
    prompts, batched = batch_of_prompts(prompt)
    drafter = _batch_drafter(draft, len(prompts), policy)
    rows = pass_rows(exact, nodes(policy, drafter) or getattr(policy, "max_lookahead", None), target)  # a tree's too
    prompts = check_models_and_prompts(prompts, max_new_tokens, generator, eos_token_id, target=target,
                                       draft=getattr(drafter, "model", None))
    device = prompts[0].device
    noise = check_coupling(coupled, seed, generator, len(prompts), target.config.vocab_size, device)
    rule, chance = check_rule(rule, noise, drafts_trees(policy, drafter)), Chance(temperature, generator, noise)
    check_tree(policy, target, drafter, coupled, rows)
    clock = clock or DeviceClock(device)
    begun = clock.mark()
    process = partial(logits_to_probs, temperature=temperature, top_k=top_k, top_p=top_p)
    batch = Batch(prompts, max_new_tokens, eos_token_id, trace, on_tokens, batched, on_finished)
    B, V = len(prompts), target.config.vocab_size
    target_cache = target.new_cache(B, max_len=batch.max_len, room=max((rows or 1) - 1, nodes(policy, drafter)))
    target_pass = partial(fixed_rows_pass, target, rows=rows)  # (idx, cache) -> logits, in exact mode's shape
    verify = partial(verify_pass, target_pass, target, rows)  # a chain's, or a tree's
    prefill(target_pass, target_cache, batch.ids, batch.lengths)  # each row's last prompt token is then pending
    draw = partial(draw_tokens, temperature=temperature, generator=generator, noise=noise)
    drafter.start(prompts, batch.max_len, Sampling(process, draw, V, greedy=temperature == 0))
    prefilled = clock.mark()
    while active := batch.rows:
        step_began = time.perf_counter()
        K = min(check_lookahead(policy.choose(), rows, cap=isinstance(policy, AdaptiveLookahead)), batch.most_drafts())
        started = clock.mark()
        # Step 1, draft: up to K tokens per row with the p they were drawn from, as a tree: a chain of width 1.
        tree, counts, sources, checks = batch.draft(drafter, K, V)
        drafted = clock.mark()
        # Step 2, verify: each row's pending token and its drafts, scored in ONE pass: q after each of them.
        q = process(verify(batch.pending(), tree, target_cache))  # (B, K + 1, V); a tree's: (B, 1 + nodes, V)
        verified = clock.mark()
        # Step 3, accept: how many drafts each row keeps, and the token that follows them (resampled, or a bonus).
        verdict = rule(tree, q, chance.at(batch.lengths))
        judged = verdict_checks(verdict, tree, V)  # and a proposal's, and whether both models' numbers are finite
        path = path_tokens(tree, verdict)  # (B, K): the kept drafts first, each row
        read = Readback.of(path, verdict, tree, [*checks, *judged, tree.p.isfinite().all(), q.isfinite().all()])
        refuse_bad_proposal(getattr(drafter, "name", ""), read.checks[: len(checks)])
        refuse_bad_verdict(rule, read.checks[len(checks) : -2])
        check_finite({"draft model": read.checks[-2], "target model": read.checks[-1]},
                     len(batch.outs[active[0]].tokens))
        draft_ms, verify_ms, K = clock.ms(started, drafted), clock.ms(drafted, verified), tree.depth
        # Step 4, commit and roll back: each row keeps its kept drafts and the next token; the target's cache
        # forgets the rejected positions (its pending token is the next pass's first), the drafter's likewise.
        committed = [None] * B
        for b in active:
            k = counts[b]
            round = Round(k, read.kept[b], draft_ms * k / max(K, 1), verify_ms, tree.tokens.shape[1], read.nodes[b])
            traced = partial(TraceRound.of, tree, q, verdict, b, sources[b])
            new = _record_round(batch.outs[b], read.path[b][:k], round, read.next_token[b], read.leaf[b], eos_token_id,
                                policy, partial(batch.stream, b), traced)
            committed[b] = batch.commit(b, new, torch.cat([path[b, : read.kept[b]], verdict.next_token[b : b + 1]]))
        settle(target_cache, tree, verdict.path)  # a tree's kept path to its positions' slots
        target_cache.crop(batch.pending_at())
        drafter.commit(committed)
        batch.timed(active, K, step_began)
    batch.finish(device, clock, begun, prefilled)
    return batch.outs if batched else batch.outs[0]


def _record_round(out: Generation, drafts: list[int], round: Round, next_token: int, after_leaf: bool, eos_token_id,
                  policy, stream: Callable[[list[int]], None], traced) -> list[int]:
    """Writes a row's round into its Generation (and `traced`, its TraceRound, as committed), tells the policy,
    streams it; returns the tokens it committed (an EOS among them ends the row's output)."""
    new = out.commit_round(drafts, round, next_token, eos_token_id, after_leaf)
    out.target_calls += 1
    out.draft_calls += round.lookahead
    if out.trace is not None:  # the round as committed: an EOS among the kept drafts cuts it
        out.trace.append(traced(out.rounds[-1], next_token if len(new) > out.rounds[-1].kept else None))
    if round.lookahead > 0:
        policy.update(round)
    stream(new)
    return new


@torch.inference_mode()
def autoregressive_sample(model: GPT2, prompt, max_new_tokens: int, *, temperature: float = 0.0,
                          top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                          generator: torch.Generator | None = None, use_cache: bool = True, exact: int | None = None,
                          coupled: bool = False, seed: int | list[int] | None = None,
                          on_tokens: Callable | None = None,
                          on_finished: Callable[[int, Generation], None] | None = None
                          ) -> Generation | list[Generation]:
    """Plain decoding: one pass of `model` per new token (of every row, for a batch). `use_cache=False` recomputes
    everything each step (the toyllm blog post's uncached baseline; one prompt). `exact=n` pads each cached pass to
    n rows, as `speculative_sample(..., exact=n)` does; `coupled` and `seed` as there. Returns a `Generation`, or a
    list of one per prompt."""
    check_options(max_new_tokens, temperature, top_k, top_p, eos_token_id, generator)
    rows = pass_rows(exact, None, model)
    prompts, batched = batch_of_prompts(prompt)
    if batched and not use_cache:
        raise ValueError("use_cache=False (the uncached baseline) decodes one prompt: pass one, not a batch")
    prompts = check_models_and_prompts(prompts, max_new_tokens, generator, eos_token_id, target=model)
    device = prompts[0].device
    noise = check_coupling(coupled, seed, generator, len(prompts), model.config.vocab_size, device)
    clock = DeviceClock(device)
    begun = clock.mark()
    batch = Batch(prompts, max_new_tokens, eos_token_id, False, on_tokens, batched, on_finished)
    cache = model.new_cache(len(prompts), max_len=batch.max_len, room=(rows or 1) - 1) if use_cache else None
    model_pass = partial(fixed_rows_pass, model, rows=rows if use_cache else None)
    if use_cache:
        prefill(model_pass, cache, batch.ids, batch.lengths)  # as in speculative_sample
    prefilled = clock.mark()
    while active := batch.rows:
        step_began = time.perf_counter()
        if use_cache:
            cache.crop(batch.pending_at())
        fed = batch.pending() if use_cache else batch.ids[:, : batch.lengths[0]]
        probs = logits_to_probs(model_pass(fed, cache)[:, -1], temperature, top_k, top_p)  # (B, V)
        token = draw_tokens(probs, batch.lengths, temperature=temperature, generator=generator, noise=noise)  # (B,)
        *tokens, finite = torch.cat([token, probs.isfinite().all().view(1)]).tolist()  # the step's one host sync
        check_finite({"model": finite}, len(batch.outs[active[0]].tokens))
        for b in active:
            out = batch.outs[b]
            out.tokens.append(tokens[b])
            out.origins.append(Origin.TARGET)
            out.target_calls += 1
            batch.stream(b, out.tokens[-1:])
            batch.commit(b, out.tokens[-1:], token[b : b + 1])
        batch.timed(active, 0, step_began)
    batch.finish(device, clock, begun, prefilled)
    return batch.outs if batched else batch.outs[0]


def _batch_drafter(draft, batch_size: int, policy) -> BatchDrafter:
    """A GPT2 becomes a ModelDrafter (of trees, for a tree's shape); any other drafts for one row: itself, or copies."""
    if isinstance(draft, (GPT2, CUDAGraphRunner)):
        return ModelDrafter(draft, tree_shape(policy))
    if isinstance(draft, type):  # PromptLookupDrafter, not PromptLookupDrafter()
        raise ValueError(f"draft is the class {draft.__name__}, not a drafter: pass an instance, {draft.__name__}()")
    return draft if isinstance(draft, (ModelDrafter, PerRowDrafters)) else PerRowDrafters.of(draft, batch_size)

