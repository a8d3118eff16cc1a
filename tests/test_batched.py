"""Batched decoding: several prompts of different lengths decoded together, each row exactly as if alone.

Greedy rows equal single-prompt plain decoding (float32; bit for bit against batched plain decoding in exact mode,
in bfloat16); sampled rows follow the target's distribution; EOS ends one row, never the others.
"""

import pytest
import torch
from hypothesis import Phase, given, settings, strategies as st

from gpt2_model import GPT2Config
from speculative import autoregressive_sample, speculative_sample
from speculative_gpt2 import rules
from speculative_gpt2.drafters import PromptLookupDrafter
from speculative_gpt2.random_checkpoint import noisy_copy, random_model
from test_speculative import LEVEL, batched_first_two_counts, chi_square_p_value, exact_first_two

CONFIG = GPT2Config(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4)
KINDS = ["itself", "unrelated", "noisy copy", "lookup"]


@pytest.fixture(scope="module")
def target():
    return random_model(CONFIG, seed=0, scale=5)  # scaled so that the greedy choices are not near-ties


@pytest.fixture(scope="module")
def drafts(target):
    return {"itself": target, "unrelated": random_model(CONFIG, seed=1, scale=5),
            "noisy copy": noisy_copy(target, noise=0.08, seed=2)}


def drafter(drafts, kind):
    return PromptLookupDrafter(3, 1) if kind == "lookup" else drafts[kind]


def alone(model, prompts, n, **options):
    """Each prompt decoded by itself: what every row of a batch must equal."""
    return [autoregressive_sample(model, p, n, **options).tokens for p in prompts]


batches = st.lists(st.lists(st.integers(0, CONFIG.vocab_size - 1), min_size=1, max_size=24), min_size=1,
                   max_size=5)


