"""What a newcomer meets first: the Python API takes what the command line takes, hub ids name the presets, and
`--help` shows no empty defaults (the report's why lines: tests/test_report.py)."""

import os
import re
import subprocess
import sys

import pytest
import torch

from gpt2_model import GPT2
from speculative import speculative_sample
from speculative_gpt2.checkpoints import find_checkpoint, local_pair, preset_of
from speculative_gpt2.cli import parse_args
from speculative_gpt2.random_checkpoint import tiny_pair

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


def test_lookahead_auto_in_python_as_on_the_command_line():
    target, draft = tiny_pair()
    out = speculative_sample(target, draft, [1, 2, 3], 24, lookahead="auto")
    assert len(out.tokens) == 24 and len(set(out.lookahead_per_round[:-1])) >= 1
    with pytest.raises(ValueError, match="an integer >= 1, 'auto', a tree's widths such as \\(3, 2\\), or a policy"):
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


@pytest.mark.parametrize("offline", [True, False])
def test_every_missing_model_is_named_at_once_with_the_commands_that_make_both(tmp_path, monkeypatch, offline,
                                                                             refused_before_loading):
    # A newcomer's first run without the hub: both presets are missing, and one line says so, with the commands that
    # write random checkpoints of both shapes and the flags that use them (not one model per try).
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the download fails
        monkeypatch.setattr("speculative_gpt2.checkpoints.time.sleep", lambda s: None, raising=False)
    err = refused_before_loading("--weights-dir", tmp_path / "weights", "--max-new-tokens", "4")
    why = "HF_HUB_OFFLINE is set" if offline else "downloading failed: "
    assert f"--target gpt2-xl and --draft gpt2 are not on this machine, and {why}" in err
    assert ("python -m speculative_gpt2.random_checkpoint gpt2-xl weights/random-gpt2-xl && python -m "
            "speculative_gpt2.random_checkpoint gpt2 weights/random-gpt2, then pass --target weights/random-gpt2-xl "
            "--draft weights/random-gpt2") in err
    assert "with --n-layer 2 after each folder, 2-layer stand-ins in seconds" in err


def test_the_notebook_finds_the_random_checkpoints_of_the_offline_route(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = tmp_path / "weights"
    assert local_pair("gpt2-xl", "gpt2", weights_dir=weights) is None
    target, draft = tiny_pair()
    target.save_pretrained(weights / "random-gpt2-xl")
    assert local_pair("gpt2-xl", "gpt2", weights_dir=weights) is None  # both or neither
    draft.save_pretrained(weights / "random-gpt2")
    assert local_pair("gpt2-xl", "gpt2", weights_dir=weights) == (weights / "random-gpt2-xl", weights / "random-gpt2",
                                                                   True)
    # Folders named by the caller come first, and are no random stand-ins.
    assert local_pair(weights / "random-gpt2", weights / "random-gpt2", weights_dir=weights)[2] is False


@pytest.mark.parametrize("held", ["model.safetensors", "pytorch_model.bin"])  # a weights file loading prefers, or not
def test_random_checkpoint_refuses_a_folder_that_holds_a_checkpoint_unless_forced(tmp_path, held):
    """A slip of the folder name must not replace downloaded weights with random ones, nor hide them behind a
    random model.safetensors, which loading prefers."""
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / held).write_bytes(b"downloaded")
    command = [sys.executable, "-m", "speculative_gpt2.random_checkpoint", "gpt2", str(folder), "--n-layer", "1"]
    refused = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert f"already holds a checkpoint ({held})" in refused.stderr and "--force" in refused.stderr
    assert sorted(p.name for p in folder.iterdir()) == [held] and (folder / held).read_bytes() == b"downloaded"
    if held == "model.safetensors":
        forced = subprocess.run([*command, "--force"], capture_output=True, text=True, cwd=ROOT)
        assert forced.returncode == 0, forced.stderr
        assert GPT2.from_pretrained(str(folder), download=False).config.n_layer == 1
