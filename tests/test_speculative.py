"""speculative_sample is lossless: greedy output equals the target's, samples follow the target's distribution.

Notation as in speculative.py: q is the target's distribution, p the draft's.
"""

import pytest
import torch

from gpt2_model import GPT2Config
from speculative_gpt2 import rules
from speculative_gpt2.random_checkpoint import noisy_copy, random_model
from speculative_gpt2.lookahead import AdaptiveLookahead
from speculative import autoregressive_sample, logits_to_probs, speculative_sample


def policy(lookahead):
    """K, or a fresh AdaptiveLookahead for "auto" (a policy object learns across calls)."""
    return AdaptiveLookahead() if lookahead == "auto" else lookahead

CONFIG = GPT2Config(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4)
PROMPTS = [[1, 2, 3], [7] * 6, list(range(10, 30)), [42]]


@pytest.fixture(scope="module")
def target():
    return random_model(CONFIG, seed=0, scale=5)  # scaled so that the greedy choices are not near-ties


@pytest.fixture(scope="module")
def drafts(target):
    return {
        "itself": target,  # everything accepted
        "unrelated": random_model(CONFIG, seed=1, scale=5),  # nearly everything rejected
        "noisy copy": noisy_copy(target, noise=0.08, seed=2),  # rounds end at every position
    }


# 1. Greedy equivalence ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["itself", "unrelated", "noisy copy"])
@pytest.mark.parametrize("lookahead", [1, 2, 3, 4, 8, "auto"])
def test_greedy_output_is_the_targets(target, drafts, kind, lookahead):
    for prompt, n in zip(PROMPTS, [40, 17, 33, 5]):
        expected = autoregressive_sample(target, prompt, n).tokens
        out = speculative_sample(target, drafts[kind], prompt, n, lookahead=policy(lookahead))
        assert out.tokens == expected, (prompt, n)


def test_drafts_span_the_acceptance_range(target, drafts):
    rates = {}
    for kind, draft in drafts.items():
        outs = [speculative_sample(target, draft, prompt, 40, lookahead=4) for prompt in PROMPTS]
        rates[kind] = sum(o.accepted for o in outs) / sum(o.proposed for o in outs)
        positions = {a for o in outs for a in o.accepted_per_round}
        if kind == "noisy copy":
            assert positions == {0, 1, 2, 3, 4}  # rejections at every position of a round
    assert rates["itself"] == 1.0
    assert rates["unrelated"] < 0.1
    assert 0.2 < rates["noisy copy"] < 0.9, rates


def test_cached_and_uncached_naive_decoding_agree(target):
    for prompt in PROMPTS[:3]:
        assert autoregressive_sample(target, prompt, 24).tokens == autoregressive_sample(
            target, prompt, 24, use_cache=False).tokens


def test_models_are_left_unchanged_and_calls_are_independent(target, drafts):
    before = {k: v.clone() for k, v in target.state_dict().items()}
    first = speculative_sample(target, drafts["noisy copy"], PROMPTS[0], 20)
    second = speculative_sample(target, drafts["noisy copy"], PROMPTS[0], 20)
    assert first.tokens == second.tokens and first.accepted_per_round == second.accepted_per_round
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())


def test_prompt_as_tensor_and_long_generation_near_the_context_end(target, drafts):
    prompt = torch.arange(100, 120)
    n = CONFIG.n_positions - len(prompt)  # fill the context exactly: the last rounds must shrink K
    out = speculative_sample(target, drafts["itself"], prompt, n, lookahead=8)
    assert out.tokens == autoregressive_sample(target, prompt, n).tokens
    assert len(out.tokens) == n


# 2. Processing of logits ------------------------------------------------------------------------------


LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 3.0, 1.0]])


def test_temperature_0_is_the_argmax_one_hot():
    assert torch.equal(logits_to_probs(LOGITS, temperature=0), torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))


def test_temperature_scales_the_logits():
    torch.testing.assert_close(logits_to_probs(LOGITS, 2.0), torch.softmax(LOGITS / 2, -1))


