"""--output: what the command line writes the JSON lines to. A regular file or a new one, never through a symbolic
link, never a FIFO, a device or a folder, never the prompts file under another name; and every check that can fail
runs before the file is touched."""

import errno
import fcntl
import os
import re
import stat
import subprocess
import sys
import time

import pytest

from gpt2_model import GPT2Config
from speculative_gpt2 import prompts_file
from speculative_gpt2.random_checkpoint import noisy_copy, random_model
from speculative_gpt2.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLDER = "an older run\n"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    config = GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2)
    target = random_model(config, seed=0, scale=5)
    target.save_pretrained(folder / "target")
    noisy_copy(target, noise=0.08, seed=1).save_pretrained(folder / "draft")
    # A vocabulary of 2000: GPT-2's end-of-text id, 50256, is not one of its tokens.
    random_model(GPT2Config(vocab_size=2000, n_positions=64, n_embd=32, n_layer=2, n_head=2), seed=2).save_pretrained(
        folder / "vocab2000")
    return folder


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("the a the\nand the\n")  # ids below 2000, so that the small vocabulary can read them
    assert all(t < 2000 for line in path.read_text().splitlines() for t in load_tokenizer().encode(line))
    return path


def models(checkpoints, target="target"):
    return ["--target", str(checkpoints / target), "--draft", str(checkpoints / "draft"), "--device", "cpu",
            "--max-new-tokens", "4"]




# Links ---------------------------------------------------------------------------------------------------------


def test_a_symlink_to_another_file_is_refused_and_the_file_kept(checkpoints, prompts, tmp_path, refused_before_loading):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "out.jsonl").symlink_to(victim)
    err = refused_before_loading(*models(checkpoints), "--prompts-file", prompts, "--output",
                                 tmp_path / "out.jsonl")
    assert f"--output {tmp_path / 'out.jsonl'} is a symbolic link" in err and "never written through" in err
    assert victim.read_text() == "precious\n"


def test_a_dangling_symlink_is_refused_and_nothing_created(checkpoints, prompts, tmp_path, refused_before_loading):
    (tmp_path / "out.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    err = refused_before_loading(*models(checkpoints), "--prompts-file", prompts, "--output",
                                 tmp_path / "out.jsonl")
    assert "is a symbolic link" in err and not (tmp_path / "elsewhere.jsonl").exists()


def test_a_link_into_a_missing_folder_is_refused_before_the_models_load(checkpoints, prompts, tmp_path,
                                                                        refused_before_loading):
    (tmp_path / "out.jsonl").symlink_to(tmp_path / "missing" / "out.jsonl")
    err = refused_before_loading(*models(checkpoints), "--prompts-file", prompts, "--output",
                                 tmp_path / "out.jsonl")
    assert "is a symbolic link" in err and "Errno" not in err


def test_a_symlink_to_a_folder_is_refused(checkpoints, prompts, tmp_path, refused_before_loading):
    (tmp_path / "folder").mkdir()
    (tmp_path / "out.jsonl").symlink_to(tmp_path / "folder")
    err = refused_before_loading(*models(checkpoints), "--prompts-file", prompts, "--output",
                                 tmp_path / "out.jsonl")
    assert "is a symbolic link" in err


def test_a_hard_link_to_the_prompts_file_is_the_prompts_file(checkpoints, prompts, tmp_path, refused_before_loading):
    os.link(prompts, tmp_path / "out.jsonl")
    before = prompts.read_text()
    err = refused_before_loading(*models(checkpoints), "--prompts-file", prompts, "--output",
                                 tmp_path / "out.jsonl")
    assert f"--output {tmp_path / 'out.jsonl'} is the --prompts-file file too: give it another name" in err
    assert prompts.read_text() == before


def test_hard_links_between_the_output_and_the_trace_are_one_file(checkpoints, prompts, tmp_path,
                                                                  refused_before_loading):
    (tmp_path / "out.jsonl").write_text(OLDER)
    os.link(tmp_path / "out.jsonl", tmp_path / "run.html")
    err = refused_before_loading(*models(checkpoints), "--prompts-file", prompts, "--output",
                                 tmp_path / "out.jsonl", "--trace", tmp_path / "run.html")
    assert "--trace" in err and "is the --output file too" in err
    os.unlink(tmp_path / "out.jsonl")
    os.link(prompts, tmp_path / "other.html")
    err = refused_before_loading(*models(checkpoints), "--prompts-file", prompts, "--trace",
                                 tmp_path / "other.html")
    assert "is the --prompts-file file too" in err


# Files that are not regular --------------------------------------------------------------------------------------


