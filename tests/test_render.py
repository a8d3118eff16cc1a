"""render.py: colours by origin, escaping, characters split over several tokens, streaming from the sampler."""

import html
import io
import re

import pytest
import torch

from speculative_gpt2 import render
from speculative_gpt2.text import strip_ansi
from gpt2_model import GPT2Config
from speculative_gpt2.random_checkpoint import noisy_copy, random_model
from speculative import Generation, speculative_sample
from speculative_gpt2.tokenizer import load_tokenizer

MULTIBYTE = "héllo 👩‍💻 日本語 🎉"


@pytest.fixture(scope="module")
def enc():
    return load_tokenizer()


def html_text(fragment: str) -> str:
    """What the text block of `to_html` shows: its tags removed, its entities decoded (the legend excluded)."""
    body = re.search(r'<div class="speculative-text"[^>]*>(.*?)</div>', fragment, re.S).group(1)
    return html.unescape(re.sub(r"<[^>]*>", "", body))


def ansi_text(text: str) -> str:
    """What `to_ansi` shows above its legend line."""
    return strip_ansi(text).rsplit("\nlegend: ", 1)[0]


def test_each_token_has_its_origins_colour(enc):
    # " the cat sat" is one token per word; 💻 is three tokens (b"\xf0\x9f", b"\x92", b"\xbb").
    words, laptop = enc.encode(" the cat sat"), enc.encode("💻")
    assert len(words) == 3 and len(laptop) == 3
    gen = Generation(tokens=words + laptop + enc.encode("!"),
                     origins=["draft", "resampled", "bonus", "draft", "draft", "resampled", "target"])
    out = render.to_html(gen, enc, prompt_tokens=enc.encode("Hi"))
    assert html_text(out) == "Hi the cat sat💻!"
    spans = [
        '<span style="color:#888" title="prompt">Hi</span>',
        '<span style="background:#b6e8b0; color:#000" title="draft"> the</span>',
        '<span style="background:#ffbf8f; color:#000" title="resampled"> cat</span>',
        '<span style="background:#a9cdf7; color:#000" title="bonus"> sat</span>',
        # The laptop's last token was resampled: the whole character takes that origin.
        '<span style="background:#ffbf8f; color:#000" title="resampled">💻</span>',
        '<span style="background:#ddd0f2; color:#000" title="target">!</span>',  # a plain target step
    ]
    assert "".join(spans) in out
    for origin in render.ORIGINS:
        assert f'title="{origin}">{origin}</span> {html.escape(render.MEANINGS[origin])}' in out  # the legend

    out = render.to_ansi(gen, enc, prompt_tokens=enc.encode("Hi"))
    body, legend = out.rsplit("\n", 1)
    assert body == ("\x1b[2mHi\x1b[0m\x1b[32m the\x1b[0m\x1b[31m cat\x1b[0m\x1b[34m sat\x1b[0m"
                    "\x1b[31m💻\x1b[0m\x1b[35m!\x1b[0m")
    assert legend.startswith("legend: \x1b[32mdraft\x1b[0m: ")
    for origin in render.ORIGINS:
        assert f"{render.ANSI_COLOURS[origin]}{origin}\x1b[0m: {render.MEANINGS[origin]}" in legend


def test_html_escapes_text(enc):
    prompt = enc.encode('<script>alert(1)</script> & "quotes"\n')
    gen = Generation(tokens=enc.encode("<b>bold</b>"), origins=["target"] * len(enc.encode("<b>bold</b>")))
    out = render.to_html(gen, enc, prompt_tokens=prompt)
    assert "<script>" not in out and "<b>" not in out
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quotes&quot;\n" in out
    assert "white-space:pre-wrap" in out  # the newline shows
    assert html_text(out) == '<script>alert(1)</script> & "quotes"\n<b>bold</b>'


def test_ansi_shows_control_characters_as_symbols(enc):
    tokens = enc.encode("a\x1b[2Jb\rc\n")
    out = render.to_ansi(Generation(tokens=tokens, origins=["target"] * len(tokens)), enc)
    assert ansi_text(out) == "a␛[2Jb␍c\n"


