"""Benchmark of batched decoding: throughput over all rows at several batch sizes, in one run.

For each batch size B (default 1, 4, 8, 16) the first B of a fixed list of prompts (lengths drawn from a range by a
seed, slices of one text) are decoded greedily, every row to exactly --max-new-tokens tokens (no EOS), by:

  plain                  autoregressive_sample with the batch: one target pass per token serves all rows
  speculative, itself    speculative_sample with the target as its own draft: acceptance 1, the upper bound of
                         speculation (K + 1 tokens per round)
  speculative, lookup    speculative_sample with the prompt lookup drafter
  transformers generate  GPT2LMHeadModel.generate on the same checkpoint and dtype: left padding, attention mask,
                         greedy, min_new_tokens = max_new_tokens
  transformers assisted  generate(assistant_model=the small draft): it refuses a batch of more than one prompt; the
                         table records its error instead of leaving the cell out

and, at batch 1, each of our decoders called with one prompt (not a list): the single-prompt path, today's or,
with --before COMMIT, the code of that commit (e.g. the last one before batching) on the same weights. Runs are
interleaved (every method at every batch size, then again), and medians are reported. Throughput is new tokens over
all rows per second of the call, prefill included, and decode-only: the tokens made after the prefill over the
seconds after it (ours: the prefill is the prompt minus its last token and makes no token; transformers': its
prefill pass makes the first token, so its decode phase makes max_new_tokens - 1 per row). Each of our decoders is
also called on the first --references prompts alone, and the table says how many of those rows of a batch have the
single-prompt call's tokens (transformers' rows: plain decoding's).

    python benchmarks/batched.py --target weights/random-gpt2-xl --draft weights/random-gpt2
    python benchmarks/batched.py ... --batch-sizes 16 --references 0 --append   # add to an earlier run's JSON
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from the checkout
from gpt2_model import GPT2  # noqa: E402
from speculative import autoregressive_sample, speculative_sample  # noqa: E402
from speculative_gpt2.checkpoints import find_checkpoint  # noqa: E402
from speculative_gpt2.drafters import PromptLookupDrafter  # noqa: E402
from speculative_gpt2.machine import (  # noqa: E402
    cpu_flags, dtype_name, hardware_name, resolve_device, resolve_dtype, synchronize)
from speculative_gpt2.tokenizer import load_tokenizer  # noqa: E402

PLAIN, SELF, LOOKUP = "plain", "speculative, target itself", "speculative, prompt lookup"
HF_GENERATE, HF_ASSISTED = "transformers generate", "transformers assisted, small draft"
OURS = (PLAIN, SELF, LOOKUP)
SINGLE = "1 (single-prompt call)"
METHODS = (*OURS, HF_GENERATE, HF_ASSISTED)

# The prompts are slices of this text (public-domain prose: Turing, "Computing Machinery and Intelligence", 1950).
TEXT = (
    "I propose to consider the question, 'Can machines think?' This should begin with definitions of the meaning of "
    "the terms 'machine' and 'think'. The definitions might be framed so as to reflect so far as possible the normal "
    "use of the words, but this attitude is dangerous. If the meaning of the words 'machine' and 'think' are to be "
    "found by examining how they are commonly used it is difficult to escape the conclusion that the meaning and the "
    "answer to the question, 'Can machines think?' is to be sought in a statistical survey such as a Gallup poll. But "
    "this is absurd. Instead of attempting such a definition I shall replace the question by another, which is "
    "closely related to it and is expressed in relatively unambiguous words."
)


@dataclass(frozen=True)
class Cell:
    """One timed configuration: a method at a batch size; `single`: our decoder called with one prompt, not a list."""

    method: str
    batch: int
    single: bool = False

    @property
    def name(self) -> str:
        return f"{self.method} @ {'single-prompt call' if self.single else f'batch {self.batch}'}"


def make_prompts(count: int, shortest: int, longest: int, seed: int) -> list[list[int]]:
    """`count` prompts of lengths drawn uniformly from [shortest, longest], each a slice of TEXT at a drawn start."""
    tokens = load_tokenizer().encode(TEXT)
    if longest > len(tokens):
        raise ValueError(f"--prompt-lengths: at most {len(tokens)} tokens (the text's length), got {longest}")
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        n = rng.randint(shortest, longest)
        start = rng.randint(0, len(tokens) - n)
        prompts.append(tokens[start : start + n])
    return prompts


def kv_cache_bytes(config, dtype: torch.dtype, positions: int) -> dict:
    """KV cache of one model: a key and a value of n_embd numbers per layer and token."""
    per_token = 2 * config.n_layer * config.n_embd * torch.finfo(dtype).bits // 8
    return {"per_token": per_token, "positions": positions, "per_row": per_token * positions}


# ----------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="gpt2-xl", help="target: preset name or checkpoint folder")
    parser.add_argument("--draft", default="gpt2", help="the small draft of transformers' assisted generation")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16], help="batch sizes")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per row")
    parser.add_argument("--lookahead", type=int, default=4, help="K of the speculative rows")
    parser.add_argument("--prompt-lengths", type=int, nargs=2, default=[8, 40], metavar=("MIN", "MAX"),
                        help="prompt lengths are drawn from [MIN, MAX]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts' lengths and starts")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repetitions; medians")
    parser.add_argument("--ngram-max", type=int, default=3, help="prompt lookup: longest n-gram matched")
    parser.add_argument("--ngram-min", type=int, default=1, help="prompt lookup: shortest n-gram matched")
    parser.add_argument("--skip", nargs="+", default=[], choices=METHODS, metavar="METHOD",
                        help=f"methods not to run: {', '.join(map(repr, METHODS))}")
    parser.add_argument("--references", type=int, default=1, metavar="N",
                        help="the first N prompts are also decoded alone by each of our decoders, to check the "
                        "batched rows' tokens (prompt 0 costs nothing when batch 1 runs: its timed single call)")
    parser.add_argument("--before", metavar="COMMIT", default=None,
                        help="the single-prompt calls run speculative.py and gpt2_model.py as of this commit (the "
                        "single-prompt path before batching), on the same weights; default: today's")
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="relative noise allowed by the 'batch 1 no slower than the single-prompt call' target")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 where the hardware runs it natively, else float32")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--out", default=str(ROOT / "bench-out" / "batched.json"), help="the JSON of raw results")
    parser.add_argument("--append", action="store_true",
                        help="add to the runs of an existing --out file made with the same settings (split runs)")
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.max_new_tokens < 1 or args.repeats < 1 or args.lookahead < 1:
        parser.error("--batch-sizes, --max-new-tokens, --repeats and --lookahead must be >= 1")
    if args.references < 0:
        parser.error("--references must be >= 0")
    if not 1 <= args.prompt_lengths[0] <= args.prompt_lengths[1]:
        parser.error("--prompt-lengths MIN MAX: 1 <= MIN <= MAX")
    args.batch_sizes = sorted(set(args.batch_sizes))
    return args


def run(args) -> dict:
    """Times every cell; returns the raw results (JSON-ready)."""
    from tqdm.auto import tqdm

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    target = GPT2.from_pretrained(args.target, dtype=dtype, device=device)
    n, K = args.max_new_tokens, args.lookahead
    prompts = make_prompts(max(args.batch_sizes), *args.prompt_lengths, args.seed)
    methods = [m for m in METHODS if m not in args.skip]
    ours = {PLAIN: lambda batch, tokens, **kw: autoregressive_sample(target, batch, tokens, **kw),
            SELF: lambda batch, tokens, **kw: speculative_sample(target, target, batch, tokens, lookahead=K, **kw),
            LOOKUP: lambda batch, tokens, **kw: speculative_sample(
                target, PromptLookupDrafter(args.ngram_max, args.ngram_min), batch, tokens, lookahead=K, **kw)}
    single = ours if args.before is None else _single_prompt_before(args.before, target, K, args)
    cells = {}
    for method in methods:
        if method in ours:
            if 1 in args.batch_sizes:
                cells[Cell(method, 1, single=True)] = _ours(single[method], prompts[0], n)
            for B in args.batch_sizes:
                cells[Cell(method, B)] = _ours(ours[method], prompts[:B], n)
    hf = {m for m in methods if m not in ours}
    if hf:
        cells |= _transformers_cells(target.checkpoint_folder, args.draft, hf, prompts, args.batch_sizes, n, K,
                                     dtype, device)

    # Warm-up: allocations, kernel choices and caches, outside the timings.
    for cell, fn in cells.items():
        if cell.batch == min(args.batch_sizes):
            fn(tokens=2)
    raw = {cell: [] for cell in cells}
    with tqdm(total=len(cells) * args.repeats, desc="batched benchmark", unit="run", file=sys.stderr) as bar:
        for _ in range(args.repeats):  # interleaved, so that a slow spell of the machine hits every cell alike
            for cell, fn in cells.items():
                bar.set_postfix_str(cell.name)
                raw[cell].append(fn())
                bar.update()
    # Every prompt alone through each of our decoders: the tokens the batched rows should have.
    reference = {}
    for method in tqdm([m for m in methods if m in ours and args.references], desc="single-prompt references",
                       file=sys.stderr):
        reference[method] = [raw[Cell(method, 1, True)][0]["tokens"][0] if Cell(method, 1, True) in raw and i == 0
                             else _ours(single[method], prompt, n)()["tokens"][0]
                             for i, prompt in enumerate(prompts[: args.references])]
    return {
        "meta": {
            "target": str(target.checkpoint_folder), "draft": str(args.draft), "dtype": dtype_name(dtype),
            "device": str(device), "hardware": hardware_name(device), "torch": torch.__version__,
            "transformers": _transformers_version(), "avx512_bf16": "avx512_bf16" in cpu_flags(),
            "max_new_tokens": n, "lookahead": K, "prompt_lengths": args.prompt_lengths, "seed": args.seed,
            "ngram": [args.ngram_max, args.ngram_min], "repeats": args.repeats, "tolerance": args.tolerance,
            "before": args.before,
            "command": "python benchmarks/batched.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "prompts": prompts,
        "kv_cache": kv_cache_bytes(target.config, dtype, args.prompt_lengths[1] + n),
        "runs": {cell.name: {**asdict(cell), "repeats": runs} for cell, runs in raw.items()},
        "reference": reference,
    }


def _single_prompt_before(commit: str, target: GPT2, K: int, args) -> dict:
    """Our three decoders as of `commit` (speculative.py, gpt2_model.py, speculative_gpt2/), imported beside today's
    under the same names and put back, on a model of that commit that shares `target`'s weights (no copy)."""
    import importlib
    import io
    import subprocess
    import tarfile
    import tempfile

    folder = tempfile.mkdtemp()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "speculative.py", "gpt2_model.py",
                              "speculative_gpt2"], check=True, capture_output=True).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(folder, filter="data")
    names = ("speculative", "gpt2_model", "speculative_gpt2")
    today = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] in names}
    sys.path.insert(0, folder)
    try:
        old, old_model = importlib.import_module("speculative"), importlib.import_module("gpt2_model")
    finally:
        sys.path.remove(folder)
        for name in [name for name in sys.modules if name.split(".")[0] in names]:
            del sys.modules[name]
        sys.modules.update(today)
    with torch.device("meta"):
        model = old_model.GPT2(old_model.GPT2Config(**asdict(target.config)))
    model.load_state_dict(target.state_dict(), assign=True)
    model.eval()

    def finished(out, on_finished):  # that code has no on_finished: one prompt, done when the call returns
        on_finished(0, out)
        return out

    return {PLAIN: lambda prompt, tokens, on_finished: finished(
                old.autoregressive_sample(model, prompt, tokens), on_finished),
            SELF: lambda prompt, tokens, on_finished: finished(
                old.speculative_sample(model, model, prompt, tokens, lookahead=K), on_finished),
            LOOKUP: lambda prompt, tokens, on_finished: finished(old.speculative_sample(
                model, old.PromptLookupDrafter(args.ngram_max, args.ngram_min), prompt, tokens, lookahead=K),
                on_finished)}


