"""Shared fixtures: tiny random GPT-2 checkpoints written by `transformers`, the reference implementation."""

import os

import pytest
import torch

# Under pytest-xdist (`-n 2`) each worker runs its tests with one torch thread: two workers with two threads each on
# two cores would wait for each other, and the tests' tiny models gain nothing from a second thread.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def make_reference(n_layer=2, n_embd=64, n_head=4, seed=0, std=0.02):
    """A random `transformers.GPT2LMHeadModel` with the real 50257-token vocabulary, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, initializer_range=std))
    return model.eval()


@pytest.fixture(scope="session")
def reference_folder(tmp_path_factory):
    """A `save_pretrained` folder of a 3-layer, 96-wide reference model, and the model itself."""
    model = make_reference(n_layer=3, n_embd=96, n_head=4)
    folder = tmp_path_factory.mktemp("reference")
    model.save_pretrained(folder)
    return folder, model


def _run_cli(capsys, *args):
    from speculative_gpt2 import cli

    try:
        status = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse's refusals
        status = e.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def run_cli(capsys):
    """Runs the command line in this process: run_cli(*args) -> (status, stdout, stderr)."""
    return lambda *args: _run_cli(capsys, *args)


@pytest.fixture
def refused_before_loading(capsys, monkeypatch):
    """refused_before_loading(*args) -> the one-line error of a command line run that must stop before any model
    loads (loading one fails the test)."""
    from gpt2_model import GPT2

    def run(*args) -> str:
        monkeypatch.setattr(GPT2, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
        status, out, err = _run_cli(capsys, *args)
        assert status == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err
        return err

    return run
