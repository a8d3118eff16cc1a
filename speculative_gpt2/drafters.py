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

import copy
from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol

import torch

from speculative_gpt2.checks import check_integer


@dataclass(frozen=True)
class Sampling:
    """How this call turns logits into tokens. A drafter that samples must use it: the rule is exact only when p
    is processed (temperature, top-k, top-p) as q is."""

    process: Callable[[torch.Tensor], torch.Tensor]  # logits (..., V) -> float32 probabilities (..., V)
    # probabilities (B, V) [, positions (B,) of the tokens drawn] -> tokens (B,): the argmax at temperature 0; with
    # coupled sampling, the Gumbel-max at those positions (speculative_gpt2/coupling.py), which a draft must propose
    # to be kept often (without positions: an ordinary sample).
    draw: Callable[..., torch.Tensor]
    vocab_size: int
    greedy: bool = False  # temperature 0: p and q are one-hot, and `draw` takes the argmax


class Proposal(NamedTuple):
    """Drafts x1..xk (k,) long, their draft distributions p (k, V) float32, both on the target's device; and,
    optionally, a line saying where they came from (shown on the trace page)."""

    tokens: torch.Tensor
    p: torch.Tensor
    source: str | None = None


class TreeProposal(NamedTuple):
    """A token tree: a Proposal whose drafts each name their parent, an earlier draft's index or -1 for the pending
    token (parents before children; siblings in the order they were drawn), at most K levels deep."""

    tokens: torch.Tensor
    p: torch.Tensor
    source: str | None
    parents: list[int]


class Drafter(Protocol):
    """Proposes draft tokens for `speculative_sample`. Implement these three methods; nothing else is asked."""

    def start(self, prompt: torch.Tensor, max_len: int, sampling: Sampling) -> None:
        """A call begins: `prompt` (n,) is on the target's device, no call reaches past `max_len` positions."""

    def propose(self, tokens: torch.Tensor, lookahead: int) -> Proposal:
        """Up to `lookahead` (K >= 1) drafts to follow the committed `tokens` (n,), with their p; none is allowed:
        the round is then one plain target step."""

    def commit(self, new: list[int]) -> None:
        """The tokens the round committed (1 to K + 1 ids): the kept drafts, then the target's token."""

    # Optional, for a drafter of token trees: def nodes(self, lookahead: int) -> int, the most drafts a proposal
    # for K = lookahead holds (a chain's: K). The caches keep that many slots for a tree's pass.


