"""Text safe to show on a terminal: model output and file names must not drive it."""

from __future__ import annotations

import re

# What a terminal may act on, shown as visible symbols: model output must not move the cursor, start escape
# sequences of its own (ESC, and the C1 controls: CSI U+009B, OSC U+009D, ST U+009C ...) or reorder the text on
# screen (bidirectional overrides, isolates and marks). Newlines and tabs stay. C0 and DEL show as their Unicode
# pictures (ESC as ␛); the others, which have no picture, as <U+XXXX>; so do lone surrogates (undecodable bytes
# of a file name), which an encoder would refuse.
_CONTROL_PICTURES = {c: 0x2400 + c for c in range(32) if chr(c) not in "\n\t"} | {0x7F: 0x2421}
_ESCAPED = re.compile("[\x80-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(text: str) -> str:
    """`text` safe to write to a terminal: C0 controls other than newline and tab, and DEL, shown as their Unicode
    pictures (ESC as ␛); C1 controls (U+0080-U+009F), bidirectional controls and lone surrogates as <U+XXXX>."""
    return _ESCAPED.sub(lambda m: f"<U+{ord(m.group()):04X}>", text.translate(_CONTROL_PICTURES))


def strip_ansi(text: str) -> str:
    """`text` without its ANSI colour codes (what a terminal shows)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)
