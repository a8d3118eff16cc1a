"""Drafters (speculative_gpt2/drafters.py): any proposer drafts exactly; prompt lookup finds, copies and commits.

Notation as in speculative.py: q is the target's distribution, p the draft's.
"""

import os
import runpy
import subprocess
import sys
from functools import lru_cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2_model import GPT2Config
from speculative import ModelDrafter, Origin, autoregressive_sample, speculative_sample
from speculative_gpt2 import rules
from speculative_gpt2.drafters import PromptLookupDrafter, Proposal, Sampling, one_hot
from speculative_gpt2.lookahead import AdaptiveLookahead
from speculative_gpt2.random_checkpoint import random_model
from test_adaptive_lookahead import PassCostClock
from test_speculative import LEVEL, SMALL, chi_square_p_value, exact_first_two

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 40
BOUNDED = settings(max_examples=15, deadline=None, derandomize=True)


def lookup_on(history, max_ngram=3, min_ngram=1, K=4):
    """What a fresh lookup drafter proposes after `history`, and where it says it copied from."""
    drafter = PromptLookupDrafter(max_ngram, min_ngram)
    drafter.start(torch.tensor(history[:1]), 64, Sampling(None, None, VOCAB))
    drafter.commit(history[1:])  # committing in pieces or at once must not matter
    proposal = drafter.propose(torch.tensor(history), K)
    return proposal.tokens.tolist(), proposal.source


# 1. The lookup itself ---------------------------------------------------------------------------------------


def test_lookup_copies_what_followed_the_most_recent_earlier_match():
    assert lookup_on([1, 2, 3, 9, 1, 2, 3, 8, 5, 1, 2, 3]) == ([8, 5, 1, 2], "lookup: copied from position 7 of "
                                                                            "prompt + output (3-gram match)")
    # The longest n first: the 3-gram (4, 1, 2) beats the later 2-gram (1, 2).
    assert lookup_on([4, 1, 2, 7, 0, 1, 2, 6, 4, 1, 2])[0] == [7, 0, 1, 2]
    assert lookup_on([4, 1, 2, 7, 0, 1, 2, 6, 4, 1, 2], max_ngram=2)[0] == [6, 4, 1, 2]


def test_lookup_copies_forward_into_what_it_proposes():
    # In a loop of period 2 the latest match is 2 tokens back: the copy runs on into its own proposals, as LZ77 does.
    assert lookup_on([5, 6, 7, 6, 7], K=5)[0] == [6, 7, 6, 7, 6]
    assert lookup_on([5, 9, 9], K=3)[0] == [9, 9, 9]


def test_lookup_without_a_match_proposes_nothing():
    assert lookup_on([1, 2, 3, 4]) == ([], "lookup: no match, nothing drafted")
    assert lookup_on([1, 2, 3, 1, 2], min_ngram=3)[0] == []  # only a 2-gram repeats
    assert lookup_on([7])[0] == []


def test_lookup_p_is_one_hot_on_the_device_of_the_prompt():
    drafter = PromptLookupDrafter(2, 1)
    drafter.start(torch.tensor([3, 4, 3]), 16, Sampling(None, None, VOCAB))
    tokens, p, _ = drafter.propose(torch.tensor([3, 4, 3]), 3)
    assert tokens.tolist() == [4, 3, 4] and torch.equal(p, one_hot(tokens, VOCAB)) and p.dtype == torch.float32


@pytest.mark.parametrize("sizes, message", [((2, 0), "min_ngram must be an integer from 1 to 2, got 0"),
                                            ((1, 2), "min_ngram must be an integer from 1 to 1, got 2")])
def test_bad_ngram_sizes(sizes, message):
    with pytest.raises(ValueError, match=message):
        PromptLookupDrafter(*sizes)


# 2. Exactness with any drafter: greedy equality over random models, prompts and K --------------------------------


