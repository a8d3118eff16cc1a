"""A tree's shape from measured acceptance (speculative_gpt2/tree_search.py): the dynamic program finds the best of
every tree up to its budget (checked against all of them), the expected drafts kept are what the positional model
says, acceptance is read from traced rounds, a fitted tree decodes the target's text, and a tree fitted during the
call (FittedTree) counts each rank's acceptance and refits between rounds."""

import itertools
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from speculative import speculative_sample
from speculative import autoregressive_sample
from speculative_gpt2.records import Round
from speculative_gpt2.tree_search import FittedTree, acceptance_by_rank, best_tree, best_trees, expected_kept
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


def test_a_tree_fitted_during_the_call_counts_each_rank_where_it_was_tried_and_refits_between_rounds():
    tree = FittedTree(budget=6, depth=3, width=4, every=4)
    for path in [(0,), (0,), (2,), ()]:  # ranks 1, 1 and 3 kept, then none
        assert tree.choose() == 1 and tree.parents == [-1] * 4  # the first `every` rounds: the fan, depth 1
        tree.update(Round(1, len(path), nodes=4, path=path))
    assert tree.acceptance() == [0.5, 0.0, 0.25, 0.0] and tree.fitted_to is None
    tree.choose()  # the fifth round begins: refit
    assert tree.parents == best_tree([0.5, 0.0, 0.25, 0.0], 6, 3).parents != [-1] * 4
    assert tree.fitted_to == [0.5, 0.0, 0.25, 0.0]
    # On the fitted tree a node with 2 children counts ranks 1 and 2 only: rank 3's estimate keeps its 4 tries.
    root_children = tree.parents.count(-1)
    tree.update(Round(tree.max_lookahead, 0, path=()))
    assert tree.tried[:root_children] == [5] * root_children and tree.tried[root_children:] == [4] * (4 -
                                                                                                   root_children)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seeds=st.lists(st.integers(0, 2**31), min_size=1, max_size=40), budget=st.integers(1, 20),
       depth=st.integers(1, 5), width=st.integers(1, 8), every=st.integers(1, 4), rejects=st.booleans())
def test_whatever_its_rounds_keep_a_fitted_tree_stays_within_its_budget_and_depth(seeds, budget, depth, width, every,
                                                                                 rejects):
    # Rounds keep random paths of the shape they drafted (each node's children tried in order, one kept or none):
    # the acceptance stays a distribution over ranks and every fit a valid tree within the budget and depth.
    depth, width = min(depth, budget), min(width, budget)
    tree = FittedTree(budget=budget, depth=depth, width=width, every=every)
    for seed in seeds:
        levels = tree.choose()
        assert 1 <= levels <= depth and len(tree.parents) <= budget
        generator = torch.Generator().manual_seed(seed)
        path, at, drafted = [], -1, int(torch.randint(1, levels + 1, (), generator=generator))  # a row may draft fewer
        for _ in range(drafted):
            children = [i for i, parent in enumerate(tree.parents) if parent == at]
            pick = int(torch.randint(0, len(children) + rejects, (), generator=generator)) if children else 0
            if pick == len(children):  # every child rejected
                break
            path.append(children[pick])
            at = children[pick]
        tree.update(Round(drafted, len(path), path=tuple(path)))
        a = tree.acceptance()
        assert all(0.0 <= x <= 1.0 for x in a) and sum(a) <= 1.0 + 1e-9
        assert all(k <= t for k, t in zip(tree.kept, tree.tried))


def test_a_fitted_tree_that_measured_nothing_kept_stays_the_fan_until_a_draft_is_kept():
    # Nothing kept: the cheapest round that still measures every rank (one draft pass), not a deep chain.
    tree = FittedTree(budget=6, depth=3, width=4, every=2)
    for _ in range(2):
        tree.choose()
        tree.update(Round(1, 0, nodes=4, path=()))
    assert tree.choose() == 1 and tree.parents == [-1] * 4 and tree.fitted_to == [0.0] * 4
    tree.update(Round(1, 1, nodes=4, path=(1,)))  # the third round keeps rank 2
    tree.choose()
    tree.update(Round(1, 0, nodes=4, path=()))
    tree.choose()  # the fifth round begins: refit to what was kept
    assert tree.fitted_to == [0.0, 0.25, 0.0, 0.0]  # 1 of 4 rounds
    assert tree.parents == best_tree([0.0, 0.25, 0.0, 0.0], 6, 3).parents != [-1] * 4


def test_a_tree_fitted_during_the_call_keeps_the_text_and_fits_a_chain_to_the_target_itself(models):
    target, drafts = models
    prompts = [[5, 6, 7], [1] * 9]
    for draft in (target, drafts["another model"]):
        tree = FittedTree(every=3)
        outs = speculative_sample(target, draft, prompts, 40, lookahead=tree)
        assert [out.tokens for out in outs] == [autoregressive_sample(target, p, 40).tokens for p in prompts]
        assert {r.nodes for out in outs for r in out.rounds} > {8}  # the fan, then fitted trees of other sizes
    assert tree.acceptance()[0] < 1.0 and tree.parents.count(-1) > 1  # another model: first drafts beside the first
    itself = FittedTree(every=3)
    speculative_sample(target, target, [5, 6, 7], 40, lookahead=itself)
    assert itself.acceptance() == [1.0] + [0.0] * 7 and itself.parents == [-1, 0, 1, 2]


@pytest.mark.parametrize("acceptance, nodes, depth", [([0.27, 0.08, 0.04, 0.05, 0.04, 0.06, 0.04, 0.02], 15, 4),
                                                       ([0.9, 0.05], 8, 3), ([0.2, 0.2, 0.2], 6, 2)])
