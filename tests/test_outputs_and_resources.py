"""Adversarial cases: what reaches the terminal, what the project writes to disk, what the trace claims, what a
preset name promises, resources, pipes and policy objects. One section per category; each named case has its test,
beside tests of its neighbours."""

import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from gpt2_model import GPT2, GPT2Config
from speculative_gpt2.checkpoints import PRESETS
from speculative_gpt2.errors import CheckpointError
from speculative_gpt2.files import write_atomically
from speculative_gpt2.state_dict import _TensorFile, expected_shapes
from speculative import Generation, speculative_sample
from speculative_gpt2 import cli, packing, render
from speculative_gpt2.text import strip_ansi
from speculative_gpt2.checkpoints import find_checkpoint
from speculative_gpt2.machine import resolve_device
from speculative_gpt2.lookahead import AdaptiveLookahead, Round
from speculative_gpt2.random_checkpoint import noisy_copy, random_model
from speculative_gpt2.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = GPT2Config(n_positions=128, n_embd=32, n_layer=2, n_head=2)  # the real vocabulary: real text
# Everything a terminal may act on (C0 but newline and tab, DEL, C1) or that reorders the displayed text.
DANGEROUS = ({chr(c) for c in range(32)} - {"\n", "\t"} | {chr(c) for c in range(0x7F, 0xA0)}
             | set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"))


@pytest.fixture(scope="module")
def enc():
    return load_tokenizer()


@pytest.fixture(scope="module")
def pair():
    target = random_model(SMALL, seed=0, scale=5)
    return target, noisy_copy(target, noise=0.08, seed=1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, pair):
    folder = tmp_path_factory.mktemp("pair")
    pair[0].save_pretrained(folder / "target")
    pair[1].save_pretrained(folder / "draft")
    return folder


def run_cli(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, os.path.join(ROOT, "speculative.py"), *args], capture_output=True,
                          timeout=300, env=env, **kwargs)


def safe(text: str) -> bool:
    return not DANGEROUS & set(text)


# 1. Terminal output ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("control", ["\x9b", "\x9d", "\x9c", "\x85", "\x80", "\x9f", "\x1b", "\x7f", "\r"])
def test_printable_shows_c0_del_and_c1_as_visible_symbols(control):
    shown = render.printable(f"a{control}b")
    assert safe(shown) and shown.startswith("a") and shown.endswith("b") and shown != f"a{control}b"


@pytest.mark.parametrize("bidi", ["\u202e", "\u202d", "\u2066", "\u2067", "\u2068", "\u2069", "\u200e", "\u200f",
                                  "\u061c", "\u202a"])
def test_bidirectional_controls_show_as_code_points(bidi):
    assert render.printable(f"x{bidi}y") == f"x<U+{ord(bidi):04X}>y"


@settings(derandomize=True, max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40))
def test_printable_output_is_always_safe_and_leaves_ordinary_text_alone(text):
    shown = render.printable(text)
    assert safe(shown)
    if safe(text):
        assert shown == text  # é, 日本語, emoji, newlines and tabs are text, not controls


def test_model_text_with_c1_controls_is_escaped_in_every_renderer(enc):
    # A model scripted to clear the screen, draw in red and set the window title through CSI, OSC and ST.
    attack = "ok \x9b2J\x9b31mred\x9d0;title\x9c \u202eevil\u2066 done"
    tokens = enc.encode(attack)
    gen = Generation(tokens=tokens, origins=["draft"] * (len(tokens) - 1) + ["bonus"])
    prompt = enc.encode("\x9b1;1H")
    outputs = [render.to_text(gen, enc, prompt), strip_ansi(render.to_ansi(gen, enc, prompt))]
    stream = render.TextStream(enc, escape=True)
    outputs.append("".join(stream([t]) for t in tokens) + stream.flush())
    for shown in outputs:
        assert safe(shown), repr(shown)
        assert "<U+009B>2J" in shown and "<U+009D>0;title<U+009C>" in shown and "<U+202E>evil" in shown


