"""--prompts-file: many prompts decoded in batches (`speculative_sample` with a list of prompts), one JSON line each.

Called by the command line (speculative_gpt2/cli.py), which parses the flags, loads the models and hands over how
to decode and how to lay out the weights; this module reads the file, runs the batches, writes the lines and the
summary.
"""

from __future__ import annotations

import codecs
import json
import os
import stat
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from speculative_gpt2.checks import check_integer
from speculative_gpt2.coupling import MAX_SEED
from speculative_gpt2.files import open_output, write_page
from speculative_gpt2.machine import peak_memory
from speculative_gpt2.records import Generation
from speculative_gpt2.report import (EXACT, PLAIN, NGRAM, SPECULATIVE, acceptance, exact_rows, k_used, run_shape,
                                     tree_line, why_slower)
from speculative_gpt2.text import printable
from speculative_gpt2.timing import Timed, cpu_share, expected_seconds, pace_line, speedup_lines

# The most a prompts file may hold: hundreds of thousands of prompts; a larger input is most likely not one.
MAX_FILE_BYTES = 64 * 2**20
# Generation settings that hold for the whole run, each with its flag: a JSON line naming one is refused, not silently
# ignored, since a line's "seed" does act and these would seem to as well. Other fields stay ignored: ids and
# metadata, and names such as "target" that datasets use for a reference answer.
RUN_OPTIONS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
               "top_p": "--top-p", "lookahead": "--lookahead", "tree": "--tree", "matches": "--matches",
               "ignore_eos": "--ignore-eos", "coupled": "--coupled"}
# The runs, as the progress bar and the summary name them.
NAMES = {PLAIN: "plain decoding", EXACT: "plain decoding, exact mode", SPECULATIVE: "speculative sampling"}


@dataclass(frozen=True)
class PromptLine:
    """A prompt of a --prompts-file: its line number (from 1), its text, its tokens, and its JSON line's "seed"."""

    line: int
    text: str
    tokens: list[int]
    seed: int | None = None


def read_prompts(path: str, enc) -> list[PromptLine]:
    """The prompts of a --prompts-file, in order; a bad line is a ValueError naming its number.

    The file is UTF-8 (a BOM is skipped, CRLF line ends are fine); blank lines are skipped. Its first non-blank
    line decides its format, for every line: when it starts with `{` the file is JSON lines, each line an object
    with a string "prompt" and, for coupled sampling, an integer "seed" (other fields ignored, but a run's option
    such as "temperature" is refused: RUN_OPTIONS); otherwise each line is one prompt, exactly as written.
    """
    try:
        kind = os.stat(path).st_mode
        if stat.S_ISCHR(kind) or stat.S_ISBLK(kind):  # /dev/zero, /dev/urandom: no end, and no text
            raise ValueError(f"--prompts-file {path} is a device, not a file of prompts: give a text file")
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)  # a pipe is read to its end, up to the cap
    except OSError as e:
        raise ValueError(f"--prompts-file {path}: cannot read it ({e.strerror or e})") from None
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"--prompts-file {path} holds more than {MAX_FILE_BYTES // 2**20} MiB: split it into "
                         f"smaller files")
    prompts, json_lines = [], None
    for number, raw in enumerate(data.removeprefix(codecs.BOM_UTF8).split(b"\n"), 1):
        where = f"--prompts-file {path}, line {number}"
        try:
            line = raw.removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: byte {e.start + 1} is not UTF-8: save the file as UTF-8") from None
        if not line.strip():
            continue
        if json_lines is None:
            json_lines = line.lstrip().startswith("{")
        text, seed = _json_prompt(line, where) if json_lines else (line, None)
        surrogate = next((c for c in text if "\ud800" <= c <= "\udfff"), None)
        if surrogate is not None:  # only a JSON escape can make one: it is no character
            raise ValueError(f"{where}: the prompt holds a lone surrogate \\u{ord(surrogate):04x}, which is not text: "
                             f"remove it")
        tokens = enc.encode(text, allowed_special="all")
        if not tokens:
            raise ValueError(f'{where}: the prompt is empty: give some text, {{"prompt": "..."}}')
        prompts.append(PromptLine(number, text, tokens, seed))
    if not prompts:
        raise ValueError(f"--prompts-file {path} holds no prompt (every line is blank): write one prompt per line")
    return prompts