def _ours(sample, batch, n):
    """A cell of one of our decoders: calls it on `batch` (a list of prompts, or one prompt) and reads back what
    the table needs. `on_finished` must be called once per row."""

    def call(tokens=n):
        finished = {}

        def on_finished(index, generation):
            finished[index] = finished.get(index, 0) + 1

        start = time.perf_counter()
        outs = sample(batch, tokens, on_finished=on_finished)
        seconds = time.perf_counter() - start
        single = not isinstance(outs, list)
        outs = [outs] if single else outs
        if finished != {i: 1 for i in range(len(outs))}:
            raise AssertionError(f"on_finished calls per row {finished}, expected one per row of {len(outs)}")
        return {"seconds": seconds, "prefill_seconds": max(g.prefill_seconds for g in outs),
                "row_seconds": [g.seconds for g in outs], "tokens": [g.tokens for g in outs],
                "decode_tokens": sum(len(g.tokens) for g in outs),
                "target_calls": [g.target_calls for g in outs], "draft_calls": [g.draft_calls for g in outs],
                "accepted": sum(g.accepted for g in outs), "proposed": sum(g.proposed for g in outs), "error": None}

    return lambda tokens=n: call(tokens)


def _transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def _transformers_cells(target_folder, draft, methods, prompts, batch_sizes, n, K, dtype, device) -> dict:
    """transformers' generate and assisted generation on the same checkpoint, dtype and device."""
    from transformers import GPT2LMHeadModel
    from transformers.generation.streamers import BaseStreamer
    from transformers.utils import logging

    logging.set_verbosity_error()
    hf_target = GPT2LMHeadModel.from_pretrained(target_folder, dtype=dtype).to(device).eval()
    hf_draft = None
    if HF_ASSISTED in methods:
        folder = find_checkpoint(draft)
        hf_draft = GPT2LMHeadModel.from_pretrained(folder, dtype=dtype).to(device).eval()
        # Read from the ASSISTANT's generation config (see benchmarks/bench.py): K drafts every round.
        hf_draft.generation_config.num_assistant_tokens = K
        hf_draft.generation_config.num_assistant_tokens_schedule = "constant"
        hf_draft.generation_config.assistant_confidence_threshold = 0.0

    class FirstToken(BaseStreamer):
        """Notes when generate hands out its first new tokens (its second `put`; the first is the prompt)."""

        def __init__(self):
            self.puts, self.first = 0, None

        def put(self, value):
            self.puts += 1
            if self.puts == 2:
                synchronize(device)
                self.first = time.perf_counter()

        def end(self):
            pass

    def generate(batch, assisted, tokens=n):
        # Left padding: every row's last prompt token is in the last column, where generation continues.
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), 50256, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, prompt in enumerate(batch):
            ids[i, width - len(prompt):] = torch.tensor(prompt, device=device)
            mask[i, width - len(prompt):] = 1
        streamer = FirstToken()
        extra = dict(assistant_model=hf_draft) if assisted else {}
        synchronize(device)
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                out = hf_target.generate(ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                                         do_sample=False, pad_token_id=50256, streamer=streamer, **extra)
        except ValueError as error:  # assisted generation and a batch of more than one prompt
            return {"error": f"{type(error).__name__}: {error}"}
        synchronize(device)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "prefill_seconds": streamer.first - start,
                "tokens": out[:, width:].tolist(), "decode_tokens": len(batch) * (tokens - 1), "error": None}

    cells = {}
    for B in batch_sizes:
        for method in (HF_GENERATE, HF_ASSISTED):
            if method in methods:
                cells[Cell(method, B)] = lambda tokens=n, batch=prompts[:B], a=method == HF_ASSISTED: \
                    generate(batch, a, tokens)
    return cells