@pytest.mark.slow
def test_cli_escapes_c1_and_bidi_in_every_path(folders):
    prompt = "hi \x9b2J\x9d0;t\x9c \u202eab\u2066"
    base = ["--target", str(folders / "target"), "--draft", str(folders / "draft"), "--max-new-tokens", "6",
            "--mode", "speculative", "--prompt", prompt]
    # Streamed with colours, then unstreamed with marks: every path that prints prompt or model text.
    for extra in (["--show-acceptance", "--color", "always"], ["--no-stream", "--show-acceptance"]):
        result = run_cli(*base, *extra, text=True)
        assert result.returncode == 0, result.stderr
        shown = strip_ansi(result.stdout)  # our own colour codes are the only escapes
        assert safe(shown) and "hi <U+009B>2J<U+009D>0;t<U+009C> <U+202E>ab<U+2066>" in shown
    # Errors that quote the user's text: a folder name, a flag's value.
    for args in (["--target", "/nonexistent/\x9b2J\u202e"], ["--top-k", "\x9b2J"]):
        result = run_cli(*args, text=True)
        assert result.returncode == 2 and safe(result.stderr), repr(result.stderr)


# 2. Files the project writes ------------------------------------------------------------------------------


def test_a_symlink_planted_at_the_old_temporary_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "run.html.tmp").symlink_to(victim)
    write_atomically(tmp_path / "run.html", lambda tmp: open(tmp, "w").write("page"))
    assert victim.read_text() == "precious" and (tmp_path / "run.html").read_text() == "page"
    assert (tmp_path / "run.html.tmp").is_symlink()


def test_a_users_own_tmp_file_is_not_consumed(tmp_path):
    (tmp_path / "run.html.tmp").write_text("mine")
    write_atomically(tmp_path / "run.html", lambda tmp: open(tmp, "w").write("page"))
    assert (tmp_path / "run.html.tmp").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.html", "run.html.tmp"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "run.html").write_text("old")

    def fail(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(tmp_path / "run.html", fail)
    assert [p.name for p in tmp_path.iterdir()] == ["run.html"] and (tmp_path / "run.html").read_text() == "old"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_save_pretrained_writes_both_files_with_the_usual_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        random_model(GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1, n_head=2), 0).save_pretrained(
            tmp_path / "m")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()}
    assert modes == {"model.safetensors": 0o666 & ~umask, "config.json": 0o666 & ~umask}


# 3. The trace and the renderers --------------------------------------------------------------------------


def eos_runs(pair, enc):
    """Greedy runs with the target as its own draft (every draft kept), K=4, EOS set to the token at position
    `at` of the text: at 0-3 it is a kept draft of round 1, at 4 the bonus token."""
    target = pair[0]
    prompt = enc.encode("The cat")  # greedy: 4 distinct tokens among the first 5 (positions 0, 1, 3, 4)
    plain = speculative_sample(target, target, prompt, 12, lookahead=4).tokens
    for at in range(5):
        if plain[at] in plain[:at]:
            continue  # the EOS must first appear at `at`
        out = speculative_sample(target, target, prompt, 12, lookahead=4, eos_token_id=plain[at], trace=True)
        yield at, prompt, out


def test_a_kept_eos_cuts_the_traced_round_as_it_cuts_the_generation(pair, enc):
    tried = 0
    for at, prompt, out in eos_runs(pair, enc):
        tried += 1
        assert len(out.tokens) == at + 1 and len(out.trace) == 1
        t = out.trace[0]
        assert (t.kept, len(t.drafts)) == (out.accepted, out.proposed)
        assert t.drafts[: t.kept] + ([] if t.next_token is None else [t.next_token]) == out.tokens
        page = render.trace_page(out, enc, prompt)
        if at < 4:  # a kept draft: no bonus was made
            assert t.next_token is None and t.next_origin is None and t.next_probability is None
            assert f"{at + 1} of {at + 1} drafts kept (acceptance 1.00), {at + 1}\nnew tokens" in page
            assert f"Round 1: {at + 1} of {at + 1} drafts kept, the last one ends the text" in page
            assert "then bonus" not in page
        else:  # the bonus token is the EOS: it was produced
            assert t.next_origin == "bonus" and "4 of 4 drafts kept, then bonus" in page
    assert tried == 4


@pytest.mark.parametrize("kind", ["list", "tensor", "numpy", "one-element tensor", "token 0"])
def test_renderers_take_every_prompt_the_samplers_take(pair, enc, kind):
    ids = enc.encode("Hello there") if "one" not in kind and kind != "token 0" else [0 if kind == "token 0" else 15496]
    prompt = {"list": ids, "numpy": np.array(ids)}.get(kind, torch.tensor(ids))
    out = speculative_sample(*pair, prompt, 6, lookahead=2, trace=True)
    text = enc.decode(ids)
    assert render.text_groups(out, enc, prompt)[0] == text
    assert render.to_text(out, enc, prompt).startswith(text)
    assert strip_ansi(render.to_ansi(out, enc, prompt)).startswith(text)
    for page in (render.to_html(out, enc, prompt), render.trace_page(out, enc, prompt)):
        assert f'title="prompt">{text}</span>' in page


