"""Draw the speculative output coloured by origin, as `--show-acceptance` prints it, into a PNG (for the README).

    python examples/acceptance_png.py --target weights/gpt2-xl --draft weights/gpt2 docs/acceptance.png
    python examples/acceptance_png.py docs/acceptance.png      # tiny random models: gibberish, but every colour
"""

import argparse
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from speculative_gpt2.random_checkpoint import tiny_pair  # noqa: E402
from speculative_gpt2.cli import DEFAULT_PROMPT  # noqa: E402
from gpt2_model import GPT2  # noqa: E402
from speculative_gpt2.render import HTML_COLOURS, MEANINGS, ORIGINS, text_groups  # noqa: E402
from speculative import Origin, speculative_sample  # noqa: E402
from speculative_gpt2.tokenizer import load_tokenizer  # noqa: E402


def draw(prompt_text, groups, title, path, width=88):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Lay the text out on a monospace grid: (line, column, text, origin) per piece, wrapped at `width` columns.
    pieces, line, col = [], 0, 0
    for text, origin in [(prompt_text, "prompt")] + groups:
        for part in textwrap.wrap(text.replace("\n", " "), width, drop_whitespace=False, break_long_words=True) or [""]:
            if col + len(part) > width:
                line, col = line + 1, 0
            pieces.append((line, col, part, origin))
            col += len(part)
    rows = line + 1 + len(ORIGINS) + 2
    # One x unit = one character: a monospace glyph is 0.6 em wide, 10 pt here, and 72 pt make an inch.
    fig = plt.figure(figsize=((width + 2) * 0.6 * 10 / 72, rows * 0.3))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, width + 2)
    ax.set_ylim(rows, 0)
    ax.axis("off")
    font = dict(family="monospace", fontsize=10, va="center")
    ax.text(1, 0.6, title, weight="bold", **font)
    for line, col, part, origin in pieces:
        colour = HTML_COLOURS.get(origin)
        y = line + 1.8
        if colour:
            ax.add_patch(plt.Rectangle((col + 1, y - 0.45), len(part), 0.9, color=colour, lw=0))
        ax.text(col + 1, y, part, color="#777" if origin == "prompt" else "black", **font)
    for i, origin in enumerate(ORIGINS):
        y = line + 3.3 + i
        ax.add_patch(plt.Rectangle((1, y - 0.45), 9, 0.9, color=HTML_COLOURS[origin], lw=0))
        ax.text(1.3, y, origin, **font)
        ax.text(11, y, MEANINGS[origin], **font)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--target", help="target checkpoint (name or folder); default: a tiny random model")
    parser.add_argument("--draft", help="draft checkpoint (name or folder)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--lookahead", type=int, default=4)
    args = parser.parse_args()
    if args.target:
        target, draft = GPT2.from_pretrained(args.target), GPT2.from_pretrained(args.draft)
        label = f"{args.target} / {args.draft}"
    else:
        target, draft = tiny_pair()
        label = "tiny random models (no real GPT-2 weights here): gibberish text"
    enc = load_tokenizer()
    prompt = enc.encode(args.prompt)
    out = speculative_sample(target, draft, prompt, args.max_new_tokens, lookahead=args.lookahead)
    prompt_text, groups = text_groups(out, enc, prompt)
    draw(prompt_text, groups, f"K={args.lookahead}, {label}", args.out)
    print(f"wrote {args.out}: acceptance rate {out.acceptance_rate:.2f}")
