"""Show where each token of a `Generation` came from: as HTML (notebooks), ANSI colours or marks (terminals), and a
self-contained page that shows a traced run round by round.

`to_html`, `to_ansi` and `to_text` show every new token by its origin: a draft token the target kept, a token
resampled from norm(max(0, q - p)) at a rejection, a bonus token drawn from q after all K drafts were kept, or a
plain target step. `trace_page` renders `speculative_sample(..., trace=True)`: the coloured text, then each round
with its drafts, p, q, min(1, q/p), the draws r and the verdict; `batch_trace_page` does the same for a batch, a
section per prompt. `TextStream` turns the token chunks of the `on_tokens` callback into text that is safe to
print.

GPT-2 tokens are byte sequences: an emoji or a CJK character may span several tokens, and one token alone may
be an incomplete UTF-8 sequence. Decoding token by token would print U+FFFD in their place, so text is cut
only where the bytes so far form complete characters.
"""

from __future__ import annotations

import codecs
import html
from typing import IO

from speculative_gpt2.arguments import token_list
from speculative_gpt2.drafters import node_depths
from speculative_gpt2.records import Origin
from speculative_gpt2.text import printable

ORIGINS = tuple(Origin)

MEANINGS = {
    Origin.DRAFT: "proposed by the draft, kept by the target",
    Origin.RESAMPLED: "a draft was rejected: drawn from norm(max(0, q - p))",
    Origin.BONUS: "all K drafts kept (a tree: a path to a leaf): one more token drawn from q",
    Origin.TARGET: "a target step with nothing drafted: plain decoding, or a last token made alone",
}
# With coupled sampling a rejected draft gives way to the target's own sample at its place.
COUPLED_MEANINGS = MEANINGS | {Origin.RESAMPLED: "a draft was rejected: the target's Gumbel-max token at its place",
                               Origin.BONUS: "all K drafts kept (a tree: a path to a leaf): the target's Gumbel-max "
                                             "token after them"}
HTML_COLOURS = {Origin.DRAFT: "#b6e8b0", Origin.RESAMPLED: "#ffbf8f", Origin.BONUS: "#a9cdf7", Origin.TARGET: "#ddd0f2"}
ANSI_COLOURS = {Origin.DRAFT: "\x1b[32m", Origin.RESAMPLED: "\x1b[31m", Origin.BONUS: "\x1b[34m",
                Origin.TARGET: "\x1b[35m"}
ANSI_PROMPT, ANSI_RESET = "\x1b[2m", "\x1b[0m"  # the prompt is dim
# Without colours: kept drafts as they are, the other origins between marks.
PLAIN_MARKS = {Origin.DRAFT: ("", ""), Origin.RESAMPLED: ("[", "]"), Origin.BONUS: ("{", "}"),
               Origin.TARGET: ("<", ">")}


class HTML(str):
    """An HTML string that a notebook shows rendered (`_repr_html_`) rather than as source."""

    def _repr_html_(self) -> str:
        return str(self)

def _decoder():
    # errors="replace": bytes that can never become a character (a stray continuation byte, or a sequence cut
    # off by the end of the generation) show as U+FFFD, as in `tokenizer.decode`.
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


def text_groups(generation, tokenizer, prompt_tokens=None) -> tuple[str, list[tuple[str, str]]]:
    """The prompt's text and the new text as (text, origin) pairs, one pair per group of tokens.

    A group is the shortest run of consecutive tokens whose bytes end on a character boundary (usually one
    token). It takes the origin of its LAST token: the character appears only once that token is committed.
    """
    decoder = _decoder()
    # A list, a 1-D tensor or a numpy array, as the samplers take: never a truth test (`tensor([0])` is false).
    prompt_tokens = [] if prompt_tokens is None else token_list(prompt_tokens)
    prompt_text = "".join(decoder.decode(tokenizer.decode_single_token_bytes(t)) for t in prompt_tokens)
    groups, text = [], ""
    for token, origin in zip(generation.tokens, map(Origin, generation.origins), strict=True):
        text += decoder.decode(tokenizer.decode_single_token_bytes(token))
        if decoder.getstate()[0] == b"":  # no incomplete character is pending: the group ends here
            groups.append((text, origin))
            text = ""
    tail = text + decoder.decode(b"", final=True)  # non-empty only if the bytes end inside a character
    if tail and generation.tokens:
        groups.append((tail, Origin(generation.origins[-1])))
    else:
        prompt_text += tail
    return prompt_text, groups


