"""What the samplers return: a `Generation` per prompt, a `Round` per target pass, a `Step` per timed decoding step,
an `Origin` per token, and, when asked for, a `TraceRound` per round (the numbers of the trace page)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

import torch


class Origin(str, Enum):
    """Where a new token came from. A str, so that `origin == "draft"` holds."""

    DRAFT = "draft"  # a draft token the target kept
    RESAMPLED = "resampled"  # drawn from norm(max(0, q - p)) at a rejection
    BONUS = "bonus"  # drawn from q after all K drafts were kept (in a tree: a kept path that ends at a leaf)
    TARGET = "target"  # plain decoding: one target pass for this token

    def __str__(self) -> str:
        return self.value



@dataclass(frozen=True)
class Round:
    """One round of speculative sampling: `lookahead` drafts proposed (K; a token tree's depth), `kept` of them
    kept by the target, the measured milliseconds of the draft passes and of the verification pass, `nodes`, the
    drafts that pass scored (a tree's nodes; a chain's K), and `path`, the kept drafts' node indices in the round's
    tree (a chain's: 0, 1, ...), which a policy that fits its tree to the rounds reads (tree_search.FittedTree)."""

    lookahead: int
    kept: int
    draft_ms: float = 0.0
    verify_ms: float = 0.0
    nodes: int = 0
    path: tuple[int, ...] = ()


@dataclass(frozen=True)
class Step:
    """One decoding step after the prefill, timed on the host: `width` the drafts per row its target pass scored
    (K; 0 for plain decoding, or a round where nothing was proposed) and `ms` its wall time, all of it (drafting,
    verification, acceptance, commit, callbacks). A row records the steps it took part in; the report compares a
    run's time with its steps at their median pace (speculative_gpt2/timing.py)."""

    width: int
    ms: float


@dataclass
class Generation:
    """What a sampling call produced, and how.

    `tokens` are the new tokens (never the prompt); `origins[i]` says where `tokens[i]` came from (an `Origin`).
    `rounds` holds one `Round` per target pass of speculative sampling: K proposed (fewer when an EOS among the
    kept drafts ended the output), drafts kept, and the measured ms of its draft and verification passes.
    `draft_calls` counts the tokens the drafter proposed (an EOS may drop some): for a model drafter one forward
    pass each; a prompt lookup makes no pass. Call counts exclude the prefill; `seconds` includes it,
    `prefill_seconds` is its share; `steps` holds a `Step` per decoding step after it. `trace` holds a `TraceRound`
    per round when the call asked for it.
    """

    tokens: list[int] = field(default_factory=list)
    origins: list[Origin] = field(default_factory=list)
    rounds: list[Round] = field(default_factory=list)
    target_calls: int = 0
    draft_calls: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    steps: list[Step] = field(default_factory=list)
    trace: list[TraceRound] | None = None

    def commit_round(self, drafts: list[int], round: Round, next_token: int, eos_token_id: int | None,
                     after_leaf: bool) -> list[int]:
        """Records a round that kept drafts[:round.kept] and then emitted `next_token`; returns the committed tokens.
        `after_leaf`: whether the last kept place has no children (a chain's: all its drafts kept), so that
        `next_token` is a bonus; in a tree a short branch's leaf is one before the round's depth.

        An EOS ends the output: what follows it is dropped and not counted as proposed or accepted.
        """
        kept, K = round.kept, len(drafts)
        new = drafts[:kept] + [next_token]
        # With no drafts (the last token of a call) the round is a plain target step.
        last = Origin.TARGET if K == 0 else Origin.BONUS if after_leaf else Origin.RESAMPLED
        origins = [Origin.DRAFT] * kept + [last]
        if eos_token_id in new:
            end = new.index(eos_token_id) + 1
            new, origins = new[:end], origins[:end]
            if end <= kept:  # the EOS was a kept draft: the drafts after it were never needed
                round = Round(end, end, round.draft_ms, round.verify_ms, round.nodes, round.path[:end])
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
    With coupled sampling, `choices` are the target's Gumbel-max tokens at the K + 1 positions (a draft is kept iff
    it equals the choice at its place, the next token is the choice after the kept ones), `r` is None and
    `next_probability` is q(next_token).
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
    choices: list[int] | None = None
    # A token tree's round: `drafts` are its nodes, parents before children, `parents` each one's (-1: the pending
    # token), `q` the target's probability of each after its parent, `path` the nodes kept, one per kept depth,
    # `tested` min(1, q/p) of each node as the rule tried it against what was left of q (None: never tried) and `r`
    # each tried node's draw.
    parents: list[int] | None = None
    path: list[int] | None = None
    tested: list[float | None] | None = None

    @property
    def acceptance_probabilities(self) -> list[float | None]:
        """min(1, q(xi) / p(xi)) for each draft; a tree's, as each node was tried (None: never tried)."""
        if self.tested is not None:
            return self.tested
        return [min(1.0, q / p) if p > 0 else 1.0 for p, q in zip(self.p, self.q)]

    @property
    def next_origin(self) -> Origin | None:
        """Where `next_token` came from; None when a kept EOS ended the round before it. In a tree, a bonus follows a
        kept node without children, a resample a node whose children were all rejected."""
        K = len(self.drafts)
        if self.next_token is None:
            return None
        if self.parents is not None and K:
            below = set(self.parents)  # the places with children: -1 the pending token
            return Origin.BONUS if (self.path[-1] if self.path else -1) not in below else Origin.RESAMPLED
        return Origin.TARGET if K == 0 else Origin.BONUS if self.kept == K else Origin.RESAMPLED

    @classmethod
    def of(cls, tree, q, verdict, b: int, source: str | None, round: Round, next_token: int | None) -> TraceRound:
        """Row b's round read back from the device (only when tracing: extra transfers), as the Generation committed
        it: `round` and `next_token` after an EOS cut. `tree` the round's DraftTree (a chain), q (B, K + 1, V),
        `verdict` the rule's (speculative_gpt2/rules.py)."""
        if not tree.is_chain:
            return cls._of_tree(tree, q, verdict, b, source, round, next_token)
        K, kept = round.lookahead, round.kept
        drafts, p, q_b = tree.tokens[b, :K], tree.p[b, :K], q[b, : K + 1]
        rows = torch.arange(K, device=drafts.device)
        probability = None
        if next_token is not None:  # under the distribution it was drawn from: a residual, q, or coupled's q
            following = verdict.following[b]
            probability = (following[next_token] / following.sum()).item()
        r = None if verdict.r is None else verdict.r[b, :K, 0].tolist()
        choices = None if verdict.choices is None else verdict.choices[b, : K + 1].tolist()
        return cls(drafts=drafts.tolist(), p=p[rows, drafts].tolist(), q=q_b[rows, drafts].tolist(), r=r, kept=kept,
                   next_token=next_token, next_probability=probability, draft_ms=round.draft_ms,
                   verify_ms=round.verify_ms, source=source, choices=choices)


    @classmethod
    def _of_tree(cls, tree, q, verdict, b: int, source: str | None, round: Round, next_token: int | None) -> TraceRound:
        """`of` for a token tree: its listed nodes (renumbered in order), their parents, and what the rule tried."""
        children = tree.children[b].tolist()  # (1 + N, W): each place's children, -1 after the last
        parent = {child: place - 1 for place, kids in enumerate(children) for child in kids if child >= 0}
        nodes = sorted(parent)  # parents before children, as the tree lists them
        number = {node: i for i, node in enumerate(nodes)}
        places = torch.tensor([parent[n] + 1 for n in nodes], dtype=torch.long, device=q.device)
        index = torch.tensor(nodes, dtype=torch.long, device=q.device)
        x = tree.tokens[b, index]
        tested, draws = [None] * len(nodes), [None] * len(nodes)
        path = verdict.path[b, : round.kept].tolist()
        ratios = verdict.ratios[b].tolist() if verdict.ratios is not None else []  # (depth, W), NaN: not tried
        r = verdict.r[b].tolist() if verdict.r is not None else None
        place = 0
        for depth, row in enumerate(ratios):
            for j, ratio in enumerate(row):
                child = children[place][j] if j < len(children[place]) else -1
                if child >= 0 and ratio == ratio:  # tried: NaN is not
                    tested[number[child]] = ratio
                    draws[number[child]] = None if r is None else r[depth][j]
            if depth >= len(path):
                break
            place = path[depth] + 1
        probability = None
        if next_token is not None:
            following = verdict.following[b]
            probability = (following[next_token] / following.sum()).item()
        return cls(drafts=x.tolist(), p=tree.p[b, index, x].tolist(), q=q[b, places, x].tolist(),
                   r=None if r is None else draws, kept=round.kept, next_token=next_token,
                   next_probability=probability, draft_ms=round.draft_ms, verify_ms=round.verify_ms, source=source,
                   parents=[number[parent[n]] if parent[n] >= 0 else -1 for n in nodes],
                   path=[number[n] for n in path], tested=tested)


class Readback(NamedTuple):
    """What a round reads back from the device in its one host sync: each row's path (the kept drafts first), drafts
    kept, next token and whether the kept path ended at a leaf (the next token then a bonus), the checks
    (booleans) of the proposal, the rule and the models, and each row's kept node indices (the verdict's path)."""

    path: list[list[int]]
    kept: list[int]
    next_token: list[int]
    leaf: list[bool]
    checks: list[bool]
    nodes: list[tuple[int, ...]]

    @classmethod
    def of(cls, path: torch.Tensor, verdict, tree, checks: list[torch.Tensor]) -> Readback:
        """From the path's tokens (B, K), a rule's Verdict, the round's DraftTree and 0-d boolean tensors, with one
        `.tolist()`."""
        B, K = path.shape
        # The last kept place: 0 the root, i + 1 node i; a leaf's first child is -1. Clamped: a rule's bad verdict
        # is refused after this read, in one line, and must not fail inside torch first.
        depth = verdict.path.shape[1]
        last = verdict.path.gather(1, (verdict.kept - 1).clamp(0, max(depth - 1, 0))[:, None])[:, 0] + 1 if depth \
            else verdict.kept
        last = torch.where(verdict.kept > 0, last, 0).clamp(0, tree.children.shape[1] - 1)
        leaf = tree.children[torch.arange(B, device=last.device), last, 0] < 0
        flat = torch.cat([path.flatten(), verdict.kept, verdict.next_token, leaf.long(),
                          verdict.path.long().flatten(), torch.stack(checks).long()]).tolist()
        kept, following = flat[B * K : B * K + B], flat[B * K + B : B * K + 2 * B]
        leaf = [bool(x) for x in flat[B * K + 2 * B : B * K + 3 * B]]
        at = B * K + 3 * B  # each row's node indices, depth of them (-1 past the kept ones)
        nodes = [tuple(flat[at + b * depth : at + b * depth + min(k, depth)]) for b, k in enumerate(kept)]
        checks = [bool(x) for x in flat[at + B * depth :]]
        return cls([flat[b * K : (b + 1) * K] for b in range(B)], kept, following, leaf, checks, nodes)
