"""The acceptance rules: steps 2 and 3 of a round, what the target keeps of the drafts and which token follows.

A rule is one function `rule(tree, q, chance) -> Verdict` of the drafts (a `DraftTree`: tokens with the draft
distributions p they were drawn from; a chain is a tree of width 1), the target's distributions q after the root and
after each draft, and the call's randomness (`Chance`). It runs on the device, for every row of a batch at once,
with no host sync. Three rules, Chen et al.'s notation (q the target's, p the draft's):

- `chen`: Chen et al.'s rule over a chain. Keep x_i with probability min(1, q(x_i)/p(x_i)); at the first rejection
  the next token is drawn from norm(max(0, q - p)); if all are kept, a bonus token from q.
- `coupled`: every token is the target's Gumbel-max with noise fixed by the seed and the position
  (speculative_gpt2/coupling.py); a draft is kept iff it equals it, so the text is the plain sampler's.
- `recursive_rejection`: the tree's rule (Jeon et al. 2024, "Recursive Speculative Decoding"). At a node, try its
  children in the order they were drawn, each by Chen's test against what is left of q, which becomes
  norm(max(0, q - p)) after each rejection; when every child is rejected, the next token is drawn from what is
  left. A child's p is the distribution it was drawn from: siblings drawn without replacement carry p with the
  earlier ones removed, a deterministic proposer's children one-hot p. On a chain it is Chen's rule.

Each is exact: the text is distributed as the target's (tests/test_acceptance_rules.py proves it by enumeration for
Chen's rule and the tree rule; the coupled rule gives the plain coupled sampler's text, tests/test_coupled_sampling.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from speculative_gpt2.coupling import GumbelNoise, gumbel_max


class DraftTree(NamedTuple):
    """A round's drafts for every row of a batch, as a tree below each row's pending token (the root).

    Node i of row b holds token tokens[b, i] (B, N), drawn from p[b, i] (B, N, V), at depth depths[b, i] (B, N;
    the root's children are at depth 1). children (B, N + 1, W) long: children[b, 0] lists the root's children and
    children[b, i + 1] node i's, in the order they were drawn, -1 after the last. A parent comes before its children,
    so one target pass over [root, node 0, ..., node N - 1] gives q at every place: q[:, 0] after the root,
    q[:, i + 1] after node i. `counts` (B,): the nodes listed in each row's children (a chain's: its first counts[b]
    drafts); a node no list holds is padding, never tried."""

    tokens: torch.Tensor
    p: torch.Tensor
    depths: torch.Tensor
    children: torch.Tensor
    counts: torch.Tensor
    depth: int  # the deepest level any row reaches, known on the host

    @property
    def is_chain(self) -> bool:
        """One child at most per place: every node already sits at its position's slot."""
        return self.children.shape[2] == 1

    @classmethod
    def chain(cls, tokens: torch.Tensor, p: torch.Tensor, counts: list[int]) -> DraftTree:
        """K drafts in a row per row, tokens (B, K) and p (B, K, V), row b's first counts[b] real."""
        B, K = tokens.shape
        counts = torch.tensor(counts, device=tokens.device)
        places = torch.arange(K + 1, device=tokens.device).expand(B, K + 1)  # node i is the child of place i
        children = torch.where(places < counts[:, None], places, -1)[..., None]  # (B, K + 1, 1)
        depths = torch.arange(1, K + 1, device=tokens.device).expand(B, K)
        return cls(tokens, p, depths, children, counts, K)


class Verdict(NamedTuple):
    """What a rule decided, per row: `kept` (B,) drafts kept; `path` (B, depth) the node kept at each depth, -1 past
    `kept`; `next_token` (B,) and `following` (B, V), the distribution it was drawn from (unnormalised). For the
    trace: `ratios` (B, depth, W) min(1, q/p) of each child tested at each depth, NaN for the untested; `r` the
    uniform draws, or None; `choices` (B, N + 1) the target's Gumbel-max token at every place of a coupled round,
    else None."""

    kept: torch.Tensor
    path: torch.Tensor
    next_token: torch.Tensor
    following: torch.Tensor
    ratios: torch.Tensor | None = None
    r: torch.Tensor | None = None
    choices: torch.Tensor | None = None