def to_html(generation, tokenizer, prompt_tokens=None) -> HTML:
    """An HTML fragment: the prompt in grey, each new token in a <span> coloured by its origin (named in its
    `title`), then a legend. All text is escaped; newlines show (white-space: pre-wrap). A str that renders
    itself in a notebook."""
    prompt_text, groups = text_groups(generation, tokenizer, prompt_tokens)
    parts = [f'<span style="color:#888" title="prompt">{html.escape(prompt_text)}</span>'] if prompt_text else []
    for text, origin in groups:
        parts.append(f'<span{_html_style(origin)} title="{origin}">{html.escape(text)}</span>')
    legend = " ".join(
        f'<span{_html_style(origin)} title="{origin}">{origin}</span> {html.escape(MEANINGS[origin])}.'
        for origin in ORIGINS
    )
    return HTML(
        '<div class="speculative-text" style="white-space:pre-wrap; font-family:monospace; line-height:1.6">'
        f'{"".join(parts)}</div>\n<div class="speculative-legend" style="font-size:smaller; margin-top:0.5em">'
        f"{legend}</div>"
    )


def _html_style(origin: str) -> str:
    # Dark text on the light backgrounds, so that they stay readable under a dark notebook theme.
    return f' style="background:{HTML_COLOURS[origin]}; color:#000"'


def to_ansi(generation, tokenizer, prompt_tokens=None, coupled: bool = False) -> str:
    """The text for a terminal: the prompt dim, each new token in its origin's colour (reset after each token),
    then a legend on the last line (`coupled`: of coupled sampling's origins). Control characters other than
    newline and tab show as symbols (␛, ␍)."""
    prompt_text, groups = text_groups(generation, tokenizer, prompt_tokens)
    parts = [f"{ANSI_PROMPT}{printable(prompt_text)}{ANSI_RESET}"] if prompt_text else []
    for text, origin in groups:
        parts.append(f"{ANSI_COLOURS[origin]}{printable(text)}{ANSI_RESET}")
    meanings = COUPLED_MEANINGS if coupled else MEANINGS
    legend = "; ".join(f"{ANSI_COLOURS[origin]}{origin}{ANSI_RESET}: {meanings[origin]}" for origin in ORIGINS)
    return f"{''.join(parts)}\nlegend: {legend}"


def to_text(generation, tokenizer, prompt_tokens=None, coupled: bool = False) -> str:
    """The text for a terminal without colours: kept drafts as they are, [resampled], {bonus}, <target step>
    tokens between marks, then a legend on the last line (`coupled` as in `to_ansi`). Control characters show as
    symbols."""
    prompt_text, groups = text_groups(generation, tokenizer, prompt_tokens)
    meanings = COUPLED_MEANINGS if coupled else MEANINGS
    legend = "; ".join(f"{'plain' if o == Origin.DRAFT else PLAIN_MARKS[o][0] + '..' + PLAIN_MARKS[o][1]}: "
                       f"{meanings[o]}" for o in ORIGINS)
    return f"{printable(prompt_text)}{printable(marked_text(groups))}\nlegend: {legend}"


def marked_text(groups: list[tuple[str, str]]) -> str:
    """The (text, origin) groups of `text_groups` as one string with to_text's marks: kept drafts as they are,
    [resampled], {bonus}, <target step>. Control characters are left as they are (JSON escapes them)."""
    return "".join(f"{PLAIN_MARKS[o][0]}{text}{PLAIN_MARKS[o][1]}" for text, o in groups)


def origin_counts(generation) -> str:
    """How many new tokens came from each origin, as "draft 40, resampled 10, bonus 5, target 1"."""
    origins = [Origin(o) for o in generation.origins]
    return ", ".join(f"{o} {origins.count(o)}" for o in ORIGINS)


