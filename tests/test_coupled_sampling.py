"""Coupled sampling (speculative_gpt2/coupling.py): at temperature > 0 one seed gives one text, whatever K, drafter,
batch or speculation; and every token is still an exact sample from the target."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2_model import GPT2Config
from near_ties import VOCAB, near_tie_model
from speculative import autoregressive_sample, speculative_sample
from speculative_gpt2.coupling import gumbel_max, gumbel_noise
from speculative_gpt2 import render
from speculative_gpt2.drafters import PromptLookupDrafter, Proposal, one_hot
from speculative_gpt2.random_checkpoint import random_model
from speculative_gpt2.tokenizer import load_tokenizer

BOUNDED = settings(max_examples=8, deadline=None, derandomize=True)
LEVEL = 1e-3  # the statistical tests' significance level


class EveryOtherToken:
    """A custom deterministic drafter: proposes the token after the last one, K times."""

    def start(self, prompt, max_len, sampling):
        self.vocab_size = sampling.vocab_size

    def propose(self, tokens, lookahead):
        drafts = (tokens[-1] + 1 + torch.arange(lookahead, device=tokens.device)) % self.vocab_size
        return Proposal(drafts, one_hot(drafts, self.vocab_size))

    def commit(self, new):
        pass


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@BOUNDED
@given(prompts=st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40), min_size=1, max_size=3),
       temperature=st.sampled_from([0.7, 1.0]), top_k=st.sampled_from([None, 20]), top_p=st.sampled_from([None, 0.9]),
       lookahead=st.one_of(st.integers(1, 8), st.just("auto")), drafter=st.sampled_from(["model", "lookup", "custom"]),
       seed=st.integers(0, 2**20))
def test_coupled_speculative_sampling_gives_the_plain_samplers_text(dtype_name, prompts, temperature, top_k, top_p,
                                                                    lookahead, drafter, seed):
    target = near_tie_model(dtype_name)
    draft = {"model": near_tie_model(dtype_name, n_layer=1, seed=1), "lookup": PromptLookupDrafter(),
             "custom": EveryOtherToken()}[drafter]
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, coupled=True, seed=seed)
    plain = autoregressive_sample(target, prompts, 16, exact=4, **options)
    spec = speculative_sample(target, draft, prompts, 16, lookahead=lookahead, exact=True, **options)
    for row, prompt in enumerate(prompts):
        assert spec[row].tokens == plain[row].tokens, f"row {row}, K={lookahead}, {drafter} drafter"
        alone = autoregressive_sample(target, prompt, 16, exact=4, **options)
        assert alone.tokens == plain[row].tokens, f"row {row} differs from its prompt decoded alone"


def test_each_row_draws_from_its_own_seed_and_seeds_part_texts():
    target, draft = near_tie_model("float32"), near_tie_model("float32", n_layer=1, seed=1)
    prompt = [5, 6, 7]
    batch = speculative_sample(target, draft, [prompt, prompt, prompt], 20, temperature=1.0, coupled=True,
                               seed=[1, 2, 1], exact=True)
    assert batch[0].tokens == batch[2].tokens  # one seed, one text
    assert batch[0].tokens != batch[1].tokens  # another seed, another text
    for seed, out in ((1, batch[0]), (2, batch[1])):
        assert autoregressive_sample(target, prompt, 20, temperature=1.0, coupled=True, seed=seed,
                                     exact=4).tokens == out.tokens
    texts = {tuple(autoregressive_sample(target, prompt, 8, temperature=1.0, coupled=True, seed=s).tokens)
             for s in range(6)}
    assert len(texts) == 6


def test_the_target_as_its_own_draft_keeps_every_draft_when_coupled():
    # The same distribution and the same noise: the draft's Gumbel-max is the target's at every position.
    target = near_tie_model("float32")
    out = speculative_sample(target, target, [3, 4], 24, lookahead=4, temperature=0.8, coupled=True, seed=9,
                             exact=True)
    assert out.acceptance_rate == 1.0


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """The p-value of Pearson's chi-square test of `counts` against the distribution `probs` (cells with an
    expected count of at least 5; the rest pooled)."""
    expected = probs.double() * counts.sum()
    big = expected >= 5
    observed = torch.cat([counts[big].double(), counts[~big].double().sum().view(1)])
    expected = torch.cat([expected[big], expected[~big].sum().view(1)])
    if expected[-1] < 5:  # nothing worth a cell left over
        observed, expected = observed[:-1], expected[:-1]
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = len(expected) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.double), statistic / 2).item()


@pytest.mark.parametrize("position", [0, 700])
def test_gumbel_max_of_the_position_noise_follows_the_distribution(position):
    q = torch.softmax(torch.randn(12, generator=torch.Generator().manual_seed(position)) * 1.5, -1)
    draws = torch.stack([gumbel_max(q, gumbel_noise(seed, position, 12)) for seed in range(4000)])
    assert chi_square_p_value(torch.bincount(draws, minlength=12), q) > LEVEL
    # Negative control: uniform noise in place of Gumbel noise favours the likely tokens too much.
    biased = torch.stack([gumbel_max(q, torch.rand(12, generator=torch.Generator().manual_seed(s)))
                          for s in range(4000)])
    assert chi_square_p_value(torch.bincount(biased, minlength=12), q) < LEVEL


@pytest.mark.parametrize("seed", [0, 1, 4103, 2**43 - 1, 2**63 - 1])
def test_seeds_that_differ_in_any_bit_draw_different_noise(seed):
    # Every seed of the documented range has noise of its own at every position: seeds one bit apart (4096 apart
    # included, which a 32-bit generator seed once merged) and positions one bit apart never share it.
    noise = gumbel_noise(seed, 5, 64)
    for bit in range(63):
        assert not torch.equal(gumbel_noise(seed ^ (1 << bit), 5, 64), noise), f"seed {seed} and bit {bit}"
    for bit in range(20):
        assert not torch.equal(gumbel_noise(seed, 5 ^ (1 << bit), 64), noise), f"position 5 and bit {bit}"
    assert torch.equal(gumbel_noise(seed, 5, 64), noise) and noise.isfinite().all()  # the same key, the same noise


def test_texts_of_seeds_4096_apart_differ():
    target = near_tie_model("float32")
    texts = [autoregressive_sample(target, [1, 2, 3], 24, temperature=1.0, coupled=True, seed=s).tokens
             for s in (0, 4096, 7, 4103)]
    assert texts[0] != texts[1] and texts[2] != texts[3]


def test_the_coupled_samplers_tokens_follow_the_target_over_seeds():
    # Over 3000 seeds (rows of one batch, one seed each), the first and the third new token of coupled speculative
    # sampling follow the target's distribution: the first's q, and the third's marginal over the first two,
    # enumerated exactly with the model.
    config = GPT2Config(vocab_size=8, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    target, draft = random_model(config, seed=0, scale=20), random_model(config, seed=1, scale=20)
    prompt, n = [1, 2, 3], 3000
    out = speculative_sample(target, draft, [prompt] * n, 3, lookahead=2, temperature=1.0, coupled=True,
                             seed=list(range(n)))
    tokens = torch.tensor([o.tokens for o in out])  # (n, 3)
    with torch.no_grad():
        def q(prefix):
            return torch.softmax(target(torch.tensor([prompt + prefix]))[0, -1].double(), -1)

        first = q([])
        third = sum(first[a] * q([a])[b] * q([a, b]) for a in range(8) for b in range(8))
    assert chi_square_p_value(torch.bincount(tokens[:, 0], minlength=8), first) > LEVEL
    assert chi_square_p_value(torch.bincount(tokens[:, 2], minlength=8), third) > LEVEL
    # Negative control: the third token tested against the first's distribution is rejected.
    assert chi_square_p_value(torch.bincount(tokens[:, 2], minlength=8), first) < LEVEL


@pytest.mark.parametrize("kwargs,message", [
    (dict(coupled=True), "coupled sampling needs seed"),
    (dict(seed=3), "seed is for coupled sampling"),
    (dict(coupled=True, seed=3, generator=torch.Generator()), "not from a generator"),
    (dict(coupled=True, seed=-1), "seed must be an integer from 0"),
    (dict(coupled=True, seed=[1, 2]), "one per prompt"),
    (dict(coupled="yes", seed=1), "coupled must be True or False"),
])
def test_bad_coupling_arguments_are_refused_in_one_line(kwargs, message):
    target = near_tie_model("float32")
    for run in (lambda: speculative_sample(target, PromptLookupDrafter(), [1, 2], 4, temperature=1.0, **kwargs),
                lambda: autoregressive_sample(target, [1, 2], 4, temperature=1.0, **kwargs)):
        with pytest.raises(ValueError, match=message):
            run()


def test_a_coupled_trace_records_the_targets_gumbel_max_tokens():
    target, draft = near_tie_model("float32"), near_tie_model("float32", n_layer=1, seed=1)
    out = speculative_sample(target, draft, [3, 4], 12, lookahead=3, temperature=1.0, coupled=True, seed=4,
                             trace=True)
    for r in out.trace:
        assert r.r is None and len(r.choices) == len(r.drafts) + 1
        assert r.drafts[: r.kept] == r.choices[: r.kept]
        if r.next_token is not None:
            assert r.next_token == r.choices[r.kept]
            assert r.kept == len(r.drafts) or r.drafts[r.kept] != r.choices[r.kept]
    page = render.trace_page(out, load_tokenizer())
    assert "Gumbel-max y<sub>i</sub></th>" in page and "min(1, q/p)</th>" not in page
    assert page.count("<details class=\"round\"") == len(out.trace)