@lru_cache(maxsize=None)
def tiny_target(n_layer: int, scale: float):
    """Scale 5: peaked logits, greedy text that wanders; scale 1: greedy text that soon loops (lookup hits)."""
    return random_model(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=n_layer, n_head=2), 0, scale)


class SeededGuesser:
    """A custom deterministic drafter: up to K tokens from a seeded generator, a different number every round."""

    def __init__(self, seed: int):
        self.seed = seed

    def start(self, prompt, max_len, sampling):
        self.vocab_size, self.generator = sampling.vocab_size, torch.Generator().manual_seed(self.seed)

    def propose(self, tokens, lookahead):
        k = int(torch.randint(0, lookahead + 1, (1,), generator=self.generator))
        drafts = torch.randint(0, self.vocab_size, (k,), generator=self.generator)
        return Proposal(drafts, one_hot(drafts, self.vocab_size))

    def commit(self, new):
        pass


cases = st.fixed_dictionaries({
    "n_layer": st.integers(1, 2),
    "scale": st.sampled_from([1.0, 5.0]),
    "prompt": st.lists(st.integers(0, 5), min_size=1, max_size=10),  # few distinct ids: prompts that repeat
    "max_new_tokens": st.integers(1, 24),
    "lookahead": st.one_of(st.integers(1, 7), st.just("auto")),
    "ngram": st.sampled_from([(1, 1), (2, 1), (3, 1), (3, 2), (4, 4)]),
    "eos": st.one_of(st.none(), st.integers(0, VOCAB - 1)),
})


def check_greedy_and_counters(case, drafter):
    target = tiny_target(case["n_layer"], case["scale"])
    lookahead = AdaptiveLookahead() if case["lookahead"] == "auto" else case["lookahead"]
    out = speculative_sample(target, drafter, case["prompt"], case["max_new_tokens"], lookahead=lookahead,
                             eos_token_id=case["eos"])
    assert out.tokens == autoregressive_sample(target, case["prompt"], case["max_new_tokens"],
                                               eos_token_id=case["eos"]).tokens
    # A round that proposed nothing is one plain target step; draft_calls counts the tokens proposed.
    assert len(out.origins) == len(out.tokens) and out.target_calls == len(out.rounds)
    plain = [r for r in out.rounds if r.lookahead == 0]
    assert out.origins.count(Origin.TARGET) == len(plain)
    assert out.origins.count(Origin.DRAFT) == out.accepted and out.proposed <= out.draft_calls
    if case["eos"] not in out.tokens:
        assert out.proposed == out.draft_calls
    return out


@BOUNDED
@given(cases)
def test_greedy_output_with_the_lookup_drafter_is_the_targets(case):
    check_greedy_and_counters(case, PromptLookupDrafter(*case["ngram"]))


@BOUNDED
@given(cases, st.integers(0, 3))
def test_greedy_output_with_a_custom_deterministic_drafter_is_the_targets(case, seed):
    check_greedy_and_counters(case, SeededGuesser(seed))


def test_lookup_drafts_are_kept_where_the_target_loops():
    # scale 1: greedy text runs one token for a while, then another: the lookup predicts most of it.
    target = tiny_target(2, 1.0)
    out = speculative_sample(target, PromptLookupDrafter(), [1, 2, 3], 48, lookahead=4)
    assert out.tokens == autoregressive_sample(target, [1, 2, 3], 48).tokens
    assert out.acceptance_rate > 0.5 and out.tokens_per_target_call > 2.5, (out.acceptance_rate, out.target_calls)


def test_scaled_residuals_are_the_seeds_weights_with_gpt2s_residual_scaling():
    # The benchmark's looping target (random_checkpoint --scaled-residuals, docs/bench-drafters.md): the same seed's
    # weights, with only the projections into the residual stream divided by sqrt(2 * n_layer).
    config = GPT2Config(n_positions=32, n_embd=32, n_layer=3, n_head=2)
    plain = random_model(config, seed=0).state_dict()
    scaled = random_model(config, seed=0, scaled_residuals=True).state_dict()
    assert sum(name.endswith("c_proj.weight") for name in plain) == 2 * config.n_layer
    for name, tensor in plain.items():
        expected = tensor / 6 ** 0.5 if name.endswith("c_proj.weight") else tensor
        torch.testing.assert_close(scaled[name], expected, rtol=1e-6, atol=0)


