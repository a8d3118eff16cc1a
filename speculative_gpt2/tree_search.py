"""A token tree's shape from measured acceptance: Sequoia's dynamic program (Chen et al. 2024, arXiv 2402.12374).

Suppose the target keeps the i-th sibling drawn below a kept node with probability a_i, whatever the node (Sequoia's
positional acceptance; a_1 + a_2 + ... <= 1, since at most one sibling is kept). A node is then on the kept path with
the product of a_rank along its path, and the drafts a round keeps are, in expectation, the sum of those products over
the tree's nodes (`expected_kept`). `best_tree(acceptance, nodes, depth)` finds the shape of at most `nodes` nodes and
`depth` levels with the largest sum, exactly, by dynamic programming over (levels left, nodes left, the next child's
rank): a node's subtree of n nodes is split among its children of ranks 1, 2, ..., child i taking a subtree of its own.
`acceptance_by_rank(rounds)` measures the a_i from traced rounds (`speculative_sample(..., trace=True)`) of a tree
wide enough to try the ranks wanted.

The shape is fixed before any round, so which nodes exist never depends on what was drawn: the tree rule stays exact
for any shape, measured or not; a shape fitted to one pair of models is merely slower on another. `FittedTree` refits
during a call, between rounds, from the rounds before: each round's shape is still fixed before its drafts.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from speculative_gpt2.checks import check_integer, check_real
from speculative_gpt2.lookahead import interpolate, moving_average
from speculative_gpt2.trees import MAX_NODES, TreeShape


def expected_kept(shape: TreeShape, acceptance: list[float]) -> float:
    """The drafts a round of `shape` keeps in expectation when the i-th sibling is kept with acceptance[i - 1]."""
    reach = []  # each node's probability of being on the kept path
    for parent, rank in zip(shape.parents, shape.ranks):
        a = acceptance[rank] if rank < len(acceptance) else 0.0
        reach.append(a * (1.0 if parent < 0 else reach[parent]))
    return sum(reach)


def best_tree(acceptance: list[float], nodes: int, depth: int) -> TreeShape:
    """The TreeShape of at most `nodes` nodes and `depth` levels that keeps the most drafts in expectation
    (`expected_kept`); of equal ones, the one with fewer nodes."""
    root = _search(acceptance, nodes, depth)(depth, nodes, 0)[1]
    if not root:
        raise ValueError(f"acceptance {acceptance!r} keeps nothing: no tree keeps more than no drafts")
    return _shape(root)


def best_trees(acceptance: list[float], nodes: int, depth: int) -> list[TreeShape]:
    """best_tree for every budget up to `nodes` and every depth up to `depth`, each shape once, fewer nodes first:
    the candidates when a larger tree also costs more (FittedTree with costs)."""
    return [_shape(candidate.root) for candidate in _candidates(acceptance, nodes, depth)]


class _Candidate(NamedTuple):
    kept: float  # drafts kept in expectation (expected_kept)
    nodes: int
    depth: int
    root: tuple  # the root's children, as nested tuples


def _candidates(acceptance: list[float], nodes: int, depth: int) -> list[_Candidate]:
    """best_trees before any TreeShape is built (a fit builds only the one it keeps), fewer nodes first."""
    split, found = _search(acceptance, nodes, depth), {}
    for n in range(1, nodes + 1):
        for levels in range(1, min(depth, n) + 1):
            kept, root = split(levels, n, 0)
            if root and root not in found:
                found[root] = _Candidate(kept, _size(root), _depth(root), root)
    if not found:
        raise ValueError(f"acceptance {acceptance!r} keeps nothing: no tree keeps more than no drafts")
    return sorted(found.values(), key=lambda candidate: (candidate.nodes, candidate.depth))


def _size(children: tuple) -> int:
    return sum(1 + _size(child) for child in children)


def _depth(children: tuple) -> int:
    return max((1 + _depth(child) for child in children), default=0)


def _search(acceptance: list[float], nodes: int, depth: int):
    """Sequoia's dynamic program over (levels left, nodes left, the next child's rank), checked arguments first."""
    a = [float(x) for x in acceptance]
    if not a or not all(0.0 <= x <= 1.0 for x in a) or sum(a) > 1.0 + 1e-6:
        raise ValueError(f"acceptance is the probability that the i-th sibling is the one kept, for i = 1, 2, ...: "
                         f"numbers from 0 to 1 that sum to at most 1, got {acceptance!r}")
    if not (isinstance(nodes, int) and 1 <= nodes <= MAX_NODES and isinstance(depth, int) and 1 <= depth <= nodes):
        raise ValueError(f"best_tree takes nodes from 1 to {MAX_NODES} and a depth from 1 to nodes, got nodes={nodes!r}"
                         f", depth={depth!r}")

    @lru_cache(maxsize=None)
    def split(levels: int, n: int, rank: int) -> tuple[float, tuple]:
        """The best children of ranks `rank`, rank + 1, ... below a kept node, their subtrees within `levels` levels
        and `n` nodes in all: (expected drafts kept, each child's own children, as nested tuples)."""
        if levels == 0 or n == 0 or rank >= len(a):
            return 0.0, ()
        best = (0.0, ())
        for size in range(1, n + 1):  # this child with size - 1 nodes below it
            below, children = split(levels - 1, size - 1, 0)
            rest, siblings = split(levels, n - size, rank + 1)
            value = a[rank] * (1.0 + below) + rest
            if value > best[0] + 1e-12:
                best = (value, (children,) + siblings)
        return best

    return split


def _shape(root: tuple) -> TreeShape:
    """The TreeShape of nested tuples of children (the root's children first), breadth-first."""
    parents, queue = [], [(-1, root)]
    for parent, children in queue:  # breadth-first: parents in order, each one's children in rank order
        for child in children:
            parents.append(parent)
            queue.append((len(parents) - 1, child))
    return TreeShape.of_parents(parents)


def tried_children(parents: list[int], path: list[int]) -> list[tuple[list[int], int | None]]:
    """Where a round's rule tried children: at the root, then at each kept node (path: node indices), the node's
    children in the order drawn (empty at a leaf) and the one kept there (None: every one rejected)."""
    children = {}
    for i, parent in enumerate(parents):
        children.setdefault(parent, []).append(i)
    return [(children.get(parent, []), child) for parent, child in zip([-1] + path, path + [None])]


def acceptance_by_rank(rounds, ranks: int) -> list[float]:
    """a_1 .. a_ranks measured from traced rounds (`TraceRound`s, trace=True): at every node the rule tried children
    below (the pending token, then each kept node with children) and that has at least `ranks` of them, which rank was
    kept, if any. One count of nodes for every rank keeps the a_i a distribution (a round of a tree at least `ranks`
    wide at its root, e.g. lookahead=(8,) for 8 ranks, tries one such node). A chain's round is the width-1 tree; a
    round without drafts (the text's last token) tells nothing, nor does the node an EOS ended the round at."""
    kept, tried = [0] * ranks, 0
    for round in rounds:
        if not round.drafts:
            continue
        parents, path = round.parents, round.path
        if parents is None:  # a chain: each draft below the one before it
            parents, path = list(range(-1, len(round.drafts) - 1)), list(range(round.kept))
        tested = tried_children(parents, path)
        if round.next_token is None:  # an EOS ended the round: the trace does not say which of its children was kept
            tested = tested[:-1]
        for below, child in tested:
            if len(below) >= ranks:
                tried += 1
                if child is not None and below.index(child) < ranks:
                    kept[below.index(child)] += 1
    if not tried:
        raise ValueError(f"no traced round tried {ranks} siblings at a node: trace rounds of a tree at least {ranks} "
                         f"wide at its root, such as lookahead=({ranks},)")
    return [k / tried for k in kept]


class FittedTree(TreeShape):
    """A tree fitted to the acceptance its own rounds measure, during the call: its first `every` rounds try `width`
    first drafts (a fan, depth 1); then, every `every` rounds (a batch's round counts once), it becomes `best_tree` of
    at most `budget` nodes and `depth` levels at the a_i measured so far; while no draft has been kept it stays the fan
    (one draft pass a round, every rank still measured). a_i is counted at every node whose children a round tried:
    among such nodes with at least i children, how often the i-th was the one kept (whether it is does not depend on the
    siblings drawn after it). Each round's shape is fixed before its drafts are drawn, from earlier rounds only, so the
    tree rule stays exact, as with any adaptive K. A rank that a fit leaves out is not measured again: one never kept
    while the fan was tried stays out. The object keeps what it measured: a second call starts from the last fit.

    `costs` says what a larger tree costs. None: nothing, and each fit is the tree of the most drafts kept within the
    budget and depth. "measured": each fit is the tree of the most tokens per ms among the best trees of every
    smaller budget and depth (`best_trees`), a round costing its depth in draft passes and its verification as the
    rounds measured them (per rows; between measured sizes linear, beyond them along the nearest two's slope but
    never below half the cheapest), for a CPU where extra verification rows are not free. A number c: the paper's
    cost model, a draft pass costing c target passes and a verification 1 whatever its rows; the fit then depends
    only on the drafts kept, so at a temperature the same seed gives the same text, which measured times, varying
    from run to run, do not promise."""

    def __init__(self, budget: int = 15, depth: int = 4, width: int | None = None, every: int = 8,
                 costs: str | float | None = None):
        self.budget = check_integer("budget (the most nodes)", budget, 1, MAX_NODES)
        self.most_depth = check_integer("depth", depth, 1, self.budget)
        width = min(8, self.budget) if width is None else width  # 8 first drafts, or as many as the budget holds
        self.width = check_integer("width (first drafts tried while measuring, at most the budget)", width, 1,
                                   self.budget)
        self.every = check_integer("every (rounds between fits)", every, 1)
        if costs is not None and costs != "measured":
            costs = check_real('costs (None, "measured", or a draft pass\'s cost in target passes)', costs, 0)
        self.costs = costs
        self.draft_ms, self.verify_ms = None, {}  # costs="measured": ms per draft pass; rows -> ms per verification
        self.kept, self.tried = [0] * self.width, [0] * self.width  # by sibling rank
        # Rounds since the last fit; the acceptance it was fitted to, and at how many nodes rank 1 was tried then.
        self.rounds, self.fitted_to, self.fitted_at = 0, None, 0
        super().__init__((self.width,))
        self.widths = None  # its shape changes: no widths name it

    def most_nodes(self) -> int:
        return self.budget

    def fed(self) -> int:
        """The rows a draft pass of a fit typically feeds (its nodes per level), for the draft's weight layout chosen
        before the call: the fan's first rounds feed 1, and the fits that follow more."""
        return max(1, self.budget // self.most_depth)

    def acceptance(self) -> list[float]:
        """The measured a_1 .. a_width (0 where no node had that many children), scaled to sum to at most 1."""
        a = [k / t if t else 0.0 for k, t in zip(self.kept, self.tried)]
        return [x / max(1.0, sum(a)) for x in a]

    def choose(self) -> int:
        """Called once at the start of every round: refits after `every` rounds, whose rows were all counted on the
        shape they drafted."""
        if self.rounds >= self.every:
            self.rounds, self.fitted_to, self.fitted_at = 0, self.acceptance(), self.tried[0]
            a = self.fitted_to
            if not any(a):
                fitted = TreeShape((self.width,))
            elif self.costs is None or (self.costs == "measured" and not self.verify_ms):
                fitted = best_tree(a, self.budget, self.most_depth)
            else:
                best = max(_candidates(a, self.budget, self.most_depth),
                           key=lambda c: (1.0 + c.kept) / max(self.round_cost(c.nodes, c.depth), 1e-9))
                fitted = _shape(best.root)
            self._build(fitted.parents)
        self.rounds += 1
        return self.max_lookahead

    def round_cost(self, nodes: int, depth: int) -> float:
        """A round of a tree of `nodes` nodes and `depth` levels in ms (costs="measured") or in target passes
        (costs=c): its draft passes, one per level, and its verification of 1 + nodes rows."""
        if self.costs == "measured":
            # Along the measured sizes' slope beyond them, but never below half the cheapest measured: a slope
            # extended down from two noisy sizes must not make a small tree look free.
            verify = max(interpolate(self.verify_ms, nodes + 1, True), 0.5 * min(self.verify_ms.values()))
            return depth * (self.draft_ms or 0.0) + verify
        return depth * self.costs + 1.0

    def update(self, round) -> None:
        """Counts one row's round: at the root and at each kept node, which of its children (if any) was kept; with
        costs="measured", its times too."""
        if self.costs == "measured" and round.lookahead > 0 and round.nodes > 0:
            self.draft_ms = moving_average(self.draft_ms, round.draft_ms / round.lookahead)
            self.verify_ms[round.nodes + 1] = moving_average(self.verify_ms.get(round.nodes + 1), round.verify_ms)
        for below, child in tried_children(self.parents[: self.ends[round.lookahead]], list(round.path)):
            for rank in range(min(len(below), self.width)):  # the levels this row drafted
                self.tried[rank] += 1
            if child is not None and self.ranks[child] < self.width:
                self.kept[self.ranks[child]] += 1

    def __repr__(self) -> str:
        return (f"FittedTree(budget={self.budget}, depth={self.most_depth}, width={self.width}, every={self.every}"
                + (f", costs={self.costs!r}" if self.costs is not None else "") + ")")

    def __str__(self) -> str:  # as the command line takes it
        return "auto"