# ----------------------------------------------------------------------------------------------------------
# The table


def derive(results: dict) -> list[dict]:
    """One row per cell: medians over the repeats, throughput, the ratios the targets ask for."""
    runs, reference = results["runs"], results["reference"]
    table = []
    for name, r in runs.items():
        first = r["repeats"][0]
        row = {"name": name, "method": r["method"], "batch": r["batch"], "single": r["single"],
               "error": first.get("error")}
        if row["error"] is None:
            seconds = statistics.median(x["seconds"] for x in r["repeats"])
            decode = statistics.median(x["seconds"] - x["prefill_seconds"] for x in r["repeats"])
            tokens = sum(map(len, first["tokens"]))
            row |= {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                    "decode_tokens_per_s": first["decode_tokens"] / decode,
                    "prefill_seconds": statistics.median(x["prefill_seconds"] for x in r["repeats"])}
            if "target_calls" in first:
                row["tokens_per_target_pass"] = tokens / max(first["target_calls"])
                row["acceptance"] = first["accepted"] / first["proposed"] if first["proposed"] else None
            # transformers' rows against our plain single-prompt calls: the same work, if its padding is right.
            expected = reference.get(r["method"] if r["method"] in OURS else PLAIN)
            if expected is not None:
                checked = list(zip(first["tokens"], expected))  # the rows whose prompt has a reference
                row["rows_equal"], row["rows_checked"] = sum(a == b for a, b in checked), len(checked)
        table.append(row)
    by = {(row["method"], row["batch"], row["single"]): row for row in table}
    for row in table:
        one = by.get((row["method"], 1, False))
        if "tokens_per_s" in row and not row["single"] and one is not None and "tokens_per_s" in one:
            row["over_batch_1"] = row["tokens_per_s"] / one["tokens_per_s"]
        hf = by.get((HF_GENERATE, row["batch"], False))
        if row["method"] == PLAIN and not row["single"] and hf is not None and "tokens_per_s" in hf:
            row["over_transformers"] = row["tokens_per_s"] / hf["tokens_per_s"]
            row["decode_over_transformers"] = row["decode_tokens_per_s"] / hf["decode_tokens_per_s"]
        single = by.get((row["method"], 1, True))
        if row["batch"] == 1 and not row["single"] and single is not None:
            row["over_single"] = row["tokens_per_s"] / single["tokens_per_s"]
    return table


