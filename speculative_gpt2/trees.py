"""Token trees: a round drafts several candidate continuations, and the target verifies all of them in one pass.

A tree's shape is its widths (w1, ..., wK): every node at depth d - 1 has w_d children (the root, depth 0, is the
row's pending token), so depth d holds w1 * ... * wd nodes; (1,) * K is the chain of K drafts. One shape serves every
row of a batch: its structure (each node's parent and depth, breadth-first) is known on the host, and only the
tokens and their p are per row.

One pass over a tree. [root, node 0, ..., node N - 1] (B, 1 + N) go through the model at once: place j of row b at
position L_b + depth_j (its place in the text if its path is kept), its keys and values at a slot of its own,
L_b + j, where it sees the text (the slots before L_b), its ancestors and itself, nothing else (`sees`). After the
verdict the kept path's keys and values move to the slots of their positions, L_b + 1 ... L_b + kept (`settle`), so
that later passes find plain decoding's layout; the other nodes are forgotten as rejected drafts are. The draft
model grows the tree in one pass per depth, all of a depth's nodes at once, laid out the same way.

Siblings are drawn without replacement: child i from p with children 0..i-1 removed and renormalised, and that is
the p it carries, which `recursive_rejection` (rules.py) is exact for. At temperature 0 the children are the draft's
most likely tokens in order, each with a one-hot p.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import torch

from speculative_gpt2.checks import check_integer
from speculative_gpt2.cuda_graphs import CUDAGraphRunner
from speculative_gpt2.drafters import Sampling, node_depths
from speculative_gpt2.lookahead import as_policy
from speculative_gpt2.rules import DraftTree

MAX_NODES = 64  # a verification of more rows is no longer nearly free on a CPU (docs/design.md, "Token trees")


class TreePolicy:
    """A lookahead policy (speculative_gpt2/lookahead.py) that drafts a token tree every round: its K
    (`max_lookahead`) is the tree's depth, `ends[d]` the nodes of its first d levels. The shapes below say which
    nodes they hold."""

    max_lookahead: int
    ends: list[int]

    def choose(self) -> int:
        return self.max_lookahead

    def update(self, round) -> None:
        pass

    def nodes(self, depth: int) -> int:
        """How many nodes the first `depth` levels hold."""
        return self.ends[depth]

    def most_nodes(self) -> int:
        """The most nodes a round's tree may hold, in any round of a call: the slots the caches keep past the text."""
        return self.nodes(self.max_lookahead)

    def fed(self) -> int:
        """The most rows a draft pass of this tree feeds (the root's pass: 1)."""
        raise NotImplementedError