def test_top_k_keeps_the_k_most_likely():
    top2 = logits_to_probs(LOGITS[:1], 1.0, top_k=2)
    torch.testing.assert_close(top2, torch.tensor([[0.7311, 0.2689, 0, 0]]), atol=1e-4, rtol=0)


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    # softmax([2, 1, 0, -1]) = [0.644, 0.237, 0.087, 0.032]: top-p 0.7 keeps the token that crosses 0.7.
    nucleus = logits_to_probs(LOGITS[:1], 1.0, top_p=0.7)
    torch.testing.assert_close(nucleus, torch.tensor([[0.7311, 0.2689, 0, 0]]), atol=1e-4, rtol=0)
    assert torch.equal(logits_to_probs(LOGITS[:1], 1.0, top_p=0.5) > 0, torch.tensor([[True, False, False, False]]))
    assert torch.equal(logits_to_probs(LOGITS[:1], 1.0, top_p=0.644) > 0, torch.tensor([[True, True, False, False]]))


def test_probabilities_are_float32_whatever_the_logits():
    assert logits_to_probs(LOGITS.bfloat16(), 1.0).dtype == torch.float32


def test_a_tiny_temperature_is_its_limit_never_nan():
    # Uniform over the tied maxima, as temperature -> 0; also where the temperature underflows float32 to 0.
    for temperature in (1e-38, 1e-300, 5e-324):
        assert torch.equal(logits_to_probs(LOGITS, temperature), torch.tensor([[1.0, 0, 0, 0], [0, 0.5, 0.5, 0]]))


def test_a_huge_temperature_still_honours_top_k():
    probs = logits_to_probs(LOGITS, 1e300, top_k=1)  # overflows float32 to inf
    assert torch.equal(probs, torch.tensor([[1.0, 0, 0, 0], [0, 0.5, 0.5, 0]]))  # the tie at 3.0 keeps both


# 3. Distribution ---------------------------------------------------------------------------------------
# Tiny vocabulary: the exact distribution of the first two new tokens is computed by enumeration, and about
# 3000 speculative samples are compared with it by a chi-square test at level 1e-3 (fixed seeds).

SMALL = GPT2Config(vocab_size=8, n_positions=16, n_embd=16, n_layer=1, n_head=2)
LEVEL = 1e-3
N_SAMPLES = 3000


@pytest.fixture(scope="module")
def small_pair():
    # Random models far apart (total variation ~0.8 at the first position): most drafts get rejected,
    # so the resampling step is exercised at every position.
    return random_model(SMALL, seed=0, scale=20), random_model(SMALL, seed=1, scale=20)


@torch.inference_mode()
def exact_first_two(target, prompt, **options):
    """P(x1, x2) = q(x1 | prompt) q(x2 | prompt, x1), a (V, V) table."""
    V = target.config.vocab_size
    q1 = logits_to_probs(target(torch.tensor([prompt]))[0, -1], **options)  # (V,)
    continued = torch.tensor([prompt + [x1] for x1 in range(V)])  # (V, T + 1)
    q2 = logits_to_probs(target(continued)[:, -1], **options)  # (V, V)
    return q1[:, None] * q2


def first_two_counts(sampler, V, seed):
    counts = torch.zeros(V, V)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(N_SAMPLES):
        x1, x2 = sampler(generator)[:2]
        counts[x1, x2] += 1
    return counts


# Batched draws: each call decodes COPIES rows of every prompt, each row as if alone (test_one_prompt_one_text.py), so
# the rows are independent samples; 120 calls of 25 copies draw N_SAMPLES per prompt about 8x faster than 3000 calls.
COPIES = 25


def batched_first_two_counts(sample, prompts, V):
    """(len(prompts), V, V) counts of the first two tokens of N_SAMPLES rows per prompt: `sample(batch)` decodes a
    batch of prompts (COPIES of each) and returns its Generations."""
    counts = torch.zeros(len(prompts), V, V)
    for _ in range(N_SAMPLES // COPIES):
        for row, out in enumerate(sample(prompts * COPIES)):
            counts[row % len(prompts), out.tokens[0], out.tokens[1]] += 1
    return counts


def chi_square_p_value(counts, probs):
    """Pearson's test; cells expecting fewer than 5 are pooled into one. 0 when a zero-probability cell is hit."""
    expected = probs.double().flatten() * counts.sum()
    observed = counts.double().flatten()
    small = expected < 5
    observed = torch.cat([observed[~small], observed[small].sum().view(1)])
    expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    if expected[-1] < 1e-9:
        if observed[-1] > 0:
            return 0.0
        observed, expected = observed[:-1], expected[:-1]
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = len(observed) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.double), statistic / 2).item()


