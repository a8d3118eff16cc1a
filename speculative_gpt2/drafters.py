"""Drafters: whatever proposes the tokens that the target verifies (p in Chen et al.'s notation).

Chen et al.'s accept/reject rule is exact for ANY draft distribution p, so a drafter need not be a model. The
sampler asks a drafter three things: `start` once per call, then every round `propose` up to K tokens with their
distributions p, and `commit` the tokens the round committed (a model drafter rolls its cache back then).

A deterministic proposer's p is one-hot on its token (`one_hot`): a draft x is then kept with probability q(x),
and a rejected one is replaced from norm(max(0, q - p)), which is q without x. At temperature 0 the output is the
target's greedy output whatever the drafter proposes.

`PromptLookupDrafter` copies what followed the most recent earlier occurrence of the last n tokens (prompt lookup
decoding). For a batch of prompts the sampler runs a copy of a drafter per row (`PerRowDrafters`). A draft model is the
exception: `ModelDrafter` (speculative.py, beside the loop that uses it) drafts for every row of a batch in one pass
per draft step, so it speaks the samplers' batch protocol (`BatchDrafter`) directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol

import torch

from speculative_gpt2.checks import check_integer


@dataclass(frozen=True)
class Sampling:
    """How this call turns logits into tokens. A drafter that samples must use it: the rule is exact only when p
    is processed (temperature, top-k, top-p) as q is."""

    process: Callable[[torch.Tensor], torch.Tensor]  # logits (..., V) -> float32 probabilities (..., V)
    draw: Callable[[torch.Tensor], torch.Tensor]  # probabilities (V,) -> a token (0-d): argmax at temperature 0
    vocab_size: int


class Proposal(NamedTuple):
    """Drafts x1..xk (k,) long, their draft distributions p (k, V) float32, both on the target's device; and,
    optionally, a line saying where they came from (shown on the trace page)."""

    tokens: torch.Tensor
    p: torch.Tensor
    source: str | None = None


class Drafter(Protocol):
    """Proposes draft tokens for `speculative_sample`. Implement these three methods; nothing else is asked."""

    def start(self, prompt: torch.Tensor, max_len: int, sampling: Sampling) -> None:
        """A call begins: `prompt` (n,) is on the target's device, no call reaches past `max_len` positions."""

    def propose(self, tokens: torch.Tensor, lookahead: int) -> Proposal:
        """Up to `lookahead` (K >= 1) drafts to follow the committed `tokens` (n,), with their p; none is allowed:
        the round is then one plain target step."""

    def commit(self, new: list[int]) -> None:
        """The tokens the round committed (1 to K + 1 ids): the kept drafts, then the target's token."""