class Chance:
    """The randomness of a call, for a rule to draw from: uniform draws and tokens from the generator (greedy
    argmax at temperature 0, where no draw is made), or coupled sampling's noise at each row's positions."""

    def __init__(self, temperature: float, generator: torch.Generator | None, noise: GumbelNoise | None = None,
                 positions: list[int] | None = None):
        self.temperature, self.generator, self.noise, self.positions = temperature, generator, noise, positions

    def at(self, positions: list[int]) -> Chance:
        """This call's chance for a round whose first new token of row b is at positions[b]."""
        return Chance(self.temperature, self.generator, self.noise, positions)

    def uniform(self, *shape: int, device) -> torch.Tensor | None:
        """Uniform draws in [0, 1), or None at temperature 0 (a test of a one-hot q needs none)."""
        return None if self.temperature == 0 else torch.rand(*shape, generator=self.generator, device=device)

    def token(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per row of probs (B, V), which need not be normalised: the argmax at temperature 0, else a
        sample."""
        return probs.argmax(-1) if self.temperature == 0 else sample(probs, self.generator)

    def gumbel(self, count: int) -> torch.Tensor:
        """(B, count, V): the noise at each row's next `count` positions (coupled sampling)."""
        return self.noise.at(self.positions, count)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of `probs` (..., V); rows need not be normalised. A one-hot row gives its token."""
    flat = probs.reshape(-1, probs.shape[-1])
    # A NaN row (a broken model) is sampled uniformly, not left to fail in torch: the round's check names the model.
    flat = torch.where(flat.isfinite().all(-1, keepdim=True), flat, 1.0)
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def residual(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """norm(max(0, q - p)), unnormalised: what is left of q once a draft drawn from p is rejected. When q = p it
    rounds to zero everywhere; a rejection then had probability ~0, and q is the right answer."""
    left = (q - p).clamp_min(0)  # (..., V)
    return torch.where(left.sum(-1, keepdim=True) > 0, left, q)


def chen(tree: DraftTree, q: torch.Tensor, chance: Chance) -> Verdict:
    """Chen et al.'s rule over a chain: tree.tokens x (B, K), p (B, K, V), q (B, K + 1, V) after the pending token and
    after each draft. Keep x_i if r_i < q(x_i)/p(x_i), i.e. with probability min(1, q(x_i)/p(x_i)); the next token
    is drawn from norm(max(0, q - p)) at the first rejection, or from q after the last draft if all are kept."""
    drafts, p = tree.tokens, tree.p
    B, K = drafts.shape
    r = chance.uniform(B, K, device=q.device)
    if r is None:  # temperature 0: one-hot p and q, kept iff it is the target's greedy choice
        ratio = (drafts == q[:, :K].argmax(-1)).to(q.dtype)
        keep = ratio == 1
    else:
        ratio = q[:, :K].gather(-1, drafts[..., None])[..., 0] / p.gather(-1, drafts[..., None])[..., 0]
        keep = r < ratio
    place = torch.arange(K, device=q.device)
    keep &= place < tree.counts[:, None]  # padding is never kept
    kept = keep.int().cumprod(1).sum(1)  # (B,): the length of each row's kept prefix
    tested = (place <= kept[:, None]) & (place < tree.counts[:, None])  # the kept ones and the first rejected
    # A zero row appended to p makes row `kept` of max(0, q - p) equal to q there when every proposed draft was
    # kept (p is 0 past a row's drafts): the bonus needs no branch.
    rows = torch.arange(B, device=q.device)
    following = residual(q[rows, kept], torch.cat([p, p.new_zeros(B, 1, p.shape[2])], 1)[rows, kept])  # (B, V)
    path = torch.where(place < kept[:, None], place, -1)
    ratios = torch.where(tested, ratio.clamp(max=1), float("nan"))[..., None]  # (B, K, 1)
    return Verdict(kept, path, chance.token(following), following, ratios, None if r is None else r[..., None])


def coupled(tree: DraftTree, q: torch.Tensor, chance: Chance) -> Verdict:
    """Coupled sampling's rule, over a chain or a tree: the target's Gumbel-max y = argmax(log q + g) at each place,
    g the noise of that place's position, is an exact sample from q there. From the root, the child whose token
    equals y is kept (at most one can), and the next token is y where no child equals it."""
    B, N = tree.tokens.shape
    rows = torch.arange(B, device=q.device)
    places = torch.cat([tree.depths.new_zeros(B, 1), tree.depths], 1)  # (B, N + 1): each place's depth
    noise = chance.gumbel(tree.depth + 1)  # (B, depth + 1, V)
    choices = gumbel_max(q, noise.gather(1, places[..., None].expand(-1, -1, q.shape[2])))  # (B, N + 1)
    node = torch.zeros(B, dtype=torch.long, device=q.device)
    path = torch.full((B, tree.depth), -1, dtype=torch.long, device=q.device)
    for depth in range(tree.depth):
        wanted = choices[rows, node]
        children = tree.children[rows, node]  # (B, W)
        match = (children >= 0) & (tree.tokens.gather(1, children.clamp_min(0)) == wanted[:, None])
        taken = torch.where(match.any(1), children.gather(1, match.int().argmax(1, keepdim=True))[:, 0], -1)
        taken = torch.where((depth == 0) | (path[:, depth - 1] >= 0), taken, -1)  # a stopped row stays stopped
        path[:, depth] = taken
        node = torch.where(taken >= 0, taken + 1, node)
    kept = (path >= 0).sum(1)
    return Verdict(kept, path, choices[rows, node], q[rows, node], choices=choices)


def recursive_rejection(tree: DraftTree, q: torch.Tensor, chance: Chance) -> Verdict:
    """The tree rule: recursive rejection sampling over each node's children (see the module's docstring). q
    (B, N + 1, V) after the root and after each node; one uniform draw per child a row may try."""
    B, N = tree.tokens.shape
    W, rows, depth = tree.children.shape[2], torch.arange(B, device=q.device), tree.depth
    r = chance.uniform(B, depth, W, device=q.device)
    node = torch.zeros(B, dtype=torch.long, device=q.device)  # each row's current place: 0 the root
    left = q[:, 0]  # (B, V): what is left of q at the current node
    alive = torch.ones(B, dtype=torch.bool, device=q.device)
    path = torch.full((B, depth), -1, dtype=torch.long, device=q.device)
    ratios = torch.full((B, depth, W), float("nan"), dtype=q.dtype, device=q.device)
    for d in range(depth):
        taken = torch.full((B,), -1, dtype=torch.long, device=q.device)  # the child kept at this depth
        for j in range(W):
            child = tree.children[rows, node, j]  # (B,), -1: none
            tried = alive & (taken < 0) & (child >= 0)
            c = child.clamp_min(0)
            x, p = tree.tokens[rows, c], tree.p[rows, c]  # (B,), (B, V): a child and what it was drawn from
            normalised = left / left.sum(-1, keepdim=True)
            ratio = normalised[rows, x] / p[rows, x]  # p(x) > 0: x was drawn from p
            keep = tried & (ratio >= 1 if r is None else r[:, d, j] < ratio)
            ratios[:, d, j] = torch.where(tried, ratio.clamp(max=1), float("nan"))
            taken = torch.where(keep, child, taken)
            left = torch.where((tried & ~keep)[:, None], residual(normalised, p), left)
        moved = taken >= 0
        path[:, d] = taken
        node = torch.where(moved, taken + 1, node)
        left = torch.where(moved[:, None], q[rows, node], left)  # a kept child: q after it, whole
        alive &= moved
    return Verdict((path >= 0).sum(1), path, chance.token(left), left, ratios, r)


def path_tokens(tree: DraftTree, verdict: Verdict) -> torch.Tensor:
    """(B, depth): the token of the node kept at each depth, the kept drafts first (what follows is any token: read
    only `kept` of them, once `verdict_checks` held)."""
    return tree.tokens.gather(1, verdict.path.clamp(0, max(tree.tokens.shape[1] - 1, 0)))


def check_rule(rule, noise: GumbelNoise | None, trees: bool = False):
    """A sampler's `rule`: when none is given, Chen's for chains, coupled sampling's with its noise, the recursive
    rejection where rounds draft token trees; coupled sampling takes no other, since its text is the plain
    sampler's only under its own rule, and Chen's rule takes chains only."""
    if rule is None:
        return coupled if noise is not None else recursive_rejection if trees else chen
    if not callable(rule):
        raise ValueError(f"rule must be a function rule(tree, q, chance) -> Verdict (speculative_gpt2/rules.py), got "
                         f"{type(rule).__name__}")
    if noise is not None and rule is not coupled:
        raise ValueError("coupled=True decides every token by the coupled rule: leave out rule (or coupled)")
    if noise is None and rule is coupled:
        raise ValueError("the coupled rule compares Gumbel-max tokens under a seed's noise: pass coupled=True and a "
                         "seed instead of rule=coupled")
    if trees and rule is chen:
        raise ValueError("chen's rule tests a chain of drafts, not a token tree: use recursive_rejection, the tree "
                         "rule (the default), or an integer lookahead")
    return rule


def verdict_checks(verdict, tree: DraftTree, vocab_size: int) -> list[torch.Tensor]:
    """Device booleans (read with the round's one host sync) that a rule's Verdict fits the round: kept from 0 to
    each row's drafts, the next token an id in [0, V). Its shapes are checked at once; ValueError naming the fix."""
    B = len(tree.tokens)
    shapes_ok = isinstance(verdict, Verdict) and all(isinstance(t, torch.Tensor) for t in verdict[:4]) and \
        verdict.kept.shape == (B,) and verdict.next_token.shape == (B,)
    if not shapes_ok or verdict.path.shape != (B, tree.depth):
        raise ValueError(f"the acceptance rule returned {type(verdict).__name__}"
                         f"{'' if not shapes_ok else ' with a path of shape ' + str(tuple(verdict[1].shape))}: return "
                         f"a Verdict(kept (B,), path (B, depth), next_token (B,), following (B, V)) for the {B} rows "
                         f"and the round's depth {tree.depth} (speculative_gpt2/rules.py)")
    kept, path, next_token = verdict.kept, verdict.path, verdict.next_token
    # The path: a node per kept depth, each a child of the one before (the root's first), -1 after.
    above = torch.cat([path.new_full((B, 1), -1), path[:, :-1]], 1) + 1  # (B, depth): each depth's parent place
    listed = tree.children.gather(1, above.clamp(0, tree.children.shape[1] - 1)[..., None].expand(
        -1, -1, tree.children.shape[2]))  # (B, depth, W): the children there
    followed = torch.where(path >= 0, (listed == path[..., None]).any(-1), path == -1)
    depths = torch.arange(tree.depth, device=path.device)
    return [((kept >= 0) & (kept <= tree.depth)).all(),
            (followed & ((path >= 0) == (depths < kept[:, None]))).all(),
            ((next_token >= 0) & (next_token < vocab_size)).all()]


# What a rule's Verdict must be, in the order of `verdict_checks`' booleans.
VERDICT_RULES = ("its kept must be from 0 to the round's depth",
                 "its path must follow the tree's children from the root, a node per kept draft, -1 after",
                 "its next token must be an id in [0, vocabulary size)")


def refuse_bad_verdict(rule, checks: list[bool]) -> None:
    """ValueError naming the rule and the first thing of `VERDICT_RULES` its Verdict broke, if any."""
    broken = [what for what, ok in zip(VERDICT_RULES, checks) if not ok]
    if broken:
        raise ValueError(f"the acceptance rule {getattr(rule, '__name__', type(rule).__name__)} returned a bad "
                         f"Verdict: {broken[0]}; fix the rule")