class TextStream:
    """Streams token chunks as text, never splitting a character: pass it as `on_tokens`, then call `flush()`.

    Each call returns the text that the chunk completes (possibly ""), holding back the bytes of a character
    whose last token has not arrived yet; with a `file` (e.g. sys.stdout) it also writes that text there. With
    `escape`, control characters come out as symbols (`printable`): model output must not drive a terminal.
    """

    def __init__(self, tokenizer, file: IO[str] | None = None, escape: bool = False):
        self.tokenizer, self.file, self.escape = tokenizer, file, escape
        self._decoder = _decoder()

    def __call__(self, tokens: list[int]) -> str:
        """The complete text that `tokens` add."""
        return self._emit(self._decoder.decode(b"".join(map(self.tokenizer.decode_single_token_bytes, tokens))))

    def flush(self) -> str:
        """The end of the stream: the held-back bytes, as U+FFFD if they never formed a character."""
        return self._emit(self._decoder.decode(b"", final=True))

    def _emit(self, text: str) -> str:
        text = printable(text) if self.escape else text
        if self.file is not None and text:
            self.file.write(text)
            self.file.flush()  # a chunk is a round of the sampler: show it now, not when a line ends
        return text


def trace_page(generation, tokenizer, prompt_tokens=None,
               title: str = "Speculative sampling, round by round") -> HTML:
    """A self-contained HTML page (no server, no network) of a traced run (`speculative_sample(..., trace=True)`):
    the text coloured by origin, then every round, expandable, with its drafts x_i, p(x_i), q(x_i), min(1, q/p),
    the draw r_i, the verdict, the resampled or bonus token with its probability, and the round's time split."""
    _check_traced(generation)
    return _page(title, f'{to_html(generation, tokenizer, prompt_tokens)}\n<p id="summary">{_trace_summary(generation)}'
                        f'</p>\n<p id="counted"></p>\n{_trace_rounds_html(generation, tokenizer)}')


def batch_trace_page(generations, tokenizer, prompts, names=None,
                     title: str = "Speculative sampling of a batch, round by round") -> HTML:
    """One self-contained page for a traced batch (a list of `Generation`s, each with its `trace`, and their
    prompts): a contents list, then a section per prompt with what `trace_page` shows for one; `names` heads
    the sections (default "prompt 1", "prompt 2", ...)."""
    for generation in generations:
        _check_traced(generation)
    names = [f"prompt {i}" for i in range(1, len(generations) + 1)] if names is None else list(names)
    if not len(names) == len(prompts) == len(generations):
        raise ValueError(f"{len(generations)} generations, {len(prompts)} prompts and {len(names)} names: give one "
                         f"prompt and one name per generation")
    contents, sections = [], []
    for i, (generation, prompt, name) in enumerate(zip(generations, prompts, names), 1):
        contents.append(f'<li><a href="#row-{i}">{html.escape(printable(name))}</a>: {_trace_summary(generation)}</li>')
        sections.append(f'<section class="row" id="row-{i}">\n<h2>{html.escape(printable(name))}</h2>\n'
                        f'{to_html(generation, tokenizer, prompt)}\n<p class="summary">{_trace_summary(generation)}'
                        f'</p>\n{_trace_rounds_html(generation, tokenizer)}</section>\n')
    rounds = [r for g in generations for r in g.trace]
    summary = (f"{len(generations)} prompts, {len(rounds)} rounds, {_kept(rounds)}, "
               f"{sum(len(g.tokens) for g in generations)} new tokens.")
    return _page(title, f'<p id="summary">{summary}</p>\n<p id="counted"></p>\n<ol class="contents">'
                        f'{"".join(contents)}</ol>\n{"".join(sections)}')


def _check_traced(generation) -> None:
    if generation.trace is None:
        raise ValueError("this Generation has no trace: run speculative_sample(..., trace=True)")


def _trace_summary(generation) -> str:
    rounds = generation.trace
    return (f"{len(rounds)} rounds, {_kept(rounds)}, {len(generation.tokens)}\n"
            f"new tokens in {generation.seconds:.3f} s.")


