"""Property-based tests (hypothesis, derandomized and bounded): for random tiny models, prompts, lookaheads and EOS
ids, greedy speculative output equals the target's, and a Generation's counters always add up."""

from functools import lru_cache

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from speculative_gpt2.random_checkpoint import noisy_copy, random_model
from gpt2_model import GPT2Config
from speculative_gpt2.lookahead import AdaptiveLookahead
from speculative import Origin, autoregressive_sample, speculative_sample

VOCAB = 40
BOUNDED = settings(max_examples=40, deadline=None, derandomize=True)


@lru_cache(maxsize=None)
def model(n_layer: int, seed: int, kind: str = "random"):
    """A tiny target (seed 0) or draft: the target itself, an unrelated model, or a noisy copy of the target."""
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=n_layer, n_head=2)
    target = random_model(config, seed=0, scale=5)  # peaked logits: no near-ties for greedy choices
    if kind == "noisy":
        return noisy_copy(target, noise=0.1, seed=seed)
    return target if seed == 0 else random_model(config, seed=seed, scale=5)


cases = st.fixed_dictionaries({
    "n_layer": st.integers(1, 2),
    "draft": st.sampled_from([(0, "random"), (1, "random"), (2, "random"), (3, "noisy"), (4, "noisy")]),
    "prompt": st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8),
    "max_new_tokens": st.integers(1, 24),
    "lookahead": st.one_of(st.integers(1, 7), st.just("auto")),
    "eos": st.one_of(st.none(), st.integers(0, VOCAB - 1)),
})


def run(case, temperature=0.0, seed=0):
    target = model(case["n_layer"], 0)
    draft = model(case["n_layer"], *case["draft"])
    lookahead = AdaptiveLookahead() if case["lookahead"] == "auto" else case["lookahead"]
    return speculative_sample(target, draft, case["prompt"], case["max_new_tokens"], lookahead=lookahead,
                              eos_token_id=case["eos"], temperature=temperature,
                              generator=torch.Generator().manual_seed(seed))


@BOUNDED
@given(cases)
def test_greedy_speculative_output_is_the_targets(case):
    expected = autoregressive_sample(model(case["n_layer"], 0), case["prompt"], case["max_new_tokens"],
                                     eos_token_id=case["eos"]).tokens
    assert run(case).tokens == expected


@BOUNDED
@given(cases, st.sampled_from([0.0, 1.0]), st.integers(0, 3))
def test_generation_counters_add_up(case, temperature, seed):
    out = run(case, temperature, seed)
    tokens, origins, rounds = out.tokens, out.origins, out.rounds
    # Length: exactly max_new_tokens, or up to and including the first EOS.
    if case["eos"] in tokens:
        assert tokens.index(case["eos"]) == len(tokens) - 1
    else:
        assert len(tokens) == case["max_new_tokens"]
    assert len(origins) == len(tokens) and out.target_calls == len(rounds)
    # Each round commits its kept drafts and at most one resampled, bonus or target token, in that order.
    position = 0
    for r in rounds:
        assert 0 <= r.kept <= r.lookahead
        committed = origins[position : position + r.kept + 1]
        assert committed[: r.kept] == [Origin.DRAFT] * r.kept
        if len(committed) > r.kept:  # the round's last token was not cut off by an EOS among the drafts
            last = committed[r.kept]
            assert last == (Origin.TARGET if r.lookahead == 0 else Origin.BONUS if r.kept == r.lookahead
                            else Origin.RESAMPLED)
        position += len(committed)
    assert position == len(tokens)
    assert origins.count(Origin.DRAFT) == out.accepted == sum(r.kept for r in rounds)
    assert out.proposed == sum(r.lookahead for r in rounds) <= out.draft_calls
    if case["eos"] not in tokens:
        assert out.proposed == out.draft_calls  # nothing drafted was dropped
    assert all(r.draft_ms >= 0 and r.verify_ms >= 0 for r in rounds)
