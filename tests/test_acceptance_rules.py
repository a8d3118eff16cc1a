"""The acceptance rules (speculative_gpt2/rules.py), exact by enumeration: no random numbers.

For a vocabulary of 5 tokens, a target q and a draft p that depend on the prefix, every tree a drafter can propose is
enumerated with its probability (a model drafter draws siblings without replacement from p; a deterministic one
proposes fixed tokens with one-hot p), and every path through the rule's tests with its probability: a test is forced
to keep (r = 0) or to reject (r just below 1), and weighs min(1, q/p) or 1 - min(1, q/p), which the rule reports. The
distribution of the first two emitted tokens must equal the target's, q(t1) q(t2 | t1), to 1e-9. Subtrees the rule
never reaches (a rejected child's) are given one draw of weight 1: whatever they hold sums out. A negative control
breaks each rule as an implementation could, and the check fails.
"""

import itertools
import runpy
from pathlib import Path

import pytest
import torch

from speculative import autoregressive_sample, speculative_sample
from speculative_gpt2 import rules
from speculative_gpt2.rules import Chance, DraftTree, chen, coupled, recursive_rejection
from test_speculative import LEVEL, chi_square_p_value, exact_first_two, first_two_counts, small_pair  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent

V = 5
KEEP, REJECT = 0.0, 1 - 1e-12  # r forcing a test's outcome (r < ratio keeps)


def distribution(seed: int, prefix: tuple) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * seed + sum(7**i * (t + 1) for i, t in enumerate(prefix)))
    return torch.softmax(torch.randn(V, generator=gen, dtype=torch.float64) * 1.5, -1)


def q_of(prefix) -> torch.Tensor:  # the target's next-token distribution after the prefix (the root: ())
    return distribution(1, tuple(prefix))


def p_of(prefix) -> torch.Tensor:  # the draft model's
    return distribution(2, tuple(prefix))


def without(p: torch.Tensor, removed) -> torch.Tensor:
    p = p.clone()
    p[list(removed)] = 0
    return p / p.sum()


def one_hot(x: int) -> torch.Tensor:
    return torch.zeros(V, dtype=torch.float64).index_fill_(0, torch.tensor([x]), 1.0)


def siblings(prefix, width: int, drafter: str):
    """Every ordered draw of `width` children below `prefix`: (tokens, the p each was drawn from as the rule is
    told, probability). "model": without replacement from p; "with replacement": drawn i.i.d. but told as without
    (a negative control); "fixed": a deterministic proposer's tokens (the most likely under p, then the next), p
    one-hot, probability 1."""
    p = p_of(prefix)
    if drafter == "fixed":
        tokens = p.argsort(descending=True)[:width].tolist()
        yield tokens, [one_hot(x) for x in tokens], 1.0
        return
    draws = itertools.product(range(V), repeat=width) if drafter == "with replacement" else \
        itertools.permutations(range(V), width)
    for xs in draws:
        probability = 1.0
        for i, x in enumerate(xs):
            probability *= (p if drafter == "with replacement" else without(p, xs[:i]))[x].item()
        if probability > 0:
            yield list(xs), [without(p, xs[:i]) for i in range(width)], probability


def below(shape) -> list[int]:
    """Each depth-1 child's number of children: a depth-2 tree's shape is (w1, w2) or (w1, (its w2 per child))."""
    w1, w2 = shape
    return [w2] * w1 if isinstance(w2, int) else list(w2)


def rounds(shape, drafter: str):
    """Every (tree, forced outcomes) of a depth-2 tree of this `shape` (`below`): the tree's tensors, its
    probability, and j1, j2: the child kept at depths 1 and 2 (a width: none)."""
    w1, w2s = shape[0], below(shape)
    for top, top_p, top_probability in siblings((), w1, drafter):
        unreached = [next(siblings((x,), w2, drafter)) for x, w2 in zip(top, w2s)]
        for j1 in range(w1 + 1):
            kept_below = siblings((top[j1],), w2s[j1], drafter) if j1 < w1 else [unreached[0]]
            for sub in kept_below:
                tokens, p, probability = list(top), list(top_p), top_probability
                children = [list(range(w1))]
                for i in range(w1):
                    xs, xps, sub_probability = sub if i == j1 else unreached[i]
                    children.append(list(range(len(tokens), len(tokens) + w2s[i])))
                    tokens, p = tokens + xs, p + xps
                    probability *= sub_probability if i == j1 else 1.0
                children += [[]] * sum(w2s)
                for j2 in range(w2s[j1] + 1) if j1 < w1 else [max(w2s)]:
                    yield tokens, p, children, probability, j1, j2


