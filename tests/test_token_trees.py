"""Token trees (speculative_gpt2/trees.py): a round drafts a tree of candidates, one target pass scores every node,
and the tree rule (recursive rejection, proven exact by enumeration in test_acceptance_rules.py) decides.

Here: the pass gives each node the logits of its own path, the kept path's keys and values land where plain
decoding puts them, greedy text is the target's, samples follow the target's distribution (chi-square at level
1e-3, with a negative control), and what trees do not take is refused in one line."""

from functools import partial

import pytest
import torch

from gpt2_model import GPT2Config
from speculative import ModelDrafter, autoregressive_sample, draw_tokens, logits_to_probs, speculative_sample
from speculative_gpt2 import trees
from speculative_gpt2.drafters import PromptLookupDrafter, Sampling
from speculative_gpt2.random_checkpoint import noisy_copy, random_model
from speculative_gpt2.rules import DraftTree, chen
from speculative_gpt2.render import trace_page
from speculative_gpt2.tokenizer import load_tokenizer
from speculative_gpt2.tree_search import FittedTree
from speculative_gpt2.trees import ExpandingTree, TreeShape, settle, tree_pass
from test_batched import PROMPTS
from test_speculative import (LEVEL, batched_first_two_counts, chi_square_p_value, exact_first_two,  # noqa: F401
                             small_pair)

CONFIG = GPT2Config(vocab_size=64, n_positions=128, n_embd=32, n_layer=2, n_head=2)


@pytest.fixture(scope="module")
def models():
    target = random_model(CONFIG, seed=0)
    return target, {"itself": target, "a noisy copy": noisy_copy(target, 0.3, seed=1),
                    "another model": random_model(CONFIG, seed=2)}


