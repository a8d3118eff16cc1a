"""A tree's shape from measured acceptance (speculative_gpt2/tree_search.py): the dynamic program finds the best of
every tree up to its budget (checked against all of them), the expected drafts kept are what the positional model
says, acceptance is read from traced rounds, and a fitted tree decodes the target's text."""

import itertools
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from speculative import speculative_sample
from speculative_gpt2.tree_search import acceptance_by_rank, best_tree, expected_kept
from speculative_gpt2.trees import TreeShape
from test_token_trees import models  # noqa: F401


def forests(nodes: int, depth: int):
    """Every ordered forest of at most `nodes` nodes and `depth` levels, as nested tuples of children."""
    yield ()
    if nodes == 0 or depth == 0:
        return
    for size in range(1, nodes + 1):  # the first tree takes `size` nodes, its root and size - 1 below it
        for first in forests(size - 1, depth - 1):
            if sum(1 for _ in flatten(first)) != size - 1:
                continue
            for rest in forests(nodes - size, depth):
                yield (first,) + rest


def flatten(forest):
    for tree in forest:
        yield tree
        yield from flatten(tree)


def shape_of(forest) -> TreeShape:
    parents, queue = [], [(-1, forest)]
    for parent, children in queue:
        for child in children:
            parents.append(parent)
            queue.append((len(parents) - 1, child))
    return TreeShape.of_parents(parents)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.01, 1.0), min_size=1, max_size=3), st.integers(1, 5), st.integers(1, 3))
def test_the_best_tree_keeps_at_least_as_much_as_every_tree_within_its_budget(weights, nodes, depth):
    acceptance = [w / max(1.0, sum(weights)) for w in weights]
    depth = min(depth, nodes)
    every = [expected_kept(shape_of(f), acceptance) for f in forests(nodes, depth) if f]
    best = best_tree(acceptance, nodes, depth)
    assert len(best.parents) <= nodes and best.max_lookahead <= depth
    assert expected_kept(best, acceptance) == pytest.approx(max(every), abs=1e-12)


def test_expected_kept_is_the_positional_models_sum_over_nodes():
    a = [0.5, 0.3, 0.1]
    assert expected_kept(TreeShape((1, 1, 1)), a) == pytest.approx(0.5 + 0.25 + 0.125)
    assert expected_kept(TreeShape((3,)), a) == pytest.approx(0.9)
    assert expected_kept(TreeShape((2, 2)), a) == pytest.approx(0.8 + 0.8 * 0.8)
    assert expected_kept(TreeShape((4,)), a) == pytest.approx(0.9)  # a rank never measured keeps nothing


def test_a_confident_draft_gets_a_chain_and_a_doubtful_one_a_bush():
    assert best_tree([0.95, 0.04], 4, 4).parents == [-1, 0, 1, 2]
    assert best_tree([0.3, 0.25, 0.2, 0.15], 4, 4).parents == [-1, -1, -1, -1]


def test_acceptance_is_read_from_the_ranks_kept_in_traced_rounds():
    tree = dict(drafts=[7, 8, 9, 10, 11], parents=[-1, -1, 0, 0, 1], next_token=5)
    rounds = [SimpleNamespace(**tree, path=[1, 4]),  # the root's 2nd child, then node 1's only one (not 2 wide)
              SimpleNamespace(**tree, path=[0]),  # the root's 1st, then neither of node 0's
              SimpleNamespace(**tree, path=[]),  # none of the root's
              SimpleNamespace(**tree | dict(next_token=None), path=[0]),  # an EOS at node 0: its children untried
              SimpleNamespace(drafts=[], parents=None, path=None, next_token=5)]  # a last round without drafts
    # Nodes with 2 children tried: the root 4 times, node 0 once; the 1st rank kept twice, the 2nd once.
    assert acceptance_by_rank(rounds, 2) == pytest.approx([2 / 5, 1 / 5])
    chains = [SimpleNamespace(drafts=[1, 2, 3], parents=None, path=None, kept=k, next_token=5) for k in (3, 1)]
    assert acceptance_by_rank(chains, 1) == pytest.approx([4 / 5])  # kept 4 of the 5 drafts tried
    with pytest.raises(ValueError, match="no traced round tried 2 siblings at a node"):
        acceptance_by_rank(chains, 2)


def test_a_draft_that_is_the_target_has_its_first_sibling_kept_every_time(models):
    target, _ = models
    out = speculative_sample(target, target, [1, 2, 3], 20, lookahead=(3, 2), temperature=1.0, trace=True,
                             generator=torch.Generator().manual_seed(0))
    assert acceptance_by_rank(out.trace, 3) == [1.0, 0.0, 0.0]


def test_a_fitted_tree_decodes_the_targets_text(models):
    target, drafts = models
    draft = drafts["a noisy copy"]
    measured = speculative_sample(target, draft, [5, 6, 7], 30, lookahead=(4,), trace=True)
    acceptance = acceptance_by_rank(measured.trace, 4)
    shape = best_tree(acceptance, 8, 3)
    out = speculative_sample(target, draft, [5, 6, 7], 30, lookahead=shape)
    assert out.tokens == measured.tokens  # both the target's greedy text
    chain = speculative_sample(target, draft, [5, 6, 7], 30, lookahead=3)
    assert out.tokens_per_target_call >= chain.tokens_per_target_call


@pytest.mark.parametrize("call, message", [
    (lambda: best_tree([0.7, 0.5], 4, 2), "numbers from 0 to 1 that sum to at most 1"),
    (lambda: best_tree([], 4, 2), "numbers from 0 to 1"),
    (lambda: best_tree([0.5], 0, 1), "nodes from 1 to 64"),
    (lambda: best_tree([0.5], 3, 4), "a depth from 1 to nodes"),
    (lambda: best_tree([0.0, 0.0], 3, 2), "keeps nothing"),
    (lambda: TreeShape.of_parents([-1, 0, -1]), "never smaller than node i - 1's"),
    (lambda: TreeShape.of_parents([0]), "an earlier node"),
    (lambda: TreeShape.of_parents([-1] * 65), "1 to 64 integers"),
])
def test_bad_shapes_and_acceptance_are_refused_in_one_line(call, message):
    with pytest.raises(ValueError, match=message) as refused:
        call()
    assert "\n" not in str(refused.value)


def test_every_forest_is_counted_once():  # the enumeration the first test trusts: C_k ordered forests of k nodes
    assert [sum(1 for _ in forests(n, n)) for n in range(1, 6)] == [2, 4, 9, 23, 65]  # 1 + C_1 + ... + C_n
    assert len({repr(shape_of(f).parents) for f in itertools.islice(forests(5, 5), 1, None)}) == 64
    assert {shape_of(f).max_lookahead for f in forests(5, 2) if f} == {1, 2}