@pytest.mark.parametrize("split", [0, 5, 11])
def test_characters_split_over_tokens_render_whole(enc, split):
    tokens = enc.encode(MULTIBYTE)
    assert len(tokens) > len(MULTIBYTE.split())  # several characters do span several tokens
    prompt, new = tokens[:split], tokens[split:]  # split 5 cuts 👩 between the prompt and the new tokens
    gen = Generation(tokens=new, origins=[("draft", "resampled", "bonus")[i % 3] for i in range(len(new))])
    assert html_text(render.to_html(gen, enc, prompt_tokens=prompt)) == MULTIBYTE
    assert ansi_text(render.to_ansi(gen, enc, prompt_tokens=prompt)) == MULTIBYTE
    _, groups = render.text_groups(gen, enc, prompt)
    assert all("\ufffd" not in text for text, _ in groups)


def test_generation_ending_inside_a_character(enc):
    tokens = enc.encode("ok 日")[:-1]  # " \xe6" then "\x97": the last byte of 日 never comes
    gen = Generation(tokens=tokens, origins=["bonus"] * len(tokens))
    assert html_text(render.to_html(gen, enc)) == enc.decode(tokens) == "ok \ufffd"


@pytest.mark.parametrize("size", [1, 2, 3])
def test_text_stream_never_splits_a_character(enc, size):
    tokens = enc.encode(MULTIBYTE)
    out = io.StringIO()
    stream = render.TextStream(enc, file=out)
    pieces = [stream(tokens[i : i + size]) for i in range(0, len(tokens), size)] + [stream.flush()]
    assert "".join(pieces) == out.getvalue() == enc.decode(tokens) == MULTIBYTE
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces  # some chunks only start a character: nothing is printed for them


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_streaming_from_the_sampler(enc, temperature):
    config = GPT2Config(n_positions=128, n_embd=32, n_layer=2, n_head=2)
    target = random_model(config, seed=0, scale=5)
    draft = noisy_copy(target, noise=0.08, seed=1)
    chunks, stream = [], render.TextStream(enc)
    text = []
    on_tokens = lambda new: (chunks.append(new), text.append(stream(new)))  # noqa: E731
    gen = speculative_sample(target, draft, enc.encode("Hello, my name is"), 30, lookahead=3,
                             temperature=temperature, generator=torch.Generator().manual_seed(0), on_tokens=on_tokens)
    assert sum(chunks, []) == gen.tokens and len(gen.tokens) == 30
    assert len(chunks) == gen.target_calls  # one call per round
    assert [len(c) for c in chunks] == [n + 1 for n in gen.accepted_per_round]
    assert "".join(text) + stream.flush() == enc.decode(gen.tokens)


def test_plain_text_marks_each_origin_and_counts_them(enc):
    gen = Generation(tokens=enc.encode(" the cat sat on") + enc.encode("!"),
                     origins=["draft", "resampled", "bonus", "draft", "target"])
    body, legend = render.to_text(gen, enc, prompt_tokens=enc.encode("Hi")).rsplit("\n", 1)
    assert body == "Hi the[ cat]{ sat} on<!>"
    assert legend.startswith("legend: plain: proposed by the draft") \
        and "{..}: all K drafts kept (a tree: a path to a leaf)" in legend
    assert render.origin_counts(gen) == "draft 2, resampled 1, bonus 1, target 1"


def test_html_renders_itself_in_a_notebook(enc):
    gen = Generation(tokens=enc.encode(" ok"), origins=["draft"])
    fragment = render.to_html(gen, enc)
    assert isinstance(fragment, str) and fragment._repr_html_() == str(fragment)
    assert 'title="draft"> ok</span>' in fragment


def test_the_legend_of_a_coupled_run_says_where_its_tokens_came_from(enc):
    gen = Generation(tokens=enc.encode(" a b c"), origins=["draft", "resampled", "bonus"])
    for text in (render.to_text(gen, enc, coupled=True), strip_ansi(render.to_ansi(gen, enc, coupled=True))):
        legend = text.rsplit("\n", 1)[1]
        assert "the target's Gumbel-max token at its place" in legend and "norm(max(0, q - p))" not in legend
    assert "norm(max(0, q - p))" in render.to_text(gen, enc).rsplit("\n", 1)[1]  # Chen's rule: the residual