def test_best_trees_holds_the_best_tree_of_every_smaller_budget_and_depth(acceptance, nodes, depth):
    shapes = best_trees(acceptance, nodes, depth)
    values = {tuple(shape.parents): expected_kept(shape, acceptance) for shape in shapes}
    assert len(values) == len(shapes) and [len(s.parents) for s in shapes] == sorted(len(s.parents) for s in shapes)
    for n in range(1, nodes + 1):
        for levels in range(1, min(depth, n) + 1):
            best = best_tree(acceptance, n, levels)
            assert tuple(best.parents) in values  # the very shape, not only one as good
            fitting = [v for s, v in zip(shapes, values.values()) if len(s.parents) <= n and s.max_lookahead <= levels]
            assert max(fitting) == pytest.approx(expected_kept(best, acceptance))


def fitted_with(costs, draft_ms: float, verify_ms, acceptance=(0.3, 0.2, 0.1, 0.1), budget=15, depth=4):
    """A FittedTree of `costs` after one measuring stretch: its fan's rounds kept rank i + 1 in acceptance[i] of
    them (20 rounds), their draft passes taking `draft_ms` and their verifications `verify_ms(rows)`; then refit."""
    tree = FittedTree(budget=budget, depth=depth, width=len(acceptance), every=20, costs=costs)
    kept = [rank for rank, a in enumerate(acceptance) for _ in range(round(20 * a))]
    for i in range(20):
        tree.choose()
        path = (kept[i],) if i < len(kept) else ()
        tree.update(Round(1, len(path), draft_ms, verify_ms(len(acceptance) + 1), nodes=len(acceptance), path=path))
    if costs == "measured":  # as if a verification of the whole budget had been measured too: two sizes, a slope
        tree.verify_ms[budget + 1] = verify_ms(budget + 1)
    tree.choose()
    return tree


def test_a_fit_by_measured_costs_times_its_rounds_and_extends_them_with_care():
    tree = FittedTree(budget=15, depth=4, width=4, every=8, costs="measured")
    tree.choose()
    tree.update(Round(1, 0, 30.0, 200.0, nodes=4, path=()))  # the fan: one draft pass, 5 rows verified
    tree.update(Round(0, 0, 0.0, 50.0, nodes=0))  # a row that drafted nothing: no time to learn from
    assert tree.draft_ms == 30.0 and tree.verify_ms == {5: 200.0}
    assert tree.round_cost(15, 2) == 2 * 30.0 + 200.0  # one size measured: every size costs it
    tree.verify_ms[16] = 420.0
    assert tree.round_cost(20, 3) == pytest.approx(3 * 30.0 + 520.0)  # 21 rows, beyond the sizes: 20 ms a row more
    tree.verify_ms[5] = 100.0  # a slope steep enough to reach zero below the sizes measured
    assert tree.round_cost(1, 1) == pytest.approx(30.0 + 0.5 * 100.0)  # held at half the cheapest, not free


def test_a_fit_by_costs_trades_kept_drafts_for_cheaper_rounds():
    a = [0.3, 0.2, 0.1, 0.1]
    # Free draft passes and rows: the most drafts kept, as without costs.
    free = fitted_with("measured", 0.0, lambda rows: 100.0)
    assert expected_kept(free, a) == pytest.approx(expected_kept(best_tree(a, 15, 4), a))
    dear = fitted_with("measured", 10.0, lambda rows: 100.0 + 20.0 * rows)  # each row a fifth of a pass
    assert len(dear.parents) < 15 and expected_kept(dear, a) < expected_kept(free, a)
    # What it chose decodes the most per ms of every candidate, by its own cost model.
    rate = {tuple(s.parents): (1 + expected_kept(s, a)) / (s.max_lookahead * 10.0 + 100.0 + 20.0 * (len(s.parents) + 1))
            for s in best_trees(a, 15, 4)}
    assert rate[tuple(dear.parents)] == pytest.approx(max(rate.values()))
    # The paper's cost model: a verification costs one pass whatever its rows, so depth is what a fit weighs.
    free_draft, dear_draft = fitted_with(0.0, 10.0, lambda rows: 0.0), fitted_with(1.0, 10.0, lambda rows: 0.0)
    assert expected_kept(free_draft, a) == pytest.approx(expected_kept(best_tree(a, 15, 4), a))
    assert dear_draft.max_lookahead < free_draft.max_lookahead
    assert fitted_with(None, 10.0, lambda rows: 100.0 + 20.0 * rows).parents == best_tree(a, 15, 4).parents


@pytest.mark.parametrize("call, message", [
    (lambda: FittedTree(budget=0), r"budget \(the most nodes\) must be an integer from 1 to 64"),
    (lambda: FittedTree(budget=4, depth=5), "depth must be an integer from 1 to 4"),
    (lambda: FittedTree(every=0), r"every \(rounds between fits\)"),
    (lambda: FittedTree(costs="timed"), r"costs \(None, \"measured\", or a draft pass's cost in target passes\) must "
                                        r"be a finite number >= 0"),
    (lambda: FittedTree(costs=-0.5), r"costs .* must be a finite number >= 0"),
    (lambda: FittedTree(budget=6, width=8), r"width \(first drafts tried while measuring, at most the budget\) must be "
                                            r"an integer from 1 to 6"),
    (lambda: speculative_sample(None, None, [1], 4, lookahead=FittedTree), "lookahead is the class FittedTree, not a "
                                                                          r"policy: pass an instance, FittedTree\(\)"),
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