SETTINGS = [
    ("auto", dict(temperature=1.0)),
    (1, dict(temperature=1.0)),
    (2, dict(temperature=1.0)),
    (3, dict(temperature=1.0)),
    (2, dict(temperature=0.7, top_k=4)),
    (3, dict(temperature=1.0, top_p=0.8)),
]


@pytest.mark.parametrize("lookahead, options", SETTINGS)
@pytest.mark.slow
def test_speculative_samples_follow_the_target_distribution(small_pair, lookahead, options):
    target, draft = small_pair
    prompt = [3]

    n = 6 if lookahead == "auto" else lookahead + 1

    def sampler(generator):
        # K + 1 new tokens: the first round really drafts K, and its tokens include the first two.
        return speculative_sample(target, draft, prompt, n, lookahead=policy(lookahead), generator=generator,
                                  **options).tokens

    p_value = chi_square_p_value(first_two_counts(sampler, 8, seed=n), exact_first_two(target, prompt, **options))
    assert p_value > LEVEL, p_value


@pytest.mark.slow
def test_speculative_samples_in_exact_mode_follow_the_target_distribution(small_pair):
    # Exact mode pads the target's passes; the padding rows must not leak into q.
    target, draft = small_pair
    options = dict(temperature=1.0)

    def sampler(generator):
        return speculative_sample(target, draft, [3], 4, lookahead=3, generator=generator, exact=4, **options).tokens

    p_value = chi_square_p_value(first_two_counts(sampler, 8, seed=7), exact_first_two(target, [3], **options))
    assert p_value > LEVEL, p_value


def test_autoregressive_samples_follow_the_target_distribution(small_pair):
    target, _ = small_pair
    options = dict(temperature=0.7, top_k=4)

    def sampler(generator):
        return autoregressive_sample(target, [3], 2, generator=generator, **options).tokens

    assert chi_square_p_value(first_two_counts(sampler, 8, seed=0), exact_first_two(target, [3], **options)) > LEVEL


@pytest.mark.slow
def test_negative_control_wrong_resampling_rule_is_detected(small_pair, monkeypatch):
    # The real loop, with only the resampling step wrong: replace a rejected draft with a sample from q instead
    # of norm(max(0, q - p)). The output then leans towards the draft, and the test above must notice.
    target, draft = small_pair
    monkeypatch.setattr(rules, "residual", lambda q, p: q)

    def sampler(generator):
        return speculative_sample(target, draft, [3], 3, lookahead=2, temperature=1.0, generator=generator).tokens

    p_value = chi_square_p_value(first_two_counts(sampler, 8, seed=2), exact_first_two(target, [3], temperature=1.0))
    assert p_value < LEVEL, p_value


# 4. EOS, lengths, seeds and statistics -----------------------------------------------------------------


def test_exact_length_and_eos(target, drafts):
    draft = drafts["noisy copy"]
    greedy = autoregressive_sample(target, PROMPTS[2], 30).tokens
    for n in (1, 2, 5, 13):
        assert len(speculative_sample(target, draft, PROMPTS[2], n).tokens) == n
    eos = greedy[11]
    first = greedy.index(eos)
    for lookahead in (1, 3, 4, 8, "auto"):
        out = speculative_sample(target, draft, PROMPTS[2], 30, lookahead=policy(lookahead), eos_token_id=eos)
        assert out.tokens == greedy[: first + 1]  # the EOS is included, nothing after it
        check_statistics(out)
    assert autoregressive_sample(target, PROMPTS[2], 30, eos_token_id=eos).tokens == greedy[: first + 1]


def test_same_seed_same_tokens(target, drafts):
    def run(seed):
        return speculative_sample(target, drafts["noisy copy"], PROMPTS[0], 30, temperature=1.0,
                                  generator=torch.Generator().manual_seed(seed))

    assert run(5).tokens == run(5).tokens
    assert run(5).tokens != run(6).tokens
    naive = [autoregressive_sample(target, PROMPTS[0], 30, temperature=1.0, top_p=0.9,
                                   generator=torch.Generator().manual_seed(5)).tokens for _ in range(2)]
    assert naive[0] == naive[1]


