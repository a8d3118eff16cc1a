"""`.verified.json`, the record a download leaves: only a regular file of at most 1 MiB is read, never through a link,
never waiting on a FIFO; anything else is no valid record, refused at once in one line that says why."""

import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from gpt2_model import GPT2Config
from speculative_gpt2.checkpoints import PRESETS
from speculative_gpt2.errors import CheckpointError
from speculative_gpt2.checkpoints import RECORD, RECORD_LIMIT, find_checkpoint
from speculative_gpt2.random_checkpoint import random_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "distilgpt2"


@pytest.fixture
def preset(tmp_path, monkeypatch):
    """A folder holding the files of a preset of a tiny shape, and the record a download would write for them."""
    monkeypatch.setitem(PRESETS, NAME, (1, 2, 16))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    folder = tmp_path / "weights" / NAME
    random_model(GPT2Config(n_positions=64, n_embd=16, n_layer=1, n_head=2), seed=0).save_pretrained(folder)
    files = {f: {"size": (folder / f).stat().st_size, "mtime_ns": (folder / f).stat().st_mtime_ns, "SHA-256": "0"}
             for f in ("config.json", "model.safetensors")}
    (folder / RECORD).write_text(json.dumps({"preset": NAME, "files": files}))
    return folder


def refusal(folder) -> str:
    """The one-line refusal of the preset folder, which must come at once."""
    started = time.monotonic()
    with pytest.raises(CheckpointError) as error:
        find_checkpoint(NAME, weights_dir=folder.parent, allow_download=False)
    assert time.monotonic() - started < 5
    message = str(error.value)
    assert "\n" not in message and f"{folder} has no valid record of a verified download ({RECORD} " in message
    assert f"pass its path (--target/--draft {folder})" in message
    return message


def test_a_huge_sparse_record_is_refused_without_reading_it(preset):
    os.truncate(preset / RECORD, 1 << 30)  # 1 GiB of holes: instant to make, 13 s and 2.3 GB to read whole
    assert "is 1,073,741,824 bytes, more than a record's 1 MiB at most" in refusal(preset)


def test_a_symlink_to_a_valid_record_is_not_followed(preset, tmp_path):
    os.replace(preset / RECORD, tmp_path / "elsewhere.json")
    (preset / RECORD).symlink_to(tmp_path / "elsewhere.json")
    assert "is a symbolic link, which is not followed" in refusal(preset)


def test_a_fifo_is_refused_without_waiting(preset):
    # In a thread, so that a read that waits for a writer fails the test instead of hanging it.
    (preset / RECORD).unlink()
    os.mkfifo(preset / RECORD)
    messages = []
    thread = threading.Thread(target=lambda: messages.append(refusal(preset)), daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        os.close(os.open(preset / RECORD, os.O_WRONLY))  # release the reader
        pytest.fail("reading the record waited on the FIFO")
    assert messages and "is a FIFO (named pipe), not a regular file" in messages[0]


def test_links_to_devices_and_fifos_in_a_process_with_bounded_memory(tmp_path):
    # /dev/zero read whole grows until the kernel kills the process: here a child whose memory is capped (a
    # MemoryError then, not the machine's memory) and whose time is bounded.
    for case in ("zero", "fifo"):
        (tmp_path / case).mkdir()
    (tmp_path / "zero" / RECORD).symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo" / RECORD)
    script = textwrap.dedent(f"""
        import resource, time
        from pathlib import Path
        resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))
        from speculative_gpt2.checkpoints import _read_record
        for case in ("zero", "fifo"):
            started = time.monotonic()
            print(case, _read_record(Path({str(tmp_path)!r}) / case), round(time.monotonic() - started, 2))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert "(None, 'is a symbolic link, which is not followed')" in lines["zero"]
    assert "(None, 'is a FIFO (named pipe), not a regular file')" in lines["fifo"]
    assert all(float(line.split()[-1]) < 5 for line in lines.values())


def test_a_device_itself_is_not_read(preset):
    # A device node under the name, not a link to one: refused from its lstat, never opened.
    (preset / RECORD).unlink()
    try:
        # A character device, as /dev/null: should it be read, the read ends at once (not so /dev/zero's, which
        # is left to the child with capped memory above).
        os.mknod(preset / RECORD, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs privileges")
    assert "is a device, not a regular file" in refusal(preset)


def test_the_limit_is_a_megabyte(preset):
    record = (preset / RECORD).read_text()
    (preset / RECORD).write_text(record + " " * (RECORD_LIMIT - len(record)))  # exactly 1 MiB: read
    assert find_checkpoint(NAME, weights_dir=preset.parent, allow_download=False) == preset
    os.utime(preset / "config.json", ns=(1, 1))  # the checks after the record still run
    with pytest.raises(CheckpointError, match="config.json is not the file whose download was verified"):
        find_checkpoint(NAME, weights_dir=preset.parent, allow_download=False)
    (preset / RECORD).write_text(record + " " * (RECORD_LIMIT - len(record) + 1))  # one byte more: refused
    assert "is 1,048,577 bytes" in refusal(preset)


@pytest.mark.parametrize("content, message", [
    ("[" * 1_000_000, "is not a record: invalid JSON"),  # deep enough to exhaust the parser's recursion
    ("\xff\xfe", "is not a record: invalid JSON"),
    ('{"files": [1, 2]}', 'its "files" are not a table of files'),
    ('{"preset": "distilgpt2"}', 'no "files"'),
])
def test_a_record_that_is_not_one_is_named(preset, content, message):
    (preset / RECORD).write_text(content, encoding="latin-1")
    assert message in refusal(preset)


def test_no_record_keeps_its_message(preset):
    (preset / RECORD).unlink()
    with pytest.raises(CheckpointError, match=rf"{NAME} has no record of a verified download \({RECORD}\), so it"):
        find_checkpoint(NAME, weights_dir=preset.parent, allow_download=False)