def one_hot(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """p (k, V) of a deterministic proposer: probability 1 on each proposed token."""
    return torch.zeros(len(tokens), vocab_size, device=tokens.device).scatter_(1, tokens[:, None], 1.0)


class BatchProposal(NamedTuple):
    """What a batch drafter proposes for all rows of a batch: drafts (B, K) long and their p (B, K, V) float32 on
    the target's device; row b's first counts[b] drafts are proposals, the rest padding (p zero there); and each
    row's `source` line, or None."""

    tokens: torch.Tensor
    p: torch.Tensor
    counts: list[int]
    sources: list[str | None]


class BatchDrafter(Protocol):
    """What the samplers' loop talks to: one drafter for all the rows of a batch (a batch of one for one prompt).
    `ModelDrafter` is one (a draft pass serves every row); `PerRowDrafters` makes one of per-row `Drafter`s."""

    def start(self, prompts: list[torch.Tensor], max_len: int, sampling: Sampling) -> None:
        """A call begins with these prompts (n_b,), on the target's device; no row reaches past `max_len`."""

    def propose(self, ids: torch.Tensor, lengths: list[int], lookahead: int, active: list[bool]) -> BatchProposal:
        """Up to `lookahead` drafts for every active row b, to follow its committed tokens ids[b, :lengths[b]]."""

    def commit(self, new: list[list[int] | None]) -> None:
        """What each row committed this round (None: the row has finished and will not be asked again)."""


class PerRowDrafters:
    """A batch drafter made of one `Drafter` per row: each proposes for its own row, in turn."""

    def __init__(self, drafters: list[Drafter]):
        self.drafters = drafters

    def start(self, prompts: list[torch.Tensor], max_len: int, sampling: Sampling) -> None:
        self.vocab_size = sampling.vocab_size
        for drafter, prompt in zip(self.drafters, prompts):
            drafter.start(prompt, max_len, sampling)

    def propose(self, ids: torch.Tensor, lengths: list[int], lookahead: int, active: list[bool]) -> BatchProposal:
        B = len(self.drafters)
        tokens = ids.new_zeros(B, lookahead)
        p = torch.zeros(B, lookahead, self.vocab_size, device=ids.device)
        counts, sources = [0] * B, [None] * B
        for b, drafter in enumerate(self.drafters):
            if active[b]:
                x, p_b, sources[b] = checked_proposal(drafter.propose(ids[b, : lengths[b]], lookahead), lookahead,
                                                      self.vocab_size)
                counts[b] = len(x)
                tokens[b, : len(x)], p[b, : len(x)] = x, p_b
        return BatchProposal(tokens, p, counts, sources)

    def commit(self, new: list[list[int] | None]) -> None:
        for drafter, tokens in zip(self.drafters, new):
            if tokens is not None:
                drafter.commit(tokens)


def checked_proposal(proposal, lookahead: int, vocab_size: int) -> Proposal:
    """A drafter's proposal, checked for what would otherwise fail deep inside the round."""
    drafts, p, *source = proposal
    if drafts.dim() != 1 or len(drafts) > lookahead or drafts.dtype != torch.long:
        raise ValueError(f"the drafter proposed {list(drafts.shape)} {drafts.dtype} tokens for K={lookahead}: "
                         f"propose a 1-D long tensor of at most K tokens")
    if p.shape != (len(drafts), vocab_size):
        raise ValueError(f"the drafter's p has shape {list(p.shape)}: give one distribution over the {vocab_size} "
                         f"tokens per draft, ({len(drafts)}, {vocab_size}) (one_hot(tokens, V) for fixed tokens)")
    return Proposal(drafts, p, *source)


class PromptLookupDrafter:
    """Prompt lookup (n-gram) drafting: find the most recent earlier occurrence of the last n committed tokens,
    for n from `max_ngram` down to `min_ngram`, and propose the up to K tokens that followed it. The copy may run
    into what it proposes (as LZ77 does): in a loop of period d the match sits d tokens back, and the copy repeats
    the loop for all K tokens instead of stopping at the end of the context. No match: no drafts.

    The search is a trie of the n-grams read backwards (last token first), n up to `max_ngram` (at most
    MAX_NGRAM): its node at depth n is the n-gram that ends with the path's tokens, and holds the position after
    its most recent occurrence. Every committed token adds at most `max_ngram` nodes, each an entry of one dict
    and of one list, so memory grows linearly with the context; a lookup or a commit walks at most `max_ngram`
    nodes. p is one-hot.
    """

    # Prompt lookup copies matches of a few tokens; a longer n-gram rarely matches, and each n costs a node per
    # committed token.
    MAX_NGRAM = 64

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram = check_integer("max_ngram", max_ngram, 1, self.MAX_NGRAM)
        self.min_ngram = check_integer("min_ngram", min_ngram, 1, self.max_ngram)

    def start(self, prompt: torch.Tensor, max_len: int, sampling: Sampling) -> None:
        self.vocab_size, self.device = sampling.vocab_size, prompt.device
        self.history: list[int] = []
        self.child: dict[tuple[int, int], int] = {}  # (node, the token before its n-gram) -> node one deeper
        self.follower: list[int] = [0]  # node -> index of the token after its n-gram's latest occurrence; 0: root
        self.commit(prompt.tolist())

    def propose(self, tokens: torch.Tensor, lookahead: int) -> Proposal:
        history, node, match = self.history, 0, None
        for n in range(1, min(self.max_ngram, len(history) - 1) + 1):  # the last n tokens, longer and longer
            node = self.child.get((node, history[-n]))
            if node is None:  # no longer n-gram has occurred either
                break
            if n >= self.min_ngram:
                match = n, self.follower[node]
        if match is not None:
            n, start = match
            drafts = []
            for i in range(lookahead):  # copy forward from `start`, reading what was just copied if needed
                j = start + i
                drafts.append(history[j] if j < len(history) else drafts[j - len(history)])
            x = torch.tensor(drafts, device=self.device)
            return Proposal(x, one_hot(x, self.vocab_size),
                            f"lookup: copied from position {start} of prompt + output ({n}-gram match)")
        x = torch.empty(0, dtype=torch.long, device=self.device)
        return Proposal(x, one_hot(x, self.vocab_size), "lookup: no match, nothing drafted")

    def commit(self, new: list[int]) -> None:
        history, child, follower = self.history, self.child, self.follower
        for token in new:
            # Every n-gram that ends just before this token is now followed by it: its latest occurrence.
            node = 0
            for n in range(1, min(self.max_ngram, len(history)) + 1):
                key = node, history[-n]
                node = child.get(key)
                if node is None:
                    node = child[key] = len(follower)
                    follower.append(0)
                follower[node] = len(history)
            history.append(token)

    def __repr__(self) -> str:
        return f"PromptLookupDrafter(max_ngram={self.max_ngram}, min_ngram={self.min_ngram})"