def path_of(shape: TreeShape, node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = shape.parents[node]
    return path[::-1]


@pytest.mark.parametrize("widths", [(1,), (3,), (2, 2), (3, 1, 2), TreeShape.of_parents([-1, -1, -1, 0, 0, 2, 3])],
                         ids=str)
def test_one_tree_pass_gives_every_node_the_logits_of_its_own_path(models, widths):
    target, _ = models
    shape, prompts = trees.lookahead_policy(widths), [[1, 2, 3, 4, 5], [9, 8]]
    N = shape.nodes(shape.max_lookahead)
    cache = target.new_cache(2, max_len=32, room=N)
    target(torch.tensor([prompts[0][:-1], prompts[1][:-1] + [0] * 3]), cache)
    cache.crop([4, 1])  # ragged rows: each row's last prompt token is pending
    nodes = torch.randint(0, 64, (2, N), generator=torch.Generator().manual_seed(0))
    pending = torch.tensor([[prompts[0][-1]], [prompts[1][-1]]])
    logits = tree_pass(target, shape.layout(shape.max_lookahead, 2, 'cpu'), torch.cat([pending, nodes], 1), cache)
    for b, prompt in enumerate(prompts):
        for place in range(N + 1):
            tokens = prompt + ([] if place == 0 else nodes[b, path_of(shape, place - 1)].tolist())
            alone = target(torch.tensor([tokens]))[0, -1]
            torch.testing.assert_close(logits[b, place], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", [[1, 4], [0, 2], [1, 5], [0, -1], [-1, -1]])
def test_the_kept_path_moves_to_plain_decodings_slots(models, path):
    target, _ = models
    shape = TreeShape((2, 2))
    N = shape.nodes(2)
    prompt = [3, 1, 4, 1, 5]
    cache = target.new_cache(1, max_len=32, room=N)
    target(torch.tensor([prompt[:-1]]), cache)
    nodes = torch.randint(0, 64, (1, N), generator=torch.Generator().manual_seed(1))
    tree = DraftTree(nodes, None, None, torch.zeros(1, N + 1, 2, dtype=torch.long), None, 2)
    tree_pass(target, shape.layout(2, 1, 'cpu'), torch.cat([torch.tensor([[prompt[-1]]]), nodes], 1), cache)
    settle(cache, tree, torch.tensor([path]))
    kept = [node for node in path if node >= 0]
    cache.crop(len(prompt) + len(kept))  # the next token is pending, as after a round
    text = prompt + nodes[0, kept].tolist() + [7]
    torch.testing.assert_close(target(torch.tensor([[7]]), cache)[0, -1], target(torch.tensor([text]))[0, -1],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("widths", [(2,), (2, 2), (3, 2), (1, 1, 1), (2, 2, 2), (4, 3), ExpandingTree(2, 2),
                                    ExpandingTree(3, 2, 2), ExpandingTree(4, 3, 2), ExpandingTree(1, 4, 1),
                                    TreeShape.of_parents([-1, -1, -1, 0, 0, 1, 3]),
                                    TreeShape.of_parents([-1, -1, 0, 2, 2, 3])], ids=str)
@pytest.mark.parametrize("drafter", ["itself", "a noisy copy", "another model"])
def test_greedy_tree_text_is_the_targets(models, widths, drafter):
    target, drafts = models
    shape = trees.lookahead_policy(widths)
    K = shape.max_lookahead
    prompts = [[5], [1, 2, 3, 4, 5, 6, 7], [9] * 20]
    outs = speculative_sample(target, drafts[drafter], prompts, 17, lookahead=widths)
    assert [out.tokens for out in outs] == [autoregressive_sample(target, p, 17).tokens for p in prompts]
    assert max(r.nodes for out in outs for r in out.rounds) == shape.nodes(K)
    if drafter == "itself":  # every round keeps a full path of depth K (an expanding tree's likeliest path)
        assert outs[0].tokens_per_target_call > 0.9 * (K + 1) * 17 / (17 + K)
    alone = speculative_sample(target, drafts[drafter], prompts[1], 3, lookahead=widths, eos_token_id=7)
    assert alone.tokens == autoregressive_sample(target, prompts[1], 3, eos_token_id=7).tokens


def test_a_wider_tree_keeps_more_than_a_chain_where_the_draft_half_agrees(models):
    target, drafts = models
    chain = speculative_sample(target, drafts["a noisy copy"], [5, 6, 7], 40, lookahead=2)
    tree = speculative_sample(target, drafts["a noisy copy"], [5, 6, 7], 40, lookahead=(4, 2))
    assert tree.tokens == chain.tokens and tree.tokens_per_target_call >= chain.tokens_per_target_call


def test_an_expanding_tree_gives_children_to_the_most_likely_nodes_only(models):
    target, drafts = models
    shape = ExpandingTree(3, 3, 2)
    drafter = ModelDrafter(drafts["a noisy copy"], shape)
    greedy = Sampling(logits_to_probs, partial(draw_tokens, temperature=0.0, generator=None), CONFIG.vocab_size,
                      greedy=True)
    drafter.start([torch.tensor([1, 2, 3])], 40, greedy)
    proposal = drafter.propose(torch.tensor([[1, 2, 3]]), [3], 3, [True])
    tree = proposal.tree
    assert tree.tokens.shape == (1, 3 + 6 + 6) and int(tree.counts) == 15
    # The noisy draft's own log-probabilities along each path, computed node by node from plain passes.
    def path_logp(node):
        path = [node]
        while (parent := int(parent_of[path[-1]])) >= 0:
            path.append(parent)
        tokens, total = [1, 2, 3], 0.0
        for j in reversed(path):
            logits = drafts["a noisy copy"](torch.tensor([tokens]))[0, -1].float()
            total += logits.log_softmax(-1)[tree.tokens[0, j]].item()
            tokens.append(int(tree.tokens[0, j]))
        return total
    parent_of = {int(c): place - 1 for place, kids in enumerate(tree.children[0].tolist()) for c in kids if c >= 0}
    for level, (first, end) in enumerate([(0, 3), (3, 9)], 1):  # the levels that have children below them
        with_children = {place - 1 for place, kids in enumerate(tree.children[0].tolist()) if kids[0] >= 0} - {-1}
        scores = {j: path_logp(j) for j in range(first, end)}
        best = sorted(scores, key=scores.get, reverse=True)[:2]
        assert {j for j in with_children if first <= j < end} == set(best), (level, scores)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_broken_draft_model_is_named_with_trees_too(models, temperature):
    target, _ = models
    broken = random_model(CONFIG, seed=2)
    with torch.no_grad():
        broken.lm_head.weight[0, 0] = float("nan")  # the tied head: every logit of the draft is NaN
    with pytest.raises(ValueError, match="draft model"):
        speculative_sample(target, broken, [1, 2, 3], 8, lookahead=(2, 2), temperature=temperature,
                           generator=torch.Generator().manual_seed(0))


def test_a_width_past_the_vocabulary_proposes_each_token_once(small_pair):
    target, draft = small_pair  # a vocabulary of 8
    assert speculative_sample(target, draft, [3], 12, lookahead=(10, 2)).tokens == \
        autoregressive_sample(target, [3], 12).tokens


def tree_p_values(target, draft, widths, seed: int, **options) -> list[float]:
    """Chi-square p-values of the first two tokens of each row of a ragged batch against the target's."""
    generator = torch.Generator().manual_seed(seed)
    counts = batched_first_two_counts(
        lambda batch: speculative_sample(target, draft, batch, 3, lookahead=widths, generator=generator, **options),
        PROMPTS, target.config.vocab_size)
    return [chi_square_p_value(counts[b], exact_first_two(target, p, **options)) for b, p in enumerate(PROMPTS)]


@pytest.mark.slow
@pytest.mark.parametrize("widths, options", [((2, 2), dict(temperature=1.0)), ((4,), dict(temperature=1.0)),
                                             ((3, 1), dict(temperature=0.8, top_k=4)),
                                             ((2, 3), dict(temperature=1.0, top_p=0.8)),
                                             (ExpandingTree(2, 2), dict(temperature=1.0)),
                                             (TreeShape.of_parents([-1, -1, -1, 0, 1, 1]), dict(temperature=1.0)),
                                             (ExpandingTree(2, 3, 2), dict(temperature=0.8, top_k=4)),
                                             (FittedTree(budget=6, depth=2, width=3, every=1), dict(temperature=1.0))],
                         ids=["2x2", "4", "3x1-top-k", "2x3-top-p", "expanding-2-2-1", "parents-3-then-1-2-0",
                              "expanding-2-3-2-top-k", "fitted-every-round"])
def test_tree_samples_follow_the_target_distribution(small_pair, widths, options):
    p_values = tree_p_values(*small_pair, widths, seed=21, **options)
    assert min(p_values) > LEVEL, p_values


@pytest.mark.slow
def test_negative_control_siblings_told_their_parents_whole_p_are_detected(small_pair, monkeypatch):
    # Siblings drawn without replacement, but each told the parent's whole p: the rule's correction for the tokens
    # already drawn is lost, and the test above must fail (its assertion on the same rows).
    def told_whole_p(p, logits, width, sampling):
        tokens, p_each, exists = siblings(p, logits, width, sampling)
        return tokens, (p / p.sum(-1, keepdim=True))[:, :, None].expand_as(p_each), exists

    siblings = trees.siblings
    monkeypatch.setattr(trees, "siblings", told_whole_p)
    p_values = tree_p_values(*small_pair, (2, 2), seed=21, temperature=1.0)
    assert min(p_values) < LEVEL, p_values


@pytest.mark.slow
def test_negative_control_an_expanding_tree_that_keeps_only_its_best_first_drafts_is_detected(small_pair,
                                                                                            monkeypatch):
    # EAGLE-2's reranking in small: of the root's children only the one the draft finds more likely stays (the
    # one given children). Which sibling is proposed then depends on its own value, which the rule cannot correct.
    def reranked(*args):
        tree = expand(*args)
        has_children = tree.children[:, 1:, 0] >= 0  # (B, N)
        return trees.prune(tree, has_children | (tree.depths > 1))

    expand = trees.expand
    monkeypatch.setattr(trees, "expand", reranked)
    p_values = tree_p_values(*small_pair, ExpandingTree(2, 2), seed=21, temperature=1.0)
    assert min(p_values) < LEVEL, p_values


@pytest.mark.parametrize("options, message", [
    (dict(coupled=True, seed=1, temperature=1.0), "coupled=True drafts chains only: draft chains, or leave coupled"),
    (dict(rule=chen), "chen's rule tests a chain of drafts, not a token tree: use recursive_rejection"),
    (dict(lookahead=(0, 2)), "a tree's shape is its widths per depth, integers from 1 to 64 such as (3, 2), got (0, "),
    (dict(lookahead=()), "a tree's shape is its widths per depth, integers from 1 to 64 such as (3, 2), got ()"),
    (dict(lookahead=(8, 8, 8)), "the tree 8x8x8 has 584 nodes, more than 64: lower its widths or its depth"),
    (dict(draft=PromptLookupDrafter()), "lookahead=(2, 2) drafts a token tree, which a draft model grows"),
    (dict(lookahead=ExpandingTree(2, 3), draft=PromptLookupDrafter()),  # named as given, not as its nodes per level
     "lookahead=ExpandingTree(depth=2, width=3, expand=1) drafts a token tree, which a draft model grows"),
    (dict(lookahead=ExpandingTree(2, 2), coupled=True, seed=1, temperature=1.0),
     "lookahead=ExpandingTree(depth=2, width=2, expand=1) drafts token trees and coupled=True drafts chains only"),
])
def test_what_trees_do_not_take_is_refused_in_one_line(models, options, message):
    target, drafts = models
    options = {"lookahead": (2, 2), "draft": drafts["a noisy copy"], **options}
    with pytest.raises(ValueError) as error:
        speculative_sample(target, options.pop("draft"), [1, 2, 3], 5, **options)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_traced_tree_round_shows_its_nodes_and_the_kept_path(models, temperature):
    target, drafts = models
    out = speculative_sample(target, drafts["a noisy copy"], [5, 6, 7], 20, lookahead=(3, 2), trace=True,
                             temperature=temperature, generator=torch.Generator().manual_seed(0))
    assert len(out.trace) == len(out.rounds)
    for traced, round in zip(out.trace, out.rounds):
        assert traced.kept == round.kept == len(traced.path)
        for depth, node in enumerate(traced.path):  # each kept node hangs from the one before, the first from the root
            assert traced.parents[node] == (traced.path[depth - 1] if depth else -1)
            assert traced.tested[node] is not None
        tried = [i for i, t in enumerate(traced.tested) if t is not None]
        assert set(traced.path) <= set(tried) and (temperature == 0) == (traced.r is None)
        assert all(0 <= t <= 1 for t in traced.acceptance_probabilities if t is not None)
    page = trace_page(out, load_tokenizer(), [5, 6, 7])
    assert page.count('<details class="round"') == len(out.rounds) and "(a tree, 3 first drafts)" in page
    # The page counts acceptance as the command line does: over the trees' levels, the drafts scored beside it.
    levels, scored = sum(r.lookahead for r in out.rounds), sum(len(t.drafts) for t in out.trace)
    assert (f"{out.accepted} drafts kept over their trees' {levels} levels (acceptance {out.accepted / levels:.2f}; "
            f"{scored} drafts scored)") in page
    bonus = any(o == "bonus" for o in map(str, out.origins))
    assert ("the kept path reached a leaf of the tree" in page) == bonus and "all drafts kept" not in page