def one_hot(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """p (k, V) of a deterministic proposer: probability 1 on each proposed token."""
    return torch.zeros(len(tokens), vocab_size, device=tokens.device).scatter_(1, tokens[:, None], 1.0)


class BatchProposal(NamedTuple):
    """What a batch drafter proposes for all rows of a batch: drafts (B, K) long and their p (B, K, V) float32 on
    the target's device; row b's first counts[b] drafts are proposals, the rest padding (p zero there); each row's
    `source` line, or None; and, for proposals not made by a model, `checks`: device booleans (one per rule of
    `PROPOSAL_RULES`) that the samplers read with the round's one host sync (`refuse_bad_proposal`)."""

    tokens: torch.Tensor
    p: torch.Tensor
    counts: list[int]
    sources: list[str | None]
    checks: torch.Tensor | None = None
    tree: object = None  # a model drafter's token tree (a DraftTree, speculative_gpt2/trees.py), else None
    # Per-row drafters' trees: each row's parent of each draft (-1: the root, -2: padding), else None (chains);
    # counts[b] is then row b's depth.
    parents: list[list[int]] | None = None


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
    """A batch drafter made of one `Drafter` per row: each proposes for its own row, in turn, from a copy of the
    row's tokens (what it does to them cannot reach the sampler). Its proposals are checked: their shapes on the
    host at once, their values on the device, read with the round's one host sync."""

    def __init__(self, drafters: list[Drafter]):
        self.drafters = drafters
        self.name = type(drafters[0]).__name__  # what refusals call it (a copy of one drafter per row)

    @classmethod
    def of(cls, drafter, batch_size: int) -> PerRowDrafters:
        """`drafter` for one prompt; for a batch, a deep copy of it per row."""
        name = type(drafter).__name__
        if not all(callable(getattr(drafter, move, None)) for move in ("start", "propose", "commit")):
            raise ValueError(f"draft must be a GPT2 model or a drafter (start, propose and commit methods, see "
                             f"speculative_gpt2/drafters.py), got {name}")
        try:
            return cls([drafter] if batch_size == 1 else [copy.deepcopy(drafter) for _ in range(batch_size)])
        except Exception as e:  # a lock, a file, a generator ...: whatever deepcopy refuses
            raise ValueError(f"a batch runs a copy of the drafter per row, but {name} cannot be copied "
                             f"({type(e).__name__}: {e}): decode one prompt at a time, or make it copyable") from None

    def start(self, prompts: list[torch.Tensor], max_len: int, sampling: Sampling) -> None:
        self.vocab_size = sampling.vocab_size
        for drafter, prompt in zip(self.drafters, prompts):
            drafter.start(prompt.clone(), max_len, sampling)

    def propose(self, ids: torch.Tensor, lengths: list[int], lookahead: int, active: list[bool]) -> BatchProposal:
        B, V, N = len(self.drafters), self.vocab_size, self.nodes(lookahead)
        tokens = ids.new_zeros(B, N)
        p = torch.zeros(B, N, V, device=ids.device)
        counts, sources, checks, parents = [0] * B, [None] * B, [], [[] for _ in range(B)]
        for b, drafter in enumerate(self.drafters):
            if active[b]:
                proposal = drafter.propose(ids[b, : lengths[b]].clone(), lookahead)
                x, p_b, sources[b], parents[b] = checked_proposal(proposal, lookahead, V, ids.device,
                                                                  type(drafter).__name__, N)
                counts[b] = max(node_depths(parents[b]), default=0) if parents[b] is not None else len(x)
                checks.append(proposal_checks(x, p_b, V))
                # Out-of-range ids would fail inside the target's embedding before the round's sync names them.
                tokens[b, : len(x)], p[b, : len(x)] = x.clamp(0, V - 1), p_b
        checks = torch.stack(checks).all(0) if checks else None
        if not any(parents):  # chains
            return BatchProposal(tokens[:, :lookahead], p[:, :lookahead], counts, sources, checks)
        # A tree somewhere: each row's drafts as a tree (a chain's each following the one before), padded alike.
        rows = [row if row is not None else list(range(-1, c - 1)) for row, c in zip(parents, counts)]
        n = max(map(len, rows))
        return BatchProposal(tokens[:, :n], p[:, :n], counts, sources, checks,
                             parents=[row + [-2] * (n - len(row)) for row in rows])

    def nodes(self, lookahead: int) -> int:
        """The most drafts a row's proposal holds: K, or more where a drafter proposes trees (its `nodes`)."""
        return max(d.nodes(lookahead) if callable(getattr(d, "nodes", None)) else lookahead for d in self.drafters)

    def commit(self, new: list[list[int] | None]) -> None:
        for drafter, tokens in zip(self.drafters, new):
            if tokens is not None:
                drafter.commit(tokens)


# What a proposal's values must be, in the order of `proposal_checks`' booleans.
PROPOSAL_RULES = (
    "token ids in [0, vocabulary size)",
    "p finite",
    "p >= 0",
    "each p row summing to 1 (within 1e-3)",
    "each p row positive on its own draft",
)


def proposal_checks(tokens: torch.Tensor, p: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """One device boolean per rule of PROPOSAL_RULES for drafts (k,) and their p (k, V): no host sync."""
    finite = p.isfinite().all()
    safe = torch.where(p.isfinite(), p, 0.0)  # the other checks on finite values: NaN is named by its own rule
    own = safe.gather(1, tokens.clamp(0, vocab_size - 1)[:, None])
    return torch.stack([((tokens >= 0) & (tokens < vocab_size)).all(), finite, (safe >= 0).all(),
                        ((safe.sum(1) - 1).abs() <= 1e-3).all(), (own > 0).all()])


def refuse_bad_proposal(name: str, checks: list[bool]) -> None:
    """ValueError naming the drafter and the first rule its proposal broke, if any (`checks` read back)."""
    broken = [rule for rule, ok in zip(PROPOSAL_RULES, checks) if not ok]
    if broken:
        raise ValueError(f"the drafter {name} proposed drafts that break the rule {broken[0]!r} (needed: "
                         f"{'; '.join(PROPOSAL_RULES)}): fix its propose; one_hot(tokens, V) serves fixed tokens")


def node_depths(parents: list[int]) -> list[int]:
    """Each node's depth in a tree given by each node's parent (-1: the root, below which depth 1; a negative parent
    counts as the root; parents before children)."""
    depths = []
    for parent in parents:
        depths.append(1 if parent < 0 else depths[parent] + 1)
    return depths


def checked_proposal(proposal, lookahead: int, vocab_size: int, device: torch.device, name: str,
                     max_nodes: int | None = None) -> Proposal:
    """A drafter's proposal with the shapes, dtypes and device the round needs, as a TreeProposal (parents None: a
    chain); ValueError naming the drafter. A tree holds at most `max_nodes` drafts (the drafter's `nodes(K)`)."""
    if not (isinstance(proposal, tuple) and 2 <= len(proposal) <= 4
            and all(isinstance(t, torch.Tensor) for t in proposal[:2])):
        raise ValueError(f"the drafter {name}'s propose returned {type(proposal).__name__}: return a "
                         f"Proposal(tokens, p) of two tensors (and optionally a source line), or a TreeProposal")
    drafts, p, source, parents = (*proposal, None, None)[:4]
    for what, t in (("tokens", drafts), ("p", p)):
        if t.layout != torch.strided:
            raise ValueError(f"the drafter {name} proposed {what} as a {str(t.layout)[6:]} tensor: give a dense one "
                             f"({what}.to_dense())")
    most = lookahead if parents is None else max_nodes or lookahead
    if drafts.dim() != 1 or len(drafts) > most or drafts.dtype != torch.long:
        raise ValueError(f"the drafter {name} proposed {list(drafts.shape)} {drafts.dtype} tokens for K={lookahead}: "
                         f"propose a 1-D long tensor of at most {'K' if parents is None else most} tokens")
    if p.shape != (len(drafts), vocab_size) or not p.dtype.is_floating_point:
        raise ValueError(f"the drafter {name}'s p has shape {list(p.shape)}, {p.dtype}: give one distribution over "
                         f"the {vocab_size} tokens per draft, ({len(drafts)}, {vocab_size}) floating point "
                         f"(one_hot(tokens, V) for fixed tokens)")
    for what, t in (("tokens", drafts), ("p", p)):
        if t.device != device:
            raise ValueError(f"the drafter {name} proposed {what} on {t.device}, the target is on {device}: make "
                             f"them on the prompt's device (start's prompt.device)")
    if parents is not None:
        parents = [int(i) for i in (parents.tolist() if isinstance(parents, torch.Tensor) else parents)]
        if len(parents) != len(drafts) or any(not -1 <= parent < i for i, parent in enumerate(parents)) \
                or max(node_depths(parents), default=0) > lookahead:
            raise ValueError(f"the drafter {name} proposed the parents {parents} for {len(drafts)} drafts: give each "
                             f"draft's parent, an earlier draft's index or -1 for the pending token, at most "
                             f"K={lookahead} levels deep")
        if len(set(parents)) < len(parents) and (max_nodes or lookahead) <= lookahead:
            raise ValueError(f"the drafter {name} proposed a token tree but does not say how many drafts its trees "
                             f"hold: give it a method nodes(K) returning that count (more than K)")
    return TreeProposal(drafts, p.float(), source, parents)


class PromptLookupDrafter:
    """Prompt lookup (n-gram) drafting: find the most recent earlier occurrence of the last n committed tokens,
    for n from `max_ngram` down to `min_ngram`, and propose the up to K tokens that followed it. The copy may run
    into what it proposes (as LZ77 does): in a loop of period d the match sits d tokens back, and the copy repeats
    the loop for all K tokens instead of stopping at the end of the context. No match: no drafts.

    With `matches` > 1 it proposes a token tree: what followed each of the `matches` latest occurrences (of the
    longest n-gram first, then of shorter ones), merged where they agree (a trie of continuations), up to
    `matches` * K drafts. p is one-hot, so the tree rule keeps a child with the probability the target gives it
    once the siblings tried before it are ruled out (speculative_gpt2/rules.py).

    The search is a trie of the n-grams read backwards (last token first), n up to `max_ngram` (at most
    MAX_NGRAM): its node at depth n is the n-gram that ends with the path's tokens, and holds the positions after
    its `matches` most recent occurrences, latest first. Every committed token adds at most `max_ngram` nodes, each
    an entry of one dict and of one list, so memory grows linearly with the context; a lookup or a commit walks at
    most `max_ngram` nodes.
    """

    # Prompt lookup copies matches of a few tokens; a longer n-gram rarely matches, and each n costs a node per
    # committed token.
    MAX_NGRAM = 64
    # A tree of more continuations costs verification rows that are no longer nearly free (trees.MAX_NODES).
    MAX_MATCHES = 16

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, matches: int = 1):
        self.max_ngram = check_integer("max_ngram", max_ngram, 1, self.MAX_NGRAM)
        self.min_ngram = check_integer("min_ngram", min_ngram, 1, self.max_ngram)
        self.matches = check_integer("matches", matches, 1, self.MAX_MATCHES)

    def nodes(self, lookahead: int) -> int:
        """The most drafts a proposal for K holds: K each of `matches` continuations."""
        return self.matches * lookahead

    def start(self, prompt: torch.Tensor, max_len: int, sampling: Sampling) -> None:
        self.vocab_size, self.device = sampling.vocab_size, prompt.device
        self.history: list[int] = []
        self.child: dict[tuple[int, int], int] = {}  # (node, the token before its n-gram) -> node one deeper
        # node -> the indices of the tokens after its n-gram's latest occurrences, latest first; node 0: the root
        self.followers: list[list[int]] = [[]]
        self.commit(prompt.tolist())

    def propose(self, tokens: torch.Tensor, lookahead: int) -> Proposal:
        history, node, found = self.history, 0, []
        for n in range(1, min(self.max_ngram, len(history) - 1) + 1):  # the last n tokens, longer and longer
            node = self.child.get((node, history[-n]))
            if node is None:  # no longer n-gram has occurred either
                break
            if n >= self.min_ngram:
                found.append((n, self.followers[node]))
        starts, grams = [], []  # the continuations' first indices, longest n-gram's latest first
        for n, followers in reversed(found):
            for start in followers:
                if start not in starts and len(starts) < self.matches:
                    starts.append(start)
                    grams.append(n)
        drafts, parents = [], []
        for start in starts:  # each continuation joins the trie where it parts from those before it
            at, copied = -1, []
            for i in range(lookahead):  # copy forward from `start`, reading what was just copied if needed
                j = start + i
                copied.append(history[j] if j < len(history) else copied[j - len(history)])
                known = [c for c, parent in enumerate(parents) if parent == at and drafts[c] == copied[-1]]
                if not known:
                    drafts.append(copied[-1])
                    parents.append(at)
                at = known[0] if known else len(drafts) - 1
        x = torch.tensor(drafts, dtype=torch.long, device=self.device)
        if not starts:
            return Proposal(x, one_hot(x, self.vocab_size), "lookup: no match, nothing drafted")
        source = (f"lookup: copied from position {starts[0]} of prompt + output ({grams[0]}-gram match)"
                  if len(starts) == 1 else f"lookup: {len(starts)} continuations, from positions "
                  f"{', '.join(map(str, starts))} of prompt + output ({'/'.join(map(str, grams))}-gram matches)")
        if self.matches == 1:
            return Proposal(x, one_hot(x, self.vocab_size), source)
        return TreeProposal(x, one_hot(x, self.vocab_size), source, parents)

    def commit(self, new: list[int]) -> None:
        history, child, followers = self.history, self.child, self.followers
        for token in new:
            # Every n-gram that ends just before this token is now followed by it: its latest occurrence.
            node = 0
            for n in range(1, min(self.max_ngram, len(history)) + 1):
                key = node, history[-n]
                node = child.get(key)
                if node is None:
                    node = child[key] = len(followers)
                    followers.append([])
                latest = followers[node]
                latest.insert(0, len(history))
                del latest[self.matches :]
            history.append(token)

    def __repr__(self) -> str:
        return f"PromptLookupDrafter(max_ngram={self.max_ngram}, min_ngram={self.min_ngram}, matches={self.matches})"
