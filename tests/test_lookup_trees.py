"""Prompt lookup's token trees (speculative_gpt2/drafters.py, `PromptLookupDrafter(matches=...)`): what followed
several earlier occurrences of the last tokens, merged into a trie, verified in one target pass and decided by the
tree rule (exact for one-hot p by enumeration in test_acceptance_rules.py).

Here: the trie holds each continuation once and in order, greedy text is the target's for ragged batches, samples
follow the target's distribution (chi-square at level 1e-3, with a negative control: a rule that forgets the
siblings it rejected), the replay benchmark's counts are a greedy call's, and what lookup trees do not take is
refused in one line. Exact mode: test_exact_trees.py."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2_model import GPT2Config
from speculative import autoregressive_sample, speculative_sample
from speculative_gpt2 import rules
from speculative_gpt2.drafters import PromptLookupDrafter, Sampling, TreeProposal, one_hot
from speculative_gpt2.random_checkpoint import random_model
from speculative_gpt2.records import Origin, TraceRound
from speculative_gpt2.rules import chen
from test_speculative import (LEVEL, batched_first_two_counts, chi_square_p_value, exact_first_two,  # noqa: F401
                             small_pair)

CONFIG = GPT2Config(vocab_size=64, n_positions=128, n_embd=32, n_layer=2, n_head=2)


def proposal_for(history: list[int], K: int, **options):
    drafter = PromptLookupDrafter(**options)
    drafter.start(torch.tensor(history), 128, Sampling(lambda x: x, None, 64))
    return drafter.propose(torch.tensor(history), K)


def test_the_trie_holds_each_continuation_once_latest_longest_match_first():
    # "5 1" occurred three times, followed by 2 9 5 (latest), 3 5 1, and 2 5 1: the first and last share "2".
    history = [5, 1, 2, 5, 1, 3, 5, 1, 2, 9, 5, 1]
    tree = proposal_for(history, 3, matches=3)
    assert tree.tokens.tolist() == [2, 9, 5, 3, 5, 1, 5, 1]
    assert tree.parents == [-1, 0, 1, -1, 3, 4, 0, 6]
    assert torch.equal(tree.p, one_hot(tree.tokens, 64))
    assert "3 continuations" in tree.source
    chain = proposal_for(history, 3)  # one match: the chain of before, no parents
    assert chain.tokens.tolist() == [2, 9, 5] and len(chain) == 3
    two = proposal_for(history, 3, matches=2)
    assert two.tokens.tolist() == [2, 9, 5, 3, 5, 1] and two.parents == [-1, 0, 1, -1, 3, 4]


def test_shorter_matches_fill_the_tree_when_the_longest_has_too_few():
    # "7 1" occurred once (followed by 4); "1" also occurred before 8: the 1-gram's continuation joins the tree.
    tree = proposal_for([1, 8, 7, 1, 4, 7, 1], 2, matches=2)
    assert tree.tokens.tolist() == [4, 7, 8, 7] and tree.parents == [-1, 0, -1, 2]
    assert "2/1-gram" in tree.source
    assert proposal_for([1, 2, 3], 2, matches=4).tokens.numel() == 0  # no match: nothing


@pytest.fixture(scope="module")
def looping():
    return random_model(CONFIG, seed=0)


PROMPTS = [[5, 1, 2, 5, 1, 3, 5, 1], [9, 9, 4, 9, 7, 9], list(range(10, 30)) + list(range(10, 20)), [42]]


class Spy(PromptLookupDrafter):
    """Records the widest root of the trees it proposes."""

    widest = 0

    def propose(self, tokens, lookahead):
        proposal = super().propose(tokens, lookahead)
        if isinstance(proposal, TreeProposal):
            Spy.widest = max(Spy.widest, proposal.parents.count(-1))
        return proposal


@pytest.mark.parametrize("matches, K", [(2, 2), (3, 4), (4, 1)])
def test_greedy_lookup_tree_text_is_the_targets(looping, matches, K):
    Spy.widest = 0
    outs = speculative_sample(looping, Spy(matches=matches), PROMPTS, 24, lookahead=K)
    assert [out.tokens for out in outs] == [autoregressive_sample(looping, p, 24).tokens for p in PROMPTS]
    assert Spy.widest >= 2  # real trees were verified, not only chains
    alone = speculative_sample(looping, PromptLookupDrafter(matches=matches), PROMPTS[0], 24, lookahead=K)
    assert alone.tokens == outs[0].tokens


@pytest.mark.parametrize("matches, K", [(1, 4), (3, 3)])
def test_the_replay_benchmark_counts_the_rounds_and_kept_drafts_a_greedy_call_makes(looping, matches, K):
    # benchmarks/lookup_replay.py stands a text in for the target: replaying the target's own greedy text must give
    # the call's own rounds, or its figures for real text say nothing.
    from benchmarks.lookup_replay import replay

    prompt = PROMPTS[0]
    out = speculative_sample(looping, PromptLookupDrafter(matches=matches), prompt, 40, lookahead=K)
    counts = replay(prompt, out.tokens, PromptLookupDrafter(matches=matches), K)
    assert counts == {"passes": len(out.rounds), "tokens": 40, "drafts_verified": sum(r.nodes for r in out.rounds)}
    assert sum(r.kept for r in out.rounds) > len(out.rounds)  # the lookup found the loop: drafts were kept


@settings(max_examples=40, deadline=None, derandomize=True)
@given(text=st.lists(st.integers(0, 5), min_size=2, max_size=60), K=st.integers(1, 5))
def test_the_replay_bound_keeps_at_every_position_what_every_lookup_tree_keeps(text, K):
    # The trie of every earlier continuation, the bound the docs cite: at every place of any text (a small vocabulary
    # repeats itself), one round of it keeps at least what prompt lookup keeps there with any number of matches, and
    # it is a valid tree (each parent an earlier node).
    from benchmarks.lookup_replay import EveryContinuation

    def kept(drafter, history, following):
        drafter.start(torch.tensor(history), len(history) + K, Sampling(None, None, 50257, greedy=True))
        proposal = drafter.propose(None, K)
        tokens = proposal.tokens.tolist()
        parents = getattr(proposal, "parents", None) or list(range(-1, len(tokens) - 1))
        assert all(-1 <= parent < i for i, parent in enumerate(parents))  # parents before children, as proposed
        count, at = 0, -1
        while count < len(following):  # down the tree while a child holds the text's next token
            at = next((i for i, parent in enumerate(parents) if parent == at and tokens[i] == following[count]), None)
            if at is None:
                break
            count += 1
        return count

    for x in range(1, len(text)):
        history, following = text[:x], text[x : x + K]
        bound = kept(EveryContinuation(), history, following)
        assert all(bound >= kept(PromptLookupDrafter(matches=m), history, following) for m in (1, 2, 4, 16))


LOOKUP_PROMPTS = [[1, 2, 1, 3, 1, 4, 1], [6, 5, 6, 7, 6], [3]]  # the last token followed by 3, 2 and 0 others


def lookup_p_values(target, seed: int, **options) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    drafter = PromptLookupDrafter(matches=3)
    counts = batched_first_two_counts(
        lambda batch: speculative_sample(target, drafter, batch, 3, lookahead=2, generator=generator, **options),
        LOOKUP_PROMPTS, target.config.vocab_size)
    return [chi_square_p_value(counts[b], exact_first_two(target, p, **options)) for b, p in enumerate(LOOKUP_PROMPTS)]


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(temperature=1.0), dict(temperature=0.8, top_k=4)])
def test_lookup_tree_samples_follow_the_target_distribution(small_pair, options):
    target, _ = small_pair  # a vocabulary of 8, far from uniform
    p_values = lookup_p_values(target, seed=5, **options)
    assert min(p_values) > LEVEL, p_values


@pytest.mark.slow
def test_negative_control_a_rule_that_forgets_rejected_siblings_is_detected(small_pair, monkeypatch):
    target, _ = small_pair
    monkeypatch.setattr(rules, "residual", lambda q, p: q)  # a rejected child stays as likely as before
    p_values = lookup_p_values(target, seed=5, temperature=1.0)
    assert min(p_values) < LEVEL, p_values


class Planted:
    """A drafter proposing fixed drafts with the given parents (`fit`: only the levels K allows)."""

    def __init__(self, tokens, parents, nodes=8, fit=False):
        self.tokens, self.parents, self.most, self.fit = tokens, parents, nodes, fit

    def nodes(self, lookahead):
        return self.most

    def start(self, prompt, max_len, sampling):
        self.V = sampling.vocab_size

    def propose(self, tokens, lookahead):
        depths = []
        for parent in self.parents if self.fit else []:
            depths.append(1 if parent < 0 else depths[parent] + 1)
        keep = [i for i, d in enumerate(depths) if d <= lookahead] if self.fit else range(len(self.tokens))
        x = torch.tensor([self.tokens[i] for i in keep])
        return TreeProposal(x, one_hot(x, self.V), None, [self.parents[i] for i in keep])

    def commit(self, new):
        pass


@pytest.mark.parametrize("options, message", [
    (dict(coupled=True, seed=1, temperature=1.0), "drafts token trees and coupled=True drafts chains only"),
    (dict(lookahead=8, draft=PromptLookupDrafter(matches=9)), "the drafter PromptLookupDrafter proposes up to 72 "
     "drafts a round with K=8, more than 64: lower K, or the width of its trees"),
    (dict(rule=chen), "chen's rule tests a chain of drafts, not a token tree: use recursive_rejection"),
    (dict(draft=Planted([1, 2], [-1, 1])), "proposed the parents [-1, 1] for 2 drafts: give each draft's parent"),
    (dict(draft=Planted([1, 2, 3], [-1, 0, 1])), "at most K=2 levels deep"),
    (dict(draft=Planted([1, 2, 3], [-1, -1, -1], nodes=2)), "propose a 1-D long tensor of at most 2 tokens"),
])
def test_what_lookup_trees_do_not_take_is_refused_in_one_line(looping, options, message):
    options = {"lookahead": 2, "draft": PromptLookupDrafter(matches=2), **options}
    with pytest.raises(ValueError) as error:
        speculative_sample(looping, options.pop("draft"), [1, 2, 1, 3, 1], 5, **options)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_drafters_own_tree_is_verified_and_its_text_is_the_targets(looping):
    prompt = [4, 4, 4]
    planted = Planted([7, 3, 9], [-1, -1, 1], fit=True)  # the root's children 7 and 3, and 9 below 3
    out = speculative_sample(looping, planted, prompt, 10, lookahead=2)
    assert out.tokens == autoregressive_sample(looping, prompt, 10).tokens


def test_matches_out_of_range_are_refused():
    for matches in (0, 17, 2.5):
        with pytest.raises(ValueError, match="matches"):
            PromptLookupDrafter(matches=matches)


def test_a_tree_from_a_drafter_that_does_not_count_its_nodes_is_refused(looping):
    class Uncounted(Planted):
        nodes = None  # no nodes(K): the sampler would take its proposals for chains

    with pytest.raises(ValueError, match=r"the drafter Uncounted proposed a token tree but does not say how many "
                                         r"drafts its trees hold: give it a method nodes\(K\)"):
        speculative_sample(looping, Uncounted([7, 3, 9], [-1, -1, 1], fit=True), [4, 4, 4], 6, lookahead=3)


def test_the_generation_names_a_bonus_after_a_short_branchs_kept_leaf(looping):
    # The target's greedy tokens a, b, c: the root's children a (no children: a branch of depth 1) and a wrong token
    # with a child (the round's depth 2). a is kept and has no children, so b is drawn from q after it: a bonus.
    prompt = [4, 4, 4]
    a, b, c = autoregressive_sample(looping, prompt, 3).tokens
    wrong = min({0, 1, 2} - {a, b})
    out = speculative_sample(looping, Planted([a, wrong, b], [-1, -1, 1], fit=True), prompt, 3, lookahead=2)
    assert out.tokens == [a, b, c] and out.accepted_per_round[0] == 1
    assert out.origins[:2] == [Origin.DRAFT, Origin.BONUS]
    chain = speculative_sample(looping, Planted([a, wrong], [-1, 0], fit=True), prompt, 3, lookahead=2)
    assert chain.origins[:2] == [Origin.DRAFT, Origin.RESAMPLED]  # a's child rejected: b replaces it


def test_the_trace_names_a_bonus_after_a_kept_leaf_and_a_resample_after_rejected_children():
    def traced(path):
        return TraceRound(drafts=[7, 3, 9], p=[1.0] * 3, q=[0.5] * 3, r=None, kept=len(path), next_token=1,
                          next_probability=1.0, draft_ms=0.0, verify_ms=0.0, parents=[-1, -1, 1], path=path,
                          tested=[1.0, 1.0, 1.0])

    assert traced([0]).next_origin == Origin.BONUS  # 7 has no children: the next token is drawn from q
    assert traced([1]).next_origin == Origin.RESAMPLED  # 3's child 9 was rejected
    assert traced([1, 2]).next_origin == Origin.BONUS
    assert traced([]).next_origin == Origin.RESAMPLED
