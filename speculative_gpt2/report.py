"""What the command line reports beyond the texts: the runs it makes, the K and the acceptance it names one way, and
why a run was slower than plain decoding.

Shared by the single-prompt report (cli.py) and the prompts-file summary (prompts_file.py).
"""

from __future__ import annotations

import statistics

import torch

from speculative_gpt2.machine import resolve_dtype
from speculative_gpt2.records import Generation

# The runs, in the order they are made; EXACT is plain decoding in the passes speculative sampling is compared in.
PLAIN, UNCACHED, EXACT, SPECULATIVE = "plain", "uncached", "exact", "speculative"
# --draft ngram: prompt lookup drafting, no draft model.
NGRAM = "ngram"


def parted(tokens: list[int], other: list[int]) -> int:
    """The index of the first new token where two outputs differ."""
    return next((i for i, (a, b) in enumerate(zip(tokens, other)) if a != b), min(len(tokens), len(other)))


def k_used(runs: list[Generation], asked: int | str, lookup: bool = False, short: bool = False,
           tree: str | None = None) -> str:
    """The K the rounds drafted with, as the report says it: K=4 (and its mean when rounds drafted fewer); with
    auto, its mean and range. `short`: only K, or auto's mean. `tree`: the command line's --tree; with auto (a tree
    fitted during the run) its depth changes as K auto's does."""
    widths = _drafted_widths(runs)
    mean = sum(widths) / len(widths) if widths else 0.0
    what = "K" if tree is None else "tree depth"  # a tree's K is its depth
    if asked == "auto" or tree == "auto":
        return f"{what} auto (mean {mean:.2f})" if short or not widths else \
            f"{what} auto: mean {mean:.2f}, from {min(widths)} to {max(widths)}"
    said = f"K={asked}" if tree is None else f"tree depth {asked}"
    if short or min(widths, default=asked) == max(widths, default=asked) == asked:
        return said
    fewer = "no more than the tokens left" + (" or than a lookup finds" if lookup else "")
    return f"{said} ({mean:.2f} per drafting round on average: a round drafts {fewer})"


def _drafted_widths(runs: list[Generation]) -> list[int]:
    """The K (a tree's depth) of every step that drafted."""
    return [s.width for g in runs for s in g.steps if s.width > 0]


def acceptance(runs: list[Generation], trees: bool = False) -> str:
    """The report's one acceptance figure, defined where it is printed: drafts kept / drafts proposed. A token tree
    keeps at most one draft per level, so for `trees` (a run of --tree or --matches) it is drafts kept over the trees'
    depths."""
    kept, proposed = sum(g.accepted for g in runs), sum(g.proposed for g in runs)
    rate = f"{kept / proposed:.2f}" if proposed else "n/a"
    if trees:
        return (f"acceptance rate: {rate} (drafts kept / tree depth, summed over rounds: {kept} of {proposed}; a tree "
                f"keeps at most one draft per level)")
    return f"acceptance rate: {rate} (drafts kept / drafts proposed: {kept} of {proposed})"


def tree_line(runs: list[Generation]) -> str | None:
    """What a tree run's verifications scored, over the rounds that drafted: drafts per round against the depth of
    its trees (a chain of that depth would score as many as its depth), or None when no round drafted."""
    rounds = [r for g in runs for r in g.rounds if r.lookahead > 0]
    widths = _drafted_widths(runs)  # the depths k_used says (a batch's pass's)
    if not rounds or not widths:
        return None
    nodes, depth = statistics.mean(r.nodes for r in rounds), statistics.mean(widths)
    return (f"token trees: {nodes:.1f} drafts scored per drafting round, in trees of mean depth {depth:.2f} (a chain "
            f"of that depth scores {depth:.2f})")


def run_shape(lookahead: int | str, tree=None, matches: int = 1) -> str:
    """The drafts a run asked for, as titles name them: K, and the tree (the command line's --tree, a tree policy,
    or prompt lookup's --matches)."""
    if str(tree) == "auto":  # tree_search.FittedTree: its depth changes as it fits
        return f"a tree fitted during the run, depth up to {tree.most_depth}"
    trees = f", a tree {tree}" if tree is not None else f", trees of {matches} lookup matches" if matches > 1 else ""
    return f"K={lookahead}{trees}"


def exact_rows(rows: int) -> str:
    """Exact mode's rows per target pass, and why that many."""
    from speculative_gpt2.exact import PASS_ROW_MULTIPLE

    return (f"{rows} rows: the most a round verifies, its drafts and the pending token, rounded up to a multiple of "
            f"{PASS_ROW_MULTIPLE}, at which every row of a product rounds alike")