def _kept(rounds) -> str:
    """The drafts kept and the acceptance, as the command line's report counts them: of the drafts proposed, or for
    token trees, which keep at most one draft per level, of their levels (and the drafts they scored beside it)."""
    kept = sum(r.kept for r in rounds)
    if all(r.parents is None for r in rounds):
        proposed = sum(len(r.drafts) for r in rounds)
        return f"{kept} of {proposed} drafts kept (acceptance {f'{kept / proposed:.2f}' if proposed else 'n/a'})"
    levels = sum(_levels(r) for r in rounds)
    rate = f"{kept / levels:.2f}" if levels else "n/a"
    return (f"{kept} drafts kept over their trees' {levels} levels (acceptance {rate}; "
            f"{sum(len(r.drafts) for r in rounds)} drafts scored)")


def _levels(r) -> int:
    """A traced round's depth: a chain's drafts, or its tree's deepest node; a kept EOS ends it at the drafts kept,
    as the run's own record counts it."""
    if r.next_token is None:
        return r.kept
    return len(r.drafts) if r.parents is None else max(node_depths(r.parents), default=0)


def _trace_rounds_html(generation, tokenizer) -> str:
    rounds = generation.trace
    # Open the first round, and the first with a rejection, so that both verdicts show before any click.
    first_rejection = next((i for i, r in enumerate(rounds, 1) if _rejected(r)), None)
    return "".join(_trace_round_html(i, r, tokenizer, opened=i in (1, first_rejection))
                   for i, r in enumerate(rounds, 1))


def _rejected(r) -> bool:
    """Whether a round rejected a draft: a chain's kept fewer than it drafted, a tree tried a node off its kept path."""
    if r.parents is None:
        return r.kept < len(r.drafts)
    return any(tried is not None and node not in r.path for node, tried in enumerate(r.tested))