def targets(results: dict, table: list[dict]) -> list[str]:
    """The issue's targets, each with its figures and a verdict."""
    by = {(row["method"], row["batch"], row["single"]): row for row in table}
    tolerance = results["meta"]["tolerance"]
    lines = []
    for method in (SELF, LOOKUP):
        row = by.get((method, 8, False))
        if row is not None and "over_batch_1" in row:
            lines.append(f"- {method}: batch 8 / batch 1 = {row['over_batch_1']:.2f}x (target >= 4x): "
                         f"{_verdict(row['over_batch_1'] >= 4)}")
    plain = [row for row in table if "over_transformers" in row]
    if plain:
        ratios = ", ".join(f"batch {row['batch']}: {row['over_transformers']:.2f}x" for row in plain)
        met = all(row["over_transformers"] >= 1 for row in plain)
        lines.append(f"- plain over transformers generate, tokens/s (target >= 1x at every batch size): {ratios}: "
                     f"{_verdict(met)}")
    for method in OURS:
        row = by.get((method, 1, False))
        if row is not None and "over_single" in row:
            lines.append(f"- {method}: batch 1 / single-prompt call = {row['over_single']:.2f}x (target: no slower, "
                         f"within {tolerance:.0%} noise): {_verdict(row['over_single'] >= 1 - tolerance)}")
    return lines


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def _fmt(x, spec=".2f"):
    return "" if x is None else format(x, spec)


