"""How many tokens to draft per round (K): a policy object that `speculative_sample` asks and reports to.

Before each round the sampler calls `policy.choose()` for K; after it, `policy.update(round)` with what the round
did (a `Round`: K, drafts kept, measured draft and verification times). `FixedLookahead(K)` is the trivial policy;
`AdaptiveLookahead` picks the K that maximises expected tokens per second. A policy keeps what it learned from
call to call: pass a new one for a fresh start. (transformers' candidate generator plays the same role.)
"""

from __future__ import annotations

from typing import Protocol

from speculative_gpt2.checks import check_integer, check_real
from speculative_gpt2.records import Round


class LookaheadPolicy(Protocol):
    def choose(self) -> int:
        """K for the next round, >= 1."""

    def update(self, round: Round) -> None:
        """Learns from a finished round that drafted (round.lookahead >= 1)."""


class FixedLookahead:
    """The same K every round."""

    def __init__(self, lookahead: int):
        self.lookahead = self.max_lookahead = lookahead

    def choose(self) -> int:
        return self.lookahead

    def update(self, round: Round) -> None:
        pass

    def __repr__(self) -> str:
        return f"FixedLookahead({self.lookahead})"


def expected_tokens_per_round(alpha: float, K: int) -> float:
    """E = (1 - alpha^(K+1)) / (1 - alpha): kept drafts plus the one resampled or bonus token (Chen et al.),
    when each draft is kept with probability alpha, independently."""
    return K + 1.0 if alpha >= 1 else (1 - alpha ** (K + 1)) / (1 - alpha)


def predicted_speedup(alpha: float, K: int, t_draft: float, t_verify: float, t_target: float) -> float:
    """Speculative over plain decoding when a round costs K draft passes and one (K+1)-row verification:
    E(alpha, K) tokens per round against one target pass (t_target) per token."""
    return expected_tokens_per_round(alpha, K) * t_target / (K * t_draft + t_verify)


def break_even_alpha(K: int, t_draft: float, t_verify: float, t_target: float) -> float | None:
    """The alpha at which speculative sampling with this K and these pass costs is as fast as plain decoding; 0.0
    if it is faster at any alpha, None if at none (a round costs more than the K + 1 plain passes it can save)."""
    if predicted_speedup(0.0, K, t_draft, t_verify, t_target) >= 1:
        return 0.0
    if predicted_speedup(1.0, K, t_draft, t_verify, t_target) < 1:
        return None
    low, high = 0.0, 1.0  # the predicted speedup grows with alpha: bisect
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if predicted_speedup(middle, K, t_draft, t_verify, t_target) < 1 else (low, middle)
    return high


def estimated_alpha(kept: int, rejections: int) -> float:
    """The paper's alpha, the chance that one draft is kept: drafts after a rejection were never tested, so
    kept / (kept + rejections), not kept / proposed, estimates it (the two agree at 0 and 1)."""
    return kept / (kept + rejections) if kept else 0.0


def interpolate(points: dict[int, float], x: int, extend_slope: bool = False) -> float:
    """The piecewise-linear function through `points` ({x: y}, at least one) at `x`. Beyond the points it is flat
    (the nearest point's y), or with `extend_slope` continues the slope of the last two."""
    xs = sorted(points)
    if x in points:
        return points[x]
    below, above = [p for p in xs if p < x], [p for p in xs if p > x]
    if below and above:
        lo, hi = below[-1], above[0]
    elif extend_slope and len(xs) >= 2:
        lo, hi = (xs[-2], xs[-1]) if below else (xs[0], xs[1])
    else:
        return points[below[-1] if below else above[0]]
    return points[lo] + (points[hi] - points[lo]) * (x - lo) / (hi - lo)