def emitted(rule, shape, drafter: str) -> torch.Tensor:
    """P(t1, t2) (V, V) of the first two tokens a round of `rule` emits (and, when it emits one, the target's next
    step), summed over every tree and forced outcome."""
    w1, w2s = shape[0], below(shape)
    W = max([w1] + w2s)
    parent_of = [j for j in range(w1) for _ in range(w2s[j])]  # each depth-2 node's parent
    cases = list(rounds(shape, drafter))
    tokens = torch.tensor([c[0] for c in cases])
    p = torch.stack([torch.stack(c[1]) for c in cases])
    children = torch.tensor([[kids + [-1] * (W - len(kids)) for kids in c[2]] for c in cases])
    depths = torch.tensor([[1] * w1 + [2] * sum(w2s)] * len(cases))

    def prefix(c, i):  # node i's tokens from the root
        return [c[0][i]] if i < w1 else [c[0][parent_of[i - w1]], c[0][i]]

    q = torch.stack([torch.stack([q_of(())] + [q_of(prefix(c, i)) for i in range(len(c[0]))]) for c in cases])
    r = torch.full((len(cases), 2, W), KEEP, dtype=torch.float64)
    for b, c in enumerate(cases):
        r[b, 0, : c[4]], r[b, 1, : c[5]] = REJECT, REJECT
    tree = DraftTree(tokens, p, depths, children, torch.full((len(cases),), tokens.shape[1]), 2)
    verdict = rule(tree, q, Forced(r))
    joint = torch.zeros(V, V, dtype=torch.float64)
    for b, (node_tokens, _, _, probability, j1, j2) in enumerate(cases):
        weight = probability
        for d, j in ((0, j1), (1, j2)):  # the forced outcome's probability, from the tests the rule made
            for i, ratio in enumerate(verdict.ratios[b, d].tolist()):
                if ratio == ratio:  # NaN: not tested
                    weight *= (1 - ratio) if i < j else ratio if i == j else 1.0
        if weight == 0:
            continue
        kept = int(verdict.kept[b])
        path = [node_tokens[i] for i in verdict.path[b, :kept].tolist()]
        following = verdict.following[b] / verdict.following[b].sum()
        if kept == 2:
            joint[path[0], path[1]] += weight
        elif kept == 1:
            joint[path[0]] += weight * following
        else:
            joint += weight * following[:, None] * torch.stack([q_of((t,)) for t in range(V)])
    return joint


class Forced(Chance):
    """The rule's randomness, forced: its uniform draws are `r`, and it draws no token (the test weighs
    `following`, the distribution the token would be drawn from)."""

    def __init__(self, r):
        super().__init__(1.0, None)
        self.r = r

    def uniform(self, *shape, device):
        return self.r[..., : shape[-1]] if len(shape) == 3 else self.r[:, :, 0]

    def token(self, probs):
        return torch.zeros(len(probs), dtype=torch.long)


def target_joint() -> torch.Tensor:
    return torch.stack([q_of(())[a] * q_of((a,)) for a in range(V)])


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (3, 2), (2, 3), (2, (2, 1)), (3, (0, 2, 1))], ids=str)
@pytest.mark.parametrize("drafter", ["model", "fixed"])
def test_the_tree_rule_emits_the_targets_tokens_exactly(shape, drafter):
    assert torch.allclose(emitted(recursive_rejection, shape, drafter), target_joint(), atol=1e-9, rtol=0)


@pytest.mark.parametrize("drafter", ["model", "fixed"])
def test_chens_rule_on_a_chain_emits_the_targets_tokens_exactly(drafter):
    assert torch.allclose(emitted(chen, (1, 1), drafter), target_joint(), atol=1e-9, rtol=0)


def test_siblings_drawn_with_replacement_but_told_without_fail_the_check():
    # The negative control: the rule is exact only when each child's p is the one it was really drawn from.
    assert not torch.allclose(emitted(recursive_rejection, (2, 2), "with replacement"), target_joint(), atol=1e-3)