def markdown(results: dict) -> str:
    meta, kv = results["meta"], results["kv_cache"]
    table = derive(results)
    lengths = [len(p) for p in results["prompts"]]
    lines = [
        f"Target {meta['target']} ({meta['dtype']} on {meta['device']}: {meta['hardware']}, avx512_bf16: "
        f"{'yes' if meta['avx512_bf16'] else 'no'}), torch {meta['torch']}, transformers {meta['transformers']}; "
        f"greedy, {meta['max_new_tokens']} new tokens per row (no EOS), K = {meta['lookahead']}, prompt lookup "
        f"n-grams {meta['ngram']} (max, min); prompt lengths {lengths} (seed {meta['seed']}; batch B takes the first "
        f"B); median of {meta['repeats']} interleaved runs; {meta['date']}. {SINGLE}: "
        + (f"speculative.py and gpt2_model.py as of {meta['before']}, on the same weights." if meta.get("before")
           else "today's code, called with one prompt, not a list."),
        f"Command: `{meta['command']}`",
        "",
        "| method | batch | seconds | tokens/s (all rows) | decode-only tokens/s | x batch 1 | plain / transformers "
        "| tokens per target pass (all rows) | acceptance "
        "| rows equal to the single-prompt call (transformers: to plain's) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in sorted(table, key=lambda r: (METHODS.index(r["method"]), r["batch"], not r["single"])):
        batch = SINGLE if row["single"] else str(row["batch"])
        if row["error"] is not None:
            lines.append(f"| {row['method']} | {batch} | refused: {row['error']} | | | | | | | |")
            continue
        equal = f"{row['rows_equal']}/{row['rows_checked']}" if "rows_equal" in row else ""
        lines.append(
            f"| {row['method']} | {batch} | {row['seconds']:.2f} | {row['tokens_per_s']:.2f} | "
            f"{row['decode_tokens_per_s']:.2f} | {_fmt(row.get('over_batch_1'))} | "
            f"{_fmt(row.get('over_transformers'))} | {_fmt(row.get('tokens_per_target_pass'))} | "
            f"{_fmt(row.get('acceptance'))} | {equal} |")
    lines += [
        "",
        f"KV cache: {kv['per_token']} bytes per token ({kv['per_token'] / 1024:.1f} KiB: 2 x n_layer x n_embd x "
        f"{meta['dtype']}), "
        f"{kv['per_row'] / 2**20:.1f} MiB per row at {kv['positions']} positions (longest prompt + new tokens); "
        f"the target as its own draft keeps a second cache of the same size per row.",
        "",
        "Targets:",
        *targets(results, table),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    out = Path(args.out)
    if args.append and out.exists():
        results = _merged(json.loads(out.read_text()), results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    print(f"\nraw results: {out}", file=sys.stderr)
    return 0


def _merged(earlier: dict, new: dict) -> dict:
    """An earlier run's results with this run's cells added (they replace cells of the same name)."""
    same = ("target", "dtype", "device", "max_new_tokens", "lookahead", "prompt_lengths", "seed", "ngram")
    differ = [key for key in same if earlier["meta"][key] != new["meta"][key]]
    if differ:
        raise SystemExit(f"--append: {', '.join(differ)} differ from the earlier run in the JSON: use another --out")
    merged = copy.deepcopy(new)
    merged["runs"] = earlier["runs"] | new["runs"]
    merged["reference"] = {method: max(earlier["reference"].get(method, []), new["reference"].get(method, []), key=len)
                           for method in earlier["reference"] | new["reference"]}
    merged["prompts"] = max(earlier["prompts"], new["prompts"], key=len)
    merged["meta"]["command"] = earlier["meta"]["command"] + "; " + new["meta"]["command"]
    merged["meta"]["before"] = new["meta"]["before"] or earlier["meta"]["before"]
    return merged


if __name__ == "__main__":
    sys.exit(main())
