"""The command line over a file of prompts (--prompts-file, --batch-size, --output), on tiny random checkpoints: bad
lines, the JSON lines written, the summary, and runs that stop early."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from gpt2_model import GPT2, GPT2Config
from speculative import Origin, autoregressive_sample
from speculative_gpt2 import cli, prompts_file
from speculative_gpt2.random_checkpoint import noisy_copy, random_model
from speculative_gpt2.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["Hello, my name is", "The capital of France", "Once upon a time", "  two leading spaces", "日本語 🎉"]
FIELDS = {"line", "prompt", "text", "tokens", "acceptance_rate", "tokens_per_target_pass", "target_passes", "seconds"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    config = GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2)  # the real vocabulary: real text
    target = random_model(config, seed=0, scale=5)
    target.save_pretrained(folder / "target")
    noisy_copy(target, noise=0.08, seed=1).save_pretrained(folder / "draft")
    return folder


@pytest.fixture(scope="module")
def enc():
    return load_tokenizer()


def models(checkpoints):
    return ["--target", str(checkpoints / "target"), "--draft", str(checkpoints / "draft"), "--device", "cpu"]


def run(capsys, *args):
    """`main` in this process (no interpreter to start): (status, stdout, stderr)."""
    try:
        status = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        status = e.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def json_lines(text: str) -> list[dict]:
    assert text == "" or text.endswith("\n")  # never half a line
    return [json.loads(line) for line in text.splitlines()]


def write_prompts(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# 1. Bad input: one line naming the file's line, status 2, before any model loads ------------------------------


@pytest.mark.parametrize("content, line, message", [
    (b"fine\n\nbad \xff byte\n", 3, "byte 5 is not UTF-8: save the file as UTF-8"),
    (b'{"prompt": "a"}\n{"prompt": "b",}\n', 2, "invalid JSON (Expecting property name"),
    (b'{"prompt": "a"}\n\n{"text": "b"}\n', 3, 'this JSON line has no "prompt" string'),
    (b'{"prompt": "a"}\n{"prompt": 5}\n', 2, 'this JSON line has no "prompt" string'),
    (b'{"prompt": "a"}\n["b"]\n', 2, 'this JSON line has no "prompt" string'),
    (b'{"prompt": "a"}\nplain text\n', 2, "invalid JSON"),
    (b'{"prompt": ""}\n', 1, "the prompt is empty"),
    (b'{"prompt": "a \\ud800 b"}\n', 1, "lone surrogate \\ud800"),
    (b"short\nword" + b" word" * 69 + b"\n", 2, "the prompt (70 tokens) plus --max-new-tokens 8 exceeds the target's "
                                            "context of 64 positions: lower --max-new-tokens or shorten line 2"),
])
def test_a_bad_line_is_named_with_its_number(checkpoints, tmp_path, capsys, monkeypatch, content, line, message):
    monkeypatch.setattr(GPT2, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    status, out, err = run(capsys, *models(checkpoints), "--prompts-file", prompts, "--max-new-tokens", 8)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and f"--prompts-file {prompts}, line {line}: " in err and message in err, err


@pytest.mark.parametrize("args, message", [
    (["--prompts-file", "{missing}"], "cannot read it (No such file or directory)"),
    (["--prompts-file", "{blank}"], "holds no prompt (every line is blank)"),
    (["--prompts-file", "{good}", "--prompt", "x"], "argument --prompt: not allowed with argument --prompts-file"),
    (["--batch-size", "4"], "--batch-size goes with --prompts-file"),
    (["--output", "{out}"], "--output goes with --prompts-file"),
    (["--prompts-file", "{good}", "--batch-size", "0"], "argument --batch-size: invalid value '0': must be an "
                                                        "integer >= 1"),
    (["--prompts-file", "{good}", "--no-cache-baseline"], "--no-cache-baseline times one prompt"),
    (["--prompts-file", "{good}", "--output", "{good}"], "is the --prompts-file file too: give it another name"),
    (["--prompts-file", "{good}", "--output", "{out}", "--trace", "{out}"], "is the --output file too"),
    (["--prompts-file", "{good}", "--output", "/nonexistent/out.jsonl"], "give a file in an existing folder"),
    (["--prompts-file", "{good}", "--mode", "plain", "--show-acceptance"], "--show-acceptance marks speculative"),
])
def test_bad_flags_with_a_prompts_file(checkpoints, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr(GPT2, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    files = {"missing": tmp_path / "missing.txt", "blank": tmp_path / "blank.txt", "good": tmp_path / "good.txt",
             "out": tmp_path / "out.jsonl"}
    files["blank"].write_text("\n  \n\r\n")
    write_prompts(files["good"], PROMPTS)
    status, _, err = run(capsys, *models(checkpoints), *[a.format(**files) for a in args])
    assert status == 2 and err.count("\n") == 1 and message in err, err
    assert files["good"].read_text() == "".join(p + "\n" for p in PROMPTS)  # never overwritten


def test_plain_text_and_json_lines_are_read_as_written(tmp_path, enc):
    text = tmp_path / "prompts.txt"
    text.write_bytes("\ufeffHello\r\n\n  spaced  \n{not json here}\n".encode())  # a BOM, CRLF, a blank line
    assert [(p.line, p.text) for p in prompts_file.read_prompts(str(text), enc)] == [
        (1, "Hello"), (3, "  spaced  "), (4, "{not json here}")]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('  {"prompt": "a\\nb", "id": 7}\n\n{"prompt": " x"}\n')
    prompts = prompts_file.read_prompts(str(jsonl), enc)
    assert [(p.line, p.text) for p in prompts] == [(1, "a\nb"), (3, " x")]
    assert prompts[1].tokens == enc.encode(" x")


# 2. What a run writes ------------------------------------------------------------------------------------------


def test_json_lines_one_per_prompt_equal_to_decoding_each_prompt_alone(checkpoints, tmp_path, capsys, enc):
    prompts = write_prompts(tmp_path / "prompts.txt", [PROMPTS[0], "", *PROMPTS[1:]])
    status, out, err = run(capsys, *models(checkpoints), "--prompts-file", prompts, "--batch-size", 2,
                           "--max-new-tokens", 8, "--ignore-eos", "--dtype", "float32")
    assert status == 0, err
    rows = json_lines(out)
    assert sorted(r["line"] for r in rows) == [1, 3, 4, 5, 6]  # one per prompt, the blank line 2 skipped
    target = GPT2.from_pretrained(str(checkpoints / "target"), dtype=torch.float32)
    for row in rows:
        assert FIELDS | {"plain_seconds", "identical"} == set(row)
        assert row["prompt"] == PROMPTS[[1, 3, 4, 5, 6].index(row["line"])]
        # Greedy: each row's tokens are the target's own greedy continuation of that prompt alone.
        assert row["tokens"] == autoregressive_sample(target, enc.encode(row["prompt"]), 8).tokens
        assert row["text"] == enc.decode(row["tokens"]) and len(row["tokens"]) == 8
        assert row["identical"] is True and 0 <= row["acceptance_rate"] <= 1
        assert row["tokens_per_target_pass"] == pytest.approx(8 / row["target_passes"], abs=1e-4)
        assert row["seconds"] > 0 and row["plain_seconds"] > 0
    assert "\n=== Summary ===\n" in err
    # stderr is no terminal here: no progress bar reaches it, while the warm-ups are announced in lines.
    assert "\r" not in err and "tok/s" not in err and "Warming up: speculative sampling, 8 tokens" in err
    summary = err.split("=== Summary ===", 1)[1]
    assert "prompts: 5 from " in summary and "in 3 batches of up to 2" in summary
    for pattern in (r"speculative sampling: 40 tokens in [\d.]+ s, [\d.]+ tokens/s over all rows",
                    r"plain decoding: 40 tokens in [\d.]+ s, [\d.]+ tokens/s over all rows",
                    r"speedup over batched plain decoding: [\d.]+x",
                    r"acceptance rate: [\d.]+ \(drafts kept / drafts proposed: \d+ of \d+\) over all rows; mean per "
                    r"prompt [\d.]+", r"timing: .*plain decoding [\d.]+x, exact mode [\d.]+x, speculative "
                    r"sampling [\d.]+x", r"mean tokens per target pass: [\d.]+; K=4",
                    r"plain decoding, exact mode: 40 tokens in", r"exact mode \(every target pass 8 rows",
                    r"identical outputs: 5 of 5 prompts\n", r"output: 5 JSON lines on stdout"):
        assert re.search(pattern, summary), (pattern, summary)


def test_batch_size_larger_and_smaller_than_the_file_gives_the_same_rows(checkpoints, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.jsonl", [json.dumps({"prompt": p}) for p in PROMPTS])
    outputs = {}
    for size, draft in ((1, []), (3, []), (16, []), (3, ["--draft", "ngram"])):  # ngram: a drafter per row
        output = tmp_path / f"out{size}.jsonl"
        status, out, err = run(capsys, *models(checkpoints), *draft, "--prompts-file", prompts, "--batch-size", size,
                               "--max-new-tokens", 6, "--mode", "speculative", "--output", output, "--dtype",
                               "float32")
        assert status == 0 and out == "", err
        batches = -(-len(PROMPTS) // size)
        assert f"in {batches} batch{'es' * (batches > 1)} of up to {size}" in err and f"output: 5 JSON lines in {output}" in err
        rows = json_lines(output.read_text())
        assert set(rows[0]) == FIELDS  # no plain decoding ran: no plain_seconds, no identical
        outputs[size, bool(draft)] = {r["line"]: r["tokens"] for r in rows}
    assert sorted(outputs[1, False]) == [1, 2, 3, 4, 5]
    assert outputs[1, False] == outputs[3, False] == outputs[16, False] == outputs[3, True]


def test_plain_mode_and_sampling(checkpoints, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS[:3])
    status, out, err = run(capsys, *models(checkpoints), "--prompts-file", prompts, "--mode", "plain",
                           "--max-new-tokens", 5)
    assert status == 0, err
    rows = json_lines(out)
    assert len(rows) == 3 and all(r["acceptance_rate"] is None for r in rows)
    assert "speculative sampling:" not in err and "plain decoding: " in err
    sampled = run(capsys, *models(checkpoints), "--prompts-file", prompts, "--max-new-tokens", 5, "--temperature", 1,
                  "--seed", 3)
    assert sampled[0] == 0 and all(r["identical"] is None for r in json_lines(sampled[1]))
    assert "identical outputs: not expected at temperature > 0" in sampled[2]
    again = run(capsys, *models(checkpoints), "--prompts-file", prompts, "--max-new-tokens", 5, "--temperature", 1,
                "--seed", 3, "--mode", "speculative")
    tokens = [sorted((r["line"], r["tokens"]) for r in json_lines(s[1])) for s in (sampled, again)]
    assert tokens[0] == tokens[1]  # a seed gives the same rows


def test_a_tree_run_over_a_file_says_what_its_trees_scored(checkpoints, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS[:3])
    status, out, err = run(capsys, *models(checkpoints), "--prompts-file", prompts, "--tree", "3x2",
                           "--max-new-tokens", 6, "--ignore-eos", "--mode", "speculative")
    assert status == 0, err
    summary = err.split("=== Summary ===", 1)[1]
    scored = re.search(r"token trees: ([\d.]+) drafts scored per drafting round, in trees of mean depth ([\d.]+)",
                       summary)
    assert scored and 1 <= float(scored.group(1)) <= 9 and float(scored.group(2)) <= 2, summary
    assert "(drafts kept / tree depth, summed over rounds: " in summary
    # A tree fitted during each batch's call: where the last batch left it, as a single prompt's run says it.
    status, out, err = run(capsys, *models(checkpoints), "--prompts-file", prompts, "--tree", "auto",
                           "--max-new-tokens", 12, "--ignore-eos", "--mode", "speculative", "--batch-size", 2)
    assert status == 0, err
    assert re.search(r"--tree auto: the last batch (had|kept|ended)", err), err


def test_acceptance_marks_and_trace_per_row(checkpoints, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS[:3])
    page = tmp_path / "trace.html"
    status, out, err = run(capsys, *models(checkpoints), "--prompts-file", prompts, "--max-new-tokens", 12,
                           "--mode", "speculative", "--show-acceptance", "--trace", page, "--ignore-eos",
                           "--temperature", 1)
    assert status == 0, err
    rows = json_lines(out)
    html = page.read_text()
    assert html.count('<section class="row"') == 3 and "trace of 3 prompts" in err
    unmarked = 0
    for row in rows:  # a section per prompt, with its own rounds: they agree with the row's origins
        assert len(row["origins"]) == len(row["tokens"]) and set(row["origins"]) <= {str(o) for o in Origin}
        section = html.split(f"<h2>line {row['line']}</h2>", 1)[1].split("</section>", 1)[0]
        assert section.count('<details class="round"') == row["target_passes"]
        assert sum(map(int, re.findall(r'data-kept="(\d+)"', section))) == row["origins"].count("draft")
        if not set("[]{}<>") & set(row["text"]):  # the marks are the only brackets: without them, the text
            unmarked += 1
            assert re.sub(r"[\[\]{}<>]", "", row["marked"]) == row["text"]
            assert row["marked"].count("{") <= row["origins"].count("bonus") and "[" in row["marked"] or \
                "resampled" not in row["origins"]
    assert unmarked > 0


# 3. Runs that stop early keep every line written, and never half a line -------------------------------------


def test_ctrl_c_after_the_first_row_keeps_its_line(checkpoints, tmp_path, capsys, monkeypatch):
    real_write = prompts_file.JsonLines.write

    def write_then_interrupt(self, record):  # called from on_finished: Ctrl-C as the first row's line is out
        real_write(self, record)
        raise KeyboardInterrupt

    monkeypatch.setattr(prompts_file.JsonLines, "write", write_then_interrupt)
    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS)
    output, page = tmp_path / "out.jsonl", tmp_path / "trace.html"
    status, out, err = run(capsys, *models(checkpoints), "--prompts-file", prompts, "--max-new-tokens", 6,
                           "--output", output, "--trace", page, "--batch-size", 2)
    assert status == 130 and out == ""
    rows = json_lines(output.read_text())
    assert len(rows) == 1 and FIELDS <= set(rows[0])
    assert f"1 of 5 prompts written to {output} before the run stopped" in err and "interrupted" in err
    assert page.read_text().count('<section class="row"') == 1  # the finished prompt's trace is kept too


def test_a_later_failure_keeps_the_lines_of_the_batches_before(checkpoints, tmp_path, capsys, monkeypatch, enc):
    real, third = cli.speculative_sample, enc.encode(PROMPTS[2])

    def fails_on_the_third_prompt(target, draft, prompt, *args, **kwargs):  # its batch fails, as a broken model would
        if prompt == third or third in prompt:
            raise ValueError("the target model gave NaN logits")
        return real(target, draft, prompt, *args, **kwargs)

    monkeypatch.setattr(cli, "speculative_sample", fails_on_the_third_prompt)
    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS)
    output = tmp_path / "out.jsonl"
    output.write_text("an older run\n")
    status, _, err = run(capsys, *models(checkpoints), "--prompts-file", prompts, "--max-new-tokens", 4, "--mode",
                         "speculative", "--output", output, "--batch-size", 2)
    assert status == 2 and "error: the target model gave NaN logits" in err
    assert "2 of 5 prompts written" in err
    assert sorted(r["line"] for r in json_lines(output.read_text())) == [1, 2]  # emptied first, then written


def test_a_write_that_fails_midway_is_cut_back_to_the_last_whole_line(tmp_path, monkeypatch):
    output = tmp_path / "out.jsonl"
    lines = prompts_file.JsonLines(str(output))
    lines.write({"line": 1, "text": "whole"})
    real_write = os.write

    def half_then_disk_full(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_disk_full)
    with pytest.raises(OSError):
        lines.write({"line": 2, "text": "half of me would be left"})
    monkeypatch.undo()
    lines.write({"line": 3, "text": "after the failure"})
    lines.close()
    assert [r["line"] for r in json_lines(output.read_text())] == [1, 3]


def test_a_real_ctrl_c_leaves_only_whole_lines(checkpoints, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.txt", [f"Prompt number {i} says" for i in range(40)])
    output = tmp_path / "out.jsonl"
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "speculative.py"), *models(checkpoints), "--prompts-file", str(prompts),
         "--batch-size", "1", "--max-new-tokens", "40", "--ignore-eos", "--output", str(output), "--mode",
         "speculative", "--dtype", "float32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even where this process ignores Ctrl-C
    deadline = time.monotonic() + 120
    while (not output.exists() or output.read_text().count("\n") < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    rows = json_lines(output.read_text())
    assert 2 <= len(rows) < 40 and f"{len(rows)} of 40 prompts written to {output}" in stderr
    assert "Traceback" not in stderr


def test_help_lists_the_flags():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "speculative.py"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for words in ("--prompts-file FILE", "--batch-size", "(default: 8)", "--output FILE.jsonl", "JSON lines",
                  "first non-blank line starts with {", "never half a line", "a section per prompt", *FIELDS):
        assert words in text, words


def test_sigterm_keeps_the_lines_writes_the_trace_and_says_how_many(checkpoints, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.txt", [f"Prompt number {i} says" for i in range(40)])
    output, page = tmp_path / "out.jsonl", tmp_path / "trace.html"
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "speculative.py"), *models(checkpoints), "--prompts-file", str(prompts),
         "--batch-size", "1", "--max-new-tokens", "40", "--ignore-eos", "--output", str(output), "--mode",
         "speculative", "--dtype", "float32", "--trace", str(page)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    deadline = time.monotonic() + 120
    while (not output.exists() or output.read_text().count("\n") < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # what `kill`, a scheduler or a container's stop sends
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    rows = json_lines(output.read_text())
    assert 2 <= len(rows) < 40 and f"{len(rows)} of 40 prompts written to {output}" in stderr
    assert "terminated" in stderr and "Traceback" not in stderr
    assert page.read_text().count('<section class="row"') == len(rows)


def test_a_closed_pipe_ends_the_run_without_a_word(checkpoints, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.txt", [f"Prompt number {i} says" for i in range(40)])
    command = (f"{sys.executable} {os.path.join(ROOT, 'speculative.py')} {' '.join(models(checkpoints))} "
               f"--prompts-file {prompts} --batch-size 1 --max-new-tokens 8 --mode speculative --dtype float32 "
               f"| head -n 2")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert len(result.stdout.splitlines()) == 2
    assert "prompts written" not in result.stderr and "Traceback" not in result.stderr and "error" not in result.stderr


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_a_device_as_the_prompts_file_is_refused_at_once(checkpoints, device, refused_before_loading):
    err = refused_before_loading(*models(checkpoints), "--prompts-file", device)
    assert f"--prompts-file {device} is a device, not a file of prompts" in err


def test_a_prompts_file_beyond_the_cap_is_refused(tmp_path, monkeypatch, enc):
    monkeypatch.setattr(prompts_file, "MAX_FILE_BYTES", 2**20)
    path = write_prompts(tmp_path / "prompts.txt", ["a prompt of some length"] * 50_000)  # 1.2 MB
    with pytest.raises(ValueError, match="holds more than 1 MiB: split it"):
        prompts_file.read_prompts(str(path), enc)