class TreeShape(TreePolicy):
    """A tree of fixed shape, the same every round. `TreeShape(widths)`: every node at depth d - 1 has w_d children.
    `TreeShape.of_parents(parents)`: any tree, such as one built from measured acceptance (tree_search.best_tree).
    `parents[i]` is node i's parent (-1: the root) and `depths[i]` its depth, breadth-first with siblings together,
    so the first d levels are a prefix of the nodes and their structure a slice of the whole tree's, built once here."""

    def __init__(self, widths):
        given = widths
        try:
            widths = tuple(check_integer("width", w, 1, MAX_NODES) for w in widths)
        except (TypeError, ValueError):
            widths = ()
        if not widths:
            raise ValueError(f"a tree's shape is its widths per depth, integers from 1 to {MAX_NODES} such as (3, 2), "
                             f"got {given!r}")
        total = sum(math.prod(widths[:depth]) for depth in range(1, len(widths) + 1))
        if total > MAX_NODES:
            raise ValueError(f"the tree {'x'.join(map(str, widths))} has {total} nodes, more than {MAX_NODES}: lower "
                             f"its widths or its depth")
        parents, level = [], [-1]
        for width in widths:
            first = len(parents)
            parents += [parent for parent in level for _ in range(width)]
            level = range(first, len(parents))
        self.widths = widths
        self._build(parents)

    @classmethod
    def of_parents(cls, parents) -> TreeShape:
        """The tree whose node i hangs from node parents[i] (-1: the root), listed breadth-first with siblings
        together in the order drawn: each parent an earlier node, and never smaller than the one before it."""
        parents = list(parents) if parents is not None else []
        fine = 0 < len(parents) <= MAX_NODES and all(
            isinstance(parent, int) and -1 <= parent < i and (i == 0 or parent >= parents[i - 1])
            for i, parent in enumerate(parents))
        if not fine:
            raise ValueError(f"a tree's parents are 1 to {MAX_NODES} integers, node i's parent (-1: the root) an "
                             f"earlier node and never smaller than node i - 1's (breadth-first), such as [-1, -1, 0], "
                             f"got {parents!r}")
        shape = cls.__new__(cls)
        shape.widths = None
        shape._build(parents)
        return shape

    def _build(self, parents: list[int]) -> None:
        self.parents, self.depths = parents, []
        for parent in parents:
            self.depths.append(1 if parent < 0 else self.depths[parent] + 1)
        # ranks[i]: node i's place among its siblings, in the order drawn (siblings are listed together).
        self.ranks = [i - parents.index(parent) for i, parent in enumerate(parents)]
        self.max_lookahead = self.depths[-1]
        # ends[d]: the nodes of the first d levels.
        self.ends = [sum(1 for d in self.depths if d <= depth) for depth in range(self.max_lookahead + 1)]
        # Over places [root, node 0, ...]: each place's children in the order drawn, -1 after the last
        # (1 + N, max width), and whether place k is place j or one of its ancestors (1 + N, 1 + N).
        counts = [0] * (len(parents) + 1)
        for parent in parents:
            counts[parent + 1] += 1
        self._children = torch.full((len(parents) + 1, max(counts)), -1)
        self._ancestry = torch.eye(len(parents) + 1, dtype=torch.bool)
        self._ancestry[:, 0] = True
        for i, parent in enumerate(parents):
            kids = self._children[parent + 1]
            kids[(kids >= 0).sum()] = i
            self._ancestry[i + 1] |= self._ancestry[parent + 1]
        self._levels = {}

    def children(self, depth: int, device) -> torch.Tensor:
        """(1 + N, max width) long over places [root, node 0, ...] of the first `depth` levels: each place's
        children, -1 after the last (and for the last level's, whose children lie deeper)."""
        N = self.ends[depth]
        children = self._children[: N + 1]
        return torch.where(children < N, children, -1).to(device)

    def layout(self, depth: int, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `depth` levels' `layout` for every row of a batch: each place's depth (B, 1 + N) and whether
        place k is place j or one of its ancestors (B, 1 + N, 1 + N), over places [root, node 0, ...]."""
        N = self.ends[depth]
        depths = torch.tensor([0] + self.depths[:N], device=device)
        return depths.expand(batch_size, -1), self._ancestry[: N + 1, : N + 1].to(device).expand(batch_size, -1, -1)

    def fed(self) -> int:
        """The most nodes with children on one level (the root's pass: 1)."""
        return max([1] + [len(level.fed) for level in self.draft_plan(self.max_lookahead, "cpu").levels])

    def draft_plan(self, depth: int, device) -> DraftPlan:
        """How the draft model grows the first `depth` levels: one pass per level through its nodes that have
        children, in places [root, those nodes ...] of their own (the leaves need no pass)."""
        key = (depth, str(device))
        if key not in self._levels:
            has_children = set(self.parents[: self.ends[depth]])
            internal = [i for i in range(self.ends[depth - 1]) if i in has_children]
            places = [0] + [1 + i for i in internal]
            levels, first = [], 1
            for level in range(1, depth + 1):
                above = [-1] if level == 1 else [i for i in internal if self.depths[i] == level - 1]
                nodes = range(self.ends[level - 1], self.ends[level])
                local = [above.index(self.parents[i]) for i in nodes]
                width = max(self.ranks[i] for i in nodes) + 1
                pick = [n * width + self.ranks[i] for n, i in zip(local, nodes)]
                fed = [i for i in internal if self.depths[i] == level]
                as_tensor = partial(torch.tensor, dtype=torch.long, device=device)
                levels.append(DraftLevel(width, None if pick == list(range(len(above) * width)) else as_tensor(pick),
                                         as_tensor([self.parents[i] for i in nodes]), as_tensor(fed), first))
                first += len(fed)
            depths = torch.tensor([0] + [self.depths[i] for i in internal], device=device)
            ancestry = self._ancestry[places][:, places].to(device)
            self._levels[key] = DraftPlan(levels, (depths, ancestry), len(internal))
        return self._levels[key]

    def __repr__(self) -> str:
        return f"TreeShape({self.widths})" if self.widths else f"TreeShape.of_parents({self.parents})"

    def __str__(self) -> str:  # as the command line takes it
        return "x".join(map(str, self.widths)) if self.widths else "parents=" + ",".join(map(str, self.parents))


class DraftLevel(NamedTuple):
    """One level of a draft plan: `width` siblings drawn below each node of the level above that has children; which
    of them are this level's nodes (`pick`, over (parent, rank) flattened; None: all), each one's parent (node
    indices, -1 the root); the nodes with children that the next pass feeds, and their first place."""
    width: int
    pick: torch.Tensor | None
    parents: torch.Tensor
    fed: torch.Tensor
    first: int


class DraftPlan(NamedTuple):
    levels: list[DraftLevel]
    layout: tuple[torch.Tensor, torch.Tensor]  # each draft place's depth (1 + I,) and ancestry (1 + I, 1 + I)
    internal: int  # I: the nodes with children, each fed once


class ExpandingTree(TreePolicy):
    """A tree grown where the draft is most confident, as EAGLE-2 expands its trees
    (Li et al. 2024, arXiv 2406.16858): `width` children below the root; at each further depth the `expand` nodes of
    the level above with the highest cumulative draft probability (the product of the draft's probabilities along
    their path) get `width` children each; `depth` levels, width * (1 + (depth - 1) * expand) nodes, a draft pass of
    `expand` rows per level. Which nodes get children depends only on nodes already drawn, never on the children
    drawn below them, and every child drawn is proposed, so `recursive_rejection` stays exact at any temperature.
    EAGLE-2's last step, keeping the best nodes of the whole tree by their own probability, would choose children
    by their values, which the rule does not allow: it is left out. It pays at temperature 0, where siblings are the
    draft's likeliest tokens tried in that order; when sampling they are tried in the order drawn, and fixed shapes
    (TreeShape) do better (docs/results-history.md)."""

    def __init__(self, depth: int, width: int, expand: int = 1):
        self.max_lookahead = check_integer("depth", depth, 1, MAX_NODES)
        self.width = check_integer("width", width, 1, MAX_NODES)
        self.expand = check_integer("expand (the nodes given children at each depth)", expand, 1, width)
        self.level_sizes = (width,) + (width * expand,) * (depth - 1)  # the nodes at each depth
        self.ends = [sum(self.level_sizes[:d]) for d in range(depth + 1)]
        if self.ends[-1] > MAX_NODES:
            raise ValueError(f"{self!r} has {self.ends[-1]} nodes, more than {MAX_NODES}: lower its depth, width or "
                             f"expand")

    def fed(self) -> int:
        return self.expand if self.max_lookahead > 1 else 1

    def __repr__(self) -> str:
        return f"ExpandingTree(depth={self.max_lookahead}, width={self.width}, expand={self.expand})"

    def __str__(self) -> str:  # as the command line takes it
        return f"depth={self.max_lookahead},width={self.width},expand={self.expand}"


def expand(model, shape: ExpandingTree, depth: int, cache, sampling: Sampling, logits: torch.Tensor) -> DraftTree:
    """`grow` for an ExpandingTree: its nodes level by level (level d's after level d - 1's, each node after its
    parent), and the draft's cache holding the root, then the `expand` nodes given children at each level, in its
    places [root, level 1's expanded, level 2's, ...]; the cache's lengths are back where they were after."""
    B, device, V = len(logits), logits.device, sampling.vocab_size
    N, w, k = shape.nodes(depth), shape.width, shape.expand
    tokens = torch.zeros(B, N, dtype=torch.long, device=device)
    p = torch.zeros(B, N, V, device=device)
    present = torch.zeros(B, N, dtype=torch.bool, device=device)
    children = torch.full((B, N + 1, w), -1, device=device)
    children[:, 0] = torch.arange(w, device=device)  # (B, 1 + N, w): the root's children, then each node's
    # The draft's places: each place's depth (B, P) and ancestors (B, P, P), filled as nodes are expanded.
    P = 1 + (depth - 1) * k
    depths = torch.tensor([0] + [d for d in range(1, depth) for _ in range(k)], device=device).expand(B, P)
    ancestry = torch.eye(P, dtype=torch.bool, device=device).repeat(B, 1, 1)
    ancestry[:, :, 0] = True
    logits, score, start = logits[:, None].float(), logits.new_zeros(B, 1).float(), 0  # the nodes to expand's
    for level in range(1, depth + 1):
        n = logits.shape[1]
        x, p_x, exists = siblings(sampling.process(logits), logits, w, sampling)  # (B, n, w)
        end = start + n * w
        tokens[:, start:end], p[:, start:end] = x.flatten(1), p_x.flatten(1, 2)
        alive = exists if level == 1 else exists & present.gather(1, top)[:, :, None]
        present[:, start:end] = alive.flatten(1)
        if level < depth:  # the `k` most likely of this level's nodes go through the draft model
            cumulative = (score[:, :, None] + logits.log_softmax(-1).gather(-1, x)).flatten(1)  # (B, n * w)
            chosen = torch.where(present[:, start:end], cumulative, float("-inf")).topk(k, dim=1).indices  # (B, k)
            score, top = cumulative.gather(1, chosen), start + chosen
            first = 1 + (level - 1) * k  # their places: first .. first + k - 1, each below its parent's place
            parent_place = 0 if level == 1 else first - k + chosen // w
            ancestry[:, first:first + k] |= ancestry.gather(
                1, torch.as_tensor(parent_place, device=device).expand(B, k)[..., None].expand(B, k, P))
            children.scatter_(1, (top + 1)[..., None].expand(B, k, w),
                              (end + torch.arange(k * w, device=device)).view(1, k, w).expand(B, k, w))
            logits = tree_pass(model, (depths, ancestry), tokens.gather(1, top), cache, first=first).float()
        start = end
    cache.lengths = [n - (depth - 1) * k for n in cache.lengths]
    levels = torch.tensor([d for d in range(1, depth + 1) for _ in range(shape.level_sizes[d - 1])], device=device)
    return prune(DraftTree(tokens, p, levels.expand(B, N), children, None, depth), present)


def tree_pass(model, layout: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor, cache, first: int = 0,
              rows: int | None = None) -> torch.Tensor:
    """Logits (B, T, V) of places first .. first + T - 1 of a tree, tokens idx (B, T), in one pass of `model`: each
    at its position, its keys and values at its own slot, seeing the text and its ancestors. `layout`: each place's
    depth (B, 1 + N) and ancestry (B, 1 + N, 1 + N) (`TreeShape.layout`, `layout_of`). The root of row b is at
    position cache.lengths[b] - first (the places before `first` are already in the cache). `rows` (exact mode, a
    whole tree): the pass runs as that many rows, and each node reads its ancestors at their positions' slots
    (`exact_reads`), so that its logits are plain decoding's bit for bit."""
    depths, ancestry = layout
    B, T = idx.shape
    device = idx.device
    roots = torch.tensor(cache.lengths, device=device)[:, None] - first  # (B, 1): each row's root position
    places = torch.arange(first, first + T, device=device)
    positions, slots = roots + depths[:, places], roots + places  # (B, T)
    if rows is not None:  # padding rows at the root's position, in slots of their own past the tree's
        pad = rows - T
        idx = torch.cat([idx, idx.new_zeros(B, pad)], 1)
        positions = torch.cat([positions, roots.expand(B, pad)], 1)
        slots = torch.cat([slots, roots + T + torch.arange(pad, device=device)], 1)
        span = cache.span(rows)
        logits = model.forward_at(idx, positions, cache, span, slots, reads=exact_reads(layout, roots, span, rows))
    else:
        span = cache.span(depths.shape[1] - first)  # through the tree's last slot: `sees` covers every place
        text = cache.key_positions[:span] < roots[:, :, None]  # (B, 1, span): the text before the root
        sees = text.expand(B, T, span).clone()
        sees.scatter_(2, (roots + torch.arange(depths.shape[1], device=device))[:, None].expand(B, T, -1),
                      ancestry[:, places])
        logits = model.forward_at(idx, positions, cache, span, slots, sees)
    cache.lengths = [n + T for n in cache.lengths]
    return logits[:, :T]


def exact_reads(layout: tuple[torch.Tensor, torch.Tensor], roots: torch.Tensor, span: int, rows: int) -> torch.Tensor:
    """(B, rows, span): the slot each place of a whole tree (then padding rows) reads at each slot. Place j reads, at
    the slot of each ancestor's position (root + its depth), that ancestor's own slot (root + its place), itself
    included: the keys plain decoding has there; elsewhere the slot itself."""
    depths, ancestry = layout  # (B, P), (B, P, P)
    B, P = depths.shape
    reads = torch.arange(span, device=depths.device).expand(B, rows, span).clone()
    places = torch.arange(P, device=depths.device)
    # A place that is not an ancestor points at the root (depth 0, place 0), which every place reads as itself.
    at = roots[:, :, None] + torch.where(ancestry, depths[:, None, :], 0)  # (B, P, P): where j reads ancestor k
    reads[:, :P].scatter_(2, at, roots[:, :, None] + torch.where(ancestry, places, 0))
    return reads


def layout_of(tree: DraftTree) -> tuple[torch.Tensor, torch.Tensor]:
    """A tree's `layout` from its children lists: each place's depth (B, 1 + N) and ancestry (B, 1 + N, 1 + N). A
    node no list holds (padding) hangs from the root; it is never tried."""
    B, N = tree.tokens.shape
    device, listed = tree.tokens.device, tree.children >= 0
    places = torch.arange(N + 1, device=device)
    # parent[b, j]: the place whose list holds place j (the root's own: 0). Unlisted entries all write 0 at 0.
    parent = torch.zeros(B, N + 1, dtype=torch.long, device=device).scatter_(
        1, torch.where(listed, tree.children + 1, 0).flatten(1), torch.where(listed, places[:, None], 0).flatten(1))
    own = torch.eye(N + 1, dtype=torch.bool, device=device).expand(B, -1, -1)
    ancestry = own
    for _ in range(tree.depth):  # one more level of ancestors each time
        ancestry = own | ancestry.gather(1, parent[..., None].expand(-1, -1, N + 1))
    return torch.cat([tree.depths.new_zeros(B, 1), tree.depths], 1), ancestry


def settle(cache, tree: DraftTree, path: torch.Tensor) -> None:
    """Moves the kept path's keys and values (path (B, depth): node indices, -1 past what was kept) from their
    nodes' slots to their positions' slots, right after each row's root; the cache's lengths still count the whole
    tree (its pass's). A chain is already in place."""
    if tree.is_chain:
        return
    B, depth = path.shape
    roots = torch.tensor(cache.lengths, device=path.device)[:, None] - 1 - tree.tokens.shape[1]
    to = roots + torch.arange(1, depth + 1, device=path.device)  # (B, depth)
    source = torch.where(path >= 0, roots + 1 + path, to)  # a row's unkept depths copy a slot onto itself
    rows = torch.arange(B, device=path.device)[:, None].expand(B, depth)
    for buffer in (cache.keys, cache.values):  # (n_layer, B, n_head, slots, head_dim)
        buffer[:, rows, :, to] = buffer[:, rows, :, source]


def grow(model, shape: TreePolicy, depth: int, cache, sampling: Sampling, logits: torch.Tensor) -> DraftTree:
    """The draft model's tree of `depth` levels below each row's root, from its logits (B, V) after the root, in one
    tree pass per further level; the cache's lengths are back where they were after."""
    if isinstance(shape, ExpandingTree):
        return expand(model, shape, depth, cache, sampling, logits)
    B, device, V = len(logits), logits.device, sampling.vocab_size
    N, plan = shape.nodes(depth), shape.draft_plan(depth, logits.device)
    depths, ancestry = plan.layout
    layout = depths.expand(B, -1), ancestry.expand(B, -1, -1)
    tokens = torch.zeros(B, N, dtype=torch.long, device=device)
    p = torch.zeros(B, N, V, device=device)
    present = torch.zeros(B, N, dtype=torch.bool, device=device)  # top-k or top-p may leave fewer tokens than widths
    logits = logits[:, None].float()  # (B, nodes of the level above with children, V)
    for level, step in enumerate(plan.levels, 1):
        start, end = shape.ends[level - 1], shape.ends[level]
        x, p_x, exists = siblings(sampling.process(logits), logits, step.width, sampling)  # (B, n, width)
        x, p_x, exists = x.flatten(1), p_x.flatten(1, 2), exists.flatten(1)
        if step.pick is not None:  # a parent with fewer children than the widest keeps its first draws
            x, p_x, exists = x[:, step.pick], p_x[:, step.pick], exists[:, step.pick]
        tokens[:, start:end], p[:, start:end] = x, p_x
        present[:, start:end] = exists & (True if level == 1 else present[:, step.parents])
        if level < depth:  # the next level's distributions: this level's nodes with children through the draft
            logits = tree_pass(model, layout, tokens[:, step.fed], cache, first=step.first).float()
    cache.lengths = [n - plan.internal for n in cache.lengths]
    children = shape.children(depth, device).expand(B, -1, -1)  # (B, 1 + N, W)
    tree = DraftTree(tokens, p, torch.tensor(shape.depths[:N], device=device).expand(B, N), children, None, depth)
    return prune(tree, present)


def tree_of(tokens: torch.Tensor, p: torch.Tensor, parents: list[list[int]]) -> DraftTree:
    """The DraftTree of per-row proposals (speculative_gpt2/drafters.py): tokens (B, N), p (B, N, V) and each row's
    parent of each node (-1: the root, -2: padding, which hangs from no list and is never tried)."""
    B, N = tokens.shape
    lists = [[[] for _ in range(N + 1)] for _ in range(B)]  # row, place -> its children in the order proposed
    for b, row in enumerate(parents):
        for i, parent in enumerate(row):
            if parent >= -1:
                lists[b][parent + 1].append(i)
    W = max(1, max(len(kids) for row in lists for kids in row))
    children = torch.tensor([[kids + [-1] * (W - len(kids)) for kids in row] for row in lists], device=tokens.device)
    depths = [node_depths(row) for row in parents]  # padding at depth 1, beside the root's children
    depth = max((d for row, r in zip(depths, parents) for d, parent in zip(row, r) if parent >= -1), default=0)
    return DraftTree(tokens, p, torch.tensor(depths, device=tokens.device).view(B, N), children,
                     (children >= 0).sum((1, 2)), depth)


def prune(tree: DraftTree, keep: torch.Tensor | list[int]) -> DraftTree:
    """The tree without the nodes that `keep` leaves out: (B, N) bool, or per row the deepest depth kept (a row
    needs no more tokens than that). A node left out is taken from its parent's children, so neither it nor anything
    below it is ever tried; `counts` becomes the nodes still listed."""
    if not isinstance(keep, torch.Tensor):
        keep = tree.depths <= torch.tensor(keep, device=tree.depths.device)[:, None]
    listed = tree.children >= 0
    kept = keep.gather(1, tree.children.clamp_min(0).flatten(1)).view_as(tree.children)
    children = torch.where(listed & kept, tree.children, -1)  # what lies below is then out of reach too
    return tree._replace(children=children, counts=(children >= 0).sum((1, 2)))


def siblings(p: torch.Tensor, logits: torch.Tensor, width: int, sampling: Sampling):
    """`width` children below each of n parents, drawn without replacement: p and logits (B, n, V) the parents'
    distributions. Returns tokens (B, n, width), the p each was drawn from (B, n, width, V), and whether each exists
    (top-k or top-p may leave fewer tokens than `width`)."""
    B, n, V = p.shape
    tokens, ps, ok = [], [], []
    left, ranks = p.clone(), logits.clone()
    finite = p.isfinite().all(-1, keepdim=True)  # (B, n, 1)
    for _ in range(width):
        if sampling.greedy:  # the next most likely token, with a one-hot p: a deterministic proposal
            x = ranks.argmax(-1)
            p_x = torch.zeros_like(p).scatter_(-1, x[..., None], 1.0)
            exists = ranks.amax(-1) > float("-inf")  # a width past the vocabulary finds nothing more
        else:
            mass = left.sum(-1, keepdim=True)
            p_x = torch.where(mass > 0, left / mass.clamp_min(torch.finfo(left.dtype).tiny), 0.0)
            x = sampling.draw(torch.where(mass > 0, left, 1.0).view(B * n, V)).view(B, n)
            exists = mass[..., 0] > 0
        tokens.append(x)
        ps.append(torch.where(finite, p_x, float("nan")))  # a broken draft model stays visible to the round's check
        ok.append(exists)
        left.scatter_(-1, x[..., None], 0.0)
        ranks.scatter_(-1, x[..., None], float("-inf"))
    return torch.stack(tokens, -1), torch.stack(ps, 2), torch.stack(ok, -1)


def lookahead_policy(lookahead):
    """The samplers' lookahead: a tree's widths (a tuple or list) make a TreeShape, anything else a lookahead policy
    (speculative_gpt2/lookahead.py)."""
    return TreeShape(lookahead) if isinstance(lookahead, (tuple, list)) else as_policy(lookahead)


def nodes(policy, drafter=None) -> int:
    """The most nodes a round's tree holds (`policy`'s shape, or what `drafter` proposes, `drafts_trees`), else 0:
    the slots the caches need past the text."""
    if isinstance(policy, TreePolicy):
        return policy.most_nodes()
    return drafter.nodes(policy.max_lookahead) if drafts_trees(policy, drafter) else 0


def drafts_trees(policy, drafter) -> bool:
    """Whether rounds may propose token trees: a tree's shape, or a drafter whose `nodes(K)`, the most nodes it
    proposes for K (speculative_gpt2/drafters.py), exceeds K."""
    K = getattr(policy, "max_lookahead", 0)
    return isinstance(policy, TreePolicy) or (callable(getattr(drafter, "nodes", None)) and drafter.nodes(K) > K)


def verify_pass(run, model, rows: int | None, pending: torch.Tensor, tree: DraftTree, cache) -> torch.Tensor:
    """Step 2: the target's logits after each row's pending token and after each draft, (B, 1 + N, V), in one pass:
    a chain through `run` (exact mode's fixed rows, speculative_gpt2/exact.py), a tree through `tree_pass` (in exact
    mode, `rows` rows)."""
    idx = torch.cat([pending, tree.tokens], 1)
    return run(idx, cache) if tree.is_chain else tree_pass(model, layout_of(tree), idx, cache, rows=rows)


def check_tree(policy, target, drafter, coupled: bool, rows: int | None) -> None:
    """ValueError, in one line, for what token trees do not take (yet); exact mode's `rows` must hold a whole tree."""
    if not drafts_trees(policy, drafter):
        return
    what = (f"lookahead={getattr(policy, 'widths', None) or policy!r}" if isinstance(policy, TreePolicy)
            else f"the drafter {drafter.name}")
    if nodes(policy, drafter) > MAX_NODES:
        raise ValueError(f"{what} proposes up to {nodes(policy, drafter)} drafts a round with K="
                         f"{policy.max_lookahead}, more than {MAX_NODES}: lower K, or the width of its trees (a "
                         f"lookup's matches)")
    if isinstance(target, CUDAGraphRunner) or isinstance(getattr(drafter, "model", None), CUDAGraphRunner):
        raise ValueError(f"{what} drafts token trees and CUDA graphs replay chains' passes only: draft chains, or "
                         f"use models without graphs")
    if isinstance(policy, TreePolicy) and getattr(drafter, "shape", None) is None:
        raise ValueError(f"{what} drafts a token tree, which a draft model grows: pass a GPT2 as "
                         f"the draft, or an integer lookahead for this drafter")
    if coupled:
        raise ValueError(f"{what} drafts token trees and coupled=True drafts chains only: draft chains, or leave "
                         f"coupled out")
    if rows is not None and rows < 1 + nodes(policy, drafter):
        raise ValueError(f"{what} drafts up to {nodes(policy, drafter)} nodes a round, and exact mode's passes of "
                         f"{rows} rows cannot hold them and the pending token: pass exact=True, or at least "
                         f"{1 + nodes(policy, drafter)} rows")


def tree_shape(policy) -> TreePolicy | None:
    """The policy's tree shape when it drafts trees, else None."""
    return policy if isinstance(policy, TreePolicy) else None