# 4. Reproducibility -------------------------------------------------------------------------------------


class JitteryClock:
    """Times that vary from run to run, as measured times do: a seeded stream of its own."""

    def __init__(self, seed):
        self.rng, self.now = random.Random(seed), 0.0

    def mark(self):
        self.now += self.rng.uniform(0.1, 10.0)
        return self.now

    def ms(self, start, end):
        return end - start


def texts_of_runs(pair, policy, runs=8):
    return {tuple(speculative_sample(*pair, [1, 2, 3], 40, lookahead=policy(), temperature=1.0, clock=JitteryClock(i),
                                     generator=torch.Generator().manual_seed(0)).tokens) for i in range(runs)}


def test_the_cost_model_makes_the_same_seed_give_the_same_text():
    target = random_model(GPT2Config(vocab_size=100, n_positions=64, n_embd=16, n_layer=1, n_head=2), 0, scale=5)
    pair = target, noisy_copy(target, noise=0.3, seed=1)
    assert len(texts_of_runs(pair, lambda: AdaptiveLookahead(cost_ratio=0.1))) == 1
    # Negative control: K from measured times, which differ from run to run, changes the text.
    assert len(texts_of_runs(pair, AdaptiveLookahead, runs=4)) > 1


def test_the_cost_model_still_adapts_to_the_acceptance():
    # E(alpha, K) / (K c + 1): a draft that is always kept earns long rounds, one never kept K = 1.
    good, bad = AdaptiveLookahead(cost_ratio=0.05), AdaptiveLookahead(cost_ratio=0.05)
    for _ in range(20):
        good.update(Round(good.choose(), good.choose(), 1e6, 1e6))  # times are ignored
        bad.update(Round(bad.choose(), 0, 0.0, 0.0))
    assert good.choose() == good.max_lookahead and bad.choose() == 1


@pytest.mark.slow
def test_cli_auto_at_temperature_1_gives_one_text_and_says_why(folders):
    args = ["--target", str(folders / "target"), "--draft", str(folders / "draft"), "--mode", "speculative",
            "--lookahead", "auto", "--temperature", "1", "--max-new-tokens", "30", "--ignore-eos", "--seed", "3"]
    results = [run_cli(*args, text=True) for _ in range(2)]
    assert all(r.returncode == 0 for r in results), results[0].stderr
    texts = {next(line for line in r.stdout.splitlines() if line.startswith("Generated: ")) for r in results}
    assert len(texts) == 1
    assert "from the cost model, c = 1.000: the same seed gives the same text" in results[0].stdout
    help_text = run_cli("--help", text=True).stdout
    assert "the same seed and flags give the same text" in " ".join(help_text.split())


