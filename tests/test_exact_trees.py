"""Exact mode with token trees: the greedy text equals plain decoding's token for token in every dtype, for every tree
shape, drafter and batch, on models that meet near-ties at every step (tests/near_ties.py).

A tree's pass runs as exact mode's fixed rows, and each node reads its ancestors' keys and values at the slots of
their positions (`exact_reads`, `attend_each` in gpt2_model.py), where plain decoding has them, so its sums add the
same terms in the same order. The negative control: the same trees outside exact mode (each node's keys at its own
slot, 1 + N rows) part from plain decoding on the same models."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2_model import KEY_BLOCK
from near_ties import VOCAB, near_tie_model
from speculative import autoregressive_sample, speculative_sample
from speculative_gpt2.drafters import PromptLookupDrafter
from speculative_gpt2.tree_search import FittedTree

BOUNDED = settings(max_examples=8, deadline=None, derandomize=True)
SHAPES = [(2,), (2, 2), (3, 2), (2, 2, 2), (4, 1), (3, 1, 2)]


def alone(dtype_name: str, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The reference: plain decoding of the prompt alone, in exact mode's 4-row passes."""
    return autoregressive_sample(near_tie_model(dtype_name), prompt, max_new_tokens, exact=4).tokens


def drafter_of(name: str, dtype_name: str):
    return {"itself": near_tie_model(dtype_name), "small": near_tie_model(dtype_name, n_layer=1, seed=1),
            "lookup": PromptLookupDrafter(matches=3)}[name]


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
@BOUNDED
@given(prompts=st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=KEY_BLOCK + 40), min_size=1,
                        max_size=3),
       max_new_tokens=st.integers(1, 12), shape=st.sampled_from(SHAPES),
       drafter=st.sampled_from(["itself", "small", "lookup"]))
def test_each_row_of_a_tree_batch_is_its_prompt_decoded_alone(dtype_name, prompts, max_new_tokens, shape, drafter):
    target = near_tie_model(dtype_name)
    lookahead = len(shape) if drafter == "lookup" else shape  # a lookup's tree: K levels, up to 3 branches
    batch = speculative_sample(target, drafter_of(drafter, dtype_name), prompts, max_new_tokens, lookahead=lookahead,
                               exact=True)
    for row, prompt in enumerate(prompts):
        assert batch[row].tokens == alone(dtype_name, prompt, max_new_tokens), f"row {row}, {shape}, {drafter}"


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_full_trees_over_a_long_run_give_plain_decodings_text(dtype_name):
    # The target as its own draft keeps whole paths, so every round moves nodes from their own slots.
    target = near_tie_model(dtype_name)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (7, 150, 300)]
    outs = speculative_sample(target, target, prompts, 30, lookahead=(2, 2), exact=True)
    for out, prompt in zip(outs, prompts):
        assert out.tokens == alone(dtype_name, prompt, 30)
        assert out.tokens_per_target_call > 2


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_a_tree_fitted_during_the_call_changes_shape_and_each_row_is_still_its_prompt_alone(dtype_name):
    # Every fit changes the nodes a pass holds; exact mode's rows hold the most (the budget's) in every pass.
    target, draft = near_tie_model(dtype_name), near_tie_model(dtype_name, n_layer=1, seed=1)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (3, 90, 40)]
    tree = FittedTree(budget=7, depth=3, width=4, every=2)
    outs = speculative_sample(target, draft, prompts, 24, lookahead=tree, exact=True)
    for out, prompt in zip(outs, prompts):
        assert out.tokens == alone(dtype_name, prompt, 24)
    assert len({r.nodes for out in outs for r in out.rounds}) > 1


def test_negative_control_the_same_trees_outside_exact_mode_part_from_plain_decoding():
    # Outside exact mode a node's keys sit at its own slot and the pass has 1 + N rows: near-ties flip.
    target = near_tie_model("float32")
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 30, 140, 60, 9, 200)]
    references = [alone("float32", p, 20) for p in prompts]
    exact = speculative_sample(target, target, prompts, 20, lookahead=(2, 2), exact=True)
    assert [out.tokens for out in exact] == references
    loose = speculative_sample(target, target, prompts, 20, lookahead=(2, 2))
    assert sum(out.tokens != reference for out, reference in zip(loose, references)) > 0


def test_exact_rows_too_few_for_a_tree_are_refused_in_one_line():
    target = near_tie_model("float32")
    with pytest.raises(ValueError, match=r"drafts up to 6 nodes a round, and exact mode's passes of 4 rows cannot "
                                         r"hold them and the pending token: pass exact=True, or at least 7 rows"):
        speculative_sample(target, target, [1, 2, 3], 5, lookahead=(2, 2), exact=4)
    out = speculative_sample(target, target, [1, 2, 3], 5, lookahead=(2, 2), exact=7)
    assert out.tokens == alone("float32", [1, 2, 3], 5)
