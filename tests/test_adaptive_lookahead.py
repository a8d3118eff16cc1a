"""AdaptiveLookahead: close to the best fixed K without knowing it, and it follows the acceptance rate."""

import copy

import pytest
import torch

from benchmarks.adaptive_lookahead import XL_SMALL_FP32, compare
from speculative_gpt2.random_checkpoint import noisy_copy, random_model
from gpt2_model import GPT2, GPT2Config
from speculative_gpt2.int8 import quantize_int8
from speculative_gpt2.packing import pack_linears
from speculative_gpt2.report import cost_ratio
from speculative_gpt2.lookahead import (AdaptiveLookahead, Round, break_even_alpha, estimated_alpha, expected_tokens_per_round,
                                         interpolate, predicted_speedup)
from speculative import autoregressive_sample, speculative_sample

# A cost model where verification is nearly free (memory-bound, as on a GPU or a bf16-native CPU).
FLAT = {"target_ms": 190.0, "draft_ms": 18.0, "verify_ms": {"2": 192.0, "5": 206.0, "9": 215.0, "13": 225.0}}


@pytest.mark.parametrize("costs", [XL_SMALL_FP32, FLAT], ids=["xl-small-fp32", "memory-bound"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0])
def test_auto_is_within_5_percent_of_the_best_fixed_K(alpha, costs):
    result = compare(alpha, costs, seed=1)
    assert result["ratio"] >= 0.95, result


def test_expected_tokens_per_round():
    assert expected_tokens_per_round(0.0, 4) == 1.0
    assert expected_tokens_per_round(1.0, 4) == 5.0
    assert expected_tokens_per_round(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_interpolation_between_and_beyond_the_points():
    points = {2: 10.0, 4: 20.0, 8: 24.0}
    assert interpolate(points, 3) == 15.0 and interpolate(points, 6) == 22.0 and interpolate(points, 4) == 20.0
    assert interpolate(points, 1) == 10.0 and interpolate(points, 12) == 24.0  # flat beyond: optimistic
    assert interpolate(points, 12, extend_slope=True) == 28.0 and interpolate(points, 1, extend_slope=True) == 5.0


def test_policy_follows_the_evidence():
    policy = AdaptiveLookahead()
    assert policy.choose() == 4  # nothing measured yet
    for _ in range(20):
        policy.update(Round(4, 0, draft_ms=40.0, verify_ms=200.0))  # every draft rejected
    assert policy.alpha < 0.1 and policy.choose() == 1
    for _ in range(40):
        K = policy.choose()
        policy.update(Round(K, K, draft_ms=10.0 * K, verify_ms=200.0))  # every draft kept, verification flat
    assert policy.alpha > 0.9 and policy.choose() == policy.max_lookahead


class PassCostClock:
    """A virtual clock driven by the models' forward passes: a draft pass costs 10 ms, a target pass over T tokens
    100 + 5 T ms; a drafter that is no model (None: prompt lookup) costs nothing. With it the choice of K depends
    only on the acceptance observed, not on the machine."""

    def __init__(self, target, draft=None):
        self.now = 0.0
        if draft is not None:
            draft.register_forward_hook(lambda module, args, output: self._advance(10.0))
        target.register_forward_hook(lambda module, args, output: self._advance(100.0 + 5.0 * args[0].shape[1]))

    def _advance(self, ms):
        self.now += ms

    def mark(self):
        return self.now

    def ms(self, start, end):
        return end - start


def test_auto_on_real_models_adapts_and_stays_exact():
    config = GPT2Config(vocab_size=1000, n_positions=160, n_embd=64, n_layer=2, n_head=4)
    target = random_model(config, seed=0, scale=5)
    expected = autoregressive_sample(target, [5, 6, 7], 120).tokens
    runs = {}
    for name, draft in (("itself", random_model(config, seed=0, scale=5)),
                        ("unrelated", random_model(config, seed=1, scale=5)),
                        ("noisy", noisy_copy(target, 0.08, seed=2))):
        target_copy = random_model(config, seed=0, scale=5)  # hooks of its own for each run
        runs[name] = speculative_sample(target_copy, draft, [5, 6, 7], 120, lookahead=AdaptiveLookahead(),
                                        clock=PassCostClock(target_copy, draft))
        assert runs[name].tokens == expected, name

    def mean_K(out):
        return sum(out.lookahead_per_round) / len(out.lookahead_per_round)

    assert mean_K(runs["itself"]) > 6 > 2 > mean_K(runs["unrelated"])
    assert all(r.draft_ms == 10.0 * r.lookahead for r in runs["noisy"].rounds)  # the injected clock was used


class BadPolicy:
    def choose(self):
        return 0

    def update(self, round):
        pass


def test_a_policy_that_chooses_a_bad_K_is_named():
    model = random_model(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2), seed=0)
    with pytest.raises(ValueError, match="the lookahead policy chose K=0: it must choose an integer >= 1"):
        speculative_sample(model, model, [1, 2], 5, lookahead=BadPolicy())


@pytest.mark.parametrize("K, draft, verify", [(1, 10, 120), (4, 10, 130), (4, 40, 150), (8, 5, 110), (2, 0, 100)])
def test_break_even_alpha_is_where_the_predicted_speedup_crosses_one(K, draft, verify):
    b = break_even_alpha(K, draft, verify, t_target=100)
    if b is None:
        assert predicted_speedup(1.0, K, draft, verify, 100) < 1
    elif b == 0.0:
        assert predicted_speedup(0.0, K, draft, verify, 100) >= 1
    else:
        assert predicted_speedup(b - 1e-6, K, draft, verify, 100) < 1 <= predicted_speedup(b + 1e-6, K, draft, verify, 100)


def test_break_even_alpha_edges():
    assert break_even_alpha(4, 100, 500, t_target=100) is None  # a round costs 9 plain passes; at most 5 tokens
    assert break_even_alpha(4, 0, 90, t_target=100) == 0.0  # verification cheaper than one plain pass
    assert estimated_alpha(0, 5) == 0.0 and estimated_alpha(6, 2) == 0.75 and estimated_alpha(4, 0) == 1.0


def test_the_cost_ratio_is_what_a_pass_reads_packed_or_not():
    # c for gpt2-xl / gpt2 is 0.08 (the bytes their passes read); packing or int8 must not change what it counts.
    with torch.device("meta"):
        xl, small = GPT2(GPT2Config.from_name("gpt2-xl")), GPT2(GPT2Config.from_name("gpt2"))
    assert cost_ratio(xl, small) == pytest.approx(0.0792, abs=5e-4)
    torch.manual_seed(0)
    target = GPT2(GPT2Config(n_layer=4, n_head=2, n_embd=64, vocab_size=97, n_positions=32)).eval()
    draft = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=64, vocab_size=97, n_positions=32)).eval()
    plain = cost_ratio(target, draft)
    assert 0.1 < plain < 0.5
    assert cost_ratio(pack_linears(copy.deepcopy(target)), pack_linears(copy.deepcopy(draft))) == pytest.approx(plain)
    assert cost_ratio(target, pack_linears(copy.deepcopy(draft))) == pytest.approx(plain)
    # int8 weights read a quarter of float32's bytes (plus the scales): the draft costs about a quarter as much.
    assert cost_ratio(target, quantize_int8(copy.deepcopy(draft))) == pytest.approx(plain / 4, rel=0.1)
