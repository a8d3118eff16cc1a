"""lookahead="auto": close to the best fixed K without knowing it, and it follows the acceptance rate."""

import sys
from pathlib import Path

import pytest

from gpt2_model import GPT2Config
from helpers import noisy_copy, random_model
from speculative import AdaptiveLookahead, autoregressive_sample, expected_tokens_per_round, speculative_sample

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from adaptive_lookahead import XL_SMALL_FP32, compare  # noqa: E402

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


def test_policy_follows_the_evidence():
    policy = AdaptiveLookahead()
    assert policy.choose() == 4  # nothing measured yet
    for _ in range(20):
        policy.update(4, 0, draft_ms=40.0, verify_ms=200.0)  # every draft rejected
    assert policy.alpha < 0.1 and policy.choose() == 1
    for _ in range(40):
        K = policy.choose()
        policy.update(K, K, draft_ms=10.0 * K, verify_ms=200.0)  # every draft kept, verification flat
    assert policy.alpha > 0.9 and policy.choose() == policy.max_lookahead


def test_auto_on_real_models_adapts_and_stays_exact(monkeypatch):
    # Tiny models' pass times are noise; replace the measured times with a GPT-2-like cost model, so that the
    # choice of K depends only on the acceptance it observes: draft 10 ms a pass, verification 100 + 5 (K+1) ms.
    learn = AdaptiveLookahead.update
    monkeypatch.setattr(AdaptiveLookahead, "update",
                        lambda self, K, kept, draft_ms, verify_ms: learn(self, K, kept, 10.0 * K, 100 + 5.0 * (K + 1)))
    config = GPT2Config(vocab_size=1000, n_positions=160, n_embd=64, n_layer=2, n_head=4)
    target = random_model(config, seed=0, scale=5)
    expected = autoregressive_sample(target, [5, 6, 7], 120).tokens
    itself = speculative_sample(target, target, [5, 6, 7], 120, lookahead="auto")
    unrelated = speculative_sample(target, random_model(config, seed=1, scale=5), [5, 6, 7], 120, lookahead="auto")
    noisy = speculative_sample(target, noisy_copy(target, 0.08, seed=2), [5, 6, 7], 120, lookahead="auto")
    assert itself.tokens == unrelated.tokens == noisy.tokens == expected

    def mean_K(out):
        return sum(out.lookahead_per_round) / len(out.lookahead_per_round)

    assert mean_K(itself) > 6 > 2 > mean_K(unrelated)
