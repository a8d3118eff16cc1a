"""What a drafter may propose: token ids in [0, V) on the target's device, and each p row a distribution (finite,
>= 0, summing to 1, positive on its own draft). Anything else is refused in one line naming the drafter, before a
token of that round is committed, with no host sync of its own; the drafter works on copies of the tokens."""

import threading

import pytest
import torch

from gpt2_model import GPT2Config
from speculative import autoregressive_sample, speculative_sample
from speculative_gpt2.drafters import PromptLookupDrafter, Proposal, one_hot
from speculative_gpt2.random_checkpoint import random_model

VOCAB = 64
PROMPT = [5, 9, 5, 9, 5]


@pytest.fixture(scope="module")
def target():
    return random_model(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=1, n_head=2), seed=0, scale=5)


class Spoiled:
    """Proposes the token after the last one, K times, with p one-hot, then spoils p (or the tokens) by `spoil`."""

    def __init__(self, spoil):
        self.spoil = spoil

    def start(self, prompt, max_len, sampling):
        self.vocab_size = sampling.vocab_size

    def propose(self, tokens, lookahead):
        x = ((tokens[-1:] + 1) % self.vocab_size).repeat(lookahead)
        return self.spoil(x, one_hot(x, self.vocab_size))

    def commit(self, new):
        pass


def _negative_entry(x, p):
    p[:, 11] = -5.0
    return Proposal(x, p)


SPOILS = {  # name: (spoil, the rule it breaks)
    "negative entry": (_negative_entry, "p >= 0"),
    "rows all zero": (lambda x, p: Proposal(x, torch.zeros_like(p)), "each p row summing to 1"),
    "scaled by 0.2": (lambda x, p: Proposal(x, p * 0.2), "each p row summing to 1"),
    "scaled by 3": (lambda x, p: Proposal(x, p * 3), "each p row summing to 1"),
    "no mass on its own draft": (lambda x, p: Proposal(x, one_hot((x + 1) % VOCAB, VOCAB)),
                                 "each p row positive on its own draft"),
    "NaN": (lambda x, p: Proposal(x, p * float("nan")), "p finite"),
    "token id V": (lambda x, p: Proposal(torch.full_like(x, VOCAB), torch.full_like(p, 1 / VOCAB)),
                   "token ids in"),
    "negative token id": (lambda x, p: Proposal(torch.full_like(x, -3), torch.full_like(p, 1 / VOCAB)),
                          "token ids in"),
}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("case", list(SPOILS))
def test_a_proposal_that_is_not_a_distribution_is_refused_naming_the_drafter(target, case, temperature):
    spoil, rule = SPOILS[case]
    tokens = []
    with pytest.raises(ValueError, match=f"the drafter Spoiled proposed drafts that break the rule '{rule}") as e:
        speculative_sample(target, Spoiled(spoil), PROMPT, 12, temperature=temperature, on_tokens=tokens.extend,
                           generator=torch.Generator().manual_seed(0))
    assert "\n" not in str(e.value) and "draft model" not in str(e.value)
    assert tokens == []  # refused in the first round, before anything was committed


@pytest.mark.parametrize("case", ["negative entry", "token id V"])
def test_a_bad_proposal_in_one_row_of_a_batch_is_refused(target, case):
    spoil, rule = SPOILS[case]

    class OneBadRow(Spoiled):
        def propose(self, tokens, lookahead):  # only the row whose prompt ends with 7
            x = ((tokens[-1:] + 1) % self.vocab_size).repeat(lookahead)
            p = one_hot(x, self.vocab_size)
            return self.spoil(x, p) if tokens[-1].item() == 7 else Proposal(x, p)

    with pytest.raises(ValueError, match=f"break the rule '{rule}"):
        speculative_sample(target, OneBadRow(spoil), [PROMPT, [1, 2, 7], [3]], 8)


