"""`python speculative.py` end to end in a subprocess, on tiny random checkpoints given as folders."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from gpt2_model import GPT2Config
from speculative_gpt2 import cli
from speculative_gpt2.machine import dtype_name, resolve_dtype
from speculative_gpt2.random_checkpoint import noisy_copy, random_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    config = GPT2Config(n_positions=256, n_embd=32, n_layer=2, n_head=2)  # the real vocabulary: real text
    target = random_model(config, seed=0, scale=5)
    target.save_pretrained(folder / "target")
    noisy_copy(target, noise=0.08, seed=1).save_pretrained(folder / "draft")
    return folder


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "speculative.py"), *args], capture_output=True,
                          text=True, timeout=300, env=env)


def test_end_to_end_summary(checkpoints):
    result = run_cli("--target", str(checkpoints / "target"), "--draft", str(checkpoints / "draft"),
                     "--max-new-tokens", "24", "--prompt", "Hello, my name is", "--no-cache-baseline",
                     "--ignore-eos", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for header in ("=== Plain decoding without KV cache ===", "=== Plain decoding ===",
                   "=== Plain decoding, exact mode (every pass 8 rows, as speculative sampling's) ===",
                   "=== Speculative sampling (K=4), exact mode ===", "=== Summary ==="):
        assert header in out
    assert out.count("Generated: Hello, my name is") == 4
    assert "speedup over plain decoding: " in out and "speedup over plain decoding without KV cache: " in out
    assert "acceptance rate: " in out and "mean tokens per target pass: " in out
    # bfloat16 by default where the CPU runs it natively, float32 elsewhere: exact in both.
    assert f"dtype: {dtype_name(resolve_dtype('auto', torch.device('cpu')))}, device: cpu" in out
    assert ("identical outputs: yes (speculative sampling's text against plain decoding's in exact mode, both in 8-row "
            "passes)") in out
    assert "24 tokens" in out


def summary_lines(stdout: str) -> list[str]:
    return stdout.split("=== Summary ===", 1)[1].strip().splitlines()


def test_the_report(checkpoints):
    result = run_cli("--target", str(checkpoints / "target"), "--draft", str(checkpoints / "draft"),
                     "--max-new-tokens", "12", "--threads", "1", "--ignore-eos")
    assert result.returncode == 0, result.stderr
    lines = summary_lines(result.stdout)
    assert re.fullmatch(rf"target: {re.escape(str(checkpoints / 'target'))}, loaded in [\d.]+ s", lines[0])
    assert lines[1].startswith(f"draft: {checkpoints / 'draft'}, loaded in ")
    assert lines[2].startswith(f"dtype: {dtype_name(resolve_dtype('auto', torch.device('cpu')))}, device: cpu (")
    assert lines[2].endswith(", threads: 1)")
    assert re.fullmatch(r"warm-up \(8 tokens each, not timed below\): plain [\d.]+ s, exact [\d.]+ s, "
                        r"speculative [\d.]+ s", lines[3])
    spread = r"\(median; middle half [\d.]+-[\d.]+\)"
    assert re.fullmatch(rf"plain decoding: prefill \d+ ms, decode [\d.]+ tokens/s; [\d.]+ ms per target pass {spread}",
                        lines[4])
    assert re.fullmatch(rf"plain decoding, exact mode: prefill \d+ ms, decode [\d.]+ tokens/s; [\d.]+ ms per target "
                        rf"pass {spread}", lines[5])
    assert re.fullmatch(rf"speculative sampling: prefill \d+ ms, decode [\d.]+ tokens/s; [\d.]+ ms per round {spread}; "
                        r"the parts' own medians: [\d.]+ ms a verification, [\d.]+ ms a draft pass", lines[6])
    assert re.fullmatch(r"exact mode \(every target pass 8 rows: the most a round verifies, its drafts and the pending "
                        r"token, rounded up to a multiple of 4, at which every row of a product rounds alike; so that "
                        r"the texts compare equal in any dtype\) cost "
                        r"plain decoding [\d.]+x its time \(median steps\); speedups below are over the fastest plain "
                        r"decoding \(1-row passes\)", lines[7])
    assert re.fullmatch(r"speedup over plain decoding: [\d.]+x.*median steps.*", lines[8])
    assert re.fullmatch(r"timing: .*plain decoding [\d.]+x, exact mode [\d.]+x, speculative sampling [\d.]+x.*",
                        lines[9])
    assert re.fullmatch(r"acceptance rate: [\d.]+ \(drafts kept / drafts proposed: \d+ of \d+\)", lines[10])
    assert re.fullmatch(r"mean tokens per target pass: [\d.]+; K=4( \(.*\))?", lines[11])
    assert any(re.fullmatch(r"peak memory: [\d.]+ GiB resident \(RSS\)", line) for line in lines)


@pytest.mark.parametrize("mode", ["plain", "naive"])  # naive: the older name of the same mode
def test_plain_mode_neither_loads_nor_mentions_the_draft(checkpoints, mode):
    result = run_cli("--target", str(checkpoints / "target"), "--draft", "/nonexistent", "--mode", mode,
                     "--max-new-tokens", "4", "--show-acceptance")
    assert result.returncode == 0, result.stderr
    assert "draft" not in "\n".join(summary_lines(result.stdout)).split("=== Where", 1)[0]
    assert "/nonexistent" not in result.stdout + result.stderr
    assert "nothing to show: --show-acceptance needs speculative sampling" in result.stdout


def test_sampling_mode_and_options(checkpoints):
    result = run_cli("--target", str(checkpoints / "target"), "--draft", str(checkpoints / "draft"),
                     "--max-new-tokens", "8", "--temperature", "0.8", "--top-k", "50", "--top-p", "0.9",
                     "--mode", "speculative", "--lookahead", "3", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert "=== Speculative sampling (K=3) ===" in result.stdout and "=== Plain decoding ===" not in result.stdout
    assert re.search(r"^timing: speculative sampling (took|kept)|^timing: the machine was busy: speculative",
                     result.stdout, re.MULTILINE)  # timed alone, its pace is still checked


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lookahead", "0"], "argument --lookahead/-K: invalid value '0': give an integer from 1 to 64, or auto"),
        (["--temperature", "-1"], "argument --temperature: invalid value '-1': must be a finite number >= 0"),
        (["--temperature", "inf"], "argument --temperature: invalid value 'inf': must be a finite number"),
        (["--top-p", "2"], "argument --top-p: invalid value '2': must be in (0, 1]"),
        (["--top-k", "2.5"], "argument --top-k: invalid value '2.5'"),
        (["--max-new-tokens", "x"], "argument --max-new-tokens: invalid value 'x': must be an integer"),
        (["--dtype", "float8"], "invalid choice: 'float8'"),
        (["--target", "no-such-model"], "--target 'no-such-model' does not exist, and it is not a preset: give"),
        (["--target", "gpt2-xl", "--weights-dir", "/nonexistent", "--no-download"], "downloading is off"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
        (["--max-new-tokens", "2000"], "exceeds the target's context of 256 positions"),
        (["--seed", "99999999999999999999999"], "invalid seed"),
        (["--device", "meta"], "unknown device 'meta'"),
        (["--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs --device cuda"),
        (["--lookahead", "AUTO"], "invalid value 'AUTO': give an integer from 1 to 64, or auto"),
        (["--draft", "/nonexistent"], "--draft '/nonexistent' does not exist, and it is not a preset: give a "
         "checkpoint folder or one of distilgpt2, gpt2, gpt2-medium, gpt2-large, gpt2-xl or ngram"),
        (["--trace", "{tmp}/missing/run.html"], "--trace {tmp}/missing/run.html: give a file in an existing"),
        (["--trace", "{tmp}"], "--trace {tmp} is a folder, not a regular file"),
        (["--max-new-tokens", "250"], "plus --max-new-tokens 250 exceeds the target's context of 256 positions"),
        (["--target", "gpt2", "--weights-dir", "/etc/hostname/weights"], "Not a directory"),
    ],
)
def test_bad_input_exits_2_with_one_line(checkpoints, args, message, tmp_path):
    env = os.environ | {"HF_HOME": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9"}  # empty cache, no hub
    defaults = ["--target", str(checkpoints / "target"), "--draft", str(checkpoints / "draft")]
    args, message = [a.replace("{tmp}", str(tmp_path)) for a in args], message.replace("{tmp}", str(tmp_path))
    result = run_cli(*defaults, *args, env=env)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_help_explains():
    result = run_cli("--help")
    assert result.returncode == 0
    for option in ("--target", "--draft", "--lookahead", "--no-cache-baseline", "--no-download", "(default: 4)"):
        assert option in result.stdout


def run_in_terminal(args, env):
    """Runs the CLI with stdout on a pseudo-terminal (so that it is a tty), returns what it wrote there."""
    import pty

    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "speculative.py"), *args], stdout=follower,
                               stderr=subprocess.DEVNULL, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the process closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=300)
    os.close(leader)
    assert process.returncode == 0
    return b"".join(chunks).decode()


@pytest.mark.slow
def test_color_choices(checkpoints):
    args = ["--target", str(checkpoints / "target"), "--draft", str(checkpoints / "draft"), "--max-new-tokens", "12",
            "--mode", "speculative", "--show-acceptance"]
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    always = run_cli(*args, "--color", "always", env=env).stdout
    assert "\x1b[32m" in always and "legend: " in always
    assert "=== Where the speculative tokens came from ===" in always
    piped = run_cli(*args, "--color", "auto", env=env).stdout
    assert "\x1b[" not in piped and "legend: plain: proposed by the draft" in piped and "[..]: a draft was" in piped
    counts = re.search(r"tokens by origin: draft (\d+), resampled (\d+), bonus (\d+), target (\d+)", piped)
    assert counts and sum(map(int, counts.groups())) == 12
    assert "\x1b[" in run_in_terminal([*args, "--color", "auto"], env)  # a terminal gets colours ...
    assert "\x1b[" not in run_in_terminal([*args, "--color", "auto"], env | {"NO_COLOR": "1"})  # ... unless NO_COLOR
    assert "\x1b[" not in run_in_terminal([*args, "--color", "never"], env)


@pytest.mark.slow
def test_streamed_and_unstreamed_output_agree(checkpoints):
    args = ["--target", str(checkpoints / "target"), "--draft", str(checkpoints / "draft"), "--max-new-tokens", "16",
            "--prompt", "日本語 and emoji 🎉:"]
    streamed = run_cli(*args).stdout
    unstreamed = run_cli(*args, "--no-stream").stdout
    generated = [line for line in streamed.splitlines() if line.startswith("Generated: ")]
    assert generated == [line for line in unstreamed.splitlines() if line.startswith("Generated: ")]
    assert len(generated) == 3 and all("日本語 and emoji 🎉:" in line and "\ufffd" not in line for line in generated)


def test_ctrl_c_exits_quietly_with_130(checkpoints):
    # The uncached baseline over a long prompt is slow enough to be interrupted while it streams.
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "speculative.py"), "--target", str(checkpoints / "target"), "--draft",
         str(checkpoints / "draft"), "--no-cache-baseline", "--max-new-tokens", "200", "--ignore-eos", "--prompt",
         "hello " * 50], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # The default disposition of SIGINT, whatever this process inherited (an ignored SIGINT passes on to children
        # and Python then installs no KeyboardInterrupt handler: a full CI run saw the command ignore Ctrl-C).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    deadline = time.monotonic() + 120
    while "=== Plain decoding without KV cache ===" not in seen and time.monotonic() < deadline:
        seen += process.stdout.readline()
    # Interrupt as soon as that section streams (it takes seconds), not after a guessed sleep.
    section = ""
    while "Generated: hello" not in section and (char := process.stdout.read(1)):
        section += char
    seen += section
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    stdout, stderr = process.stdout.read(), process.stderr.read()  # through the buffers readline already filled
    assert process.returncode == 130, (stderr, seen[-300:], stdout[-300:])
    assert "Traceback" not in stderr and "speculative.py: interrupted" in stderr
    assert "Generated: hello" in seen + stdout  # what was generated so far stays on the screen


@pytest.mark.parametrize("args, message", [(["--threads", "0"], "argument --threads: invalid value '0'"),
                                           (["--trace", "x.html", "--mode", "plain"], "--trace shows speculative")])
def test_more_bad_flags(checkpoints, args, message):
    result = run_cli("--target", str(checkpoints / "target"), "--draft", str(checkpoints / "draft"), *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_the_summary_says_which_cache_snapshot_a_preset_came_from(checkpoints, tmp_path):
    repo = tmp_path / "hub" / "models--openai-community--gpt2"
    for snapshot in ("aaaa", "bbbb"):
        (repo / "snapshots" / snapshot).mkdir(parents=True)
        for name in ("config.json", "model.safetensors"):
            (repo / "snapshots" / snapshot / name).symlink_to(checkpoints / "target" / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("bbbb")
    env = os.environ | {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = run_cli("--target", "gpt2", "--mode", "naive", "--max-new-tokens", "3", "--weights-dir",
                     str(tmp_path / "weights"), env=env)
    assert result.returncode == 0, result.stderr
    assert f"target: gpt2 from {repo / 'snapshots' / 'bbbb'}, loaded in " in result.stdout


@pytest.mark.parametrize("typed,meant", [("--temprature", "--temperature"), ("--max-new-tokns", "--max-new-tokens"),
                                         ("--lookahed=3", "--lookahead"), ("--promt", "--prompt")])
def test_a_mistyped_flag_gets_the_one_it_resembles(typed, meant, run_cli):
    status, out, err = run_cli(typed, "1")
    assert status == 2 and err.count("\n") == 1 and f"; did you mean {meant}? (see --help)" in err


def test_an_unknown_flag_like_no_other_gets_no_guess(run_cli):
    status, _, err = run_cli("--frobnicate", "1")
    assert status == 2 and "did you mean" not in err and "unrecognized arguments: --frobnicate" in err


@pytest.mark.slow
def test_a_draft_larger_than_the_target_gets_a_note(checkpoints, tmp_path):
    random_model(GPT2Config(n_positions=256, n_embd=64, n_layer=3, n_head=2), seed=2).save_pretrained(tmp_path / "big")
    result = run_cli("--target", str(checkpoints / "target"), "--draft", str(tmp_path / "big"), "--max-new-tokens",
                     "4", "--device", "cpu", "--mode", "speculative")
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "is not smaller than the target" in line]
    assert len(notes) == 1 and "M parameters)" in notes[0] and "cannot be faster than plain decoding" in notes[0]
    smaller = run_cli("--target", str(tmp_path / "big"), "--draft", str(checkpoints / "draft"), "--max-new-tokens",
                      "4", "--device", "cpu", "--mode", "speculative")
    assert smaller.returncode == 0 and "not smaller" not in smaller.stderr  # the negative control


@pytest.mark.parametrize("args, message", [
    (["--top-k", "50"], "--top-k shapes sampling, and at temperature 0 (greedy, the default) there is none: give a "
                        "temperature above 0, e.g. --temperature 0.8, or leave --top-k out"),
    (["--top-p", "0.5", "--temperature", "0"], "--top-p shapes sampling, and at temperature 0 (greedy"),
    (["--coupled"], "--coupled shapes sampling, and at temperature 0 (greedy, the default) there is none"),
    (["--ngram-min", "5"], "--ngram-min sets prompt lookup's n-grams: add --draft ngram"),  # before "larger than"
    (["--ngram-max", "5"], "--ngram-max sets prompt lookup's n-grams: add --draft ngram"),
    (["--ngram-min", "2"], "--ngram-min sets prompt lookup's n-grams: add --draft ngram"),
])
def test_options_that_would_do_nothing_are_refused(checkpoints, refused_before_loading, args, message):
    err = refused_before_loading("--target", checkpoints / "target", "--draft", checkpoints / "draft", *args)
    assert message in err


@pytest.mark.parametrize("args, dest, value", [
    (["--top-k", "50", "--temperature", "0.8"], "top_k", 50), (["--coupled", "--temperature", "1"], "coupled", True),
    (["--ngram-max", "5", "--draft", "ngram"], "ngram_max", 5),
    (["--ngram-min", "2", "--draft", "ngram"], "ngram_min", 2),
])
def test_the_same_options_where_they_act_are_taken(args, dest, value):
    assert getattr(cli.parse_args(["--target", "t", *args]), dest) == value
