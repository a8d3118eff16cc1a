"""Exact mode: every target pass of one fixed shape, so that greedy speculative output equals plain decoding's bit
for bit in every dtype.

A matrix product rounds a row differently when it is computed among 1 or among K + 1 rows (another blocking,
another order of the sums), so in bfloat16 plain decoding (1-row passes) and verification (K + 1 rows) can flip a
near-tie and their greedy texts part. At one fixed number of rows a row's result does not depend on its place
among the rows or on what the others hold (tests/test_exact_dtype.py checks this on the running platform), so
every position's logits are the same whichever pass computed them. The samplers take the row count as their
`exact` argument and run each cached target pass through `fixed_rows_pass`, the prefill in passes of the same rows;
the padding rows go to cache slots past the new tokens (the cache is made with that room), masked, then overwritten
by the next pass: never seen.
More: docs/exact-dtype.md.
"""

from __future__ import annotations

import torch

from speculative_gpt2.checks import check_integer

# Row counts are rounded up to a multiple of this: MKL's float32 kernels (F.linear, unpacked weights) compute the
# last rows of a 5-7 or 9-11-row product apart from the others, so there a row's result depends on its place
# (tests/test_exact_dtype.py); oneDNN's (packed weights) are row-invariant at every count from 1 to 16.
PASS_ROW_MULTIPLE = 4


def padded_rows(rows: int) -> int:
    """The rows a pass of up to `rows` new tokens runs as in exact mode: `rows` rounded up to PASS_ROW_MULTIPLE."""
    return -(-rows // PASS_ROW_MULTIPLE) * PASS_ROW_MULTIPLE


def fixed_rows_pass(model, idx: torch.Tensor, cache, rows: int | None, logits: bool = True) -> torch.Tensor | None:
    """model(idx, cache=cache) for the new tokens idx (B, T), computed as a pass of `rows` rows (token 0 in the
    rows past T); a longer pass (a prefill) as consecutive passes of `rows` rows. None runs it as it is. Logits
    (B, T, V), or None with `logits=False` (the cache filled, no LM head).

    A prefill in one pass of all its rows would not do: a matrix product of hundreds of rows is another kernel, whose
    rows round apart from a few rows' (measured: bfloat16 on an AMX CPU, 252 rows against 1200), so a prompt's keys
    and values would depend on the batch's longest prompt."""
    if rows is None:
        return model(idx, cache=cache, logits=logits)
    passes = [_pass(model, idx[:, start : start + rows], cache, rows, logits) for start in range(0, idx.shape[1], rows)]
    return torch.cat(passes, 1) if logits else None


def _pass(model, idx: torch.Tensor, cache, rows: int, logits: bool) -> torch.Tensor | None:
    """One pass of `rows` rows for the T <= rows new tokens idx (B, T): logits (B, T, V), or None."""
    B, T = idx.shape
    positions = model.positions(idx, cache, rows)  # (B, rows), checked against the context and the cache's room
    out = model.forward_at(torch.cat([idx, idx.new_zeros(B, rows - T)], 1), positions, cache, cache.span(rows),
                           logits=logits)
    cache.lengths = [n + T for n in cache.lengths]
    return out[:, :T] if logits else None


def pass_rows(exact, max_lookahead: int | None, model) -> int | None:
    """The rows of exact mode's fixed target passes: None (off), K + 1 for True, or the count given; rounded up. A
    pass holds at most the model's context: more rows are refused before any memory is taken."""
    if exact is False or exact is None:
        return None
    # What is no model gets an unbounded context here: the samplers' checks name it next.
    context = getattr(getattr(model, "config", None), "n_positions", None) or 2**62
    if exact is True:
        if max_lookahead is None:
            raise ValueError("exact=True takes its rows from K: here there is none (plain decoding, or a policy "
                             "without max_lookahead): pass the row count, exact=K + 1")
        if max_lookahead + 1 > context:
            raise ValueError(f"exact=True pads every target pass to K + 1 = {max_lookahead + 1} rows, more than the "
                             f"model's context of {context} positions: lower the lookahead to at most {context - 1}")
        return min(padded_rows(max_lookahead + 1), context)
    rows = check_integer("exact (rows per target pass)", exact, 1, context)
    return min(padded_rows(rows), context)