def test_valid_proposals_of_every_kind_pass(target):
    expected = autoregressive_sample(target, PROMPT, 16).tokens
    uniform = Spoiled(lambda x, p: Proposal(x, torch.full_like(p, 1 / VOCAB)))  # a distribution, far from one-hot
    for drafter in (Spoiled(Proposal), uniform, PromptLookupDrafter()):
        assert speculative_sample(target, drafter, PROMPT, 16).tokens == expected
    # Chen's rule on a valid non-one-hot p keeps the target's distribution: the sampler runs at temperature 1.
    out = speculative_sample(target, uniform, PROMPT, 16, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert len(out.tokens) == 16


def test_a_drafter_that_writes_into_its_tokens_cannot_change_the_output(target):
    class Vandal(Spoiled):
        def propose(self, tokens, lookahead):
            proposal = super().propose(tokens, lookahead)
            tokens.fill_(0)  # a view of the sampler's own ids, before the copy
            return proposal

        def start(self, prompt, max_len, sampling):
            super().start(prompt, max_len, sampling)
            prompt.fill_(0)

    expected = autoregressive_sample(target, PROMPT, 16).tokens
    assert speculative_sample(target, Vandal(Proposal), PROMPT, 16).tokens == expected
    assert [g.tokens for g in speculative_sample(target, Vandal(Proposal), [PROMPT, [3, 4]], 16)] == \
        [expected, autoregressive_sample(target, [3, 4], 16).tokens]


@pytest.mark.parametrize("returned, shown", [(None, "NoneType"), ([1, 2], "list"), ((torch.tensor([1]),), "tuple")])
def test_propose_must_return_a_proposal(target, returned, shown):
    drafter = Spoiled(lambda x, p: returned)
    with pytest.raises(ValueError, match=f"the drafter Spoiled's propose returned {shown}: return a Proposal"):
        speculative_sample(target, drafter, PROMPT, 8)


def test_tokens_or_p_on_another_device_are_refused(target):
    for spoil, what in ((lambda x, p: Proposal(x.to("meta"), p), "tokens"), (lambda x, p: Proposal(x, p.to("meta")), "p")):
        with pytest.raises(ValueError, match=f"the drafter Spoiled proposed {what} on meta, the target is on cpu"):
            speculative_sample(target, Spoiled(spoil), PROMPT, 8)


def test_a_drafter_that_cannot_be_copied_is_refused_for_a_batch(target):
    drafter = Spoiled(Proposal)
    drafter.lock = threading.Lock()
    assert len(speculative_sample(target, drafter, PROMPT, 8).tokens) == 8  # one prompt: no copy needed
    with pytest.raises(ValueError, match="a batch runs a copy of the drafter per row, but Spoiled cannot be copied"):
        speculative_sample(target, drafter, [PROMPT, [1, 2]], 8)


def test_the_checks_add_no_host_sync(target, monkeypatch):
    calls = {"tolist": 0, "item": 0}
    real_tolist, real_item = torch.Tensor.tolist, torch.Tensor.item

    def counted(name, real):
        def wrapper(self, *args):
            calls[name] += 1
            return real(self, *args)
        return wrapper

    monkeypatch.setattr(torch.Tensor, "tolist", counted("tolist", real_tolist))
    monkeypatch.setattr(torch.Tensor, "item", counted("item", real_item))
    out = speculative_sample(target, Spoiled(Proposal), PROMPT, 24, lookahead=3)
    # One transfer per round; the prompt's check reads it once more.
    assert calls["item"] == 0 and calls["tolist"] <= out.target_calls + 1, (calls, out.target_calls)



class Sparse(Spoiled):
    """Proposes one-hot p as a sparse tensor, as a drafter that builds p from indices might."""

    def __init__(self):
        super().__init__(lambda x, p: Proposal(x, p.to_sparse()))


def test_a_sparse_p_is_refused_naming_the_drafter_and_the_fix(target):
    with pytest.raises(ValueError, match=r"the drafter Sparse proposed p as a sparse_coo tensor: give a dense one "
                                         r"\(p.to_dense\(\)\)"):
        speculative_sample(target, Sparse(), PROMPT, 6, temperature=1.0)


def test_a_drafter_class_in_place_of_an_instance_is_refused():
    with pytest.raises(ValueError, match=r"draft is the class PromptLookupDrafter, not a drafter: pass an instance, "
                                         r"PromptLookupDrafter\(\)"):
        speculative_sample(random_model(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=1, n_head=2), seed=0),
                           PromptLookupDrafter, PROMPT, 4)
