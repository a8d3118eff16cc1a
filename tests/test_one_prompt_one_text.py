"""One prompt, one text: in exact mode a prompt's greedy output depends on nothing that runs beside it: not on
its batch-mates, the batch's size, the length budget (hence the KV cache's length), K, the drafter, or whether
speculation is on at all.

The models meet near-ties at every step (tests/near_ties.py), as trained models do often.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2_model import KEY_BLOCK
from near_ties import VOCAB, near_tie_model
from speculative import autoregressive_sample, speculative_sample
from speculative_gpt2.drafters import PromptLookupDrafter

BOUNDED = settings(max_examples=10, deadline=None, derandomize=True)


def prompts_strategy(max_prompts: int):
    # Lengths past one key block, so that the cache's span and buffer take several lengths.
    prompt = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=KEY_BLOCK + 60)
    return st.lists(prompt, min_size=1, max_size=max_prompts)


def alone(dtype_name: str, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The reference: plain decoding of the prompt alone, in exact mode's 4-row passes."""
    return autoregressive_sample(near_tie_model(dtype_name), prompt, max_new_tokens, exact=4).tokens


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
@BOUNDED
@given(prompts=prompts_strategy(3), max_new_tokens=st.integers(1, 12), lookahead=st.integers(1, 7),
       drafter=st.sampled_from(["model", "lookup"]), data=st.data())
def test_each_row_of_a_batch_is_its_prompt_decoded_alone(dtype_name, prompts, max_new_tokens, lookahead, drafter,
                                                         data):
    target = near_tie_model(dtype_name)
    draft = near_tie_model(dtype_name, n_layer=1, seed=1) if drafter == "model" else PromptLookupDrafter()
    batch = speculative_sample(target, draft, prompts, max_new_tokens, lookahead=lookahead, exact=True)
    plain = autoregressive_sample(target, prompts, max_new_tokens, exact=8)
    for row, prompt in enumerate(prompts):
        reference = alone(dtype_name, prompt, max_new_tokens)
        assert batch[row].tokens == reference, f"row {row} of {len(prompts)}, speculative, K={lookahead}"
        assert plain[row].tokens == reference, f"row {row} of {len(prompts)}, plain decoding in 8-row passes"
    shorter = data.draw(st.integers(1, max_new_tokens), label="shorter budget")
    assert alone(dtype_name, prompts[0], shorter) == alone(dtype_name, prompts[0], max_new_tokens)[:shorter], (
        "a shorter run is not a prefix of the longer one")


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_the_adaptive_lookahead_and_long_runs_give_the_text_of_plain_decoding(dtype_name):
    # A run past two key blocks, its budget and the batch changing the cache's length from 288 to 768 slots.
    target, draft = near_tie_model(dtype_name), near_tie_model(dtype_name, n_layer=1, seed=1)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (250, 20, 600)]
    reference = alone(dtype_name, prompts[0], 40)
    batch = speculative_sample(target, draft, prompts, 40, lookahead="auto", exact=True)
    assert batch[0].tokens == reference
    assert speculative_sample(target, PromptLookupDrafter(), prompts[0], 25, lookahead=3, exact=True).tokens == (
        reference[:25])
