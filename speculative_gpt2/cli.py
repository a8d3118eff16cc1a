"""The command line (`speculative-gpt2`, or `python speculative.py` in a checkout): plain decoding and speculative sampling side by side, timed, with a summary.

    python speculative.py --prompt "Alan Turing theorized that computers would one day become"

It loads both models, warms every run up, runs plain decoding with the target and then speculative sampling with
the same seed, streaming each text, and prints a summary. When it compares the texts (temperature 0, or --coupled)
it also runs plain decoding in exact mode (speculative_gpt2/exact.py: every target pass of the verification's
shape), so that the texts are identical in every dtype; the speedup stays measured against the fastest plain
decoding (1-row passes), and the summary says what exact mode cost it. Each run is checked against its own steps
at their median pace, so that a busy machine is named rather than believed (speculative_gpt2/timing.py). Bad
input, missing weights and failed downloads print one line and exit with status 2.

    python speculative.py --prompts-file prompts.txt --batch-size 8 --output results.jsonl

decodes every prompt of a file in batches and writes one JSON line per prompt as soon as it finishes, with a
progress bar and a summary on stderr (speculative_gpt2/prompts_file.py).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import os
import signal
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from gpt2_model import GPT2, GPT2Config
from speculative import autoregressive_sample, speculative_sample
from speculative_gpt2.checkpoints import (ENV_WEIGHTS, DownloadError, checkpoint_config, describe_default_weights_dir,
                                          find_checkpoint, not_a_checkpoint, offline, preset_of)
from speculative_gpt2.checks import check_integer, check_real
from speculative_gpt2.drafters import PromptLookupDrafter
from speculative_gpt2.errors import OutOfMemory, asked_size, is_out_of_memory
from speculative_gpt2.exact import padded_rows
from speculative_gpt2.files import open_output, refuse_unless_regular, write_page
from speculative_gpt2.int8 import is_int8, quantize_int8
from speculative_gpt2.lookahead import AdaptiveLookahead
from speculative_gpt2.machine import (DTYPES, dtype_name, hardware_name, native_bfloat16, peak_memory,
                                     resolve_device, resolve_dtype)
from speculative_gpt2.packing import PackedLinear, lay_out
from speculative_gpt2.records import Generation
from speculative_gpt2.report import (EXACT, PLAIN, NGRAM, SPECULATIVE, UNCACHED, acceptance, cost_ratio, exact_rows,
                                     k_used, parted, run_shape, tree_line, why_slower)
from speculative_gpt2.timing import Timed, cpu_share, middle_half, pace_line, speedup_lines
from speculative_gpt2.tree_search import FittedTree
from speculative_gpt2.trees import MAX_NODES, ExpandingTree, TreePolicy, TreeShape
from speculative_gpt2.text import printable
from speculative_gpt2.tokenizer import load_tokenizer

# The name errors and --help go by: the script a checkout runs, or the installed console command.
PROG = "speculative.py" if sys.argv and sys.argv[0].endswith("speculative.py") else "speculative-gpt2"
MAX_NGRAM = PromptLookupDrafter.MAX_NGRAM
MAX_MATCHES = PromptLookupDrafter.MAX_MATCHES
MAX_TREE_NODES = MAX_NODES
# The toyllm blog post's prompt ("Implementing LLM Speculative Sampling in Under 100 Lines of Code").
DEFAULT_PROMPT = "Alan Turing theorized that computers would one day become"
# --prompts-file: prompts decoded together when --batch-size is not given.
DEFAULT_BATCH_SIZE = 8
# The largest --lookahead. All K drafts are kept with probability about alpha^K, so a K of dozens gains nothing
# over a few, while exact mode pads every target pass to K + 1 rows and the caches grow by K: a huge K only
# allocates (10^9: gigabytes) or runs for minutes. K + 1 must also fit the target's context.
MAX_LOOKAHEAD = 64
# The most --repeats: medians settle within a few runs, and each repeat is a whole decoding of every run.
MAX_REPEATS = 20


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block; the user's text in it shown safely
        self.exit(2, f"{self.prog}: error: {printable(message)}{self._suggestion(message)} (see --help)\n")

    def _suggestion(self, message: str) -> str:
        """"; did you mean --temperature?" for a mistyped flag such as --temprature."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        flags = [word.split("=")[0] for word in message.split(":", 1)[1].split() if word.startswith("--")]
        for flag in flags:
            close = difflib.get_close_matches(flag, [o for o in self._option_string_actions if o.startswith("--")],
                                              n=1, cutoff=0.75)
            if close:
                return f"; did you mean {close[0]}?"
        return ""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: None)" and "(default: False)" say nothing: leave them out
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _checked(convert, check, **limits):
    """An argparse type: `convert` the text, then apply the samplers' own check (one rule, one home); argparse
    names the flag in the error."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            kind = "an integer" if convert is int else "a number"
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be {kind}") from None
        try:
            check("value", value, **limits)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: {str(e).removeprefix('value ')}") from None
        return value

    return parse


def _top_p(text: str) -> float:
    value = _checked(float, check_real)(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be in (0, 1]")
    return value


def _lookahead(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _checked(int, check_integer, minimum=1, maximum=MAX_LOOKAHEAD)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: give an integer from 1 to {MAX_LOOKAHEAD}, or "
                                         f"auto") from None


class _Given(argparse.Action):
    """Stores the value and notes that the flag was given (its dest in the set `given`), which a default cannot
    tell."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", set()) | {self.dest}


def _tree(text: str) -> TreePolicy:
    """A tree's shape: widths per depth (3x2), each node's parent (parents=-1,-1,0), an expanding tree
    (depth=4,width=4,expand=2), or auto (fitted during each run, tree_search.FittedTree)."""
    if text.lower() == "auto":  # a template: every call gets a fresh copy (`lookahead` in main)
        return FittedTree()
    if text.lower().startswith("parents="):
        try:
            parents = [int(parent) for parent in text[len("parents="):].split(",")]
        except ValueError:
            parents = None
        if parents is not None and len(parents) > MAX_TREE_NODES:
            raise argparse.ArgumentTypeError(f"invalid tree {text!r}: {len(parents)} nodes, more than "
                                             f"{MAX_TREE_NODES}: list fewer parents")
        try:
            return TreeShape.of_parents(parents)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(
                f"invalid tree {text!r}: give each node's parent, breadth-first, -1 for the root's children, each an "
                f"earlier node and never smaller than the one before (e.g. parents=-1,-1,0: 2 drafts, then 1 below "
                f"the first; at most {MAX_TREE_NODES} nodes)") from None
    if "=" in text:
        return _expanding_tree(text)
    example = "e.g. 3x2: 3 drafts, then 2 below each"
    try:
        widths = tuple(int(w) for w in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid tree {text!r}: give the widths per depth joined by x ({example}), "
                                         f"or parents=P1,P2,..., depth=D,width=W[,expand=E], or auto") from None
    try:
        return TreeShape(widths)
    except ValueError as e:
        reason = str(e).split(": ")[0] if "nodes" in str(e) else f"widths from 1 to {MAX_TREE_NODES}"
        raise argparse.ArgumentTypeError(f"invalid tree {text!r}: {reason} ({example})") from None


