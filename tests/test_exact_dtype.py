"""Exact in every dtype (the samplers' `exact`, speculative_gpt2/exact.py): greedy speculative output equals plain decoding's bit for bit in
bfloat16, float16 and float32, and the property of the platform that this rests on.

The models have GPT-2's real inner widths (768 and 1600: small widths hide the effect, their sums are too short to
round differently) with 2 layers and a small vocabulary, so that each case takes about a second on a CPU.
"""

from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

from gpt2_model import KEY_BLOCK, GPT2Config, attend
from speculative import autoregressive_sample, speculative_sample
from speculative_gpt2.exact import fixed_rows_pass, padded_rows
from speculative_gpt2.lookahead import AdaptiveLookahead
from speculative_gpt2.machine import native_bfloat16
from speculative_gpt2.packing import PackedLinear, pack_linears
from speculative_gpt2.random_checkpoint import random_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WIDTHS = (768, 1600)
VOCAB = 512
PASS_ROWS = (4, 8, 12, 16)  # exact mode rounds to a multiple of 4; up to K = 12, AdaptiveLookahead's default


# ----------------------------------------------------------------------------------------------------------
# The platform's property: at a fixed number of rows, a row's result does not depend on its place among the rows
# or on what the other rows (or the masked cache slots) hold. A torch or BLAS upgrade that breaks it fails here.


def product(x, w, bias, packed):
    """x @ w.T + bias through F.linear, or through oneDNN's linear on the packed weight."""
    if packed is None:
        return F.linear(x, w, bias)
    with torch.no_grad():
        return packed(x)


