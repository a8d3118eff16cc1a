"""Drafters: whatever proposes the tokens that the target verifies (p in Chen et al.'s notation).

Chen et al.'s accept/reject rule is exact for ANY draft distribution p, so a drafter need not be a model. The
sampler asks a drafter three things: `start` once per call, then every round `propose` up to K tokens with their
distributions p, and `commit` the tokens the round committed (a model drafter rolls its cache back then).

A deterministic proposer's p is one-hot on its token (`one_hot`): a draft x is then kept with probability q(x),
and a rejected one is replaced from norm(max(0, q - p)), which is q without x. At temperature 0 the output is the
target's greedy output whatever the drafter proposes.

`ModelDrafter` wraps a GPT-2 (the default: `speculative_sample(target, GPT2, ...)` wraps it). `PromptLookupDrafter`
copies what followed the most recent earlier occurrence of the last n tokens (prompt lookup decoding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol

import torch

from gpt2_model import GPT2, KVCache


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


class ModelDrafter:
    """A small GPT-2 samples K drafts autoregressively from p, with its own KV cache; its pending tokens (the
    committed tokens not yet in its cache, 1 or 2) are fed first. Rolling back after a round is an integer."""

    def __init__(self, model: GPT2):
        self.model = model
        self.cache: KVCache | None = None
        self.length = 0  # committed tokens

    def start(self, prompt: torch.Tensor, max_len: int, sampling: Sampling) -> None:
        self.sampling, self.length = sampling, len(prompt)
        self.cache = self.model.new_cache(max_len=max_len)
        if len(prompt) > 1:  # the prompt minus its last token, which is then pending
            self.model(prompt[None, :-1], cache=self.cache)

    def propose(self, tokens: torch.Tensor, lookahead: int) -> Proposal:
        drafts, p = [], []
        x = tokens[None, self.cache.length :]  # (1, pending)
        for _ in range(lookahead):
            p_i = self.sampling.process(self.model(x, cache=self.cache)[0, -1])  # (V,)
            x_i = self.sampling.draw(p_i)
            drafts.append(x_i)
            p.append(p_i)
            x = x_i.view(1, 1)
        # The last draft is not fed back: it is pending for the next round, if it is kept.
        return Proposal(torch.stack(drafts), torch.stack(p))

    def commit(self, new: list[int]) -> None:
        # The cache keeps the committed prefix it holds; the last token stays pending (and also the last kept
        # draft when all were kept: it was never fed).
        self.length += len(new)
        self.cache.crop(min(self.cache.length, self.length - 1))

    def __repr__(self) -> str:
        return f"ModelDrafter({self.model.config.n_layer} layers, {self.model.config.n_embd} wide)"


class PromptLookupDrafter:
    """Prompt lookup (n-gram) drafting: find the most recent earlier occurrence of the last n committed tokens,
    for n from `max_ngram` down to `min_ngram`, and propose the up to K tokens that followed it. The copy may run
    into what it proposes (as LZ77 does): in a loop of period d the match sits d tokens back, and the copy repeats
    the loop for all K tokens instead of stopping at the end of the context. No match: no drafts.

    The search is a dict per n from n-gram to the position after its most recent occurrence, updated as tokens
    are committed: O(max_ngram) per token and per round, whatever the context length. p is one-hot.
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if isinstance(min_ngram, bool) or not isinstance(min_ngram, int) or min_ngram < 1:
            raise ValueError(f"min_ngram must be an integer >= 1, got {min_ngram!r}")
        if isinstance(max_ngram, bool) or not isinstance(max_ngram, int) or max_ngram < min_ngram:
            raise ValueError(f"max_ngram must be an integer >= min_ngram ({min_ngram}), got {max_ngram!r}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def start(self, prompt: torch.Tensor, max_len: int, sampling: Sampling) -> None:
        self.vocab_size, self.device = sampling.vocab_size, prompt.device
        self.history: list[int] = []
        self.follower: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after its latest occurrence
        self.commit(prompt.tolist())

    def propose(self, tokens: torch.Tensor, lookahead: int) -> Proposal:
        history = self.history
        for n in range(min(self.max_ngram, len(history) - 1), self.min_ngram - 1, -1):
            start = self.follower.get(tuple(history[-n:]))
            if start is not None:
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
        history = self.history
        for token in new:
            # Every n-gram that ends just before this token is now followed by it: its latest occurrence.
            for n in range(self.min_ngram, min(self.max_ngram, len(history)) + 1):
                self.follower[tuple(history[-n:])] = len(history)
            history.append(token)

    def __repr__(self) -> str:
        return f"PromptLookupDrafter(max_ngram={self.max_ngram}, min_ngram={self.min_ngram})"