def test_adaptive_lookahead_learns_that_lookup_drafts_cost_nearly_nothing():
    target = tiny_target(2, 1.0)
    policy = AdaptiveLookahead(max_lookahead=12)
    out = speculative_sample(target, PromptLookupDrafter(), [1, 2, 3], 60, lookahead=policy,
                             clock=PassCostClock(target))
    assert out.tokens == autoregressive_sample(target, [1, 2, 3], 60).tokens
    assert policy.draft_ms == 0.0 and min(policy.verify_ms.values()) >= 100.0, (policy.draft_ms, policy.verify_ms)
    assert max(out.lookahead_per_round) > 4  # drafts kept and free: K grows past its first 4


# 3. Distribution: temperature > 0 with a one-hot proposer -----------------------------------------------------


class AlwaysTheSame:
    """Proposes the same K tokens every round, p one-hot: kept with probability q(x), else replaced from q
    without x."""

    def __init__(self, tokens):
        self.tokens = tokens

    def start(self, prompt, max_len, sampling):
        self.vocab_size = sampling.vocab_size

    def propose(self, tokens, lookahead):
        drafts = torch.tensor(self.tokens[:lookahead])
        return Proposal(drafts, one_hot(drafts, self.vocab_size))

    def commit(self, new):
        pass


@pytest.fixture(scope="module")
def small_target():
    return random_model(SMALL, seed=0, scale=20)