def test_a_residual_that_is_not_updated_fails_the_check(monkeypatch):
    monkeypatch.setattr(rules, "residual", lambda q, p: q)  # a rejected child's mass is left in q
    assert not torch.allclose(emitted(recursive_rejection, (2, 2), "model"), target_joint(), atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# Fixed draws: r just below the ratio keeps, just above it rejects.


def two_drafts():
    """One row, a chain of two drafts (tokens 1 and 2) with p(1) = 0.5 and p(2) = 0.25 and q(1) = q(2) = 0.2."""
    p = torch.tensor([[[0.1, 0.5, 0.2, 0.1, 0.1], [0.25, 0.25, 0.25, 0.15, 0.1]]], dtype=torch.float64)
    q = torch.full((1, 3, V), 0.2, dtype=torch.float64)
    return DraftTree.chain(torch.tensor([[1, 2]]), p, [2]), q


@pytest.mark.parametrize("rule", [chen, recursive_rejection])
@pytest.mark.parametrize("r, kept", [(0.4 - 1e-9, 2), (0.4 + 1e-9, 0)])
def test_a_draw_just_below_the_ratio_keeps_and_just_above_rejects(rule, r, kept):
    tree, q = two_drafts()  # the first draft's ratio is q/p = 0.2 / 0.5 = 0.4, the second's 0.2 / 0.25 = 0.8
    verdict = rule(tree, q, Forced(torch.tensor([[[r], [0.5]]], dtype=torch.float64)))
    assert int(verdict.kept) == kept
    if kept == 0:  # the rejected draft's mass left q: norm(max(0, q - p)) = (0.1, 0, 0, 0.1, 0.1) / 0.3
        following = verdict.following[0] / verdict.following[0].sum()
        assert torch.allclose(following, torch.tensor([1, 0, 0, 1, 1], dtype=torch.float64) / 3)
    else:  # both kept: the bonus token comes from q after the second draft
        assert torch.allclose(verdict.following[0] / verdict.following[0].sum(), q[0, 2])


# ----------------------------------------------------------------------------------------------------------
# In the sampler: the rule parameter.


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(temperature=1.0), dict(temperature=0.7, top_k=4)])
def test_the_tree_rule_over_a_chain_follows_the_target_distribution(small_pair, options):
    def sampler(generator):
        return speculative_sample(target, draft, [3], 4, lookahead=3, generator=generator,
                                  rule=recursive_rejection, **options).tokens

    target, draft = small_pair
    p_value = chi_square_p_value(first_two_counts(sampler, 8, seed=11), exact_first_two(target, [3], **options))
    assert p_value > LEVEL, p_value


def test_the_tree_rule_over_a_chain_is_exact_at_temperature_0(small_pair):
    target, draft = small_pair
    for prompt in ([3], [1, 5, 2], [7] * 6):
        expected = autoregressive_sample(target, prompt, 10).tokens
        assert speculative_sample(target, draft, prompt, 10, lookahead=3, rule=recursive_rejection).tokens == expected


def test_the_readme_example_rule_runs():
    runpy.run_path(str(ROOT / "examples" / "own_rule.py"))  # it asserts its greedy text is the target's


def keeps_too_many(tree, q, chance):
    verdict = chen(tree, q, chance)
    return verdict._replace(kept=tree.counts + 1)


@pytest.mark.parametrize("rule, message", [
    ("chen", "rule must be a function rule(tree, q, chance) -> Verdict"),
    (lambda tree, q, chance: (1, 2), "the acceptance rule returned tuple: return a Verdict("),
    (lambda tree, q, chance: chen(tree, q, chance)._replace(path=tree.tokens[:, :1]),
     "the acceptance rule returned Verdict with a path of shape (1, 1): return a Verdict(kept (B,), path (B, depth)"),
    (keeps_too_many, "the acceptance rule keeps_too_many returned a bad Verdict: its kept must be from 0 to the "
                     "round's depth; fix the rule"),
    (lambda tree, q, chance: tuple(chen(tree, q, chance)), "the acceptance rule returned tuple: return a Verdict("),
    (lambda tree, q, chance: chen(tree, q, chance)._replace(path=torch.full_like(tree.tokens, -1), kept=tree.counts),
     "returned a bad Verdict: its path must follow the tree's children from the root, a node per kept draft"),
])
def test_a_bad_rule_is_named_in_one_line(small_pair, rule, message):
    target, draft = small_pair
    with pytest.raises(ValueError) as error:
        speculative_sample(target, draft, [3], 6, lookahead=3, rule=rule)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_coupled_rule_needs_coupled_sampling(small_pair):
    target, draft = small_pair
    with pytest.raises(ValueError, match="the coupled rule compares Gumbel-max tokens under a seed's noise: pass "
                                         "coupled=True and a seed instead of rule=coupled"):
        speculative_sample(target, draft, [3], 6, temperature=1.0, rule=coupled)


def test_coupled_sampling_takes_no_other_rule(small_pair):
    target, draft = small_pair
    with pytest.raises(ValueError, match="coupled=True decides every token by the coupled rule"):
        speculative_sample(target, draft, [3], 6, temperature=1.0, coupled=True, seed=1, rule=recursive_rejection)
    coupled_text = speculative_sample(target, draft, [3], 6, temperature=1.0, coupled=True, seed=1, rule=coupled)
    plain = autoregressive_sample(target, [3], 6, temperature=1.0, coupled=True, seed=1)
    assert coupled_text.tokens == plain.tokens