def _expanding_tree(text: str) -> ExpandingTree:
    example = "e.g. depth=4,width=4,expand=2: 4 drafts, then 4 below each of the 2 likeliest, at each depth"
    try:
        given = dict(item.split("=") for item in text.lower().split(","))
        if not {"depth", "width"} <= set(given) <= {"depth", "width", "expand"}:
            raise ValueError
        values = {key: int(value) for key, value in given.items()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid tree {text!r}: give depth=D,width=W and optionally expand=E "
                                         f"({example}), or parents=P1,P2,... (each node's parent)") from None
    try:
        return ExpandingTree(**values)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"invalid tree {text!r}: {str(e).split(': ')[0]} ({example})") from None


def _prompt(text: str) -> str:
    # Bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape): refused, not silently U+FFFD.
    if any("\ud800" <= c <= "\udfff" for c in text):
        raise argparse.ArgumentTypeError("it holds bytes that are not UTF-8: pass the text in UTF-8")
    return text


def _threads(text: str) -> int:
    # More threads than a few per core only wait for each other, and OpenMP sets up every one of them: a huge
    # count (100000) ends in a crash, not an error.
    top = 4 * (os.cpu_count() or 1)
    threads = _checked(int, check_integer, minimum=1)(text)
    if threads > top:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: at most {top} (4 per CPU core)")
    return threads


def _seed(text: str) -> int:
    seed = _checked(int, check_integer, minimum=0)(text)
    if seed >= 2**63:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: give an integer from 0 to 2**63 - 1")
    return seed


