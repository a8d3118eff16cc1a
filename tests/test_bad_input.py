"""Bad checkpoints, configs, caches, arguments and models: a clear one-line error, never wrong output or a
traceback from inside torch. One test per kind of failure, each closed as a category."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from speculative_gpt2.random_checkpoint import random_model
from speculative_gpt2.checkpoints import find_checkpoint, hf_cache_snapshot
from gpt2_model import GPT2, GPT2Config
from speculative_gpt2.errors import CheckpointError
from speculative import autoregressive_sample, speculative_sample
from speculative_gpt2.packing import pack_linears

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = GPT2Config(vocab_size=100, n_positions=64, n_embd=16, n_layer=1, n_head=2)


@pytest.fixture(scope="module")
def tiny():
    return random_model(TINY, seed=0, scale=5)


def copy_checkpoint(reference_folder, folder, edit=None, config=None):
    """The reference checkpoint in `folder`, its tensors changed by `edit`, its config.json replaced by `config`."""
    tensors = load_file(reference_folder[0] / "model.safetensors")
    if edit is not None:
        edit(tensors)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors")
    raw = json.loads((reference_folder[0] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(raw if config is None else config))
    return folder


# Wrong output, silently -----------------------------------------------------------------------------------


def test_an_untied_lm_head_is_refused(reference_folder, tmp_path):
    def untie(t):
        t["lm_head.weight"] = t["transformer.wte.weight"] + 1.0

    folder = copy_checkpoint(reference_folder, tmp_path, untie)
    with pytest.raises(CheckpointError, match="lm_head.weight differs from wte.weight"):
        GPT2.from_pretrained(folder)
    raw = json.loads((reference_folder[0] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(raw | {"tie_word_embeddings": False}))
    with pytest.raises(ValueError, match="tie_word_embeddings=False is not supported"):
        GPT2.from_pretrained(folder)


def test_a_tied_lm_head_loads(reference_folder, tmp_path):
    def tie(t):
        t["lm_head.weight"] = t["transformer.wte.weight"].clone()

    GPT2.from_pretrained(copy_checkpoint(reference_folder, tmp_path, tie))


def test_the_hf_cache_snapshot_is_the_one_refs_main_names(reference_folder, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--openai-community--gpt2"
    old = copy_checkpoint(reference_folder, repo / "snapshots" / "aaaa", lambda t: t.update(
        {"transformer.wpe.weight": t["transformer.wpe.weight"] * 0}))  # an old revision, first in sorted order
    new = copy_checkpoint(reference_folder, repo / "snapshots" / "bbbb")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("bbbb\n")
    assert hf_cache_snapshot("gpt2") == new
    (repo / "refs" / "main").unlink()  # two snapshots and nothing to choose between them: no guess
    assert hf_cache_snapshot("gpt2") is None
    assert old.exists()


@pytest.mark.parametrize("change", [dict(temperature=float("inf")), dict(temperature=float("nan")),
                                    dict(top_p=float("nan")), dict(top_p=float("inf"))])
def test_non_finite_options_are_refused(tiny, change):
    with pytest.raises(ValueError, match="must be a finite number|top_p must be in"):
        speculative_sample(tiny, tiny, [1, 2], 4, **change)


# Crashes with a traceback ---------------------------------------------------------------------------------


@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
def test_models_made_under_inference_mode_or_no_grad_work_everywhere(context):
    with context():
        target, draft = random_model(TINY, seed=0, scale=5), random_model(TINY, seed=1, scale=5)
    expected = autoregressive_sample(target, [1, 2, 3], 12).tokens
    assert speculative_sample(target, draft, [1, 2, 3], 12).tokens == expected
    pack_linears(target)
    assert autoregressive_sample(target, [1, 2, 3], 12).tokens == expected
    with torch.no_grad():
        assert target(torch.tensor([[1, 2, 3]])).shape == (1, 3, 100)


@pytest.mark.parametrize("options", [dict(temperature=1e-300), dict(temperature=5e-324),
                                     dict(temperature=1.0, top_p=1e-46), dict(temperature=1e-45, top_k=3)])
def test_options_that_underflow_float32_give_their_limit(tiny, options):
    greedy = autoregressive_sample(tiny, [1, 2, 3], 10).tokens
    generator = torch.Generator().manual_seed(0)
    assert speculative_sample(tiny, tiny, [1, 2, 3], 10, generator=generator, **options).tokens == greedy
    assert autoregressive_sample(tiny, [1, 2, 3], 10, generator=generator, **options).tokens == greedy


@pytest.mark.parametrize(
    "config, field",
    [
        ([1, 2], "must be a JSON object, got list"),
        (None, "must be a JSON object, got NoneType"),
        (3, "must be a JSON object, got int"),
        ({"n_head": "2"}, "n_head must be an integer >= 1, got '2'"),
        ({"n_embd": 8.0}, "n_embd must be an integer >= 1, got 8.0"),
        ({"n_positions": None}, "n_positions must be an integer >= 1, got None"),
        ({"layer_norm_epsilon": "x"}, r"layer_norm_epsilon must be a finite number in \(0, 1\], got 'x'"),
        ({"n_head": 0}, "n_head must be an integer >= 1, got 0"),
        ({"n_layer": True}, "n_layer must be an integer >= 1, got True"),
        ({"vocab_size": -5}, "vocab_size must be an integer >= 1, got -5"),
        ({"n_inner": "3072"}, "n_inner='3072' is not supported"),
        ({"model_type": "llama"}, "model_type 'llama' is not GPT-2"),
        ({"scale_attn_by_inverse_layer_idx": "yes"}, "scale_attn_by_inverse_layer_idx='yes' is not supported"),
    ],
)
def test_a_bad_config_names_the_field(tmp_path, config, field):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=field) as error:
        GPT2Config.from_json(tmp_path / "config.json")
    assert str(error.value).startswith(str(tmp_path / "config.json")) and "\n" not in str(error.value)


def test_config_checks_run_on_the_resolved_values(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"n_inner": 3072}))  # n_embd defaults to 768: 4 * 768
    assert GPT2Config.from_json(tmp_path / "config.json").n_embd == 768
    (tmp_path / "config.json").write_text(json.dumps({"n_embd": 64, "n_head": 4, "n_inner": 256}))
    assert GPT2Config.from_json(tmp_path / "config.json").n_embd == 64


@pytest.mark.parametrize("content", [[1, 2], torch.zeros(3), {1: torch.zeros(3)}, {"wte.weight": [1.0]}])
def test_a_bin_that_is_not_a_dict_of_tensors(reference_folder, tmp_path, content):
    torch.save(content, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_bytes((reference_folder[0] / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match="does not hold a dict of named tensors"):
        GPT2.from_pretrained(tmp_path)


# Unclear or wrong errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(top_k=2.5), "top_k must be an integer >= 1, got 2.5"),
        (dict(top_k="3"), "top_k must be an integer >= 1, got '3'"),
        (dict(top_k=True), "top_k must be an integer >= 1, got True"),
        (dict(top_p="0.5"), r"top_p must be a finite number in \(0, 1\], got '0.5'"),
        (dict(temperature=None), "temperature must be a finite number >= 0, got None"),
        (dict(temperature="1"), "temperature must be a finite number"),
        (dict(prompt=5), "prompt must be a list of token ids or a 1-D tensor, got int"),
        (dict(prompt="hello"), "prompt is text: encode it first"),
        (dict(prompt=[1, 2.0]), "prompt must hold integer token ids"),
        (dict(prompt=[1, True]), "prompt must hold integer token ids"),
        (dict(prompt=np.array([1.5, 2.0])), "prompt must be a 1-D array of token ids"),
        (dict(generator=5), "generator must be a torch.Generator"),
        (dict(eos_token_id="x"), "eos_token_id must be an integer >= 0, got 'x'"),
        (dict(eos_token_id=-1), "eos_token_id must be an integer >= 0"),
        (dict(eos_token_id=True), "eos_token_id must be an integer >= 0, got True"),
        (dict(eos_token_id=100), "eos_token_id=100 is not a token id of the models"),
        (dict(max_new_tokens=3.0), "max_new_tokens must be an integer >= 1, got 3.0"),
        (dict(lookahead=2.0), "lookahead must be an integer >= 1, .auto., a tree.s widths"),
        (dict(draft="draft"), r"draft must be a GPT2 model or a drafter \(start, propose and commit methods"),
    ],
)
def test_wrong_argument_types_are_named(tiny, change, message):
    args = dict(prompt=[1, 2, 3], max_new_tokens=4, draft=tiny) | change
    with pytest.raises(ValueError, match=message) as error:
        speculative_sample(tiny, args.pop("draft"), args.pop("prompt"), args.pop("max_new_tokens"), **args)
    assert "\n" not in str(error.value)


def test_numpy_integers_are_integers(tiny):
    expected = speculative_sample(tiny, tiny, [1, 2, 3], 5, lookahead=2, top_k=2, temperature=1.0,
                                  generator=torch.Generator().manual_seed(0)).tokens
    out = speculative_sample(tiny, tiny, np.array([1, 2, 3]), np.int64(5), lookahead=np.int32(2), top_k=np.int64(2),
                             temperature=np.float64(1.0), eos_token_id=np.int64(99),
                             generator=torch.Generator().manual_seed(0))
    assert out.tokens == expected
    assert autoregressive_sample(tiny, [np.int64(1), 2, 3], np.int64(3)).tokens == \
        autoregressive_sample(tiny, [1, 2, 3], 3).tokens
    # Exact mode's row count too (it is an argument of the samplers, as every other).
    assert autoregressive_sample(tiny, [1, 2, 3], 6, exact=np.int64(8)).tokens == \
        speculative_sample(tiny, tiny, [1, 2, 3], 6, lookahead=np.int64(3), exact=np.int32(8)).tokens


@pytest.mark.parametrize("prompt", [torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), np.array([[1.5, 2.0]]),
                                    torch.tensor([[True, False]])])
def test_a_two_dimensional_prompt_that_is_not_integer_is_named_whole(tiny, prompt):
    for run in (lambda: speculative_sample(tiny, tiny, prompt, 4), lambda: autoregressive_sample(tiny, prompt, 4)):
        with pytest.raises(ValueError, match=r"prompt must hold integer token ids: got a batch \(shape \[\d+, \d+\]\)"
                                             r" of (torch\.)?(float|bool)") as e:
            run()
        assert "\n" not in str(e.value)


def test_an_unreadable_checkpoint_says_so(reference_folder, tmp_path, monkeypatch):
    folder = copy_checkpoint(reference_folder, tmp_path)
    real_open = open

    def refuse(path, *args, **kwargs):
        if str(path) == str(folder / "model.safetensors"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refuse)  # as root, chmod 000 would not stop the test itself
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot be read \(Permission denied\)") as error:
        GPT2.from_pretrained(folder)
    assert "delete" not in str(error.value) and "corrupt" not in str(error.value)


class NotATensor:
    pass


def test_a_pickle_that_would_run_code_is_refused_in_one_line(reference_folder, tmp_path):
    torch.save({"wte.weight": torch.zeros(3), "extra": NotATensor()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_bytes((reference_folder[0] / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match="refused: unpickling it would run code.*use a safetensors") as error:
        GPT2.from_pretrained(tmp_path)
    assert "\n" not in str(error.value) and "weights_only=False" not in str(error.value)


def test_a_preset_name_means_the_preset_not_a_folder_of_that_name(reference_folder, tmp_path, monkeypatch):
    copy_checkpoint(reference_folder, tmp_path / "gpt2")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match=r"no checkpoint for gpt2 in .*weights.gpt2 or the Hugging Face cache"):
        find_checkpoint("gpt2", weights_dir=tmp_path / "weights", allow_download=False)
    assert find_checkpoint("./gpt2").resolve() == tmp_path / "gpt2"  # a path is a folder
    assert find_checkpoint(tmp_path / "gpt2") == tmp_path / "gpt2"


@pytest.mark.parametrize("broken", ["target", "draft"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_are_named(broken, temperature, value):
    target, draft = random_model(TINY, seed=0, scale=5), random_model(TINY, seed=1, scale=5)
    with torch.no_grad():
        (target if broken == "target" else draft).h[0].mlp.c_fc.weight.fill_(value)
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=f"the {broken} model produced NaN or infinite logits"):
        speculative_sample(target, draft, [1, 2, 3], 8, temperature=temperature, generator=generator)
    if broken == "target":
        with pytest.raises(ValueError, match="the model produced NaN or infinite logits"):
            autoregressive_sample(target, [1, 2, 3], 8, temperature=temperature, generator=generator)


def test_a_tensor_under_two_names_is_refused(reference_folder, tmp_path):
    def duplicate(t):
        t["wpe.weight"] = t["transformer.wpe.weight"].clone()

    with pytest.raises(CheckpointError, match="holds 'wpe.weight' twice"):
        GPT2.from_pretrained(copy_checkpoint(reference_folder, tmp_path, duplicate))


# The command line -----------------------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "speculative.py"), *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_refuses_a_vocabulary_larger_than_the_tokenizer(tmp_path):
    random_model(GPT2Config(vocab_size=50304, n_positions=64, n_embd=16, n_layer=1, n_head=2), 0).save_pretrained(
        tmp_path / "padded")
    result = run_cli("--target", str(tmp_path / "padded"), "--mode", "plain", "--max-new-tokens", "4")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the target has 50304 tokens, more than the GPT-2 tokenizer's 50257" in result.stderr


@pytest.mark.slow
def test_cli_escapes_control_characters_in_what_it_prints(tmp_path):
    random_model(GPT2Config(n_positions=64, n_embd=16, n_layer=1, n_head=2), 0).save_pretrained(tmp_path / "m")
    for stream in ([], ["--no-stream"]):
        result = run_cli("--target", str(tmp_path / "m"), "--draft", str(tmp_path / "m"), "--max-new-tokens", "4",
                         "--prompt", "ok \x1b[2J\x1b]0;title\x07 done", *stream)
        assert result.returncode == 0, result.stderr
        assert "\x1b" not in result.stdout and "\x07" not in result.stdout
        assert "ok ␛[2J␛]0;title␇ done" in result.stdout


def test_a_preset_folder_holding_another_shape_is_refused(reference_folder, tmp_path):
    copy_checkpoint(reference_folder, tmp_path / "weights" / "gpt2")  # 3 layers, 96 wide: not gpt2
    with pytest.raises(CheckpointError, match="holds a model with n_layer=3.*not the preset gpt2"):
        GPT2.from_pretrained("gpt2", weights_dir=tmp_path / "weights", download=False)


@pytest.mark.parametrize("options, message", [
    (dict(dtype="float64"), "dtype='float64' is not supported"),
    (dict(dtype=torch.int8), "dtype=torch.int8 is not supported"),
    (dict(device="tpu"), "unknown device 'tpu'"),
    (dict(device="cuda:7"), "cuda"),
])
def test_from_pretrained_checks_dtype_and_device(reference_folder, options, message):
    with pytest.raises(ValueError, match=message) as error:
        GPT2.from_pretrained(reference_folder[0], **options)
    assert "\n" not in str(error.value)


def test_from_pretrained_takes_dtype_names(reference_folder):
    assert GPT2.from_pretrained(reference_folder[0], dtype="bfloat16").wte.weight.dtype == torch.bfloat16


def test_the_download_command_is_offline_too(reference_folder, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    script = ["-m", "speculative_gpt2.checkpoints"]
    result = subprocess.run([sys.executable, *script, "gpt2", "--weights-dir", str(tmp_path / "w")], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, env=os.environ | env)
    assert result.returncode == 2 and "HF_HUB_OFFLINE is set" in result.stderr and "tries" not in result.stderr
    assert "set HF_ENDPOINT to a mirror" not in result.stderr  # no advice that needs the network
    assert "speculative_gpt2.random_checkpoint gpt2 " in result.stderr and "random-gpt2" in result.stderr
    copy_checkpoint(reference_folder, tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots" / "abc")
    result = subprocess.run([sys.executable, *script, "gpt2", "--weights-dir", str(tmp_path / "w")], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, env=os.environ | env)
    assert result.returncode == 0 and result.stdout.strip().endswith("snapshots/abc")  # found, not downloaded


def test_snapshots_without_refs_main_are_named(reference_folder, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots"
    for name in ("aaaa", "bbbb"):
        copy_checkpoint(reference_folder, repo / name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="it has snapshots aaaa, bbbb of openai-community/gpt2 but no refs/main"):
        find_checkpoint("gpt2", weights_dir=tmp_path / "w", allow_download=False)