def json_looking_note(path: str, prompts: list[PromptLine]) -> str | None:
    """A note when a plain-text file (its first line not JSON) holds lines that look like JSON prompt lines: they
    are prompts as written, which a user who mixed the formats may not expect."""
    if prompts[0].text.lstrip().startswith("{"):
        return None
    looking = [p.line for p in prompts if p.text.lstrip().startswith("{") and '"prompt"' in p.text]
    if not looking:
        return None
    more = f" (and {len(looking) - 1} more)" if len(looking) > 1 else ""
    return (f"note: --prompts-file {path} is plain text, as its first line decides: line {looking[0]}{more}, which "
            f"looks like a JSON line, is a prompt as written; for JSON lines, make every line one")


def _json_prompt(line: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg}, column {e.colno}): the file's first line starts with {{, "
                         f"so every line must be a JSON object with a \"prompt\" string") from None
    except RecursionError:  # the parser recurses once per bracket: thousands of them exhaust Python's stack
        raise ValueError(f"{where}: nested too deeply to read (thousands of brackets): write "
                         f"{{\"prompt\": \"your text\"}}") from None
    except Exception as e:  # whatever else the parser raises: still this line's fault, named
        if isinstance(e, ValueError) and "digits" in str(e):  # Python converts at most this many digits to an int
            raise ValueError(f"{where}: a number with more than {sys.get_int_max_str_digits()} digits, more than "
                             f"Python reads: shorten it, or write it as a string") from None
        raise ValueError(f"{where}: cannot be read as JSON ({type(e).__name__}: {e}): write "
                         f"{{\"prompt\": \"your text\"}}") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise ValueError(f'{where}: this JSON line has no "prompt" string: write {{"prompt": "your text"}}')
    for key in record:
        if (flag := RUN_OPTIONS.get(key.replace("-", "_"))) is not None:
            raise ValueError(f'{where}: "{printable(key)}" is an option of the whole run, not of one prompt: give it '
                             f'on the command line ({flag}) and remove it from the line')
    seed = record.get("seed")
    if seed is not None:
        try:
            seed = check_integer('"seed"', seed, 0, MAX_SEED)
        except ValueError as e:
            raise ValueError(f"{where}: {printable(str(e))}") from None
    return record["prompt"], seed


