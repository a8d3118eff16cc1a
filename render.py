"""Show where each token of a `Generation` came from: as HTML (notebooks) or ANSI colours (terminals).

`to_html` and `to_ansi` colour every new token by its origin: a draft token the target kept, a token resampled
from norm(max(0, q - p)) at a rejection, a bonus token drawn from q after all K drafts were kept, or a token of
plain decoding. `TextStream` turns the token chunks of the `on_tokens` callback into text that is safe to print.

GPT-2 tokens are byte sequences: an emoji or a CJK character may span several tokens, and one token alone may
be an incomplete UTF-8 sequence. Decoding token by token would print U+FFFD in their place, so text is cut
only where the bytes so far form complete characters.
"""

from __future__ import annotations

import codecs
import html
import re
from typing import IO

from speculative import Origin

ORIGINS = tuple(Origin)

MEANINGS = {
    Origin.DRAFT: "proposed by the draft, kept by the target",
    Origin.RESAMPLED: "a draft was rejected: drawn from norm(max(0, q - p))",
    Origin.BONUS: "all K drafts kept: one more token drawn from q",
    Origin.TARGET: "plain decoding, one target pass per token",
}
HTML_COLOURS = {Origin.DRAFT: "#b6e8b0", Origin.RESAMPLED: "#ffbf8f", Origin.BONUS: "#a9cdf7", Origin.TARGET: None}
ANSI_COLOURS = {Origin.DRAFT: "\x1b[32m", Origin.RESAMPLED: "\x1b[31m", Origin.BONUS: "\x1b[34m", Origin.TARGET: ""}
ANSI_PROMPT, ANSI_RESET = "\x1b[2m", "\x1b[0m"  # the prompt is dim

# Control characters shown as their Unicode pictures in a terminal: model output must not move the cursor or
# start escape sequences of its own. Newlines and tabs stay.
_CONTROL_PICTURES = {c: 0x2400 + c for c in range(32) if chr(c) not in "\n\t"} | {0x7F: 0x2421}


def _decoder():
    # errors="replace": bytes that can never become a character (a stray continuation byte, or a sequence cut
    # off by the end of the generation) show as U+FFFD, as in `tokenizer.decode`.
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


def text_groups(generation, tokenizer, prompt_tokens: list[int] | None = None) -> tuple[str, list[tuple[str, str]]]:
    """The prompt's text and the new text as (text, origin) pairs, one pair per group of tokens.

    A group is the shortest run of consecutive tokens whose bytes end on a character boundary (usually one
    token). It takes the origin of its LAST token: the character appears only once that token is committed.
    """
    decoder = _decoder()
    prompt_text = "".join(decoder.decode(tokenizer.decode_single_token_bytes(t)) for t in prompt_tokens or [])
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


def to_html(generation, tokenizer, prompt_tokens: list[int] | None = None) -> str:
    """An HTML fragment: the prompt in grey, each new token in a <span> coloured by its origin (named in its
    `title`), then a legend. All text is escaped; newlines show (white-space: pre-wrap)."""
    prompt_text, groups = text_groups(generation, tokenizer, prompt_tokens)
    parts = [f'<span style="color:#888" title="prompt">{html.escape(prompt_text)}</span>'] if prompt_text else []
    for text, origin in groups:
        parts.append(f'<span{_html_style(origin)} title="{origin}">{html.escape(text)}</span>')
    legend = " ".join(
        f'<span{_html_style(origin)} title="{origin}">{origin}</span> {html.escape(MEANINGS[origin])}.'
        for origin in ORIGINS
    )
    return (
        '<div class="speculative-text" style="white-space:pre-wrap; font-family:monospace; line-height:1.6">'
        f'{"".join(parts)}</div>\n<div class="speculative-legend" style="font-size:smaller; margin-top:0.5em">'
        f"{legend}</div>"
    )


def _html_style(origin: str) -> str:
    colour = HTML_COLOURS[origin]
    # Dark text on the light backgrounds, so that they stay readable under a dark notebook theme.
    return f' style="background:{colour}; color:#000"' if colour else ""


def to_ansi(generation, tokenizer, prompt_tokens: list[int] | None = None) -> str:
    """The text for a terminal: the prompt dim, each new token in its origin's colour (reset after each token),
    then a legend on the last line. Control characters other than newline and tab show as symbols (␛, ␍)."""
    prompt_text, groups = text_groups(generation, tokenizer, prompt_tokens)
    parts = [f"{ANSI_PROMPT}{printable(prompt_text)}{ANSI_RESET}"] if prompt_text else []
    for text, origin in groups:
        parts.append(f"{ANSI_COLOURS[origin]}{printable(text)}{ANSI_RESET}")
    legend = "; ".join(f"{ANSI_COLOURS[origin]}{origin}{ANSI_RESET}: {MEANINGS[origin]}" for origin in ORIGINS)
    return f"{''.join(parts)}\nlegend: {legend}"


def printable(text: str) -> str:
    """`text` with control characters other than newline and tab shown as their Unicode pictures (ESC as ␛):
    safe to write to a terminal."""
    return text.translate(_CONTROL_PICTURES)


def strip_ansi(text: str) -> str:
    """`text` without its ANSI colour codes (what a terminal shows)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


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