class AdaptiveLookahead:
    """Chooses K before each round to maximise expected tokens per ms: E(alpha, K) / (K t_draft + t_verify(K+1)).

    alpha is estimated from the rounds so far as kept / (kept + rejected), the maximum-likelihood estimate when
    drafts are kept independently (drafts after a rejection were never tested), with counts that decay so that
    it follows the text. t_draft (per pass) and t_verify (per number of rows) are measured as the rounds run.
    A verification size not yet measured costs the linear interpolation between measured sizes, or beyond them
    as much as the nearest one: optimistic, so that a larger K gets tried, and then measured.

    Measured times vary from run to run, and K changes how the random stream is consumed: with a sampling
    temperature the same seed need not give the same tokens (each call is still an exact sample from the target).
    With `cost_ratio=c`, times are not measured: the paper's cost model is used instead (a draft pass costs c
    target passes, a verification pass costs 1 whatever K), so K depends only on the drafts kept so far, and the
    same seed gives the same tokens.
    """

    def __init__(self, max_lookahead: int = 12, first: int | None = None, decay: float = 0.9,
                 cost_ratio: float | None = None):
        """`first`: K of the first round (default 4, or max_lookahead if smaller); `decay`: the weight that past
        rounds keep at each update; `cost_ratio`: see the class docstring."""
        self.max_lookahead = check_integer("max_lookahead", max_lookahead, minimum=1)
        self.first = check_integer("first", min(4, max_lookahead) if first is None else first, 1, max_lookahead)
        self.decay = check_real("decay (the weight kept by past rounds)", decay, 0, 1, open_below=True)
        if self.decay == 1:
            raise ValueError("decay (the weight kept by past rounds) must be below 1, got 1")
        self.cost_ratio = None if cost_ratio is None else check_real("cost_ratio", cost_ratio, minimum=0)
        self.kept, self.rejected = 1.0, 1.0  # a uniform prior: alpha = 0.5 until rounds say otherwise
        self.draft_ms: float | None = None
        self.verify_ms: dict[int, float] = {}  # rows -> ms

    @property
    def alpha(self) -> float:
        return self.kept / (self.kept + self.rejected)

    def choose(self) -> int:
        if self.draft_ms is None:
            return self.first
        return max(range(1, self.max_lookahead + 1), key=self.tokens_per_ms)

    def tokens_per_ms(self, K: int) -> float:
        if self.cost_ratio is not None:  # in target passes, not ms: the same choice, and nothing measured
            cost = K * self.cost_ratio + 1.0
        else:
            cost = K * self.draft_ms + interpolate(self.verify_ms, K + 1)
        # A clock too coarse to see a pass reads 0 ms: then the passes count as nearly free and E decides.
        return expected_tokens_per_round(self.alpha, K) / max(cost, 1e-9)

    def update(self, round: Round) -> None:
        K = round.lookahead
        self.kept = self.decay * self.kept + round.kept
        self.rejected = self.decay * self.rejected + (round.kept < K)
        self.draft_ms = moving_average(self.draft_ms, round.draft_ms / K)
        self.verify_ms[K + 1] = moving_average(self.verify_ms.get(K + 1), round.verify_ms)

    def __repr__(self) -> str:
        ratio = "" if self.cost_ratio is None else f", cost_ratio={self.cost_ratio:.3g}"
        return f"AdaptiveLookahead(max_lookahead={self.max_lookahead}{ratio})"


def moving_average(old: float | None, new: float, weight: float = 0.3) -> float:
    return new if old is None else (1 - weight) * old + weight * new


def as_policy(lookahead) -> LookaheadPolicy:
    """A lookahead as the samplers take it: K (an integer >= 1), "auto" (a fresh AdaptiveLookahead), or a policy."""
    if isinstance(lookahead, type):  # FittedTree, not FittedTree(): its methods would fail on a missing self
        raise ValueError(f"lookahead is the class {lookahead.__name__}, not a policy: pass an instance, "
                         f"{lookahead.__name__}()")
    if callable(getattr(lookahead, "choose", None)) and callable(getattr(lookahead, "update", None)):
        return lookahead
    if isinstance(lookahead, str) and lookahead == "auto":  # as on the command line: a fresh policy for this call
        return AdaptiveLookahead()
    try:
        return FixedLookahead(check_integer("lookahead", lookahead, minimum=1))
    except ValueError:
        raise ValueError(f"lookahead must be an integer >= 1, 'auto', a tree's widths such as (3, 2), or a policy "
                         f"such as AdaptiveLookahead() or FittedTree(), got {lookahead!r}") from None
