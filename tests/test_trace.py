"""speculative_sample(..., trace=True) and its page: the numbers of every round, checked against the algorithm, and
the page as a real browser (headless Chromium) renders it."""

import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speculative_gpt2 import render
from speculative_gpt2.random_checkpoint import noisy_copy, random_model
from gpt2_model import GPT2Config
from speculative import Origin, speculative_sample
from speculative_gpt2.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def pair():
    target = random_model(GPT2Config(n_positions=128, n_embd=32, n_layer=2, n_head=2), seed=0, scale=5)
    return target, noisy_copy(target, noise=0.1, seed=1)


@pytest.fixture(scope="module")
def enc():
    return load_tokenizer()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_trace_holds_each_rounds_numbers(pair, enc, temperature):
    target, draft = pair
    out = speculative_sample(target, draft, enc.encode("Hello, my name is"), 40, lookahead=3, trace=True,
                             temperature=temperature, generator=torch.Generator().manual_seed(0))
    assert len(out.trace) == len(out.rounds) == out.target_calls
    for t, r in zip(out.trace, out.rounds):
        assert (len(t.drafts), t.kept, t.draft_ms, t.verify_ms) == (r.lookahead, r.kept, r.draft_ms, r.verify_ms)
        assert all(0 < p <= 1 and 0 <= q <= 1 for p, q in zip(t.p, t.q))
        if temperature == 0:
            assert t.r is None and t.next_probability == pytest.approx(1.0)
        else:  # the verdicts follow the draws: kept while r < q/p, rejected at the first r >= q/p
            ratios = [q / p for p, q in zip(t.p, t.q)]
            assert all(t.r[i] < ratios[i] for i in range(t.kept))
            assert t.kept == len(t.drafts) or t.r[t.kept] >= ratios[t.kept]
            assert 0 < t.next_probability <= 1
    kept_tokens = [x for t in out.trace for x in t.drafts[: t.kept] + [t.next_token]]
    assert kept_tokens == out.tokens
    assert [t.next_origin for t in out.trace] == [o for o in out.origins if o != Origin.DRAFT]


def test_tracing_changes_nothing(pair, enc):
    target, draft = pair
    runs = [speculative_sample(target, draft, enc.encode("Hello"), 30, temperature=1.0, trace=trace,
                               generator=torch.Generator().manual_seed(3)) for trace in (False, True)]
    assert runs[0].tokens == runs[1].tokens and runs[0].trace is None


def test_the_page_needs_a_trace(pair, enc):
    out = speculative_sample(*pair, enc.encode("Hi"), 5)
    with pytest.raises(ValueError, match="no trace: run speculative_sample"):
        render.trace_page(out, enc)


def test_the_page_shows_every_round(pair, enc):
    out = speculative_sample(*pair, enc.encode("<b>Hi</b>"), 30, lookahead=4, trace=True, temperature=1.0,
                             generator=torch.Generator().manual_seed(1))
    page = render.trace_page(out, enc, enc.encode("<b>Hi</b>"))
    assert page.startswith("<!DOCTYPE html>") and "<b>Hi</b>" not in page  # escaped
    assert page.count('<details class="round"') == len(out.trace)
    assert [int(k) for k in re.findall(r'data-kept="(\d+)"', page)] == [t.kept for t in out.trace]
    assert f"{len(out.trace)} rounds, {out.accepted} of {out.proposed} drafts kept" in page
    assert "http" not in page.replace("http-equiv", "")  # nothing to fetch: it works offline


def dump_dom(path: Path) -> str:
    result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", path.as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium); .ci/run installs it")
def test_the_cli_page_in_a_real_browser(tmp_path, pair):
    for name, model in zip(("target", "draft"), pair):
        model.save_pretrained(tmp_path / name)
    page = tmp_path / "run.html"
    result = subprocess.run(
        [sys.executable, str(ROOT / "speculative.py"), "--target", str(tmp_path / "target"), "--draft",
         str(tmp_path / "draft"), "--mode", "speculative", "--max-new-tokens", "40", "--temperature", "1",
         "--ignore-eos", "--trace", str(page)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rounds = int(re.search(r"target passes: (\d+)", result.stdout).group(1))
    kept = int(re.search(r"acceptance rate: [\d.n/a]+ \(drafts kept / drafts proposed: (\d+) of",
                         result.stdout).group(1))
    dom = dump_dom(page)
    # The page's script counted the rounds and kept drafts it renders; they must be the run's.
    assert (f"A check of this page against the summary above, counted from the rounds below: {rounds} rounds, {kept} "
            f"drafts kept.") in html.unescape(dom)
    assert dom.count('class="round"') == rounds