# 5. Checkpoints -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.uint8, torch.bool, torch.complex64])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_non_floating_tensors_are_refused_by_name(reference_folder, tmp_path, dtype, fmt):
    tensors = load_file(reference_folder[0] / "model.safetensors")
    tensors["transformer.ln_f.bias"] = tensors["transformer.ln_f.bias"].to(dtype)
    if fmt == "safetensors":
        save_file(tensors, tmp_path / "model.safetensors")
    else:
        torch.save(tensors, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_bytes((reference_folder[0] / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match="tensor 'transformer.ln_f.bias' is .*, not floating point") as e:
        GPT2.from_pretrained(tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_floating_tensors_of_any_width_load(reference_folder, tmp_path, dtype):
    tensors = {k: v.to(dtype) for k, v in load_file(reference_folder[0] / "model.safetensors").items()}
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes((reference_folder[0] / "config.json").read_bytes())
    assert GPT2.from_pretrained(tmp_path).wte.weight.dtype == torch.float32


def tiny_preset(monkeypatch, name="distilgpt2"):
    # A preset of a tiny shape, so that weights of "its shape" are quick to write.
    monkeypatch.setitem(PRESETS, name, (1, 2, 16))
    return random_model(GPT2Config(n_positions=64, n_embd=16, n_layer=1, n_head=2), seed=0)


def test_random_weights_in_a_preset_folder_do_not_pass_for_the_preset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    tiny_preset(monkeypatch).save_pretrained(tmp_path / "weights" / "distilgpt2")
    with pytest.raises(CheckpointError, match=r"distilgpt2 has no record of a verified download \(.verified.json\).*"
                       r"pass its path"):
        GPT2.from_pretrained("distilgpt2", weights_dir=tmp_path / "weights", download=False)
    # As a path, the same folder loads: a folder is whatever it holds.
    assert GPT2.from_pretrained(tmp_path / "weights" / "distilgpt2").config.n_layer == 1


def verified_preset(tmp_path, monkeypatch):
    """A preset folder as a download leaves it: its files, and the record of what was verified."""
    folder = tmp_path / "weights" / "distilgpt2"
    tiny_preset(monkeypatch).save_pretrained(folder)
    files = {f: {"size": (folder / f).stat().st_size, "mtime_ns": (folder / f).stat().st_mtime_ns, "SHA-256": "0"}
             for f in ("config.json", "model.safetensors")}
    (folder / ".verified.json").write_text(json.dumps({"preset": "distilgpt2", "files": files}))
    return folder


def test_a_verified_preset_loads_and_a_changed_file_is_refused(tmp_path, monkeypatch):
    folder = verified_preset(tmp_path, monkeypatch)
    assert find_checkpoint("distilgpt2", weights_dir=tmp_path / "weights", allow_download=False) == folder
    with open(folder / "model.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckpointError, match="model.safetensors is not the file whose download was verified"):
        find_checkpoint("distilgpt2", weights_dir=tmp_path / "weights", allow_download=False)


def test_a_file_replaced_with_one_of_the_same_size_is_refused(tmp_path, monkeypatch):
    folder = verified_preset(tmp_path, monkeypatch)
    data = (folder / "model.safetensors").read_bytes()
    time.sleep(0.01)
    (folder / "model.safetensors").write_bytes(data)  # the same size, written anew: another time
    with pytest.raises(CheckpointError, match="not the file whose download was verified"):
        find_checkpoint("distilgpt2", weights_dir=tmp_path / "weights", allow_download=False)


# 6. Resources ---------------------------------------------------------------------------------------------


def test_a_config_claiming_10000_layers_is_refused_before_any_model_is_built(reference_folder, tmp_path,
                                                                              monkeypatch):
    raw = json.loads((reference_folder[0] / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((reference_folder[0] / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(raw | {"n_layer": 10_000}))
    built = []
    original = GPT2.__init__
    monkeypatch.setattr(GPT2, "__init__", lambda self, config: (built.append(config), original(self, config))[1])
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match="the file holds 3 layers, config.json says n_layer=10000"):
        GPT2.from_pretrained(tmp_path)
    assert built == [] and time.perf_counter() - started < 20


@pytest.mark.parametrize("config", [GPT2Config(), GPT2Config(vocab_size=100, n_positions=8, n_embd=12, n_layer=3,
                                                               n_head=3)])
def test_expected_shapes_are_the_models_shapes(config):
    with torch.device("meta"):
        model = GPT2(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to wte
    assert expected_shapes(config) == shapes


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. "
                                                               "DefaultCPUAllocator: not enough memory: you tried to "
                                                               "allocate 6400000000 bytes.")])
def test_running_out_of_memory_while_loading_is_named_as_such(reference_folder, monkeypatch, error):
    def no_memory(*args, **kwargs):
        raise error

    with monkeypatch.context() as m:
        m.setattr(torch, "empty", no_memory)
        with pytest.raises(CheckpointError, match="out of memory while loading .* the file is not at fault") as e:
            GPT2.from_pretrained(reference_folder[0])
    assert "delete" not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="out of memory while reading .* the file is not at fault") as e:
        with _TensorFile(reference_folder[0] / "model.safetensors") as tensors:
            tensors._read(no_memory)
    assert "delete" not in str(e.value)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN: the CLI makes no copies to run out on")
def test_running_out_of_memory_for_the_weight_copies_runs_on_without_them(folders, monkeypatch, capsys):
    def no_memory(weight, rows=None):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 6400000000 bytes.")

    monkeypatch.setattr(packing, "pack", no_memory)  # the CLI packs every model's weights
    status = cli.main(["--target", str(folders / "target"), "--draft", str(folders / "draft"), "--device", "cpu",
                       "--dtype", "float32", "--max-new-tokens", "4", "--no-stream"])
    err = capsys.readouterr().err
    assert status == 0 and "Traceback" not in err
    for role in ("target", "draft"):
        assert f"note: {role}: out of memory while packing the weights for oneDNN" in err


def test_threads_have_an_upper_bound(folders):
    result = run_cli("--target", str(folders / "target"), "--threads", "100000", text=True)
    assert result.returncode == 2 and "argument --threads: invalid value '100000': at most" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# 7. Checks before the expensive work ----------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs --device cuda"),
    # sysfs: a folder in which no one, root included, can create a file (a chmod does not stop root).
    (["--trace", "/sys/run.html"], "--trace /sys/run.html: cannot write a file in /sys"),
    (["--device", "cpu:1"], "torch has one CPU device"),
])
def test_checks_that_need_no_model_come_before_any_download_or_loading(tmp_path, args, message):
    # A preset that would need a download from an unreachable hub: the check must come first.
    env = os.environ | {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = run_cli("--target", "gpt2-xl", "--weights-dir", str(tmp_path / "w"), *args, env=env, text=True)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Loading" not in result.stderr and "download" not in result.stderr and not (tmp_path / "w").exists()


# 8. Pipes -------------------------------------------------------------------------------------------------


def test_a_closed_pipe_ends_quietly(folders):
    command = (f"{sys.executable} {ROOT}/speculative.py --target {folders / 'target'} --draft {folders / 'draft'} "
               f"--max-new-tokens 100 --ignore-eos --prompt hello 2>{folders / 'err.txt'} | head -c 10; "
               f"echo \" ${{PIPESTATUS[0]}}\"")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert result.stdout.split()[-1] in ("0", "141"), result.stdout
    err = (folders / "err.txt").read_text()
    assert "Broken pipe" not in err and "error" not in err and "Traceback" not in err, err


# 9. Policy objects -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    (dict(max_lookahead=0), "max_lookahead must be an integer >= 1, got 0"),
    (dict(max_lookahead=2.5), "max_lookahead must be an integer >= 1, got 2.5"),
    (dict(first=0), "first must be an integer from 1 to 12, got 0"),
    (dict(first=13), "first must be an integer from 1 to 12, got 13"),
    (dict(decay=2), r"decay \(the weight kept by past rounds\) must be a finite number in \(0, 1\], got 2"),
    (dict(decay=-1), r"decay \(the weight kept by past rounds\) must be a finite number in \(0, 1\], got -1"),
    (dict(decay=float("nan")), r"decay \(the weight kept by past rounds\) must be a finite number in \(0, 1\], got nan"),
    (dict(decay=1), r"decay \(the weight kept by past rounds\) must be below 1, got 1"),
    (dict(cost_ratio=float("inf")), "cost_ratio must be a finite number >= 0, got inf"),
])
def test_adaptive_lookahead_checks_its_arguments(options, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveLookahead(**options)


def test_adaptive_lookahead_accepts_numpy_integers_and_small_maxima():
    assert AdaptiveLookahead(max_lookahead=np.int64(2)).choose() == 2  # the first K fits under the maximum


def test_a_clock_that_reads_0_ms_does_not_divide_by_zero():
    policy = AdaptiveLookahead()
    policy.update(Round(4, 2, 0.0, 0.0))
    assert 1 <= policy.choose() <= policy.max_lookahead


# 10. Smaller ----------------------------------------------------------------------------------------------


def test_a_prompt_that_is_not_utf8_is_refused_naming_the_flag(folders):
    result = run_cli("--target", str(folders / "target"), "--mode", "plain", "--max-new-tokens", "4", "--prompt",
                     b"caf\xe9 au lait")  # Latin-1, as a shell in another locale would pass it
    err = result.stderr.decode()
    assert result.returncode == 2 and len(err.strip().splitlines()) == 1
    assert "argument --prompt: it holds bytes that are not UTF-8" in err


@pytest.mark.parametrize("name", ["cpu:1", "cpu:7"])
def test_a_second_cpu_device_is_refused(name):
    with pytest.raises(ValueError, match=f"device '{name}': torch has one CPU device"):
        resolve_device(name)
    assert resolve_device("cpu:0") == torch.device("cpu:0")
