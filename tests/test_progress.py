"""Progress wherever a person waits: bars on stderr when it is a terminal (a pseudo-terminal here), nothing of them
when it is not; warm-ups announced; the prompts-file bar names the run under way and moves by tokens."""

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from gpt2_model import GPT2Config
from speculative_gpt2.random_checkpoint import random_model, tiny_pair

ROOT = Path(__file__).resolve().parents[1]


def on_a_terminal(args: list[str], cwd=None, timeout=300) -> tuple[int, str, str]:
    """Runs a command with stderr on a pseudo-terminal 120 columns wide: (status, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, cwd=cwd)
    os.close(slave)
    seen = []
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        seen.append(data)
    os.close(master)
    stdout = process.communicate(timeout=timeout)[0]
    return process.returncode, stdout.decode(), b"".join(seen).decode(errors="replace")


@pytest.mark.slow
def test_the_checkpoint_writer_shows_a_bar_on_a_terminal_and_none_in_a_pipe(tmp_path):
    command = [sys.executable, "-m", "speculative_gpt2.random_checkpoint", "gpt2", "--n-layer", "1"]
    status, out, terminal = on_a_terminal(command + [str(tmp_path / "a")])
    assert status == 0 and out.startswith(f"wrote {tmp_path / 'a'} in ")
    assert "Making random weights" in terminal and "weight/s" in terminal and "Writing " in terminal
    piped = subprocess.run(command + [str(tmp_path / "b")], capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0 and "Making random weights" not in piped.stderr
    assert piped.stderr.strip().startswith(f"Writing {tmp_path / 'b' / 'model.safetensors'} (0.")  # one line, no bar
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def useless_pair(tmp_path_factory):
    """A tiny target and a random draft of its own size: nothing kept, every round dearer than a plain step."""
    folder = tmp_path_factory.mktemp("useless")
    target, _ = tiny_pair()
    target.save_pretrained(folder / "target")
    random_model(GPT2Config(n_positions=256, n_embd=64, n_layer=2, n_head=4), seed=7, scale=5).save_pretrained(
        folder / "draft")
    return folder


def test_the_prompts_file_bar_names_each_run_and_moves_by_tokens(useless_pair, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The meaning of life is\nOnce upon a time\nIn 1905 Einstein\n")
    status, out, terminal = on_a_terminal(
        [sys.executable, str(ROOT / "speculative.py"), "--target", str(useless_pair / "target"), "--draft",
         str(useless_pair / "draft"), "--prompts-file", str(prompts), "--batch-size", "2", "--max-new-tokens", "30",
         "--ignore-eos", "--threads", "1"])
    assert status == 0, terminal
    assert len([json.loads(line) for line in out.splitlines()]) == 3
    for mode in ("plain decoding", "plain decoding, exact mode", "speculative sampling"):
        assert f"Warming up: {mode}, 8 tokens of the first batch" in terminal
        for batch in (1, 2):
            assert f"{mode}, batch {batch} of 2" in terminal
    assert "tok/s" in terminal and "/270 [" in terminal  # 3 prompts x 30 tokens x 3 runs
    summary = terminal.split("=== Summary ===", 1)[1]
    # The speedup and its why lines, from the batches' own pass costs.
    assert "speedup over batched plain decoding: " in summary
    assert "why: at K=4 a drafting round cost " in summary and "try: " in summary and "agrees more with the target" in summary
