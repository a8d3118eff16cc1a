"""Waiting for another download of the same preset: the lock is tried without waiting first, and when another
process holds it, one line on stderr says which preset and which lock file this one waits for."""

import fcntl
import os
import subprocess
import sys
import threading
import time

import pytest

from speculative_gpt2 import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hold_lock(weights, name="gpt2") -> int:
    """The lock of `name` in `weights`, taken as another process's download would take it."""
    fd = os.open(weights / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def wait_for(condition, seconds=10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


class Stderr:
    """What this process writes to stderr, from any thread, read as it comes (capsys, accumulated)."""

    def __init__(self, capsys):
        self.capsys, self.text = capsys, ""

    def getvalue(self) -> str:
        self.text += self.capsys.readouterr().err
        return self.text


@pytest.fixture
def stderr(capsys):
    return Stderr(capsys)


def test_a_held_lock_is_waited_for_and_said_once(tmp_path, stderr):
    held = hold_lock(tmp_path)
    entered = threading.Event()

    def download():
        with checkpoints._download_lock(tmp_path / "gpt2"):
            entered.set()

    thread = threading.Thread(target=download, daemon=True)
    try:
        thread.start()
        assert wait_for(lambda: "waiting" in stderr.getvalue())
        time.sleep(0.3)  # still waiting, and still one line
        assert not entered.is_set()
    finally:
        os.close(held)  # closing releases the lock
    thread.join(10)
    assert entered.is_set()
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0] == (f"waiting for another process that is downloading gpt2 into {str(tmp_path)!r} to finish (it "
                        f"holds the lock file {str(tmp_path / '.gpt2.lock')!r}) ...")


def test_a_free_lock_is_taken_in_silence(tmp_path, stderr):
    with checkpoints._download_lock(tmp_path / "gpt2"):
        pass
    with checkpoints._download_lock(tmp_path / "gpt2"):  # released by the first: taken again at once
        pass
    assert stderr.getvalue() == ""


def test_the_lock_of_another_preset_is_not_waited_for(tmp_path, stderr):
    held = hold_lock(tmp_path, "gpt2-xl")
    try:
        with checkpoints._download_lock(tmp_path / "gpt2"):
            pass
    finally:
        os.close(held)
    assert stderr.getvalue() == ""


@pytest.mark.slow
def test_the_download_command_says_what_it_waits_for(tmp_path):
    # The real command in its own process, which this test's lock keeps waiting; released, it goes on (and fails
    # in one line: the endpoint is unreachable).
    weights = tmp_path / "weights"
    weights.mkdir()
    held = hold_lock(weights)
    env = os.environ | {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    env.pop("HF_HUB_OFFLINE", None)
    process = subprocess.Popen([sys.executable, "-m", "speculative_gpt2.checkpoints", "gpt2", "--weights-dir",
                                str(weights)], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.append(process.stderr.readline()), daemon=True)
    try:
        reader.start()  # in a thread: a command that waits in silence must fail this test, not hang it
        reader.join(60)
        assert lines, "the command waited without a word"
        assert lines[0].startswith("waiting for another process that is downloading gpt2 into "), lines
        assert process.poll() is None  # said, and still waiting
    finally:
        os.close(held)
        if not lines:
            process.kill()
    _, rest = process.communicate(timeout=120)
    assert process.returncode == 2 and "waiting" not in rest and "Traceback" not in rest
    assert "speculative_gpt2.checkpoints: error: " in rest