def _page(title: str, body: str) -> HTML:
    """The page around a trace's body: the style, the algorithm in a paragraph, and a script that counts the rounds
    the page holds (into the element with id "counted")."""
    return HTML(f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 72em; margin: 2em auto; padding: 0 1em; color: #222 }}
table {{ border-collapse: collapse; margin: 0.5em 0 0.5em 1.5em; font-variant-numeric: tabular-nums }}
th, td {{ border-bottom: 1px solid #ddd; padding: 0.2em 0.8em; text-align: right }}
td.token, th.token {{ text-align: left; font-family: monospace; white-space: pre }}
tr.kept td.verdict {{ color: #1a7f37 }} tr.rejected td.verdict {{ color: #c0392b; font-weight: bold }}
tr.untested {{ color: #999 }}
summary {{ cursor: pointer; padding: 0.25em 0 }}
.next {{ margin: 0.3em 0 0.8em 1.5em }}
section.row {{ border-top: 2px solid #ccc; margin-top: 1.5em }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Chen et al. 2023, Algorithm 2. <b>p</b> is the draft's distribution, <b>q</b> the target's. Each round the draft
proposes K tokens; draft x<sub>i</sub> is kept if r<sub>i</sub> &lt; q(x<sub>i</sub>)/p(x<sub>i</sub>), i.e. with
probability min(1, q/p); the first rejected one is replaced by a sample from norm(max(0, q &minus; p)); if all K are
kept, a bonus token is drawn from q. At temperature 0 there is no draw: a draft is kept iff it is the target's
argmax. With coupled sampling a draft is kept iff it is the target's Gumbel-max y<sub>i</sub> = argmax(log q + g), g
fixed by the seed and the position, and the first mismatch gives way to y<sub>i</sub>. A token tree's round tries
each node's children in the order drawn, each against what is left of q, which becomes norm(max(0, q &minus; p))
after each rejection (recursive rejection); its table lists the nodes depth first, each below its parent, and
min(1, q/p) as the rule tried it; the kept path is marked kept.</p>
{body}
<script>
// Counted from the rounds the page holds, so that a reader (or a test in a browser) can check it against the summary.
const rounds = document.querySelectorAll("details.round");
let kept = 0;
rounds.forEach(r => kept += Number(r.dataset.kept));
const check = "A check of this page against the summary above, counted from the rounds below: ";
document.getElementById("counted").textContent = check + `${{rounds.length}} rounds, ${{kept}} drafts kept.`;
</script>
</body></html>
""")


def _tree_rows(r, token) -> list[str]:
    """A token tree's round as table rows, depth first, each node indented below its parent; the kept path marked."""
    below = {i: [] for i in range(-1, len(r.drafts))}
    for node, parent in enumerate(r.parents):
        below[parent].append(node)
    rows, stack = [], [(node, 1) for node in reversed(below[-1])]
    while stack:
        node, depth = stack.pop()
        tried = r.tested[node]
        verdict = "kept" if node in r.path else "rejected" if tried is not None else "untested"
        draw = "" if r.r is None or r.r[node] is None else f"{r.r[node]:.3f}"
        rows.append(f'<tr class="{verdict}"><td>{depth}</td><td class="token">{"&nbsp;&nbsp;" * (depth - 1)}'
                    f'{"&#x2514; " if depth > 1 else ""}{token(r.drafts[node])}</td><td>{r.p[node]:.4g}</td>'
                    f'<td>{r.q[node]:.4g}</td><td>{"" if tried is None else f"{tried:.4g}"}</td><td>{draw}</td>'
                    f'<td class="verdict">{verdict}</td></tr>')
        stack += [(child, depth + 1) for child in reversed(below[node])]
    return rows


def _trace_round_html(number: int, r, tokenizer, opened: bool) -> str:
    def token(t: int) -> str:
        return html.escape(repr(printable(tokenizer.decode_single_token_bytes(t).decode("utf-8", errors="replace"))))

    rows = [] if r.parents is None else _tree_rows(r, token)
    coupled = r.choices is not None  # then a draft is kept iff it is the target's Gumbel-max at its place
    for i, (x, p, q, a) in enumerate(zip(r.drafts, r.p, r.q, r.acceptance_probabilities) if r.parents is None else ()):
        verdict = "kept" if i < r.kept else "rejected" if i == r.kept else "untested"
        last = (f'<td class="token">{token(r.choices[i])}</td>' if coupled else
                f'<td>{a:.4g}</td><td>{"" if r.r is None else f"{r.r[i]:.3f}"}</td>')
        rows.append(f'<tr class="{verdict}"><td>{i + 1}</td><td class="token">{token(x)}</td><td>{p:.4g}</td>'
                    f'<td>{q:.4g}</td>{last}<td class="verdict">{verdict}</td></tr>')
    origin = r.next_origin
    heads = ('<th class="token">target\'s Gumbel-max y<sub>i</sub></th>' if coupled else
             '<th>min(1, q/p)</th><th>r<sub>i</sub></th>')
    first = "i" if r.parents is None else "depth"
    table = (f'<table><tr><th>{first}</th><th class="token">draft x<sub>i</sub></th><th>p(x<sub>i</sub>)</th>'
             f'<th>q(x<sub>i</sub>)</th>{heads}<th>verdict</th></tr>'
             f'{"".join(rows)}</table>') if rows else ""
    if r.source:  # the drafter's word on where the drafts came from, e.g. a lookup's position
        table = f'<p class="source">{html.escape(r.source)}</p>' + table
    if origin is None:  # a kept EOS ended the output: no token was made after it
        then, next_line = "the last one ends the text", "The last kept draft is the end of text: nothing follows."
    else:
        source = {Origin.RESAMPLED: "from norm(max(0, q &minus; p))", Origin.BONUS: "from q, all drafts kept"
                  if r.parents is None else "from q, the kept path reached a leaf of the tree",
                  Origin.TARGET: "from q, nothing drafted"}[origin]
        if coupled:
            source = {Origin.RESAMPLED: "the target's Gumbel-max", Origin.BONUS: "the target's Gumbel-max, all drafts "
                      "kept", Origin.TARGET: "the target's Gumbel-max, nothing drafted"}[origin]
        then = f"then {origin} {token(r.next_token)}"
        next_line = (f"Then <span{_html_style(origin)}>{origin}</span> {token(r.next_token)} {source}, "
                     f"probability {r.next_probability:.4g}.")
    return (f'<details class="round" data-kept="{r.kept}" data-proposed="{len(r.drafts)}"{" open" if opened else ""}>'
            f'<summary>Round {number}: {r.kept} of {len(r.drafts)} drafts kept'
            f'{"" if r.parents is None else f" (a tree, {r.parents.count(-1)} first drafts)"}, {then} '
            f'&middot; draft {r.draft_ms:.1f} ms, verify {r.verify_ms:.1f} ms</summary>{table}'
            f'<p class="next">{next_line}</p></details>\n')
