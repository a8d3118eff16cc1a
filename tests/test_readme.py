"""The README's Python snippets run as written, in order, in one namespace: only the checkpoints behind the names
"gpt2-xl" and "gpt2" are tiny random ones (the real ones cannot be downloaded here)."""

import re
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
