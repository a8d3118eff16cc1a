"""Benchmark: speculative sampling beside naive decoding and Hugging Face `transformers`, in one run.

Everything is measured in the same process, on the same weights, dtype and device, after a warm-up, with
interleaved repetitions (medians reported). It prints a markdown table, writes every raw time to a JSON file
and plots speedup against K. From the measured acceptance rate a and per-pass costs it also prints the speedup
the algorithm predicts (Chen et al. 2023, section 3):

    E = (1 - a^(K+1)) / (1 - a) tokens per round,   predicted = E * t_target / (K * t_draft + t_verify(K+1))

where a is the chance that one draft is kept, estimated as kept / (kept + rejections). The table also shows
"acceptance", kept / proposed drafts, which is lower: drafts after a rejection are proposed but never tested.

    python benchmarks/bench.py --random-weights             # GPT-2 XL / small shapes, random weights
    python benchmarks/bench.py --random-weights --quick     # a short look
    python benchmarks/bench.py --drafts small ngram   # drafters (before / after a change: benchmarks/before_after.py)

The drafts: "small" (the draft model), "target itself" (with --random-weights: acceptance 1) and "ngram" (prompt
lookup, speculative_gpt2/drafters.py), beside transformers' assisted generation and its own prompt lookup
(`generate(..., prompt_lookup_num_tokens=K)`).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from the checkout
from speculative_gpt2.random_checkpoint import write_random_checkpoint  # noqa: E402
from speculative_gpt2.checkpoints import default_weights_dir  # noqa: E402
from speculative_gpt2.cli import DEFAULT_PROMPT  # noqa: E402
from gpt2_model import GPT2  # noqa: E402
from speculative_gpt2.machine import dtype_name, hardware_name, resolve_device, resolve_dtype, synchronize  # noqa: E402
from speculative_gpt2.lookahead import AdaptiveLookahead, break_even_alpha, estimated_alpha, predicted_speedup  # noqa: E402
from speculative import Origin, autoregressive_sample, speculative_sample  # noqa: E402
from speculative_gpt2.drafters import PromptLookupDrafter  # noqa: E402
from speculative_gpt2.packing import lay_out  # noqa: E402
from speculative_gpt2.report import pass_bytes  # noqa: E402
from speculative_gpt2.tokenizer import load_tokenizer  # noqa: E402

# The toyllm blog post ("Implementing LLM Speculative Sampling in Under 100 Lines of Code"): GPT-2 XL / small,
# K = 4, temperature 0, 256 tokens: 4.06 tokens per target pass.
TOYLLM_TOKENS_PER_ROUND = 4.06


@dataclass(frozen=True)
class Row:
    """One row of the table: a method, and for speculative and assisted rows the draft and K (None: our
    adaptive lookahead, or transformers' default schedule)."""

    method: str  # one of METHODS
    draft: str | None = None  # one of DRAFTS
    lookahead: int | None = None

    @property
    def name(self) -> str:
        if self.draft is None:
            return self.method
        K = self.lookahead if self.lookahead is not None else "auto" if self.method == SPECULATIVE else None
        return f"{self.method}, {self.draft}, " + (f"K={K}" if K is not None else "defaults")


NAIVE, UNCACHED, SPECULATIVE = "naive (KV cache)", "naive (no cache)", "speculative"
HF_GENERATE, HF_ASSISTED, HF_LOOKUP = "transformers generate", "transformers assisted", "transformers prompt lookup"
DRAFTS = ("small", "target itself", "ngram")


@torch.inference_mode()
def pass_ms(model: GPT2, prompt_len: int, rows: int, repeats: int = 5) -> float:
    """Median ms of one cached forward pass over `rows` new tokens after a `prompt_len`-token prefix."""
    device = model.device
    cache = model.new_cache(max_len=prompt_len + rows)
    model(torch.arange(prompt_len, device=device)[None], cache=cache)
    x = torch.arange(rows, device=device)[None]
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        synchronize(device)
        start = time.perf_counter()
        model(x, cache=cache)
        synchronize(device)
        times.append(time.perf_counter() - start)
        cache.crop(prompt_len)
    return 1e3 * statistics.median(times[1:])


def pass_costs(target: GPT2, draft: GPT2, prompt_len: int, Ks: list[int]) -> dict:
    """The target's one-row pass in naive decoding's layout, the draft's one-row pass, the target's verification
    passes and its one-row pass in their layout (the target as its own draft): cached passes after `prompt_len`
    tokens, each layout as the runs have it (laid_out)."""
    laid_out(target, 1)
    costs = {"target_ms": pass_ms(target, prompt_len, 1), "draft_ms": pass_ms(draft, prompt_len, 1)}
    costs["verify_ms"] = {str(K): pass_ms(laid_out(target, K + 1), prompt_len, K + 1) for K in Ks}  # str: JSON keys
    costs["own_draft_ms"] = {str(K): pass_ms(laid_out(target, K + 1), prompt_len, 1) for K in Ks}
    return costs


def laid_out(model, rows: int):
    """`model` with its weights in the layout that runs passes of `rows` rows faster on this CPU (packing.lay_out;
    a CUDA graph runner's model stays as it is): changed outside every clock, before a run."""
    if isinstance(model, GPT2):
        lay_out(model, rows)
    return model


def memory_bandwidth_gbs(device, size_bytes: int = 1 << 30) -> float:
    """GB/s of reading one large tensor (median of 5): the ceiling for memory-bound decoding."""
    x = torch.ones(size_bytes // 4, dtype=torch.float32, device=device)
    times = []
    for _ in range(6):
        synchronize(device)
        start = time.perf_counter()
        x.sum()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return size_bytes / statistics.median(times[1:]) / 1e9


# ----------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="gpt2-xl", help="target: preset name or checkpoint folder (default gpt2-xl)")
    parser.add_argument("--draft", default="gpt2", help="draft: preset name or checkpoint folder (default gpt2)")
    parser.add_argument("--random-weights", action="store_true",
                        help="use random checkpoints of the presets' real shapes (written once to weights/random-*); "
                        "the drafts are then the small model (acceptance ~0) and the target itself (acceptance 1)")
    parser.add_argument("--looping-target", action="store_true",
                        help="with --random-weights: the target's random weights use GPT-2's scaled residual "
                        "projections (weights/random-*-looping, written once), so that its greedy text repeats a "
                        "token: the case prompt lookup is for")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt (default: the toyllm blog post's)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per run (default 64)")
    parser.add_argument("--lookahead", type=int, nargs="+", default=[1, 2, 4, 8], help="values of K (default 1 2 4 8)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; medians (default 3)")
    parser.add_argument("--drafts", nargs="+", choices=DRAFTS, default=None,
                        help="drafts to run (default: small and ngram, and with --random-weights the target itself)")
    parser.add_argument("--ngram-max", type=int, default=3, help="prompt lookup: longest n-gram matched (default 3)")
    parser.add_argument("--ngram-min", type=int, default=1, help="prompt lookup: shortest n-gram matched (default 1)")
    parser.add_argument("--no-auto", action="store_true", help="skip the K=auto rows")
    parser.add_argument("--skip", nargs="+", default=[], metavar="ROW",
                        help='rows not to run, by name, e.g. "transformers generate"')
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default) is greedy; > 0 samples, every run from the same seed (no transformers rows)")
    parser.add_argument("--quick", action="store_true", help="32 tokens, K in {2, 4}, 1 repetition")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 where the hardware runs it natively, else float32 (default auto)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--cuda-graphs", action="store_true", help="our decoders replay CUDA graphs (cuda_graphs.py)")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers rows")
    parser.add_argument("--no-uncached", action="store_true", help="skip the (slow) uncached naive row")
    parser.add_argument("--weights-dir", default=str(default_weights_dir()), help="where checkpoints live")
    parser.add_argument("--out", default=str(ROOT / "bench-out"), help="folder for bench.json and bench.png")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_new_tokens, args.lookahead, args.repeats = 32, [2, 4], 1
    if args.max_new_tokens < 1 or args.repeats < 1 or min(args.lookahead) < 1:
        parser.error("--max-new-tokens, --repeats and --lookahead must be >= 1")
    if args.drafts is None:
        args.drafts = ["small", "target itself", "ngram"] if args.random_weights else ["small", "ngram"]
    if "target itself" in args.drafts and not args.random_weights:
        parser.error("--drafts 'target itself' needs --random-weights")
    if args.looping_target and not args.random_weights:
        parser.error("--looping-target needs --random-weights")
    if args.temperature > 0:
        args.no_transformers = True
    return args


def shown(path: Path | str) -> str:
    """A checkpoint as the results name it: relative to the checkout when inside it, so that no machine's path is
    recorded."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except (ValueError, OSError):
        return str(path)


def checkpoint_folders(args) -> tuple[Path | str, Path | str]:
    if not args.random_weights:
        return args.target, args.draft
    folders = []
    for name, looping in ((args.target, args.looping_target), (args.draft, False)):
        folder = Path(args.weights_dir) / (f"random-{name}-looping" if looping else f"random-{name}")
        if not (folder / "model.safetensors").exists():
            print(f"writing a random checkpoint of {name}'s shape to {folder} (once) ...", file=sys.stderr)
            write_random_checkpoint(name, folder, seed=0, scaled_residuals=looping)
        folders.append(folder)
    return tuple(folders)


def run(args) -> dict:
    from tqdm.auto import tqdm

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    target_path, draft_path = checkpoint_folders(args)
    load = dict(weights_dir=args.weights_dir, dtype=dtype, device=device)
    # The weights' layout (CPU: packed for oneDNN or plain, laid_out) for the passes each run makes, before its clock;
    # CUDA graphs through runners.
    target, small = (GPT2.from_pretrained(path, **load) for path in (target_path, draft_path))
    laid_out(small, 1)
    if args.cuda_graphs:
        from speculative_gpt2.cuda_graphs import CUDAGraphRunner

        target, small = CUDAGraphRunner(target), CUDAGraphRunner(small)
    lookup = partial(PromptLookupDrafter, args.ngram_max, args.ngram_min)
    drafts = {name: {"small": small, "target itself": target, "ngram": lookup}[name] for name in args.drafts}
    prompt = load_tokenizer().encode(args.prompt)
    n = args.max_new_tokens
    Ks = sorted(set(args.lookahead))
    auto = [] if args.no_auto else [None]
    sampling = dict(temperature=args.temperature)

    def seeded():  # every run samples from the same seed
        return dict(generator=torch.Generator(device).manual_seed(0)) if args.temperature > 0 else {}

    # Every row is a function returning a dict: seconds, tokens and, for ours, the rounds' statistics.
    def naive():
        return _ours(autoregressive_sample(laid_out(target, 1), prompt, n, **sampling, **seeded()))

    def speculative(draft, K, sampler=speculative_sample):
        policy = AdaptiveLookahead() if K is None else K  # a fresh policy for every run
        draft = draft() if isinstance(draft, partial) else draft  # a fresh lookup drafter too
        return _ours(sampler(laid_out(target, (K or policy.first) + 1), draft, prompt, n, lookahead=policy,
                             **sampling, **seeded()))

    rows = {Row(NAIVE): naive}
    for draft_name, draft in drafts.items():
        for K in [*Ks, *auto]:
            rows[Row(SPECULATIVE, draft_name, K)] = partial(speculative, draft, K)
    if not args.no_transformers:
        rows.update(_transformers_rows(target_path, draft_path, drafts, Ks, auto, prompt, n, dtype, device,
                                       args.ngram_max))
    rows = {row: fn for row, fn in rows.items() if row.name not in args.skip or row == Row(NAIVE)}
    once = {}
    if not args.no_uncached:
        once[Row(UNCACHED)] = lambda: _ours(autoregressive_sample(target, prompt, n, use_cache=False))

    # Warm-up: allocations, kernel selection and caches, outside the timings.
    speculative_sample(laid_out(target, 5), small, prompt, 4, lookahead=2)
    speculative_sample(target, lookup(), prompt, 4, lookahead=2)
    autoregressive_sample(laid_out(target, 1), prompt, 4)
    raw = {row: [] for row in [*rows, *once]}
    raw_costs = []
    with tqdm(total=len(rows) * args.repeats + len(once), desc="benchmark", unit="run", file=sys.stderr) as bar:
        for _ in range(args.repeats):  # interleaved, so that a slow spell of the machine hits every row alike
            for row, fn in rows.items():
                raw[row].append(fn())
                bar.update()
            raw_costs.append(pass_costs(target, small, len(prompt), Ks))  # the pass costs too
        for row, fn in once.items():
            raw[row].append(fn())
            bar.update()
    per_K = ("verify_ms", "own_draft_ms")
    costs = {key: statistics.median(c[key] for c in raw_costs) for key in raw_costs[0] if key not in per_K}
    for key in per_K:
        costs[key] = {K: statistics.median(c[key][K] for c in raw_costs) for K in raw_costs[0][key]}
    bandwidth = memory_bandwidth_gbs(device)
    naive_tokens = raw[Row(NAIVE)][0]["tokens"]
    results = {
        "meta": {
            "target": shown(target_path), "draft": shown(draft_path), "random_weights": args.random_weights,
            "looping_target": args.looping_target,
            "dtype": dtype_name(dtype), "device": str(device), "torch": torch.__version__,
            "hardware": hardware_name(device), "prompt": args.prompt, "prompt_tokens": len(prompt),
            "max_new_tokens": n, "lookahead": Ks, "repeats": args.repeats, "cuda_graphs": args.cuda_graphs,
            "temperature": args.temperature, "ngram": [args.ngram_max, args.ngram_min],
            "command": "python benchmarks/bench.py " + " ".join(sys.argv[1:]),
        },
        "raw_costs": raw_costs,
        "costs": costs | {
            "bandwidth_gbs": bandwidth,
            "target_bytes": pass_bytes(target), "draft_bytes": pass_bytes(small),
            "target_floor_ms": pass_bytes(target) / bandwidth / 1e6,
            "draft_floor_ms": pass_bytes(small) / bandwidth / 1e6,
        },
        "runs": {row.name: {**asdict(row), "seconds": [r["seconds"] for r in runs],
                            **{k: v for k, v in runs[0].items() if k != "seconds"},
                            "identical": runs[0]["tokens"] == naive_tokens,
                            "first_difference": _first_difference(runs[0]["tokens"], naive_tokens)}
                 for row, runs in raw.items()},
    }
    results["table"] = derive(results)
    return results


def _ours(out) -> dict:
    return {"seconds": out.seconds, "tokens": out.tokens, "accepted": out.accepted, "proposed": out.proposed,
            "rejections": out.origins.count(Origin.RESAMPLED), "lookahead_per_round": out.lookahead_per_round,
            "rounds": len(out.accepted_per_round) if out.draft_calls else None}


def _transformers_rows(target_path, draft_path, drafts, Ks, auto, prompt, n, dtype, device, ngram_max) -> dict:
    """Plain `generate`, assisted generation and prompt lookup of `transformers` on the same checkpoints."""
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    hf_target = GPT2LMHeadModel.from_pretrained(target_path, dtype=dtype).to(device).eval()
    hf_drafts = {}
    if "small" in drafts:
        hf_drafts["small"] = GPT2LMHeadModel.from_pretrained(draft_path, dtype=dtype).to(device).eval()
    if "target itself" in drafts:
        hf_drafts["target itself"] = hf_target
    ids = torch.tensor([prompt], device=device)
    fixed = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=50256)

    def generate(**kwargs):
        with torch.inference_mode():
            synchronize(device)
            start = time.perf_counter()
            out = hf_target.generate(ids, attention_mask=torch.ones_like(ids), **fixed, **kwargs)
            synchronize(device)
        return {"seconds": time.perf_counter() - start, "tokens": out[0, len(prompt):].tolist(), "rounds": None}

    def assisted(draft, **settings):
        # The candidate generator reads num_assistant_tokens & co. from the ASSISTANT's generation config (passed
        # to generate() they would be ignored), and adapts that config between calls: set them there, and restore
        # it after each call so that every call starts alike.
        saved = copy.deepcopy(draft.generation_config)
        try:
            for key, value in settings.items():
                setattr(draft.generation_config, key, value)
            return generate(assistant_model=draft)
        finally:
            draft.generation_config = saved

    rows = {Row(HF_GENERATE): generate}
    for name, draft in hf_drafts.items():
        for K in Ks:
            rows[Row(HF_ASSISTED, name, K)] = partial(assisted, draft, num_assistant_tokens=K,
                                                      num_assistant_tokens_schedule="constant",
                                                      assistant_confidence_threshold=0.0)
        if auto:
            rows[Row(HF_ASSISTED, name)] = partial(assisted, draft)
    if "ngram" in drafts:
        for K in Ks:  # transformers matches the first (leftmost) occurrence of up to max_matching_ngram_size tokens
            rows[Row(HF_LOOKUP, "ngram", K)] = partial(generate, prompt_lookup_num_tokens=K,
                                                       max_matching_ngram_size=ngram_max)
    return rows


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def derive(results: dict) -> list[dict]:
    """The table's rows: medians, speedups and, for speculative rows, predicted speedup and efficiency."""
    costs, runs = results["costs"], results["runs"]
    naive = statistics.median(runs[Row(NAIVE).name]["seconds"])
    table = []
    for name, r in runs.items():
        seconds = statistics.median(r["seconds"])
        row = {"name": name, "seconds": seconds, "tokens_per_s": len(r["tokens"]) / seconds,
               "speedup": naive / seconds, "acceptance": None, "alpha": None, "tokens_per_round": None,
               "predicted": None, "break_even": None, "efficiency": None, "identical": r["identical"],
               "first_difference": r["first_difference"]}
        if r["method"] == SPECULATIVE:
            row["acceptance"] = r["accepted"] / r["proposed"] if r["proposed"] else None
            row["alpha"] = estimated_alpha(r["accepted"], r["rejections"])
            row["tokens_per_round"] = len(r["tokens"]) / len(r["lookahead_per_round"])
            K = r["lookahead"]
            # No prediction for the lookup: it proposes nothing in some rounds, which E(alpha, K) does not model.
            if K is not None and r["draft"] != "ngram":
                own = costs.get("own_draft_ms", {}).get(str(K), costs["target_ms"])  # older files: none
                draft_ms = own if r["draft"] == "target itself" else costs["draft_ms"]
                row["predicted"] = predicted_speedup(row["alpha"], K, draft_ms, costs["verify_ms"][str(K)],
                                                     costs["target_ms"])
                row["break_even"] = break_even_alpha(K, draft_ms, costs["verify_ms"][str(K)], costs["target_ms"])
                row["efficiency"] = row["speedup"] / row["predicted"]
        table.append(row)
    return table


def _sampling(temperature) -> str:
    return f"temperature {temperature} (seed 0)" if temperature else "greedy"


def _fmt(x, digits=2):
    return "" if x is None else f"{x:.{digits}f}"


def _break_even(row: dict) -> str:
    # The alpha this K needs at these pass costs to match naive decoding; "none" where no alpha can.
    if row["predicted"] is None:
        return ""
    return "none" if row["break_even"] is None else f"{row['break_even']:.2f}"


def markdown(results: dict) -> str:
    meta, costs = results["meta"], results["costs"]
    weights = "random weights of the real shapes" if meta["random_weights"] else "real checkpoints"
    if meta.get("looping_target"):
        weights += "; the target's with GPT-2's scaled residual projections, so that its greedy text loops"
    lines = [
        f"Target {meta['target']}, draft {meta['draft']} ({weights}); {meta['dtype']} on {meta['device']}"
        f"{' with CUDA graphs' if meta.get('cuda_graphs') else ''} "
        f"({meta['hardware']}), torch {meta['torch']}; {meta['max_new_tokens']} new tokens after a "
        f"{meta['prompt_tokens']}-token prompt, "
        f"{_sampling(meta.get('temperature'))}, "
        f"median of {meta['repeats']} interleaved runs; prompt lookup n-grams {meta.get('ngram')} (max, min).",
        f"Command: `{meta['command']}`",
        "",
        "| run | seconds | tokens/s | speedup vs naive (KV cache) | acceptance | alpha | break-even alpha | tokens/round | predicted | efficiency | same tokens as naive |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in results["table"]:
        same = "yes" if row["identical"] else f"no (from token {row['first_difference']})"
        lines.append(f"| {row['name']} | {row['seconds']:.2f} | {row['tokens_per_s']:.2f} | {row['speedup']:.2f} | "
                     f"{_fmt(row['acceptance'])} | {_fmt(row['alpha'])} | {_break_even(row)} | "
                     f"{_fmt(row['tokens_per_round'])} | "
                     f"{_fmt(row['predicted'])} | "
                     f"{_fmt(row['efficiency'])} | {same} |")
    verify = ", ".join(f"K+1={int(K) + 1}: {ms:.1f} ms (v={ms / costs['target_ms']:.2f})"
                       for K, ms in costs["verify_ms"].items())
    lines += [
        "",
        f"Per pass: target {costs['target_ms']:.1f} ms/token, draft {costs['draft_ms']:.1f} ms/token "
        f"(cost ratio {costs['draft_ms'] / costs['target_ms']:.3f}); target verification {verify}.",
        f"Memory: bandwidth {costs['bandwidth_gbs']:.1f} GB/s; weights {costs['target_bytes'] / 1e9:.2f} GB (target), "
        f"{costs['draft_bytes'] / 1e9:.2f} GB (draft); bandwidth floor {costs['target_floor_ms']:.1f} and "
        f"{costs['draft_floor_ms']:.1f} ms/token.",
    ]
    if "4" in costs["verify_ms"]:
        projected = projection(results)
        lines.append(
            f"Projection (not a measurement): with the toyllm blog post's {TOYLLM_TOKENS_PER_ROUND} tokens per round at K=4 "
            f"(real GPT-2 XL / small), these costs give {projected['over_cached']:.2f}x over naive decoding with "
            f"KV cache" + (f" and {projected['over_uncached']:.2f}x over naive decoding without it."
                           if projected["over_uncached"] else "."))
    return "\n".join(lines)


def projection(results: dict) -> dict:
    """The real pair's speedup from the measured pass costs and the toyllm blog post's 4.06 tokens per round at
    K=4."""
    costs, runs = results["costs"], results["runs"]
    round_ms = 4 * costs["draft_ms"] + costs["verify_ms"]["4"]
    per_token_ms = round_ms / TOYLLM_TOKENS_PER_ROUND
    uncached = runs.get(Row(UNCACHED).name)
    uncached_ms = 1e3 * statistics.median(uncached["seconds"]) / len(uncached["tokens"]) if uncached else None
    return {"round_ms": round_ms, "over_cached": costs["target_ms"] / per_token_ms,
            "over_uncached": uncached_ms / per_token_ms if uncached_ms else None}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    runs = results["runs"]
    for method, style in ((SPECULATIVE, "o-"), (HF_ASSISTED, "s--"), (HF_LOOKUP, "^--")):
        for draft in DRAFTS:
            rows = [r for r in results["table"] if runs[r["name"]]["method"] == method
                    and runs[r["name"]]["draft"] == draft and runs[r["name"]]["lookahead"] is not None]
            if rows:
                Ks = [runs[r["name"]]["lookahead"] for r in rows]
                label = ("ours" if method == SPECULATIVE else method) + f", draft: {draft}"
                ax.plot(Ks, [r["speedup"] for r in rows], style, label=label)
                color = ax.lines[-1].get_color()
                if method == SPECULATIVE and draft != "ngram":
                    ax.plot(Ks, [r["predicted"] for r in rows], ":", color=color, label=f"predicted, draft: {draft}")
                auto = next((r for r in results["table"] if r["name"] == Row(SPECULATIVE, draft).name), None)
                if method == SPECULATIVE and auto is not None:
                    chosen = runs[auto["name"]]["lookahead_per_round"]
                    ax.plot([sum(chosen) / len(chosen)], [auto["speedup"]], "*", ms=12, color=color,
                            label=f"ours, K=auto (at its mean K), draft: {draft}")
    ax.axhline(1.0, color="gray", lw=0.8)
    meta = results["meta"]
    ax.set(xlabel="K (draft tokens per round)", ylabel="speedup over naive decoding (KV cache)",
           title=f"{Path(meta['target']).name} / {Path(meta['draft']).name}, {meta['dtype']}, {meta['device']}")
    ax.set_xticks(meta["lookahead"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "bench.png")
    print(markdown(results))
    print(f"\nraw times: {out / 'bench.json'}; plot: {out / 'bench.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
