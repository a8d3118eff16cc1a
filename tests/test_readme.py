"""The README's Python snippets run as written, in order, in one namespace: only the checkpoints behind the names
"gpt2-xl" and "gpt2" are tiny random ones (the real ones cannot be downloaded here)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2_model import GPT2
from speculative_gpt2.random_checkpoint import tiny_pair

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_the_readme_has_its_python_snippets():
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 4 and "from speculative import" in blocks[0]


def test_the_readme_python_snippets_run_as_written(tmp_path, monkeypatch, capsys):
    target, draft = tiny_pair()
    folders = {"gpt2-xl": tmp_path / "target", "gpt2": tmp_path / "draft"}
    target.save_pretrained(folders["gpt2-xl"])
    draft.save_pretrained(folders["gpt2"])
    load = GPT2.from_pretrained.__func__

    def from_pretrained(cls, name, *args, **kwargs):  # the preset names, on tiny checkpoints
        assert name in folders, f"the README loads {name!r}"
        return load(cls, folders[name], *args, **kwargs)

    monkeypatch.setattr(GPT2, "from_pretrained", classmethod(from_pretrained))
    namespace = {}
    for number, block in enumerate(python_blocks(README.read_text(encoding="utf-8")), 1):
        try:
            exec(compile(block, f"README.md, Python snippet {number}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"README.md, Python snippet {number} failed: {type(e).__name__}: {e}\n{block}")
    # What the snippets promise: a text, a batch of Generations, a coupled batch, a custom drafter's exact text.
    assert len(namespace["out"].tokens) == 40 and len(namespace["outs"]) == len(namespace["texts"])
    assert capsys.readouterr().out.strip()  # the first snippet prints its text


def first_try_commands(text: str) -> list[str]:
    """The bash block right after "A first try" in the README, a command per line."""
    after = text[text.index("A first try"):]
    return re.search(r"```bash\n(.*?)```", after, flags=re.DOTALL).group(1).strip().splitlines()


@pytest.mark.slow
def test_the_readme_first_try_runs_as_written(tmp_path):
    """A newcomer's first command lines, offline, in a fresh folder: they make their stand-ins and the run ends
    with identical texts."""
    commands = first_try_commands(README.read_text(encoding="utf-8"))
    assert len(commands) == 3 and "--n-layer 2" in commands[0] and "--max-new-tokens 8" in commands[2]
    (tmp_path / "weights").mkdir()
    console = [sys.executable, "-m", "speculative_gpt2.command"]  # the installed console script's entry point
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(README.parent)}
    for command in commands:
        words = shlex.split(command)
        argv = console + words[1:] if words[0] == "speculative-gpt2" else [sys.executable] + words[1:]
        assert words[0] in ("python", "speculative-gpt2"), command
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}: {result.stderr[-2000:]}"
    assert "identical outputs: yes" in result.stdout and "speedup over plain decoding" in result.stdout


def collected(*args) -> int:
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                            cwd=README.parent, capture_output=True, text=True, timeout=600)
    return int(re.search(r"(\d+)(?:/\d+)? tests? (?:collected|selected)", result.stdout).group(1))


@pytest.mark.slow
def test_the_readme_states_the_test_count_and_the_quick_subset():
    """The counts in the README's test section stay those pytest collects, within 5 %, so that a reader knows what
    the quick subset leaves out."""
    text = README.read_text(encoding="utf-8")
    total = int(re.search(r"runs\s+(\d+) tests", text).group(1))
    slow = int(re.search(r'-m "not slow"` leaves out the (\d+)', text).group(1))
    assert abs(collected() - total) <= 0.05 * total
    assert abs(collected("-m", "slow") - slow) <= max(2, 0.05 * slow)