class JsonLines:
    """Writes one JSON object per line, to a regular file (emptied when opened) or to stdout, each line whole and
    at once.

    A file is written in place, not renamed into place at the end: a reader (`tail -f`) sees every finished line,
    and a run that is killed keeps them. Should a write stop midway (a full disk, Ctrl-C between two partial
    writes), the file is cut back to its last whole line before the error goes on. The lines are ASCII (JSON
    escapes the rest), so model text can never drive a terminal or split a line.
    """

    def __init__(self, path: str | None):
        self.path, self.count, self.size = path, 0, 0
        # A regular file or a new one, never through a link (cli.open_output), so that it can always be cut back.
        self.fd = None if path is None else open_output(path, truncate=True)

    def write(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if self.fd is None:
            sys.stdout.write(line)
            sys.stdout.flush()
        else:
            data = line.encode("ascii")
            try:
                done = 0
                while done < len(data):
                    done += os.write(self.fd, data[done:])
            except BaseException:
                os.ftruncate(self.fd, self.size)
                raise
            self.size += len(data)
        self.count += 1

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def run_prompts_file(args, prompts: list[PromptLine], *, enc, device, dtype, decode, prepare, options: dict,
                     exact: bool, pass_rows: int, setup: list[str]) -> int:
    """Decodes `prompts` in batches of --batch-size, every mode of --mode on each batch (plain decoding first),
    and writes each prompt's JSON line as soon as its last run finishes it; then the summary on stderr. A failure
    or Ctrl-C keeps the lines written so far and says how many. `prepare(mode)` runs before each run's clock."""
    from tqdm.auto import tqdm

    modes = [m for m, wanted in ((PLAIN, args.mode != "speculative"), (EXACT, exact),
                                 (SPECULATIVE, args.mode != "plain")) if wanted]
    size, n = args.batch_size, args.max_new_tokens
    batches = [prompts[i:i + size] for i in range(0, len(prompts), size)]
    warm_up_seconds, done = {}, []
    for mode in reversed(modes):  # ending on plain decoding, which runs first: one change of layout fewer
        # The first passes pay for allocations and kernel selection: a short run on the first batch, not timed.
        prepare(mode)
        print(f"Warming up: {NAMES[mode]}, 8 tokens of the first batch, not timed ...", file=sys.stderr)
        started = time.perf_counter()
        decode(mode, [p.tokens for p in batches[0]], min(8, n), **options | {"temperature": 0.0, "eos_token_id": None})
        warm_up_seconds[mode] = time.perf_counter() - started
    warm_up_seconds = {mode: warm_up_seconds[mode] for mode in modes if mode in warm_up_seconds}
    out = JsonLines(args.output)
    # Moves by tokens, every run of every batch, and names the run under way; no bar when stderr is no terminal.
    bar = tqdm(total=len(prompts) * n * len(modes), unit="tok", file=sys.stderr, leave=False, disable=None)
    runs = {mode: [] for mode in modes}  # every row of every batch, by mode
    totals = {mode: [0, 0.0, 0.0, 0.0] for mode in modes}  # tokens, seconds, at the median steps' pace, CPU seconds

    def finished(batch, results, index: int, generation: Generation) -> None:  # a row of the last mode: its line, now
        record = _record(batch[index], generation, enc, {mode: r[index] for mode, r in results.items()},
                         compared=args.temperature == 0 or args.coupled, show_acceptance=args.show_acceptance)
        done.append((batch[index], generation, record))
        out.write(record)

    try:
        for number, batch in enumerate(batches, 1):
            results = {}  # this batch's earlier runs, by mode
            for mode in modes:
                bar.set_description(f"{NAMES[mode]}, batch {number} of {len(batches)}")
                generator = torch.Generator(device).manual_seed(args.seed)  # every run of every batch: the same seed
                seeds = [args.seed if p.seed is None else p.seed for p in batch]  # coupled: each row its own
                prepare(mode)
                started, cpu = time.perf_counter(), time.process_time()
                results[mode] = decode(mode, [p.tokens for p in batch], n, generator, seeds, **options,
                                       on_tokens=lambda row, new: bar.update(len(new)),
                                       on_finished=partial(finished, batch, results) if mode == modes[-1] else None)
                bar.update(sum(n - len(r.tokens) for r in results[mode]))  # rows that ended early, at an EOS
                runs[mode] += results[mode]
                longest = max(results[mode], key=lambda r: len(r.steps))  # it took part in every step
                wall = time.perf_counter() - started  # the batch's clock starts a little after the call's
                totals[mode][0] += sum(len(r.tokens) for r in results[mode])
                totals[mode][1] += wall
                totals[mode][2] += expected_seconds(longest) + wall - longest.seconds
                totals[mode][3] += time.process_time() - cpu
    except BaseException as e:
        bar.close()
        if not isinstance(e, BrokenPipeError):  # the reader went away: nothing more is printed, as Unix tools do
            print(f"{out.count} of {len(prompts)} prompts written to {printable(args.output or 'stdout')} before the "
                  f"run stopped", file=sys.stderr)
        raise
    finally:
        out.close()
        if args.trace is not None and done:  # every finished prompt's trace, also when the run stopped early
            _write_batch_trace(args, done, enc)
    bar.close()
    print("\n=== Summary ===", file=sys.stderr)
    for line in setup + _file_summary(args, done, runs, batches=len(batches), totals=totals,
                                      warm_up_seconds=warm_up_seconds, pass_rows=pass_rows, device=device,
                                      dtype=dtype):
        print(line, file=sys.stderr)
    return 0


def _record(prompt: PromptLine, generation: Generation, enc, earlier: dict[str, Generation], *, compared: bool,
            show_acceptance: bool) -> dict:
    """A prompt's JSON line. `earlier`: this row in the batch's runs before, plain decoding and its exact mode."""
    rate = generation.acceptance_rate
    record = {"line": prompt.line, "prompt": prompt.text, "text": enc.decode(generation.tokens),
              "tokens": generation.tokens, "acceptance_rate": None if rate is None else round(rate, 4),
              "tokens_per_target_pass": round(generation.tokens_per_target_call, 4),
              "target_passes": generation.target_calls, "seconds": round(generation.seconds, 4)}
    plain = earlier.get(PLAIN)
    if plain is not None:
        record["plain_seconds"] = round(plain.seconds, 4)
        reference = earlier.get(EXACT, plain)  # greedy or coupled: what the speculative tokens must equal
        # Else both are samples from the target: equality is not expected.
        record["identical"] = generation.tokens == reference.tokens if compared else None
    if show_acceptance:
        from speculative_gpt2.render import marked_text, text_groups

        record["origins"] = [str(o) for o in generation.origins]
        record["marked"] = marked_text(text_groups(generation, enc)[1])
    return record


def _write_batch_trace(args, done: list[tuple[PromptLine, Generation, dict]], enc) -> None:
    from speculative_gpt2.render import batch_trace_page

    shape = run_shape(args.lookahead, args.tree, args.matches)
    title = (f"{Path(args.target).name} / {Path(args.draft).name}, {shape}, temperature {args.temperature}: "
             f"{Path(args.prompts_file).name}")
    page = batch_trace_page([g for _, g, _ in done], enc, [p.tokens for p, _, _ in done],
                            names=[f"line {p.line}" for p, _, _ in done], title=title)
    write_page("--trace", Path(args.trace), page)
    print(f"trace of {len(done)} prompts: {printable(args.trace)}", file=sys.stderr)


def _file_summary(args, done: list[tuple[PromptLine, Generation, dict]], runs: dict[str, list[Generation]], *,
                  batches: int, totals: dict[str, list], warm_up_seconds: dict[str, float], pass_rows: int, device,
                  dtype) -> list[str]:
    """The summary of a --prompts-file run, after `_setup_lines`: throughput over all rows, and the comparisons."""
    warm_ups = ", ".join(f"{mode} {s:.2f} s" for mode, s in warm_up_seconds.items())
    lines = [f"warm-up (8 tokens of the first batch each, not timed below): {warm_ups}",
             f"prompts: {len(done)} from {printable(args.prompts_file)}, in {batches} batch{'es' * (batches != 1)} of "
             f"up to {args.batch_size}"]
    # Named as the single prompt's report names them ("exact mode"); on a GPU the host waits for the device: its CPU
    # time says nothing of other processes.
    timed = {mode: Timed("exact mode" if mode == EXACT else NAMES[mode], tokens, seconds, expected,
                         cpu_share(cpu, seconds, torch.get_num_threads()) if device.type == "cpu" else None)
             for mode, (tokens, seconds, expected, cpu) in totals.items() if seconds > 0 and tokens}
    for mode, (tokens, seconds, *_) in totals.items():
        lines.append(f"{NAMES[mode]}: {tokens} tokens in {seconds:.2f} s, {tokens / seconds if seconds else 0:.2f} "
                     f"tokens/s over all rows")
    if EXACT in timed and PLAIN in timed:
        cost = (timed[EXACT].expected / timed[EXACT].tokens) / (timed[PLAIN].expected / timed[PLAIN].tokens)
        lines.append(f"exact mode (every target pass {exact_rows(pass_rows)}, per prompt; so that the texts compare "
                     f"equal in any dtype) cost plain decoding {cost:.2f}x its time (median steps); the speedup below "
                     f"is over the fastest plain decoding")
    if SPECULATIVE in timed and PLAIN in timed:
        others = (timed[EXACT],) if EXACT in timed else ()
        trusted, speedup = speedup_lines(timed[SPECULATIVE], timed[PLAIN], "batched plain decoding", others)
        lines += speedup
    elif alone := [timed[mode] for mode in (SPECULATIVE, PLAIN) if mode in timed]:  # one run: its own pace
        lines.append(pace_line(alone[0]))
    if SPECULATIVE in totals:
        generations = [g for _, g, _ in done]
        rates = [g.acceptance_rate for g in generations if g.acceptance_rate is not None]
        passes = sum(g.target_calls for g in generations)
        trees = args.tree is not None or args.matches > 1
        lines.append(f"{acceptance(generations, trees=trees)} over all rows; mean per prompt "
                     f"{f'{sum(rates) / len(rates):.2f}' if rates else 'n/a'}")
        tree = None if args.tree is None else str(args.tree)
        lines.append(f"mean tokens per target pass: {sum(len(g.tokens) for g in generations) / max(passes, 1):.2f}; "
                     f"{k_used(generations, args.lookahead, args.draft == NGRAM, tree=tree)}")
        if trees and (line := tree_line(generations)):
            lines.append(line)
        if SPECULATIVE in timed and PLAIN in timed:
            lines += why_slower(runs[SPECULATIVE], runs[PLAIN], trusted, lookahead=args.lookahead,
                                lookup=args.draft == NGRAM, dtype=dtype, device=device,
                                exact_rows=pass_rows if runs.get(EXACT) else None, tree=tree)
    verdicts = [r["identical"] for _, _, r in done if "identical" in r]
    if verdicts and (args.temperature == 0 or args.coupled):
        parted = [str(p.line) for p, _, r in done if r.get("identical") is False]
        lines.append(f"identical outputs: {verdicts.count(True)} of {len(verdicts)} prompts" + (
            f"; not on lines {', '.join(parted)}: in exact mode this platform breaks its premise (run "
            f"tests/test_exact_dtype.py)" if parted else ""))
    elif verdicts:
        lines.append("identical outputs: not expected at temperature > 0 (both are samples from the target; "
                     "--coupled makes them one text)")
    lines.append(f"peak memory: {peak_memory(device)}")
    where = "on stdout" if args.output is None else f"in {printable(args.output)}"
    lines.append(f"output: {len(done)} JSON lines {where}")
    return lines