@lru_cache(maxsize=None)
def weights(out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random weight [out, in] and bias, in float32."""
    gen = torch.Generator().manual_seed(out_features * 7 + in_features)
    return torch.randn(out_features, in_features, generator=gen) * 0.02, torch.randn(out_features, generator=gen) * 0.02


def linear_shapes(width: int) -> list[tuple[int, int]]:
    """(out, in) of the model's linear layers: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj, the LM head
    (GPT-2's vocabulary)."""
    return [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width), (50257, width)]


# F.linear in every dtype (unpacked models), and oneDNN's linear on packed weights (pack_linears: CPU float32, and
# bfloat16 where the CPU runs it natively).
KERNELS = [(dtype, "F.linear") for dtype in DTYPES] + [("float32", "oneDNN")] + (
    [("bfloat16", "oneDNN")] if native_bfloat16() else [])


@pytest.mark.parametrize("dtype,kernel", KERNELS)
@pytest.mark.parametrize("width", WIDTHS)
def test_platform_linear_row_does_not_depend_on_its_place_or_neighbours_at_a_fixed_row_count(width, dtype, kernel):
    if kernel == "oneDNN" and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN: pack_linears packs nothing")
    gen = torch.Generator().manual_seed(width)
    for out_features, in_features in linear_shapes(width):
        w, b = (t.to(DTYPES[dtype]) for t in weights(out_features, in_features))
        bias = None if out_features == 50257 else b  # the tied LM head has no bias
        packed = PackedLinear(w, bias) if kernel == "oneDNN" else None
        for rows in PASS_ROWS if kernel == "F.linear" else range(1, 17):  # oneDNN: every count, measured invariant
            x = torch.randn(1, rows, in_features, generator=gen).to(w.dtype)  # (B, rows, in), as the model calls it
            y = product(x, w, bias, packed)
            # Every row at the mirrored place; then row 0 at place rows // 2 among new neighbours.
            other = torch.randn(1, rows, in_features, generator=gen).to(w.dtype)
            other[0, rows // 2] = x[0, 0]
            for moved, same in ((product(x.flip(1), w, bias, packed).flip(1), y),
                                (product(other, w, bias, packed)[:, rows // 2], y[:, 0])):
                assert torch.equal(moved, same), (
                    f"{kernel} {dtype} [{out_features}, {in_features}]: a row gives another result at another place "
                    f"among {rows} rows: exact mode cannot make decoding exact on this platform")


@pytest.mark.parametrize("rows", PASS_ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", WIDTHS)
def test_platform_attention_row_depends_only_on_the_keys_it_sees(width, dtype, rows):
    # As CausalSelfAttention calls it: queries (B, nh, rows, 64) over the cache's span (B, nh, S, 64), with the mask
    # positions >= key_positions. A row's output must not move with its place among the rows, the span's length
    # (the buffer, a batch-mate's longer text) or the batch's other rows.
    n_head, p = width // 64, KEY_BLOCK + 44  # the row under test is at position p: its keys fill one block and part of another
    gen = torch.Generator().manual_seed(width + rows)
    to = DTYPES[dtype]
    query = torch.randn(n_head, 64, generator=gen).to(to)
    visible_k, visible_v = (torch.randn(n_head, p + 1, 64, generator=gen).to(to) for _ in range(2))

    def attention_at(place: int, span: int, batch: int) -> torch.Tensor:
        """The row's output as row `place` of the pass, in the last row of a batch, among random rows and stale,
        masked slots."""
        positions = torch.arange(p - place, p - place + rows).expand(batch, rows)
        q = torch.randn(batch, n_head, rows, 64, generator=gen).to(to)
        q[-1, :, place] = query
        k, v = (torch.randn(batch, n_head, span, 64, generator=gen).to(to) for _ in range(2))  # stale slots
        k[-1, :, : p + 1], v[-1, :, : p + 1] = visible_k, visible_v
        return attend(q, k, v, (positions[:, :, None] >= torch.arange(span))[:, None])[-1, :, place]

    reference = attention_at(0, 2 * KEY_BLOCK, 1)
    for place, span, batch in [(rows - 1, 2 * KEY_BLOCK, 1), (rows // 2, 3 * KEY_BLOCK, 1), (0, 8 * KEY_BLOCK, 3),
                               (rows - 1, 2 * KEY_BLOCK, 2), (1, 5 * KEY_BLOCK, 1)]:
        assert torch.equal(attention_at(place, span, batch), reference), (
            f"attention {dtype}, {n_head} heads: a query row gives another result as row {place} of {rows}, over "
            f"{span} slots, in a batch of {batch}: a row's text would depend on what runs beside it here")


@pytest.mark.parametrize("dtype", DTYPES)
def test_platform_attention_row_is_the_same_in_a_pass_of_any_size(dtype):
    # attend computes every query among at least QUERY_ROWS: a query row must then give the same result in a 1-row
    # pass (plain decoding, a draft pass) as at any place of a pass of up to 16 rows (a verification).
    gen = torch.Generator().manual_seed(7)
    to = DTYPES[dtype]
    p, span = KEY_BLOCK + 20, 2 * KEY_BLOCK
    k, v = (torch.randn(2, 25, span, 64, generator=gen).to(to) for _ in range(2))
    queries = torch.randn(2, 25, 16, 64, generator=gen).to(to)
    positions = torch.arange(p, p + 16).expand(2, 16)
    mask = (positions[:, :, None] >= torch.arange(span))[:, None]
    for rows in (2, 3, 5, 8, 16):
        together = attend(queries[:, :, :rows], k, v, mask[:, :, :rows])
        for place in range(rows):
            alone = attend(queries[:, :, place : place + 1], k, v, mask[:, :, place : place + 1])
            assert torch.equal(together[:, :, place : place + 1], alone), (
                f"attention {dtype}: row {place} of a {rows}-row pass differs from the same query alone")


# ----------------------------------------------------------------------------------------------------------
# The decoders: at temperature 0, speculative output is plain decoding's, token for token, in every dtype.


@lru_cache(maxsize=None)
def target(width: int, dtype_name: str):
    config = GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=width, n_layer=2, n_head=width // 64)
    return pack_linears(random_model(config, seed=0).to(DTYPES[dtype_name]))  # as the CLI runs it


@lru_cache(maxsize=None)
def small_draft(dtype_name: str):
    """An unrelated 64-wide draft: cheap, and its drafts are mostly rejected (verification after verification)."""
    config = GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=64, n_layer=1, n_head=4)
    return pack_linears(random_model(config, seed=1).to(DTYPES[dtype_name]))


cases = st.fixed_dictionaries({
    "width": st.sampled_from(WIDTHS),
    # The target as its own draft keeps every draft: each position is scored at every place of the pass.
    "draft": st.sampled_from(["small", "target"]),
    "prompt_length": st.integers(1, 200),
    "prompt_seed": st.integers(0, 2**16),
    "lookahead": st.one_of(st.integers(1, 8), st.just("auto")),
    "extra_rows": st.integers(0, 2),  # passes wider than K + 1 need
    "eos_at": st.one_of(st.none(), st.integers(0, 23)),  # EOS: the plain output's token at this index
})


def check_greedy_identity(case, dtype: str, max_new_tokens: int = 24) -> None:
    model = target(case["width"], dtype)
    draft = model if case["draft"] == "target" else small_draft(dtype)
    max_lookahead = 8 if case["lookahead"] == "auto" else case["lookahead"]
    rows = max_lookahead + 1 + case["extra_rows"]
    gen = torch.Generator().manual_seed(case["prompt_seed"])
    prompt = torch.randint(0, VOCAB, (case["prompt_length"],), generator=gen)
    plain = autoregressive_sample(model, prompt, max_new_tokens, exact=rows).tokens
    # Plain greedy decoding with an EOS stops at its first occurrence: the same tokens, cut there.
    eos = None if case["eos_at"] is None else plain[case["eos_at"]]
    expected = plain if eos is None else plain[: plain.index(eos) + 1]
    lookahead = AdaptiveLookahead(max_lookahead=8) if case["lookahead"] == "auto" else case["lookahead"]
    out = speculative_sample(model, draft, prompt, max_new_tokens, lookahead=lookahead, eos_token_id=eos, exact=rows)
    parted = next((i for i, (a, b) in enumerate(zip(out.tokens, expected)) if a != b), None)
    assert out.tokens == expected, f"speculative output parted from plain decoding's at new token {parted}"


def bounded(max_examples: int):
    # A case takes seconds: no shrinking (minutes), the failing case is printed as it is.
    return settings(max_examples=max_examples, deadline=None, derandomize=True,
                    phases=[Phase.explicit, Phase.reuse, Phase.generate])


# Without exact mode (the code before it) this case parts at new token 19: 1-row and 12-row passes round
# differently in bfloat16. In float16 and float32 the parting is rarer (no case here parts on that code).
@bounded(max_examples=6)
@given(cases)
@example({"width": 1600, "draft": "small", "prompt_length": 193, "prompt_seed": 1, "lookahead": "auto",
          "extra_rows": 0, "eos_at": None})
def test_greedy_speculative_output_is_plain_decodings_in_bfloat16(case):
    check_greedy_identity(case, "bfloat16")


@bounded(max_examples=3)
@given(cases)
def test_greedy_speculative_output_is_plain_decodings_in_float16(case):
    check_greedy_identity(case, "float16")


@bounded(max_examples=2)
@given(cases)
def test_greedy_speculative_output_is_plain_decodings_in_float32(case):
    check_greedy_identity(case, "float32")


# ----------------------------------------------------------------------------------------------------------
# The switch itself: padding rows are never visible, and what does not fit is refused.

TINY = GPT2Config(vocab_size=VOCAB, n_positions=48, n_embd=64, n_layer=2, n_head=4)


def test_padded_passes_give_the_logits_of_a_full_pass_and_advance_the_cache_by_the_real_tokens():
    model, rows = random_model(TINY, seed=0), padded_rows(6)
    assert rows == 8
    idx = torch.randint(0, VOCAB, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(room=rows - 1)  # the whole context, plus 7 slots for the last pass's padding rows
        assert cache.max_len == 48 + 7
        pieces, start = [], 0
        for T in (20, 1, 3, 8, 2, 5, 1, 6, 2):  # a long prefill (unpadded), then passes of 1 to 8 tokens
            logits = fixed_rows_pass(model, idx[:, start : start + T], cache, rows)
            start += T
            assert logits.shape == (1, T, VOCAB) and cache.length == start
            pieces.append(logits)
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=0)


def test_a_lookahead_wider_than_the_fixed_passes_is_refused():
    model = random_model(TINY, seed=0)
    with pytest.raises(ValueError, match=r"K=8 needs verification passes of 9 rows.*exact=9"):
        speculative_sample(model, model, [1, 2, 3], 12, lookahead=8, exact=5)
    with pytest.raises(ValueError, match="has no room for 4 padding rows"):
        cache = model.new_cache(max_len=10)
        fixed_rows_pass(model, torch.tensor([[1, 2, 3]]), cache, 8)
        fixed_rows_pass(model, torch.tensor([[1] * 4]), cache, 8)


def test_the_adaptive_lookahead_is_capped_by_the_fixed_passes_from_the_start():
    model, prompt = random_model(TINY, seed=0), [1, 2, 3]
    out = speculative_sample(model, model, prompt, 40, lookahead=AdaptiveLookahead(max_lookahead=12), exact=5)
    assert max(out.lookahead_per_round) <= 7  # 5 rows, rounded up to 8: K + 1 <= 8
    assert out.tokens == autoregressive_sample(model, prompt, 40, exact=5).tokens


@pytest.mark.parametrize("rows", [0, -1, 2.0, "4"])
def test_exact_needs_a_positive_row_count_or_a_bool(rows):
    model = random_model(TINY, seed=0)
    for run in (speculative_sample, autoregressive_sample):
        args = (model, model) if run is speculative_sample else (model,)
        with pytest.raises(ValueError, match=r"exact \(rows per target pass\) must be an integer from 1 to "):
            run(*args, [1, 2], 4, exact=rows)
    with pytest.raises(ValueError, match=r"exact=True takes its rows from K.*exact=K \+ 1"):
        autoregressive_sample(model, [1, 2], 4, exact=True)