def one_hot_counts(target, seed, samples=1000, **options):
    """Counts of the first two new tokens (x1, x2), (V, V), over `samples` calls that propose x1, x2 = 1, 2."""
    counts = torch.zeros(SMALL.vocab_size, SMALL.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(samples):
        x1, x2 = speculative_sample(target, AlwaysTheSame([1, 2]), [3], 3, lookahead=2, generator=generator,
                                    **options).tokens[:2]
        counts[x1, x2] += 1
    return counts


@pytest.mark.parametrize("options", [dict(temperature=1.0), dict(temperature=0.7, top_k=4)])
def test_one_hot_proposals_follow_the_target_distribution(small_target, options):
    # Exact P(x1, x2) by enumeration, against 1000 samples, chi-square at level 1e-3 (fixed seed); the negative
    # control below fails the same test with the same number of samples.
    expected = exact_first_two(small_target, [3], **options)
    assert 0.05 < expected[1].sum() < 0.95  # q(x1 = 1) = 0.71 at temperature 1: kept sometimes, rejected sometimes
    p_value = chi_square_p_value(one_hot_counts(small_target, seed=0, **options), expected)
    assert p_value > LEVEL, p_value


def test_negative_control_replacing_from_q_with_the_draft_still_in_it_is_detected(small_target, monkeypatch):
    # With a one-hot p, norm(max(0, q - p)) is q without x; replacing from q itself lets the rejected x come back,
    # so the output leans towards the proposed tokens, and the test above must notice.
    monkeypatch.setattr(rules, "residual", lambda q, p: q)
    expected = exact_first_two(small_target, [3], temperature=1.0)
    assert chi_square_p_value(one_hot_counts(small_target, seed=0, temperature=1.0), expected) < LEVEL


# 4. The interface's checks, and the model drafter --------------------------------------------------------------


def test_what_is_not_a_drafter_or_proposes_too_much_is_named():
    target = tiny_target(1, 5.0)
    with pytest.raises(ValueError, match="draft must be a GPT2 model or a drafter"):
        speculative_sample(target, "ngram", [1, 2], 4)
    with pytest.raises(ValueError, match="the drafter TooMany proposed \\[3\\] torch.int64 tokens for K=2"):
        speculative_sample(target, TooMany(), [1, 2], 4, lookahead=2)
    with pytest.raises(ValueError, match="the drafter WrongP.s p has shape"):
        speculative_sample(target, WrongP(), [1, 2], 4, lookahead=2)


class TooMany(AlwaysTheSame):
    def __init__(self):
        super().__init__([1, 2, 3])

    def propose(self, tokens, lookahead):
        drafts = torch.tensor(self.tokens)
        return Proposal(drafts, one_hot(drafts, self.vocab_size))


class WrongP(AlwaysTheSame):
    def __init__(self):
        super().__init__([1, 2])

    def propose(self, tokens, lookahead):
        drafts = torch.tensor(self.tokens[:lookahead])
        return Proposal(drafts, torch.ones(len(drafts), 7))


def test_a_gpt2_draft_and_its_model_drafter_give_the_same_run():
    target, draft = tiny_target(2, 5.0), random_model(tiny_target(2, 5.0).config, seed=3, scale=5)
    options = dict(temperature=1.0, lookahead=3)
    a = speculative_sample(target, draft, [1, 2, 3], 20, generator=torch.Generator().manual_seed(0), **options)
    b = speculative_sample(target, ModelDrafter(draft), [1, 2, 3], 20, generator=torch.Generator().manual_seed(0),
                           **options)
    assert a.tokens == b.tokens and a.accepted_per_round == b.accepted_per_round and a.draft_calls == b.draft_calls


def test_the_readme_example_runs(capsys):
    runpy.run_path(os.path.join(ROOT, "examples", "own_drafter.py"))  # it asserts its output is the target's
    assert "tokens per target pass" in capsys.readouterr().out


# 5. The command line: --draft ngram -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def looping_target(tmp_path_factory):
    """A tiny checkpoint with the real vocabulary whose greedy text soon repeats itself."""
    folder = tmp_path_factory.mktemp("looping")
    random_model(GPT2Config(n_positions=128, n_embd=32, n_layer=2, n_head=2), seed=0).save_pretrained(folder)
    return folder


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "speculative.py"), *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("lookahead", ["4", "auto"])
def test_cli_draft_ngram_reports_like_a_model_draft(looping_target, tmp_path, lookahead):
    trace = tmp_path / "run.html"
    result = run_cli("--target", str(looping_target), "--draft", "ngram", "--ngram-max", "2", "--max-new-tokens",
                     "40", "--ignore-eos", "--lookahead", lookahead, "--trace", str(trace), "--no-stream")
    assert result.returncode == 0, result.stderr
    summary = result.stdout.split("=== Summary ===", 1)[1]
    assert "draft: ngram, prompt lookup of n-grams 2 down to 1 (no draft model)" in summary
    assert "identical outputs: yes" in summary and "speedup over plain decoding: " in summary
    assert "acceptance rate: " in summary and "acceptance rate: n/a" not in summary
    assert "drafted tokens: " in summary and "by prompt lookup (n-grams 2 down to 1; no match in " in summary
    assert "ms a lookup" in summary and "Loading draft" not in result.stderr
    page = trace.read_text()
    assert "lookup: copied from position " in page and "of prompt + output" in page


def test_cli_help_lists_ngram_and_plain_mode_ignores_it(looping_target):
    help_text = run_cli("--help").stdout
    assert "ngram" in help_text and "--ngram-max" in help_text and "--ngram-min" in help_text
    result = run_cli("--target", str(looping_target), "--draft", "ngram", "--mode", "plain", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "draft" not in result.stdout.split("=== Summary ===", 1)[1]


@pytest.mark.parametrize("args, message", [(["--ngram-min", "3", "--ngram-max", "2"], "--ngram-min 3 is larger than "
                                            "--ngram-max 2"), (["--ngram-max", "0"], "argument --ngram-max")])
def test_cli_bad_ngram_sizes_exit_2_with_one_line(looping_target, args, message):
    result = run_cli("--target", str(looping_target), "--draft", "ngram", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
