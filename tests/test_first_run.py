"""What a newcomer meets first: the report says why speculation was slow, the Python API takes what the command line
takes, and `--help` shows no empty defaults."""

import os
import re
import subprocess
import sys

import pytest
import torch

from gpt2_model import GPT2
from speculative import Generation, Origin, speculative_sample
from speculative_gpt2.checkpoints import find_checkpoint, preset_of
from speculative_gpt2.cli import parse_args, why_slower
from speculative_gpt2.lookahead import Round
from speculative_gpt2.random_checkpoint import tiny_pair

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


def naive_run(tokens=20, ms_per_pass=100.0) -> Generation:
    out = Generation(tokens=list(range(tokens)), origins=[Origin.TARGET] * tokens, target_calls=tokens)
    out.seconds = tokens * ms_per_pass / 1e3 + 0.1
    out.prefill_seconds = 0.1
    return out


def speculative_run(rounds: list[Round], seconds: float) -> Generation:
    out = Generation(rounds=rounds, target_calls=len(rounds), seconds=seconds)
    for r in rounds:
        out.tokens += [1] * (r.kept + 1)
        out.origins += [Origin.DRAFT] * r.kept + [Origin.BONUS if r.kept == r.lookahead else Origin.RESAMPLED]
    return out


def test_a_useless_draft_is_explained_with_the_break_even_alpha():
    # K = 4, nothing kept: 5 rounds of 4 x 20 ms drafts + 130 ms verification for 5 tokens, against 100 ms a token.
    spec = speculative_run([Round(4, 0, draft_ms=80, verify_ms=130)] * 5, seconds=1.05)
    lines = why_slower(spec, naive_run(5), auto=False, dtype=torch.float32, device=CPU)
    assert lines[0].startswith("why: at K=4 a round costs 4 draft passes (0.20 of a target pass each) and a "
                               "5-token verification (1.30 target passes): breaking even needs")
    assert "measured alpha 0.00" in lines[0]
    need = float(lines[0].split("alpha >= ")[1].split(";")[0])
    assert 0.3 < need < 0.9
    assert lines[1].startswith("try: --lookahead auto") and "a draft that agrees more" in lines[1]


def test_no_break_even_is_said_so():
    # Draft passes as dear as the target: a round of K = 4 costs more than the 5 passes it can save.
    spec = speculative_run([Round(4, 4, draft_ms=400, verify_ms=150)] * 4, seconds=2.2)
    lines = why_slower(spec, naive_run(20), auto=True, dtype=torch.float32, device=CPU)
    assert "no acceptance rate breaks even (measured alpha 1.00)" in lines[0]
    assert not any("--lookahead auto" in line for line in lines)  # already on


def test_slower_than_predicted_blames_time_outside_the_passes():
    # Everything kept, cheap passes: predicted well above 1, but the run took 3x longer than its passes.
    spec = speculative_run([Round(4, 4, draft_ms=40, verify_ms=120)] * 4, seconds=3.0)
    lines = why_slower(spec, naive_run(20), auto=False, dtype=torch.float32, device=CPU)
    assert lines[0].startswith("why: measured ") and "time went outside the passes" in lines[0]


def test_rounds_with_fewer_drafts_are_not_blamed_on_the_machine():
    # A lookup's rounds: 3 propose nothing, 3 propose 2 (kept) of K = 4 asked; the passes take all the time.
    rounds = [Round(0, 0, draft_ms=0.2, verify_ms=100)] * 3 + [Round(2, 2, draft_ms=0.2, verify_ms=100)] * 3
    spec = speculative_run(rounds, seconds=0.61)
    lines = why_slower(spec, naive_run(12), auto=False, dtype=torch.float32, device=CPU)
    assert lines[0].endswith("the drafter proposed 1.00 per round (3 of 6 rounds none), 2.00 tokens per target pass")
    assert not any("outside the passes" in line or "--threads" in line for line in lines)
    # The same rounds taking three times as long: then the machine is blamed.
    lines = why_slower(speculative_run(rounds, seconds=1.8), naive_run(12), auto=False, dtype=torch.float32, device=CPU)
    assert "time went outside the passes" in lines[0] and "--threads" in lines[1]


def test_rounds_of_k_drafts_that_keep_less_than_alpha_says_are_not_blamed_on_the_drafter():
    # K = 4 drafts in every round, kept all or nothing: alpha 0.8 predicts 3.36 tokens per pass (1.12x at these
    # costs), the rounds give 3 (0.97x here); the passes take 83 % of the time.
    rounds = [Round(4, 4, draft_ms=0.1, verify_ms=300), Round(4, 0, draft_ms=0.1, verify_ms=300)]
    lines = why_slower(speculative_run(rounds, seconds=0.72), naive_run(6), auto=False, dtype=torch.float32, device=CPU)
    assert "the rounds kept fewer drafts than alpha says" in lines[0] and "proposed" not in lines[0]


def test_a_fast_run_needs_no_explanation():
    spec = speculative_run([Round(4, 4, draft_ms=40, verify_ms=120)] * 4, seconds=0.7)
    assert why_slower(spec, naive_run(20), auto=False, dtype=torch.float32, device=CPU) == []
    assert why_slower(Generation(), naive_run(20), auto=False, dtype=torch.float32, device=CPU) == []


def test_lookahead_auto_in_python_as_on_the_command_line():
    target, draft = tiny_pair()
    out = speculative_sample(target, draft, [1, 2, 3], 24, lookahead="auto")
    assert len(out.tokens) == 24 and len(set(out.lookahead_per_round[:-1])) >= 1
    with pytest.raises(ValueError, match="an integer >= 1, 'auto', or a policy"):
        speculative_sample(target, draft, [1, 2, 3], 4, lookahead="Auto")


@pytest.mark.parametrize("hub_id, preset", [("openai-community/gpt2", "gpt2"), ("openai-community/gpt2-xl", "gpt2-xl"),
                                            ("distilbert/distilgpt2", "distilgpt2"), ("gpt2-medium", "gpt2-medium")])
def test_hub_ids_mean_the_presets(hub_id, preset, tmp_path, monkeypatch):
    assert preset_of(hub_id) == preset
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match=f"no local copy of {preset}|{preset}"):
        find_checkpoint(hub_id, weights_dir=tmp_path, allow_download=False)


def test_a_hub_id_loads_the_presets_folder(tmp_path):
    target, _ = tiny_pair()
    target.save_pretrained(tmp_path / "gpt2")
    # Not the preset's shape: refused as the preset, which proves the hub id was read as the preset's name.
    with pytest.raises(ValueError, match="gpt2"):
        GPT2.from_pretrained("openai-community/gpt2", weights_dir=tmp_path, download=False)
    assert preset_of("./gpt2") is None and preset_of(tmp_path) is None and preset_of("someone/gpt2") is None


def test_help_has_no_empty_defaults():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "speculative.py"), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "--prompt" in result.stdout
    assert not re.search(r"\(default:\s+(None|False)\)", result.stdout)
    assert re.search(r"\(default:\s+4\)", result.stdout)  # real defaults are still shown
    assert parse_args([]).top_k is None  # still no top-k unless asked