def parse_args(argv=None) -> argparse.Namespace:
    parser = _ArgumentParser(
        prog=PROG,
        description="Speculative sampling (Chen et al. 2023): a small GPT-2 drafts, a large GPT-2 verifies. "
        "Times plain decoding with the target and speculative sampling on the same prompt, and shows both texts. "
        "When the texts are compared (temperature 0, or --coupled) a third run, plain decoding in exact mode, and "
        "the speculative run pad every target pass to the same rows (the prefill too: slower on a long prompt), so "
        "that the texts are identical in every dtype; the speedup is measured against the fastest plain decoding.",
        formatter_class=_HelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", type=_prompt, default=DEFAULT_PROMPT, help="text to continue")
    source.add_argument("--prompts-file", metavar="FILE", default=None,
                        help="continue every prompt of FILE instead (UTF-8): one prompt per line, as written, blank "
                        "lines skipped; or, when its first non-blank line starts with {, JSON lines: every line an "
                        "object with a string \"prompt\". Decoded --batch-size prompts at a time; one JSON line per "
                        "prompt (line, prompt, text, tokens, acceptance_rate, tokens_per_target_pass, target_passes, "
                        "seconds; with --mode both also plain_seconds and identical) goes to --output as soon as it "
                        "finishes; a progress bar and a summary go to stderr")
    parser.add_argument("--batch-size", type=_checked(int, check_integer, minimum=1), default=None,
                        help=f"with --prompts-file: prompts decoded together, in the file's order (default: "
                        f"{DEFAULT_BATCH_SIZE})")
    parser.add_argument("--output", metavar="FILE.jsonl", default=None,
                        help="with --prompts-file: write the JSON lines to this file instead of stdout: a regular file "
                        "or a new one, never a symbolic link, a FIFO or a device. It is emptied "
                        "when decoding starts (a run that fails earlier leaves it as it was); each line is written "
                        "whole as soon as its prompt finishes, so an interrupted or failed run keeps every line "
                        "written so far, and never half a line")
    parser.add_argument("--target", default="gpt2-xl", help="target model: a preset name or a checkpoint folder")
    parser.add_argument("--draft", default="gpt2",
                        help=f"draft model: a preset name or a checkpoint folder; or {NGRAM}: prompt lookup, which "
                        "copies what followed the latest earlier match of the last n tokens (no draft model)")
    parser.add_argument("--ngram-max", type=_checked(int, check_integer, minimum=1, maximum=MAX_NGRAM), default=3,
                        action=_Given, help=f"--draft {NGRAM}: the longest n-gram matched first (at most {MAX_NGRAM})")
    parser.add_argument("--ngram-min", type=_checked(int, check_integer, minimum=1, maximum=MAX_NGRAM), default=1,
                        action=_Given, help=f"--draft {NGRAM}: the shortest n-gram matched when no longer one is found")
    parser.add_argument("--max-new-tokens", type=_checked(int, check_integer, minimum=1), default=128,
                        help="tokens to generate")
    parser.add_argument("--matches", type=_checked(int, check_integer, minimum=1, maximum=MAX_MATCHES), default=1,
                        help=f"--draft {NGRAM}: follow the M latest earlier matches, not only the latest: their "
                        f"continuations, merged where they agree, are verified as one token tree of up to M x K "
                        f"drafts in one target pass (at most {MAX_MATCHES}; 1: a chain)")
    auto = FittedTree()  # --tree auto's settings, as its help states them
    parser.add_argument("--tree", type=_tree, default=None, metavar="WIDTHS",
                        help="the draft model drafts a token tree of these widths per depth, e.g. 3x2: its 3 likeliest "
                        "(or sampled) first tokens, then 2 below each, all verified in one target pass; the depth is K "
                        "(leave out --lookahead); at most 64 nodes. Or depth=D,width=W,expand=E: a tree grown where "
                        "the draft is confident (W first tokens, then W below each of the E likeliest paths at each "
                        "depth; expand may be left out: 1), which pays at temperature 0. Or parents=-1,-1,0,...: "
                        "any tree, each node's parent breadth-first (-1: a first token), as benchmarks/trees.py "
                        f"--best fits one to a pair's measured acceptance. Or auto: that fit made during the run "
                        f"itself (its first {auto.every} "
                        f"rounds try {auto.width} first drafts; then, every {auto.every} rounds, the tree of at most "
                        f"{auto.budget} nodes and depth {auto.most_depth} that decodes the most tokens per unit of "
                        f"time at the acceptance measured so far: from measured pass times at temperature 0, from "
                        f"the cost model of --lookahead auto at temperature > 0, so that a seed gives one text)")
    parser.add_argument("--lookahead", "-K", type=_lookahead, default=4, action=_Given,
                        help=f"draft tokens proposed per round (K), from 1 to {MAX_LOOKAHEAD} (and K + 1 within the "
                        "target's context: a round verifies K + 1 tokens in one pass), or auto: chosen every round "
                        "from the acceptance rate so far and the pass costs: measured at temperature 0 (where K "
                        "cannot change the text in float32); at temperature > 0 the paper's cost model (a draft pass "
                        "costs c target passes, c = the bytes of weights a draft pass reads over a target pass's), so "
                        "that --seed still decides the text. Not with --tree, which sets its own depth")
    parser.add_argument("--temperature", type=_checked(float, check_real, minimum=0), default=0.0,
                        help="0 is greedy; >0 samples")
    parser.add_argument("--top-k", type=_checked(int, check_integer, minimum=1), default=None,
                        help="keep the k most likely tokens (temperature > 0)")
    parser.add_argument("--top-p", type=_top_p, default=None, help="nucleus sampling mass (temperature > 0)")
    parser.add_argument("--seed", type=_seed, default=0,
                        help="seed of the sampling generator: the same seed and flags give the same text on the same "
                        "machine (with any --lookahead); with --coupled, the seed of the Gumbel noise (a JSON line of "
                        "--prompts-file may carry its own \"seed\")")
    parser.add_argument("--coupled", action="store_true",
                        help="coupled sampling (temperature > 0): each token is the Gumbel-max of its distribution "
                        "with noise fixed by "
                        "--seed and its position, so that at temperature > 0 speculative sampling gives plain "
                        "decoding's text token for token (compared, as at temperature 0), whatever K, drafter or "
                        "batch; drafts from a model are kept somewhat less often than by Chen's rule")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="weights and activations; auto: bfloat16 where the hardware runs it natively (CUDA with "
                        "bf16, CPUs with AVX-512 BF16 or AMX: faster), else float32; the compared greedy texts are "
                        "identical in every dtype (exact mode, docs/exact-dtype.md)")
    parser.add_argument("--int8", choices=["draft", "target", "both"], default=None,
                        help="weight-only int8 (CPU, --dtype float32 or bfloat16, the products in bfloat16; "
                        "speculative_gpt2/int8.py): each pass reads half of bfloat16's bytes. For the draft it "
                        "changes only how many drafts are kept, "
                        "never the text; for the target the text becomes the int8 model's, which speculative "
                        "sampling then keeps exactly (and its verification passes cost more than bfloat16's)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="on CUDA, replay captured CUDA graphs for the decoding passes (cuda_graphs.py; not yet "
                        "measured on a GPU, so off by default)")
    parser.add_argument("--threads", type=_threads, default=None,
                        help="CPU threads for torch (default: torch's choice); on a shared or small machine, "
                        "fewer threads than cores often time more steadily")
    parser.add_argument("--repeats", type=_checked(int, check_integer, minimum=1, maximum=MAX_REPEATS), default=1,
                        help="time every run this many times, alternating (plain, speculative, plain, ...), and report "
                        "the medians and the range of the speedup: on a shared machine, load then lands on both. "
                        "Whatever this is, each run is also checked against its own steps at their median pace, and "
                        "a busy machine is named in the report")
    parser.add_argument("--mode", default="both", choices=["both", "speculative", "plain", "naive"],
                        help="what to run: plain decoding (naive, its older name, is the same) and speculative "
                        "sampling, or one of them (both: also the exact-mode run that compares the texts; one of "
                        "them: no exact mode, each at its own speed)")
    parser.add_argument("--no-cache-baseline", action="store_true",
                        help="also time plain decoding without a KV cache (the toyllm blog post's baseline; slow)")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at <|endoftext|>")
    parser.add_argument("--no-stream", action="store_true",
                        help="print each text when its run ends, with a progress bar, instead of streaming it")
    parser.add_argument("--show-acceptance", action="store_true",
                        help="print the speculative output marked by origin: draft kept, resampled, bonus, target "
                        "step (coloured, or marked in plain text without colours), with a count per origin; with "
                        "--prompts-file, each JSON line gains origins (one per token) and marked (the text with "
                        "the plain marks)")
    parser.add_argument("--color", default="auto", choices=["auto", "always", "never"],
                        help="colours for --show-acceptance; auto: only on a terminal and when NO_COLOR is unset")
    parser.add_argument("--trace", metavar="FILE.html", default=None,
                        help="write a self-contained page of the speculative run, round by round: drafts, p, q, "
                        "min(1, q/p), the draws r, verdicts and times; with --prompts-file, one page with a section "
                        "per prompt (written at the end, or with the prompts finished when a run stops early)")
    # The default is shown as text and found again when a preset needs it: a wrong environment (a `~user` that
    # does not exist) is then one error of that run, and never stops --help.
    parser.add_argument("--weights-dir", default=None,
                        help=f"where preset checkpoints live and downloads go (default: "
                        f"{printable(describe_default_weights_dir()).replace('%', '%%')}; ${ENV_WEIGHTS} sets the "
                        f"default)")
    parser.add_argument("--no-download", action="store_true", help="fail instead of downloading missing weights")
    args = parser.parse_args(argv)
    args.given = getattr(args, "given", set())
    args.mode = "plain" if args.mode == "naive" else args.mode
    for flag, value in (("--prompts-file", args.prompts_file), ("--output", args.output), ("--trace", args.trace),
                        ("--weights-dir", args.weights_dir)):
        if value == "":
            parser.error(f"{flag} is empty: give a file or folder name")
    for flag in ("--ngram-max", "--ngram-min"):
        if flag[2:].replace("-", "_") in args.given and args.draft != NGRAM:
            parser.error(f"{flag} sets prompt lookup's n-grams: add --draft {NGRAM}, or leave {flag} out")
    if args.ngram_min > args.ngram_max:
        parser.error(f"--ngram-min {args.ngram_min} is larger than --ngram-max {args.ngram_max}")
    for flag, given in (("--tree", args.tree is not None), ("--matches", args.matches > 1)):
        if given and args.mode == "plain":
            parser.error(f"{flag} makes token trees for speculative sampling, and --mode plain runs none: use --mode "
                         f"both or --mode speculative, or leave {flag} out")
    if args.tree is not None:
        for flag, given in (("--lookahead", "lookahead" in args.given),
                            (f"--draft {NGRAM}", args.draft == NGRAM),
                            ("--coupled", args.coupled), ("--cuda-graphs", args.cuda_graphs)):
            why = {"--lookahead": f"the tree sets its depth itself (3x2: 2; auto: up to {FittedTree().most_depth})",
                   f"--draft {NGRAM}": f"for prompt lookup's trees, use --draft {NGRAM} --matches M instead",
                   "--coupled": "coupled sampling verifies chains only",
                   "--cuda-graphs": "the graphs replay chains' passes only"}
            if given:
                parser.error(f"--tree drafts a token tree with the draft model and goes without {flag}: {why[flag]}")
        args.lookahead = getattr(args.tree, "most_depth", args.tree.max_lookahead)  # auto: its deepest
    if args.matches > 1:
        if args.draft != NGRAM:
            parser.error(f"--matches follows earlier matches of prompt lookup: add --draft {NGRAM} (a draft model's "
                         f"tree: --tree)")
        for flag, given in (("--coupled", args.coupled), ("--cuda-graphs", args.cuda_graphs)):
            if given:
                parser.error(f"--matches {args.matches} makes prompt lookup's token trees and goes without {flag}: "
                             f"leave one of them out")
    if args.temperature == 0:
        for flag, given in (("--top-k", args.top_k is not None), ("--top-p", args.top_p is not None),
                            ("--coupled", args.coupled)):
            if given:
                parser.error(f"{flag} shapes sampling, and at temperature 0 (greedy, the default) there is none: give "
                             f"a temperature above 0, e.g. --temperature 0.8, or leave {flag} out")
    most = AdaptiveLookahead().max_lookahead if args.lookahead == "auto" else args.lookahead
    if args.matches * most > MAX_TREE_NODES:
        parser.error(f"--matches {args.matches} with K up to {most} makes trees of up to {args.matches * most} "
                     f"drafts, more than {MAX_TREE_NODES}: lower --matches or --lookahead")
    if args.prompts_file is None:
        for flag, value in (("--batch-size", args.batch_size), ("--output", args.output)):
            if value is not None:
                parser.error(f"{flag} goes with --prompts-file (one prompt prints its text): add --prompts-file FILE")
    elif args.no_cache_baseline:
        parser.error("--no-cache-baseline times one prompt: leave it out with --prompts-file")
    elif args.repeats > 1:
        parser.error("--repeats times one prompt: leave it out with --prompts-file (every batch is checked against "
                     "its median steps)")
    elif args.batch_size is None:
        args.batch_size = DEFAULT_BATCH_SIZE
    return args


class Terminated(BaseException):
    """SIGTERM, raised where the run is, so that it ends as after Ctrl-C: lines kept, the trace page written."""


def _terminate(signum, frame):
    raise Terminated


def main(argv=None) -> int:
    """The command line; returns the exit status (2 for bad input, missing weights or a failed download, 130 when
    interrupted with Ctrl-C, 143 when terminated with SIGTERM)."""
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(args) -> int:
    try:
        return _run(args)
    except Terminated:
        print(f"\n{PROG}: terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:  # the reader went away (`| head`): end quietly, as Unix tools do
        return _quiet_exit_after_broken_pipe()
    except (ValueError, DownloadError, OSError) as e:  # bad input, weights or files: one line, no traceback
        print(f"{PROG}: error: {printable(str(e))}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        # torch's OutOfMemoryError is a RuntimeError, and an allocator's refusal may be a plain one
        # ("DefaultCPUAllocator: can't allocate memory"); any other RuntimeError is a bug, whose traceback helps.
        if not is_out_of_memory(e):
            raise
        print(f"{PROG}: error: out of memory{asked_size(e)}: {_out_of_memory_advice(args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # what was generated is already on the screen
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130


def _out_of_memory_advice(args) -> str:
    """What to lower when memory ran out, naming only flags that would change something in this run."""
    tries = []
    if args.prompts_file is not None and args.batch_size > 1:
        tries.append(f"a smaller --batch-size (this run: {args.batch_size} prompts per batch)")
    tries.append("a smaller model")
    try:
        bfloat16 = resolve_dtype(args.dtype, resolve_device(args.device)) == torch.bfloat16
    except ValueError:
        bfloat16 = False
    if not bfloat16:
        tries.append("--dtype bfloat16")
    tries += ["fewer --max-new-tokens", "a smaller --lookahead"]
    return "use " + ", ".join(tries[:-1]) + " or " + tries[-1]


def _quiet_exit_after_broken_pipe() -> int:
    """141 (128 + SIGPIPE, what a shell reports for a Unix tool killed by it), with nothing printed; stdout is
    pointed at /dev/null so that Python's own flush at exit does not complain about the closed pipe again."""
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        except (OSError, ValueError):
            pass
    return 141


# The adaptive lookahead's largest K in exact mode: every target pass is padded to K + 1 rows (rounded up to 8).
EXACT_MAX_LOOKAHEAD = 7


def _run(args) -> int:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    enc = load_tokenizer()
    if args.prompts_file is not None:
        from speculative_gpt2.prompts_file import json_looking_note, read_prompts, run_prompts_file

        file_prompts = read_prompts(args.prompts_file, enc)  # every line checked before any model loads
        if note := json_looking_note(args.prompts_file, file_prompts):
            print(note, file=sys.stderr)
        seeded = next((p for p in file_prompts if p.seed is not None), None)
        if seeded is not None and not args.coupled:
            add = "--coupled" if args.temperature > 0 else "--temperature 0.8 --coupled (a temperature above 0)"
            raise ValueError(f'--prompts-file {args.prompts_file}, line {seeded.line} has a "seed": a seed per prompt '
                             f"is coupled sampling's (each row its own noise): add {add}, or remove the seeds")
        # (tokens, what an error names, what to shorten): one entry per prompt.
        checked = [(p.tokens, f"--prompts-file {args.prompts_file}, line {p.line}: ", f"line {p.line}")
                   for p in file_prompts]
    else:
        prompt = enc.encode(args.prompt, allowed_special="all")
        if not prompt:
            raise ValueError("the prompt is empty: pass some text with --prompt")
        checked = [(prompt, "", "--prompt")]
    lookup = args.draft == NGRAM
    names = {"target": args.target} | ({"draft": args.draft} if args.mode != "plain" and not lookup else {})
    _check_before_loading(args, names, device, dtype)
    # Find both checkpoints (downloading if needed), check them against the prompt, and only then load them.
    # Every check that can fail runs here, before loading, warm-up or --output: a run that cannot finish stops
    # before it has emptied an older file.
    folders, configs = {}, {}
    absent = {role: name for role, name in names.items() if preset_of(name) and not _here(name, args.weights_dir)}
    for role, name in names.items():
        try:
            folders[role] = find_checkpoint(name, weights_dir=args.weights_dir, allow_download=not args.no_download)
            configs[role] = config = GPT2Config(**checkpoint_config(folders[role], preset_of(name)))
        except (ValueError, DownloadError) as e:
            if role in absent and len(absent) > 1:  # every missing model at once, and the way to try the code
                raise type(e)(_all_absent(absent, e, args)) from None
            raise type(e)(f"--{role} {name}: {e}") from None
        if not args.ignore_eos and enc.eot_token >= config.vocab_size:
            raise ValueError(f"--{role} {name}: its vocabulary of {config.vocab_size} tokens lacks GPT-2's end-of-text "
                             f"id {enc.eot_token}, where decoding stops: pass --ignore-eos (it then stops after "
                             f"--max-new-tokens), or use a checkpoint with the GPT-2 vocabulary")
        if role == "target" and args.lookahead != "auto" and args.lookahead + 1 > config.n_positions:
            raise ValueError(f"--lookahead {args.lookahead}: a round verifies K + 1 = {args.lookahead + 1} tokens in "
                             f"one pass of the target, whose context holds {config.n_positions}: give at most "
                             f"{config.n_positions - 1}")
        for tokens, where, shorten in checked:
            _check_config(role, config, tokens, args.max_new_tokens, enc.n_vocab, where, shorten)
    if "draft" in configs and configs["draft"].vocab_size != configs["target"].vocab_size:
        raise ValueError(f"the draft has {configs['draft'].vocab_size} tokens, the target "
                         f"{configs['target'].vocab_size}: a draft proposes the target's tokens, so they must share "
                         f"one vocabulary: use a draft with the target's")
    if "draft" in configs and parameters(configs["draft"]) >= parameters(configs["target"]):
        print(f"{PROG}: note: the draft ({printable(args.draft)}, {parameters(configs['draft']) / 1e6:.0f}M "
              f"parameters) is not smaller than the target ({printable(args.target)}, "
              f"{parameters(configs['target']) / 1e6:.0f}M): a draft pass costs as much as a target pass or more, so "
              f"speculative sampling cannot be faster than plain decoding", file=sys.stderr)
    models, load_seconds = {}, {}
    for role in folders:
        print(f"Loading {role} {printable(names[role])} ({dtype_name(dtype)}, {device}) ...", file=sys.stderr)
        started = time.perf_counter()
        models[role] = GPT2.from_pretrained(names[role], weights_dir=args.weights_dir, dtype=dtype, device=device,
                                            download=False)  # found above: already here
        if args.int8 in (role, "both"):  # int8 weights in place of packed ones
            quantize_int8(models[role])
        load_seconds[role] = time.perf_counter() - started
    batch = args.batch_size if args.prompts_file is not None else 1
    if "draft" in models:  # the draft's passes: one row per prompt, or per node of a tree's widest level but the last
        _lay_out(args, "draft", models["draft"], batch * (args.tree.fed() if args.tree else 1))
    if args.cuda_graphs:  # on CUDA (checked before loading): the samplers run the models through graph runners
        from speculative_gpt2.cuda_graphs import CUDAGraphRunner

        models = {role: CUDAGraphRunner(model) for role, model in models.items()}
    target, draft = models["target"], models.get("draft")
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   eos_token_id=None if args.ignore_eos else enc.eot_token)
    n = args.max_new_tokens
    # Comparing texts (greedy, or coupled): every target pass gets the verification's shape, so that they are equal
    # in any dtype.
    exact = args.mode == "both" and (args.temperature == 0 or args.coupled)
    max_lookahead = (EXACT_MAX_LOOKAHEAD if exact else AdaptiveLookahead().max_lookahead) if args.lookahead == "auto" \
        else args.lookahead

    fitted = []  # --tree auto: the last call's FittedTree, whose fit is reported
    if isinstance(args.tree, FittedTree):  # its costs as K auto's: measured times only where they cannot change a text
        args.tree.costs = "measured" if args.temperature == 0 else cost_ratio(target, draft)

    def lookahead():  # a fresh policy for every call: what one run learned must not steer the next
        if isinstance(args.tree, FittedTree):
            fitted[:] = [copy.deepcopy(args.tree)]
            return fitted[0]
        if args.lookahead != "auto":
            return args.tree or args.lookahead
        # At temperature > 0, K must not follow measured times, which vary from run to run: K changes how the
        # random stream is consumed, and the same seed must give the same text (coupled sampling excepted).
        return AdaptiveLookahead(max_lookahead=max_lookahead, cost_ratio=cost_ratio(target, draft)
                                 if args.temperature > 0 and not args.coupled else None)

    def drafter():  # a fresh lookup drafter for every call, as for the policy
        return PromptLookupDrafter(args.ngram_max, args.ngram_min, args.matches) if lookup else draft

    # What exact mode pads every target pass to: a verification's rows, a token tree's nodes and its root.
    nodes = args.tree.most_nodes() if args.tree else args.matches * max_lookahead
    rows = padded_rows(nodes + 1)

    def decode(mode, prompt, max_new_tokens, generator=None, seed=None, **options):  # options: sampling, callbacks
        # Exact mode for the two runs whose texts are compared; plain PLAIN stays the fastest (1-row passes).
        fixed = rows if exact and mode in (EXACT, SPECULATIVE) else None
        if args.coupled:  # the noise comes from the seed (one per row, or --seed), not from a generator
            generator, options = None, options | dict(coupled=True, seed=args.seed if seed is None else seed)
        if mode == SPECULATIVE:
            return speculative_sample(target, drafter(), prompt, max_new_tokens, lookahead=lookahead(), exact=fixed,
                                      generator=generator, trace=args.trace is not None, **options)
        return autoregressive_sample(target, prompt, max_new_tokens, use_cache=mode != UNCACHED, generator=generator,
                                     exact=fixed, **options)

    def prepare(mode):  # before a run's clock: the target's weights in the layout that runs its passes fastest here
        if mode != UNCACHED:
            _lay_out(args, "target", models["target"], batch * (1 if mode == PLAIN else rows if exact else nodes + 1))

    if args.prompts_file is not None:
        status = run_prompts_file(args, file_prompts, enc=enc, device=device, dtype=dtype, decode=decode,
                                  prepare=prepare, options=options, exact=exact, pass_rows=rows,
                                  setup=_setup_lines(args, models, load_seconds, device, dtype))
        if fitted:  # each batch is a call of its own, fitted afresh
            print(_fit_line(fitted[-1], "batch"), file=sys.stderr)
        return status
    asked = run_shape(args.lookahead, args.tree, args.matches)
    titles = {UNCACHED: "Plain decoding without KV cache", PLAIN: "Plain decoding",
              EXACT: f"Plain decoding, exact mode (every pass {rows} rows, as speculative sampling's)",
              SPECULATIVE: f"Speculative sampling ({asked})" + (", exact mode" if exact else "")}
    modes = [m for m, wanted in ((UNCACHED, args.no_cache_baseline and args.mode != "speculative"),
                                 (PLAIN, args.mode != "speculative"), (EXACT, exact),
                                 (SPECULATIVE, args.mode != "plain")) if wanted]
    warm_up_seconds = {}
    for mode in reversed(modes):  # ending on plain decoding, which runs first: one change of layout fewer
        if mode != UNCACHED:  # recomputing everything, the uncached run has no warm-up worth the wait
            prepare(mode)
            # Warm-up: the first passes pay for allocations, kernel selection and CUDA graph capture; reported, and
            # kept out of the timings.
            print(f"Warming up: {titles[mode].split(' (')[0].lower()}, 8 tokens, not timed ...", file=sys.stderr)
            started = time.perf_counter()
            decode(mode, prompt, min(8, n), **options | {"temperature": 0.0, "eos_token_id": None})
            warm_up_seconds[mode] = time.perf_counter() - started
    warm_up_seconds = {mode: warm_up_seconds[mode] for mode in modes if mode in warm_up_seconds}
    # The runs alternate (plain, speculative, plain, ...) so that a change in the machine's load lands on both.
    results, shares = {mode: [] for mode in modes}, {mode: [] for mode in modes}
    for repeat in range(args.repeats):
        for mode in modes:
            if repeat and mode == UNCACHED:  # slow, and no figure of its own is compared: timed once
                continue
            generator = torch.Generator(device).manual_seed(args.seed)  # every run: the same seed
            run = partial(decode, mode, prompt, n, generator, **options)
            prepare(mode)
            cpu, wall = time.process_time(), time.perf_counter()
            if repeat == 0:  # every run streams, or none does: writing to the terminal is part of what is timed
                results[mode].append(_run_and_show(titles[mode], run, prompt, enc, n, stream=not args.no_stream))
            else:
                results[mode].append(_run_again(f"{titles[mode].split(' (')[0]}, run {repeat + 1} of "
                                                f"{args.repeats}", run, n))
            if device.type == "cpu":  # on a GPU the host waits for the device: its CPU time says nothing
                shares[mode].append(cpu_share(time.process_time() - cpu, time.perf_counter() - wall,
                                              torch.get_num_threads()))
    _print_summary(args, results, shares, models, load_seconds, warm_up_seconds, device, dtype, rows)
    if fitted:  # --tree auto: where the last speculative run's fit ended
        print(_fit_line(fitted[-1], "run"))
    if args.show_acceptance:
        _show_acceptance(args, results.get(SPECULATIVE, [None])[0], enc, prompt)
    if args.trace is not None:
        from speculative_gpt2.render import trace_page

        title = f"{Path(args.target).name} / {Path(args.draft).name}, {asked}, temperature {args.temperature}"
        page = trace_page(results[SPECULATIVE][0], enc, prompt, title=title)
        write_page("--trace", Path(args.trace), page)
        print(f"trace of {len(results[SPECULATIVE][0].trace)} rounds: {printable(args.trace)}", file=sys.stderr)
    return 0


def _fit_line(tree: FittedTree, call: str) -> str:
    """--tree auto: where the last `call` ("run", or a prompts file's "batch") left its fit."""
    if tree.fitted_to is None:
        return (f"--tree auto: the last {call} had {tree.rounds} rounds, and the first {tree.every} try {tree.width} "
                f"first drafts before the first fit: it drafted those only")
    counted = f"{tree.fitted_at} tries of a first sibling, counted up to its last fit"
    if not any(tree.fitted_to):
        return (f"--tree auto: the last {call} kept no draft in {counted}, so it stayed on the {tree.width} first "
                f"drafts (one draft pass a round); a better-matched draft is what would pay")
    by = ("ms by the passes' measured times" if tree.costs == "measured" else
          f"target pass by the cost model (c = {tree.costs:.3f})")
    return (f"--tree auto: the last {call} ended with the tree parents={','.join(map(str, tree.parents))} "
            f"({len(tree.parents)} nodes, depth {tree.max_lookahead}), fitted to the acceptance by sibling rank "
            f"{' '.join(f'{a:.2f}' for a in tree.fitted_to)} ({counted}), for the most tokens per {by}")


def _lay_out(args, role: str, model, rows: int) -> None:
    """`model`'s weights packed for oneDNN or plain, whichever runs its passes of `rows` rows faster on this CPU
    (packing.lay_out), outside every clock; says so when the layout changes, which takes seconds for GPT-2 XL."""
    if model.device.type != "cpu":  # a GPU's model, or its CUDA graph runner: nothing to lay out
        return
    started = time.perf_counter()
    try:
        if lay_out(model, rows):
            now = "packed for oneDNN" if isinstance(model.lm_head, PackedLinear) else "plain (F.linear)"
            print(f"{role}: weights {now} for its {rows}-row passes, the faster here "
                  f"({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    except OutOfMemory as e:  # the model still runs, unpacked
        print(f"{PROG}: note: {role}: {e}", file=sys.stderr)


def _here(name: str, weights_dir) -> bool:
    """Whether the preset `name` is on this machine (the weights folder or the Hugging Face cache)."""
    try:
        find_checkpoint(name, weights_dir=weights_dir, allow_download=False)
    except (ValueError, DownloadError):
        return False
    return True


def _all_absent(absent: dict[str, str], error: Exception, args) -> str:
    """One line for presets that are not here and could not be fetched: which, why, and the commands that make
    random checkpoints of their shapes to try the code with."""
    roles = " and ".join(f"--{role} {name}" for role, name in absent.items())
    why = ("HF_HUB_OFFLINE is set" if offline() else "--no-download is set" if args.no_download else
           f"downloading failed: {str(error).split('. What to do')[0]}")
    make = " && ".join(f"python -m speculative_gpt2.random_checkpoint {name} weights/random-{name}"
                       for name in absent.values())
    use = " ".join(f"--{role} weights/random-{name}" for role, name in absent.items())
    return (f"{roles} are not on this machine, and {why}. To try the code on random weights of their shapes (a few "
            f"minutes; with --n-layer 2 after each folder, 2-layer stand-ins in seconds): {make}, then pass {use}. "
            f"For the real weights: weights/README.md")


def parameters(config: GPT2Config) -> int:
    """A GPT-2's parameter count from its configuration: the blocks' weights and biases, the embeddings."""
    C = config.n_embd
    return config.n_layer * (12 * C * C + 13 * C) + (config.vocab_size + config.n_positions) * C + 2 * C


def _check_before_loading(args, names: dict[str, str], device: torch.device, dtype: torch.dtype) -> None:
    """The checks that need no model, before minutes of loading or downloading."""
    for role, name in names.items():
        if not (preset_of(name) or Path(name).is_dir()):
            raise ValueError(f"--{role} {not_a_checkpoint(name, (NGRAM,) if role == 'draft' else ())}")
    if args.cuda_graphs and device.type != "cuda":
        raise ValueError("--cuda-graphs needs --device cuda")
    if args.int8 is not None:
        runs_dtype = dtype in (torch.float32, torch.bfloat16)
        if device.type != "cpu" or not runs_dtype:
            fixes = [fix for fix, needed in (("--device cpu", device.type != "cpu"),
                                             ("--dtype float32 or bfloat16", not runs_dtype)) if needed]
            raise ValueError(f"--int8 runs on the CPU in float32 or bfloat16, not {dtype_name(dtype)} on {device}: "
                             f"use {' and '.join(fixes)} (or leave out --int8)")
        if args.int8 != "target" and "draft" not in names:
            raise ValueError(f"--int8 {args.int8} quantizes the draft model, and this run has none (--draft "
                             f"{args.draft}{', --mode plain' if args.mode == 'plain' else ''}): use --int8 target")
    if args.trace is not None:
        if args.mode == "plain":
            raise ValueError("--trace shows speculative sampling: use --mode both or --mode speculative")
        _check_writable("--trace", args.trace, "run.html")
    if args.prompts_file is not None and args.show_acceptance and args.mode == "plain":
        raise ValueError("--show-acceptance marks speculative sampling's tokens: use --mode both or --mode speculative")
    if args.output is not None:
        _check_writable("--output", args.output, "results.jsonl")
    named = [(flag, name) for flag, name in (("--prompts-file", args.prompts_file), ("--output", args.output),
                                             ("--trace", args.trace)) if name]
    for i, (flag, name) in enumerate(named):
        for other, other_name in named[i + 1:]:
            if _same_file(name, other_name):
                raise ValueError(f"{other} {Path(other_name).resolve()} is the {flag} file too: give it another name")


def _same_file(a: str, b: str) -> bool:
    """Whether two names are one file: one path, or (a hard link has a path of its own) one device and inode."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        first, second = os.stat(a), os.stat(b)
    except OSError:  # one of them is a new file
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def _check_writable(flag: str, name: str, example: str) -> None:
    """Refuses, before any model loads, an output file that could not be written: for --output and --trace alike, a
    regular file or a new name, never a link, a FIFO, a device or a file of /proc or /sys."""
    path = Path(name)
    try:  # a look at the name itself (lstat), never through a link, never an open of a FIFO or device
        refuse_unless_regular(flag, name, os.lstat(path))
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ValueError(f"{flag} {name}: cannot reach it ({e.strerror or e}): choose another file") from None
    if path.is_dir() or not path.parent.is_dir():
        raise ValueError(f"{flag} {name}: give a file in an existing folder, e.g. {example}")
    if flag == "--output" and os.path.lexists(path):  # written in place: the file itself must open for writing
        os.close(open_output(name, truncate=False))
        return
    try:  # a real try, not os.access: root passes access() checks, yet cannot write to /sys
        tempfile.TemporaryFile(dir=path.parent).close()  # a new file, or the trace page (written beside, renamed)
    except OSError as e:
        raise ValueError(f"{flag} {name}: cannot write a file in {path.parent} ({e.strerror or e}): choose another "
                         f"folder") from None


def _check_config(role: str, config, prompt: list[int], max_new_tokens: int, tokenizer_vocab: int, where: str = "",
                  shorten: str = "--prompt") -> None:
    """Refuses a model whose vocabulary the tokenizer cannot decode, and a prompt it cannot continue; `where`
    begins the message (a prompts file's line), `shorten` names what to shorten."""
    if config.vocab_size > tokenizer_vocab:  # e.g. nanoGPT's padded 50304
        raise ValueError(f"the {role} has {config.vocab_size} tokens, more than the GPT-2 tokenizer's "
                         f"{tokenizer_vocab}: the ids past {tokenizer_vocab - 1} would have no text; use a checkpoint "
                         f"with the GPT-2 vocabulary")
    if max(prompt) >= config.vocab_size:
        raise ValueError(f"{where}the prompt has token id {max(prompt)}, but the {role} knows only {config.vocab_size} "
                         f"tokens (a vocabulary smaller than GPT-2's): use a checkpoint with the GPT-2 vocabulary")
    if len(prompt) + max_new_tokens > config.n_positions:
        raise ValueError(f"{where}the prompt ({len(prompt)} tokens) plus --max-new-tokens {max_new_tokens} exceeds "
                         f"the {role}'s context of {config.n_positions} positions: lower --max-new-tokens or shorten "
                         f"{shorten}")


def _run_and_show(title: str, run, prompt: list[int], enc, max_new_tokens: int, stream: bool) -> Generation:
    """Runs one decoder, streaming its text to stdout (or showing a progress bar on stderr), then its timing.
    On Ctrl-C, what was generated so far is shown before the interruption goes on."""
    from tqdm.auto import tqdm

    from speculative_gpt2.render import TextStream

    print(f"\n=== {title} ===")
    done = []
    if stream:
        print(f"Generated: {printable(enc.decode(prompt))}", end="", flush=True)
        # Never splits a character across rounds; control characters (ESC ...) come out as symbols.
        text = TextStream(enc, file=sys.stdout, escape=True)
        try:
            out = run(on_tokens=text)
        finally:
            text.flush()
            print()
    else:
        with tqdm(total=max_new_tokens, desc=title.split(" (")[0], unit="tok", file=sys.stderr, leave=False,
                  disable=None) as bar:  # disable=None: no bar when stderr is not a terminal
            try:
                out = run(on_tokens=lambda new: (done.extend(new), bar.update(len(new))))
            except KeyboardInterrupt:
                print(f"Generated (interrupted): {printable(enc.decode(prompt + done))}")
                raise
        print(f"Generated: {printable(enc.decode(prompt + out.tokens))}")
    print(f"completed in {out.seconds:.2f} s ({out.tokens_per_second:.2f} tokens/s, {len(out.tokens)} tokens)")
    return out


def _run_again(title: str, run, max_new_tokens: int) -> Generation:
    """A repeat of a run for the timings: its text was shown already; a progress bar, then one line."""
    from tqdm.auto import tqdm

    with tqdm(total=max_new_tokens, desc=title, unit="tok", file=sys.stderr, leave=False, disable=None) as bar:
        out = run(on_tokens=lambda new: bar.update(len(new)))
    print(f"{title}: {out.seconds:.2f} s ({out.tokens_per_second:.2f} tokens/s)")
    return out


def _use_color(choice: str) -> bool:
    # auto: colour only for a terminal, and never when NO_COLOR is set (no-color.org).
    return choice == "always" or (choice == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))


def _show_acceptance(args, spec: Generation | None, enc, prompt: list[int]) -> None:
    from speculative_gpt2.render import origin_counts, to_ansi, to_text

    print("\n=== Where the speculative tokens came from ===")
    if spec is None:
        print("nothing to show: --show-acceptance needs speculative sampling (--mode both or --mode speculative)")
        return
    print(to_ansi(spec, enc, prompt, coupled=args.coupled) if _use_color(args.color) else
          to_text(spec, enc, prompt, coupled=args.coupled))
    print(f"tokens by origin: {origin_counts(spec)}")


def _print_summary(args, results: dict[str, list[Generation]], shares: dict[str, list[float]],
                   models: dict[str, GPT2], load_seconds: dict[str, float], warm_up_seconds: dict[str, float], device,
                   dtype, rows: int) -> None:
    runs = {mode: sorted(outs, key=lambda g: g.seconds) for mode, outs in results.items()}
    # Each mode's median run (by time) stands for it; the texts of repeats are the same.
    median = {mode: outs[len(outs) // 2] for mode, outs in runs.items()}
    plain, uncached, spec, exact = (median.get(m) for m in (PLAIN, UNCACHED, SPECULATIVE, EXACT))
    print("\n=== Summary ===")
    for line in _setup_lines(args, models, load_seconds, device, dtype):
        print(line)
    warm_ups = ", ".join(f"{mode} {s:.2f} s" for mode, s in warm_up_seconds.items())
    print(f"warm-up (8 tokens each, not timed below): {warm_ups}")
    for name, out in (("plain decoding", plain), ("plain decoding, exact mode", exact), ("speculative sampling", spec)):
        if out is not None and out.steps:
            low, high = middle_half(out.steps)
            step = statistics.median(s.ms for s in out.steps)
            if out is spec:
                drafted = [r for r in out.rounds if r.lookahead > 0] or out.rounds
                per_draft = statistics.median(r.draft_ms / max(r.lookahead, 1) for r in drafted)
                parts = (f"{statistics.median(r.verify_ms for r in drafted):.1f} ms a verification, "
                         + (f"{per_draft:.2f} ms a lookup" if args.draft == NGRAM else
                            f"{per_draft:.1f} ms a draft pass"))
                passes = (f"{step:.1f} ms per round (median; middle half {low:.1f}-{high:.1f}); the parts' own "
                          f"medians: {parts}")
            else:
                passes = f"{step:.1f} ms per target pass (median; middle half {low:.1f}-{high:.1f})"
            print(f"{name}: prefill {1e3 * out.prefill_seconds:.0f} ms, decode {out.decode_tokens_per_second:.2f} "
                  f"tokens/s; {passes}")
    timed = {mode: Timed.of(name, runs[mode], shares[mode]) for mode, name in (
        (PLAIN, "plain decoding"), (EXACT, "exact mode"), (SPECULATIVE, "speculative sampling")) if mode in runs}
    if (spec is None) != (plain is None):  # one run, no speedup: whether its own speed holds
        print(pace_line(timed[SPECULATIVE if spec is not None else PLAIN]))
    if exact is not None and plain is not None:
        cost = (timed[EXACT].expected / timed[EXACT].tokens) / (timed[PLAIN].expected / timed[PLAIN].tokens)
        print(f"exact mode (every target pass {exact_rows(rows)}; so that the texts compare equal in any "
              f"dtype) cost plain decoding {cost:.2f}x its time (median steps); speedups below are over the fastest "
              f"plain decoding (1-row passes)")
    if spec is not None:
        trusted = None
        if plain is not None:
            pairs = [s.tokens_per_second / b.tokens_per_second for s, b in zip(results[SPECULATIVE], results[PLAIN])]
            repeats = (f", median of {len(pairs)} alternating runs each; {min(pairs):.2f}-{max(pairs):.2f}x"
                       if len(pairs) > 1 else "")
            others = (timed[EXACT],) if EXACT in timed else ()
            trusted, lines = speedup_lines(timed[SPECULATIVE], timed[PLAIN], "plain decoding", others, repeats)
            for line in lines:
                print(line)
        if uncached is not None:  # its steps grow with the text: no median pace; timed, once
            print(f"speedup over plain decoding without KV cache: "
                  f"{spec.tokens_per_second / uncached.tokens_per_second:.2f}x (timed)")
        trees = args.tree is not None or args.matches > 1  # --tree, or prompt lookup's tries
        print(acceptance([spec], trees=trees))
        tree = None if args.tree is None else str(args.tree)
        k = k_used([spec], args.lookahead, args.draft == NGRAM, tree=tree)
        print(f"mean tokens per target pass: {spec.tokens_per_target_call:.2f}; {k}" + (
            f" (from the cost model, c = {cost_ratio(models['target'], models.get('draft')):.3f}: the same seed "
            f"gives the same text)" if args.lookahead == "auto" and args.temperature > 0 and not args.coupled else
            " (from measured times)" if args.lookahead == "auto" else ""))
        if trees and (line := tree_line([spec])):
            print(line)
        if args.draft == NGRAM:  # a lookup makes no draft pass: count what it proposed
            no_match = sum(k == 0 for k in spec.lookahead_per_round)
            print(f"target passes: {spec.target_calls}, drafted tokens: {spec.draft_calls} by prompt lookup "
                  f"(n-grams {args.ngram_max} down to {args.ngram_min}; no match in {no_match} rounds)")
        else:
            print(f"target passes: {spec.target_calls}, draft passes: {spec.draft_calls}")
        if trusted is not None:
            for line in why_slower([spec], [plain], trusted, lookahead=args.lookahead, lookup=args.draft == NGRAM,
                                   dtype=dtype, device=device, exact_rows=rows if exact is not None else None,
                                   tree=tree):
                print(line)
    print(f"peak memory: {peak_memory(device)}")
    reference = exact or plain  # greedy or coupled: what the speculative text must equal token for token
    compared = args.temperature == 0 or args.coupled
    if spec is not None and reference is not None:
        against = (f"speculative sampling's text against plain decoding's in exact mode, both in {rows}-row passes"
                   if exact is not None else "speculative sampling's text against plain decoding's")
        if compared and spec.tokens == reference.tokens:
            print(f"identical outputs: yes ({against})")
        elif compared:
            print(f"identical outputs: no, from new token {parted(spec.tokens, reference.tokens)}: in exact mode "
                  f"this platform breaks its premise (run tests/test_exact_dtype.py)")
        else:
            print("identical outputs: not expected at temperature > 0 (both are samples from the target; --coupled "
                  "makes them one text)")
    if exact is not None and plain is not None and compared and plain.tokens != exact.tokens:
        print(f"plain decoding in 1-row passes (the timed baseline) parted from exact mode's text at new token "
              f"{parted(plain.tokens, exact.tokens)}: in {dtype_name(dtype)}, 1-row and {rows}-row passes round "
              f"differently and a near-tie flipped (why exact mode exists)")


def _setup_lines(args, models: dict[str, GPT2], load_seconds: dict[str, float], device, dtype) -> list[str]:
    """The summary's first lines: the models, where they came from, and what they run on."""
    lines = []
    for role, model in models.items():
        name, folder = getattr(args, role), getattr(model, 'model', model).checkpoint_folder
        where = "" if Path(name) == folder else f" from {folder}"  # a preset: the folder or cache snapshot used
        weights = ", weights in int8" if is_int8(model) else ""
        lines.append(printable(f"{role}: {name}{where}, loaded in {load_seconds[role]:.1f} s{weights}"))
    if args.draft == NGRAM and args.mode != "plain":
        lines.append(f"draft: {NGRAM}, prompt lookup of n-grams {args.ngram_max} down to {args.ngram_min} (no draft "
                     f"model)")
    threads = f", threads: {torch.get_num_threads()}" if device.type == "cpu" else ""
    graphs = f", CUDA graphs {'on' if args.cuda_graphs else 'off'}" if device.type == "cuda" else ""
    hardware = hardware_name(device).split(",")[0]
    emulated = (", emulated on this CPU (no AVX-512 BF16 or AMX; --dtype auto picks float32 here)"
                if device.type == "cpu" and dtype == torch.bfloat16 and not native_bfloat16() else "")
    lines.append(f"dtype: {dtype_name(dtype)}{emulated}, device: {device} ({hardware}{threads}){graphs}")
    return lines