def check_statistics(out):
    assert len(out.origins) == len(out.tokens)
    assert out.origins.count("draft") == sum(out.accepted_per_round) == out.accepted
    assert out.target_calls == len(out.accepted_per_round) == len(out.lookahead_per_round)
    assert out.origins.count("resampled") + out.origins.count("bonus") + out.origins.count("target") <= out.target_calls
    assert all(0 <= a <= k for a, k in zip(out.accepted_per_round, out.lookahead_per_round))
    assert out.accepted <= out.proposed <= out.draft_calls
    assert out.seconds > 0


@pytest.mark.parametrize("lookahead", [4, "auto"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_statistics_add_up(target, drafts, temperature, lookahead):
    for kind, draft in drafts.items():
        out = speculative_sample(target, draft, PROMPTS[1], 37, lookahead=policy(lookahead), temperature=temperature,
                                 generator=torch.Generator().manual_seed(0))
        check_statistics(out)
        # Without EOS every round ends with exactly one resampled or bonus token, a bonus when all K were kept;
        # a round without drafts (for the last token) is a plain target step.
        rounds = list(zip(out.accepted_per_round, out.lookahead_per_round))
        assert out.origins.count("target") == sum(k == 0 for _, k in rounds) <= 1
        assert out.origins.count("resampled") + out.origins.count("bonus") + out.origins.count("target") == len(rounds)
        assert out.proposed == out.draft_calls == sum(out.lookahead_per_round)  # nothing dropped
        assert out.origins.count("bonus") == sum(a == k > 0 for a, k in rounds)
        assert out.acceptance_rate == out.accepted / out.proposed
    naive = autoregressive_sample(target, PROMPTS[1], 9)
    assert naive.origins == ["target"] * 9 and naive.acceptance_rate is None and naive.target_calls == 9


def test_on_tokens_streams_each_round(target, drafts):
    chunks = []
    out = speculative_sample(target, drafts["noisy copy"], PROMPTS[0], 25, on_tokens=chunks.append)
    assert [t for chunk in chunks for t in chunk] == out.tokens
    assert len(chunks) == out.target_calls


# 5. Bad arguments --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(prompt=[]), "prompt is empty"),
        (dict(prompt=[5, 1000]), r"token ids in \[0, 1000\)"),
        (dict(prompt=torch.zeros(2, 3, 4, dtype=torch.long)), "1-D array of token ids"),  # 2-D: a batch
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        (dict(lookahead=0), "lookahead must be an integer >= 1"),
        (dict(lookahead="fast"), "lookahead must be an integer >= 1, .auto., a tree.s widths"),
        (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
        (dict(top_k=0), "top_k must be an integer >= 1"),
        (dict(top_p=0.0), r"top_p must be a finite number in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be a finite number in \(0, 1\]"),
        (dict(max_new_tokens=126), "exceeds the context of 128 positions"),
    ],
)
def test_bad_arguments(target, drafts, change, message):
    args = dict(prompt=[1, 2, 3], max_new_tokens=5) | change
    with pytest.raises(ValueError, match=message):
        speculative_sample(target, drafts["itself"], args.pop("prompt"), args.pop("max_new_tokens"), **args)


def test_mismatched_models(target):
    other_vocab = random_model(GPT2Config(vocab_size=999, n_positions=128, n_embd=64, n_layer=2, n_head=4), 0)
    with pytest.raises(ValueError, match="different vocabulary sizes"):
        speculative_sample(target, other_vocab, [1, 2], 4)
    shorter = random_model(GPT2Config(vocab_size=1000, n_positions=32, n_embd=64, n_layer=2, n_head=4), 0)
    with pytest.raises(ValueError, match="exceeds the context of 32"):
        speculative_sample(target, shorter, [1, 2], 40)
    meta = random_model(CONFIG, 0).to("meta")
    with pytest.raises(ValueError, match="different devices"):
        speculative_sample(target, meta, [1, 2], 4)


# 6. dtype auto -----------------------------------------------------------------------------------------


def test_dtype_auto_follows_the_hardware(monkeypatch):
    from speculative_gpt2 import machine

    cpu = torch.device("cpu")
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2", "fma"})
    assert machine.resolve_dtype("auto", cpu) == torch.float32  # bf16 would be emulated: slower
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert machine.resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"amx_bf16", "amx_tile"})
    assert machine.resolve_dtype("auto", cpu) == torch.bfloat16
    assert machine.resolve_dtype("float16", cpu) == torch.float16