@settings(max_examples=20, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(prompts=batches, kind=st.sampled_from(KINDS), lookahead=st.sampled_from([1, 2, 4, "auto"]),
       max_new_tokens=st.integers(1, 30), eos_at=st.one_of(st.none(), st.integers(0, 29)))
def test_every_row_of_a_ragged_batch_is_its_prompt_decoded_alone(target, drafts, prompts, kind, lookahead,
                                                                 max_new_tokens, eos_at):
    # EOS: a token of the first row's own output, so that it ends that row early and others perhaps not at all.
    plain = alone(target, prompts[:1], max_new_tokens)[0]
    eos = None if eos_at is None else plain[min(eos_at, len(plain) - 1)]
    expected = alone(target, prompts, max_new_tokens, eos_token_id=eos)
    batched_plain = autoregressive_sample(target, prompts, max_new_tokens, eos_token_id=eos)
    assert [g.tokens for g in batched_plain] == expected
    batched = speculative_sample(target, drafter(drafts, kind), prompts, max_new_tokens, lookahead=lookahead,
                                 eos_token_id=eos)
    assert [g.tokens for g in batched] == expected
    for g in batched:  # each row's own statistics add up
        # Every round commits its kept drafts and one more token, unless a kept EOS ended it.
        assert len(g.tokens) == sum(r.kept for r in g.rounds) + len(g.rounds) - (g.origins[-1] == "draft")
        assert g.target_calls == len(g.rounds)


def test_a_row_that_ends_at_its_first_token_leaves_the_others_running(target, drafts):
    prompts = [[5, 6, 7], [11], list(range(40, 60))]
    first = alone(target, prompts, 1)[1][0]  # the second row's first token, used as its EOS
    expected = alone(target, prompts, 24, eos_token_id=first)
    assert expected[1] == [first] and max(len(e) for e in expected) > 1
    for draft in (drafts["noisy copy"], PromptLookupDrafter()):
        out = speculative_sample(target, draft, prompts, 24, lookahead=3, eos_token_id=first)
        assert [g.tokens for g in out] == expected
        assert out[1].target_calls == 1


def test_on_finished_reports_each_row_once_as_it_ends(target, drafts):
    prompts = [[1, 2], [3] * 9, [4, 5, 6]]
    eos = alone(target, prompts[:1], 6)[0][3]  # ends the first row after 4 tokens
    finished = []
    out = speculative_sample(target, drafts["noisy copy"], prompts, 20, eos_token_id=eos,
                             on_finished=lambda row, g: finished.append((row, g, g.seconds)))
    assert sorted(row for row, _, _ in finished) == [0, 1, 2]
    assert all(out[row] is g for row, g, _ in finished)
    assert [s for _, _, s in finished] == sorted(s for _, _, s in finished)  # seconds until each row ended
    assert finished[0][0] == 0 and out[0].seconds < max(g.seconds for g in out)
    single = []
    speculative_sample(target, drafts["noisy copy"], prompts[1], 5, on_finished=lambda row, g: single.append(row))
    assert single == [0]


def test_a_batch_of_one_is_the_single_prompt_call(target, drafts):
    # The same random stream: a batch of one row draws exactly what the single-prompt call draws.
    for draft in (drafts["noisy copy"], PromptLookupDrafter()):
        options = dict(temperature=1.0, lookahead=3, max_new_tokens=30)
        one = speculative_sample(target, draft, [9, 8, 7], generator=torch.Generator().manual_seed(4), **options)
        batch = speculative_sample(target, draft, [[9, 8, 7]], generator=torch.Generator().manual_seed(4), **options)
        assert isinstance(batch, list) and batch[0].tokens == one.tokens
        assert [(r.lookahead, r.kept) for r in batch[0].rounds] == [(r.lookahead, r.kept) for r in one.rounds]


def test_same_seed_same_batch(target, drafts):
    prompts = [[1, 2, 3], [50], list(range(100, 120))]

    def run(seed):
        out = speculative_sample(target, drafts["noisy copy"], prompts, 25, temperature=1.0,
                                 generator=torch.Generator().manual_seed(seed))
        return [g.tokens for g in out]

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_a_2d_tensor_is_a_batch_and_a_list_of_ids_one_prompt(target):
    prompts = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = autoregressive_sample(target, prompts, 5)
    assert [g.tokens for g in out] == alone(target, prompts.tolist(), 5)
    assert autoregressive_sample(target, [1, 2, 3], 5).tokens == out[0].tokens


@pytest.mark.parametrize("sampler", ["speculative", "plain"])
def test_on_tokens_of_a_batch_gets_each_rows_tokens_in_order(target, drafts, sampler):
    streamed = {}
    on_tokens = lambda row, new: streamed.setdefault(row, []).extend(new)  # noqa: E731
    prompts = [[1, 2, 3], [4, 5], [6]]
    if sampler == "speculative":
        outs = speculative_sample(target, drafts["noisy copy"], prompts, 9, lookahead=3, on_tokens=on_tokens)
    else:
        outs = autoregressive_sample(target, prompts, 9, on_tokens=on_tokens)
    assert streamed == {row: out.tokens for row, out in enumerate(outs)}


@pytest.mark.parametrize("call, message", [
    (lambda t, d: autoregressive_sample(t, [[1], [2]], 4, use_cache=False), "one prompt: pass one, not a batch"),
    (lambda t, d: speculative_sample(t, d, [[1], [2], []], 4), "prompt 2 of the batch: prompt is empty"),
    (lambda t, d: autoregressive_sample(t, [[1], [5000]], 4), r"prompt 1 of the batch: prompt must hold token ids"),
    (lambda t, d: autoregressive_sample(t, torch.zeros(0, 3, dtype=torch.long), 4), "the batch is empty"),
    (lambda t, d: speculative_sample(t, d, [[1], list(range(120))], 9), "prompt 1 of the batch: .* exceeds the context"),
])
def test_bad_batches_are_refused_with_the_row_named(target, drafts, call, message):
    with pytest.raises(ValueError, match=message):
        call(target, drafts["noisy copy"])


# Distribution over a batch ------------------------------------------------------------------------------
# As in test_speculative.py: the exact distribution of the first two new tokens of each row, by enumeration, and
# 3000 samples per row (batches of 25 copies of each prompt), by a chi-square test per row at level 1e-3 (fixed
# seeds). Two rows share a prompt.

SMALL = GPT2Config(vocab_size=8, n_positions=16, n_embd=16, n_layer=1, n_head=2)
PROMPTS = [[3], [5, 1, 2], [3]]

@pytest.fixture(scope="module")
def small_pair():
    return random_model(SMALL, seed=0, scale=20), random_model(SMALL, seed=1, scale=20)


def row_p_values(target, draft, seed: int, **options) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    counts = batched_first_two_counts(
        lambda batch: speculative_sample(target, draft, batch, 4, lookahead=3, generator=generator, **options),
        PROMPTS, target.config.vocab_size)
    return [chi_square_p_value(counts[b], exact_first_two(target, p, **options)) for b, p in enumerate(PROMPTS)]


@pytest.mark.slow
def test_every_row_of_a_batch_follows_the_target_distribution(small_pair):
    p_values = row_p_values(*small_pair, seed=11, temperature=1.0)
    assert min(p_values) > LEVEL, p_values


@pytest.mark.slow
def test_negative_control_a_wrong_resampling_rule_is_detected_in_a_batch(small_pair, monkeypatch):
    # Replacing a rejected draft with a sample from q instead of norm(max(0, q - p)) leans towards the draft.
    monkeypatch.setattr(rules, "residual", lambda q, p: q)
    p_values = row_p_values(*small_pair, seed=12, temperature=1.0)
    assert max(p_values) < LEVEL, p_values


# Exact mode: bit for bit in bfloat16 -------------------------------------------------------------------


@settings(max_examples=4, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(prompts=st.lists(st.lists(st.integers(0, 999), min_size=1, max_size=40), min_size=2, max_size=4),
       lookahead=st.sampled_from([2, 4, 7]), eos_at=st.one_of(st.none(), st.integers(0, 15)))
def test_in_exact_mode_batched_speculative_rows_are_batched_plain_decodings_in_bfloat16(prompts, lookahead, eos_at):
    config = GPT2Config(vocab_size=1000, n_positions=128, n_embd=256, n_layer=2, n_head=4)
    model = random_model(config, seed=3).to(torch.bfloat16)
    draft = random_model(GPT2Config(vocab_size=1000, n_positions=128, n_embd=64, n_layer=1, n_head=4),
                         seed=4).to(torch.bfloat16)
    rows = lookahead + 1
    plain = autoregressive_sample(model, prompts, 16, exact=rows)
    eos = None if eos_at is None else plain[0].tokens[eos_at]
    expected = [g.tokens for g in autoregressive_sample(model, prompts, 16, eos_token_id=eos, exact=rows)]
    for d in (model, draft, PromptLookupDrafter()):  # every draft kept, most rejected, lookups
        out = speculative_sample(model, d, prompts, 16, lookahead=lookahead, eos_token_id=eos, exact=True)
        assert [g.tokens for g in out] == expected