def test_a_fifo_is_refused_at_once(checkpoints, prompts, tmp_path):
    # In a child with a timeout: opening a FIFO for writing blocks until a reader comes.
    fifo = tmp_path / "out.jsonl"
    os.mkfifo(fifo)
    try:
        result = subprocess.run([sys.executable, os.path.join(ROOT, "speculative.py"), *models(checkpoints),
                                 "--prompts-file", str(prompts), "--output", str(fifo)], capture_output=True,
                                text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the command waited on the FIFO")
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr, result.stderr
    assert f"--output {fifo} is a FIFO (named pipe), not a regular file" in result.stderr
    assert "Loading" not in result.stderr


def test_a_fifo_with_a_reader_is_never_opened_for_writing(checkpoints, prompts, tmp_path, monkeypatch,
                                                          refused_before_loading):
    # A writer that opens and closes the FIFO would hand this reader an end of file: it must see no writer at all.
    fifo = tmp_path / "out.jsonl"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    opened_for_writing, real_open = [], os.open

    def watched_open(path, flags, *args, **kwargs):
        if os.fspath(path) == str(fifo) and flags & (os.O_WRONLY | os.O_RDWR):
            opened_for_writing.append(flags)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", watched_open)
    try:
        err = refused_before_loading(*models(checkpoints), "--prompts-file", prompts,
                                     "--output", fifo)
    finally:
        os.close(reader)
    assert "is a FIFO (named pipe), not a regular file" in err and opened_for_writing == []


@pytest.mark.parametrize("name, kind", [("/dev/null", "a device"), ("{tmp}", "a folder")])
def test_devices_and_folders_are_refused(checkpoints, prompts, tmp_path, name, kind, refused_before_loading):
    name = name.format(tmp=tmp_path)
    err = refused_before_loading(*models(checkpoints), "--prompts-file", prompts, "--output",
                                 name)
    assert f"--output {name} is {kind}, not a regular file" in err and "leave out --output" in err


def test_json_lines_refuses_what_is_not_a_regular_file_without_blocking(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "target")
    os.mkfifo(tmp_path / "fifo")
    for name, message in (("link", "is a symbolic link"), ("fifo", "is a FIFO")):
        started = time.monotonic()
        with pytest.raises(ValueError, match=message):
            prompts_file.JsonLines(str(tmp_path / name))
        assert time.monotonic() - started < 5
    assert not (tmp_path / "target").exists()


def test_json_lines_empties_a_regular_file_and_creates_a_new_one(tmp_path):
    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    old.write_text(OLDER * 100)
    for path in (old, new):
        lines = prompts_file.JsonLines(str(path))
        lines.write({"line": 1})
        lines.close()
        assert path.read_text() == '{"line": 1}\n'
    umask = os.umask(0)
    os.umask(umask)
    assert new.stat().st_mode & 0o777 == 0o666 & ~umask


def test_json_lines_refuses_a_file_that_turns_into_a_link_after_the_check(tmp_path, monkeypatch):
    # Between the look (lstat) and the open, a link takes the file's place: O_NOFOLLOW refuses it.
    victim, out = tmp_path / "victim.txt", tmp_path / "out.jsonl"
    victim.write_text("precious\n")
    out.write_text(OLDER)
    real_lstat = os.lstat

    def lstat_then_swap(path, *a, **k):
        result = real_lstat(path, *a, **k)
        if os.fspath(path) == str(out):
            out.unlink()
            out.symlink_to(victim)
        return result

    monkeypatch.setattr(os, "lstat", lstat_then_swap)
    with pytest.raises(ValueError, match="out.jsonl"):
        prompts_file.JsonLines(str(out))
    assert victim.read_text() == "precious\n"


# Every check before the file is touched ----------------------------------------------------------------------------


def test_a_vocabulary_without_the_eos_id_is_refused_before_the_output_is_emptied(checkpoints, prompts, tmp_path,
                                                                                 refused_before_loading):
    output = tmp_path / "out.jsonl"
    output.write_text(OLDER)
    err = refused_before_loading(*models(checkpoints, "vocab2000"), "--mode", "plain",
                                 "--prompts-file", prompts, "--output", output)
    assert f"--target {checkpoints / 'vocab2000'}" in err and "end-of-text id 50256" in err and "--ignore-eos" in err
    assert "prompt 0" not in err and output.read_text() == OLDER


def test_with_ignore_eos_that_vocabulary_runs(checkpoints, prompts, tmp_path, run_cli):
    output = tmp_path / "out.jsonl"
    status, _, err = run_cli(*models(checkpoints, "vocab2000"), "--mode", "plain", "--prompts-file", prompts,
                         "--output", output, "--ignore-eos")
    assert status == 0, err
    assert len(output.read_text().splitlines()) == 2


def test_a_draft_with_another_vocabulary_is_refused_before_loading(checkpoints, prompts, tmp_path,
                                                                   refused_before_loading):
    output = tmp_path / "out.jsonl"
    output.write_text(OLDER)
    err = refused_before_loading("--target", checkpoints / "target", "--draft",
                                 checkpoints / "vocab2000", "--device", "cpu", "--max-new-tokens", 4, "--ignore-eos",
                                 "--prompts-file",
                                 prompts, "--output", output)
    assert "the draft has 2000 tokens, the target 50257" in err and "prompt 0" not in err
    assert output.read_text() == OLDER


def test_a_good_run_replaces_an_older_file(checkpoints, prompts, tmp_path, run_cli):
    output = tmp_path / "out.jsonl"
    output.write_text(OLDER * 50)
    status, _, err = run_cli(*models(checkpoints), "--mode", "speculative", "--prompts-file", prompts,
                         "--output", output)
    assert status == 0, err
    assert [line.startswith('{"line": ') for line in output.read_text().splitlines()] == [True, True]
    assert re.search(r"^timing: (speculative sampling|the machine was busy)", err, re.MULTILINE)  # timed alone



# The trace page follows --output's rules -----------------------------------------------------------------------


@pytest.mark.parametrize("make", ["fifo", "device", "symlink to stdout", "symlink to a file"])
def test_the_trace_page_never_replaces_a_fifo_a_device_or_a_link(checkpoints, tmp_path, make,
                                                                 refused_before_loading):
    trace = tmp_path / "trace.html"
    if make == "fifo":
        os.mkfifo(trace)
    elif make == "device":
        if os.geteuid() != 0:
            pytest.skip("making a device node takes root")
        os.mknod(trace, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
    elif make == "symlink to stdout":
        trace.symlink_to("/proc/self/fd/1")
    else:
        (tmp_path / "page.html").write_text("precious\n")
        trace.symlink_to(tmp_path / "page.html")
    before = os.lstat(trace)
    err = refused_before_loading(*models(checkpoints), "--trace", trace)
    assert f"--trace {trace} is a" in err and ("symbolic link" in err or "not a regular file" in err)
    after = os.lstat(trace)
    assert (before.st_ino, before.st_mode) == (after.st_ino, after.st_mode)  # the same thing, left as it was


@pytest.mark.parametrize("flag", ["--output", "--trace"])
def test_a_file_of_the_kernels_proc_is_refused_before_loading(checkpoints, prompts, flag, refused_before_loading):
    extra = ["--prompts-file", prompts] if flag == "--output" else []
    err = refused_before_loading(*models(checkpoints), *extra, flag, "/proc/version")
    assert f"{flag} /proc/version is a file of the kernel's /proc, not one to write to" in err


@pytest.mark.parametrize("flag", ["--output", "--trace", "--prompts-file"])
def test_an_empty_file_name_is_named_as_empty(checkpoints, prompts, flag, run_cli):
    extra = ["--prompts-file", prompts] if flag == "--output" else []
    status, out, err = run_cli(*models(checkpoints), *extra, flag, "")
    assert status == 2 and f"{flag} is empty: give a file or folder name" in err and err.count("\n") == 1


def test_a_full_disk_on_the_trace_page_names_the_flag_and_the_file(checkpoints, tmp_path, monkeypatch, run_cli):
    from speculative_gpt2 import files

    def no_space(dest, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "write_atomically", no_space)
    status, out, err = run_cli(*models(checkpoints), "--trace", tmp_path / "run.html", "--mode", "speculative")
    assert status == 2 and err.strip().splitlines()[-1].endswith(
        f"error: --trace {tmp_path / 'run.html'}: the page could not be written (No space left on device): free some "
        f"space or choose another folder")


# One run writes a file at a time ------------------------------------------------------------------------------------


def test_a_second_run_writing_the_same_output_is_refused(checkpoints, prompts, tmp_path, run_cli):
    out = tmp_path / "out.jsonl"
    out.write_text(OLDER)
    holder = os.open(out, os.O_WRONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # what a run writing the file holds
    try:
        status, _, err = run_cli(*models(checkpoints), "--prompts-file", prompts, "--output", out)
    finally:
        os.close(holder)
    assert status == 2 and f"--output {out} is being written by another run" in err and err.count("\n") == 1
    assert out.read_text() == OLDER  # refused before anything was written
    status, _, err = run_cli(*models(checkpoints), "--prompts-file", prompts, "--output", out)  # free again
    assert status == 0, err
    assert out.read_text().count("\n") == 2