def why_slower(spec: list[Generation], plain: list[Generation], speedup: float, *, lookahead: int | str,
               lookup: bool, dtype: torch.dtype, device, exact_rows: int | None = None,
               tree: str | None = None) -> list[str]:
    """When speculative sampling was slower than plain decoding (`speedup`: the figure the report trusts), a line
    that says why from the runs' median step costs, and one of what to try; otherwise none. `exact_rows`: the rows
    of exact mode's passes when the speculative run was in exact mode, whose prefill of a long prompt (in passes of
    that many rows) can outweigh everything else; a line says so when it did. `tree`: the command line's --tree
    (its depth is K, so no --lookahead is offered; a fixed shape is offered auto).

    The break-even is in the report's own terms: a round costs some target passes (its drafts and its
    verification, at their median pace) and yields some tokens; it pays when it yields more tokens than it costs.
    `spec` and `plain` are the rows of the runs compared (their steps and rounds pooled)."""
    drafted = [r for g in spec for r in g.rounds if r.lookahead > 0]
    plain_steps = [s for g in plain for s in g.steps]
    if speedup >= 1 or not drafted or not plain_steps:
        return []
    t_target = statistics.median(s.ms for s in plain_steps)  # a plain pass of the same rows
    # A drafting round in target passes, from the medians of its parts, so that the parts add up to the whole.
    drafts = sum(r.lookahead for r in drafted) / len(drafted)
    per_draft = statistics.median(r.draft_ms / r.lookahead for r in drafted) / t_target
    t_verify = statistics.median(r.verify_ms for r in drafted) / t_target
    cost = drafts * per_draft + t_verify
    yielded = sum(len(g.tokens) for g in spec) / sum(g.target_calls for g in spec)  # tokens per round
    each = f"lookups of {per_draft:.3f}" if lookup else f"draft passes of {per_draft:.2f}"
    kept, proposed = sum(g.accepted for g in spec), sum(g.proposed for g in spec)
    rounds = sum(len(g.rounds) for g in spec)
    empty = sum(r.lookahead == 0 for g in spec for r in g.rounds)
    if yielded < cost:
        at = k_used(spec, lookahead, short=True, tree=tree)
        line = (f"why: at {at} a drafting round cost {cost:.2f} target passes "
                f"({drafts:.2f} {each} each, and a verification of {t_verify:.2f}: medians) and yielded "
                f"{yielded:.2f} tokens: it pays only when it yields more than it costs")
        if empty and lookup:
            line += f"; the lookup found nothing to propose in {empty} of {rounds} rounds"
    else:
        line = (f"why: a round yielded {yielded:.2f} tokens for {cost:.2f} target passes, which pays, but the prefills "
                f"(the draft's too) and the last rounds of a short run took the gain")
    tries = [] if lookahead == "auto" or tree == "auto" else [
        "--lookahead auto (it lowers K when drafts are rejected)" if tree is None else
        "--tree auto (a tree fitted to the drafts kept during the run)"]
    rate = kept / proposed if proposed else 0.0
    if lookup and (rate < 0.5 or empty > rounds / 2):
        tries.append("a draft model (--draft gpt2, downloaded once; or a checkpoint folder of a small GPT-2): prompt "
                     "lookup pays where the text repeats earlier text")
    elif not lookup and rate < 0.5:
        tries.append(f"a draft model that agrees more with the target (this one's drafts were kept {rate:.0%} of the "
                     f"time)")
    if dtype != torch.bfloat16 and resolve_dtype("auto", device) == torch.bfloat16:
        tries.append("--dtype bfloat16 (native on this hardware: cheaper passes)")
    if yielded >= cost:
        tries.append("more --max-new-tokens")
    return _prefill_line(spec, plain, exact_rows) + [line] + ([f"try: {'; '.join(tries)}"] if tries else [])


def _prefill_line(spec: list[Generation], plain: list[Generation], exact_rows: int | None) -> list[str]:
    """A line when exact mode's prefill took most of the speculative run and several times plain decoding's."""
    prefill, spent = sum(g.prefill_seconds for g in spec), sum(g.seconds for g in spec)
    plain_prefill = sum(g.prefill_seconds for g in plain)
    if exact_rows is None or prefill <= spent / 2 or prefill <= 2 * plain_prefill:
        return []
    return [f"why: the prompt's prefill took {prefill:.1f} s of the speculative run's {spent:.1f} s (plain decoding's "
            f"{plain_prefill:.1f} s): exact mode, which makes the texts compare bit for bit, runs it in passes of "
            f"{exact_rows} rows, many for a long prompt; --mode speculative times it without exact mode"]


def cost_ratio(target, draft) -> float:
    """c, a draft pass's cost in target passes, taken as the ratio of the bytes of weights their passes read
    (`pass_bytes`): decoding reads every weight once per pass. A number of the models, not a measurement, so a
    run's K sequence can be reproduced. Without a draft model (prompt lookup) it is 0: a lookup reads no weights."""
    if draft is None:
        return 0.0
    return pass_bytes(draft) / pass_bytes(target)


def pass_bytes(model) -> int:
    """The bytes of weights one pass of `model` (or of the model a runner wraps) reads: every linear layer's,
    however it holds its weight (a Parameter, oneDNN's packed layout, int8 with scales), the LM head's included,
    and the layer norms'. An embedding is looked up, a few rows per pass, and not counted."""
    total = 0
    for module in getattr(model, "model", model).modules():
        if isinstance(module, torch.nn.Embedding) or hasattr(module, "table"):  # FrozenEmbedding: packing.py
            continue
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        total += sum(t.numel() * t.element_size() for t in own)
        if hasattr(module, "packed"):  # PackedLinear: its weight lives only in oneDNN's opaque tensor
            total += module.out_features * module.in_features * module.dtype.itemsize
    return total
