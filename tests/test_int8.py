"""Weight-only int8 (speculative_gpt2/int8.py): the rounding it makes, and what it changes in decoding: a draft's
int8 weights change how many drafts are kept, never the text; an int8 target's text is the int8 model's, which
speculative sampling keeps exactly."""

import re

import pytest
import torch
import torch.nn.functional as F

from gpt2_model import GPT2, GPT2Config
from speculative import autoregressive_sample, speculative_sample
from speculative_gpt2.int8 import Int8Linear, is_int8, quantize_int8, quantize_rows
from speculative_gpt2.packing import pack_linears


def _model(seed=0, dtype=torch.float32, n_layer=2):
    torch.manual_seed(seed)
    return GPT2(GPT2Config(n_layer=n_layer, n_head=2, n_embd=64, vocab_size=97, n_positions=64)).eval().to(dtype)


def test_rows_round_to_int8_within_half_a_step_of_their_scale():
    weight = torch.randn(48, 40, generator=torch.Generator().manual_seed(0))
    weight[3] = 0  # an all-zero row keeps a positive scale
    int8, scales = quantize_rows(weight)
    assert int8.dtype == torch.int8 and int8.abs().max() <= 127 and (scales > 0).all()
    assert ((int8.float() * scales[:, None] - weight).abs() <= scales[:, None] / 2 + 1e-7).all()
    assert (int8.abs().amax(1)[torch.arange(48) != 3] == 127).all()  # each row's largest weight uses the full range
    # Scales stored in bfloat16 (as Int8Linear keeps them): the values are rounded against the stored scale, the
    # largest clamped where the scale rounded down, so each stays within a step of it.
    int8, scales = quantize_rows(weight, torch.bfloat16)
    assert scales.dtype == torch.bfloat16
    off = (int8.float() * scales.float()[:, None] - weight).abs()
    assert (off <= scales.float()[:, None]).all() and (off.mean() < scales.float().mean() / 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_int8_linear_computes_the_product_with_its_rounded_weight(dtype):
    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(48, 64, generator=gen), torch.randn(48, generator=gen)
    layer = Int8Linear(weight, bias, dtype)
    int8, scales = quantize_rows(weight, torch.bfloat16)  # as the layer stores them
    for shape in ((1, 1, 64), (2, 5, 64), (7, 64)):
        x = torch.randn(*shape, generator=gen).to(dtype)
        # The product's activations and scales in bfloat16 (8 bits of mantissa), its sum in float32.
        expected = F.linear(x.bfloat16().float(), int8.float() * scales.float()[:, None], bias)
        tolerance = 0.02 if dtype == torch.float32 else 0.1
        assert layer(x).dtype == dtype
        torch.testing.assert_close(layer(x).float(), expected, atol=tolerance, rtol=tolerance)
        if dtype == torch.float32:  # and they were rounded: the product of the unrounded ones is another
            assert (F.linear(x, int8.float() * scales.float()[:, None], bias) - layer(x)).abs().max() > 1e-4


def test_an_int8_draft_changes_the_acceptance_never_the_text():
    target, prompt = _model(0, n_layer=2), [3, 5, 7, 11]
    draft = quantize_int8(_model(0, n_layer=2))  # the target's own weights, rounded: kept often, not always
    assert is_int8(draft) and not is_int8(target)
    expected = autoregressive_sample(target, prompt, 30).tokens
    out = speculative_sample(target, draft, prompt, 30, lookahead=4)
    assert out.tokens == expected and out.accepted > 0
    sampled = speculative_sample(target, draft, prompt, 30, temperature=1.0, coupled=True, seed=3)
    assert sampled.tokens == autoregressive_sample(target, prompt, 30, temperature=1.0, coupled=True, seed=3).tokens


def test_an_int8_target_gives_the_int8_models_text_exactly():
    target, draft, prompt = quantize_int8(_model(0)), _model(1, n_layer=1), [2, 4, 6]
    assert speculative_sample(target, draft, prompt, 24, lookahead=3, exact=True).tokens == \
        autoregressive_sample(target, prompt, 24, exact=4).tokens
    with torch.no_grad():  # another model: the rounding moves its logits
        idx = torch.tensor([prompt])
        assert not torch.allclose(target(idx), _model(0)(idx), atol=1e-4)


def test_a_conversion_to_the_models_own_dtype_leaves_the_product_as_it_was():
    model, idx = quantize_int8(_model(0)), torch.tensor([[2, 4, 6]])
    with torch.no_grad():
        before = model(idx)
        assert torch.equal(model.float()(idx), before)  # .float() converts every floating buffer, the scales too


def test_what_int8_refuses_in_one_line():
    with pytest.raises(ValueError, match="int8 weights run on the CPU in float32 or bfloat16; this model is float16"):
        quantize_int8(_model(dtype=torch.float16))
    with pytest.raises(ValueError, match="plain Linear layers, not PackedLinear"):
        quantize_int8(pack_linears(_model()))
    with pytest.raises(ValueError, match="int8 .*load the model again"):
        quantize_int8(_model()).half()
    narrow = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=24, vocab_size=97, n_positions=64))
    with pytest.raises(ValueError, match="width is a multiple of 32 .* n_embd is 24"):
        quantize_int8(narrow)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from speculative_gpt2.random_checkpoint import noisy_copy, random_model

    folder = tmp_path_factory.mktemp("int8")
    config = GPT2Config(n_positions=128, n_embd=64, n_layer=2, n_head=2)  # the real vocabulary
    target = random_model(config, seed=0, scale=5)
    target.save_pretrained(folder / "target")
    noisy_copy(target, noise=0.05, seed=1).save_pretrained(folder / "draft")
    return folder


def test_the_command_line_runs_an_int8_draft_and_says_so(checkpoints, run_cli):
    status, out, err = run_cli("--target", checkpoints / "target", "--draft", checkpoints / "draft", "--int8", "draft",
                               "--max-new-tokens", "12", "--ignore-eos", "--dtype", "float32", "--no-stream")
    assert status == 0, err
    assert "weights in int8" in next(line for line in out.splitlines() if line.startswith("draft:"))
    assert "weights in int8" not in next(line for line in out.splitlines() if line.startswith("target:"))
    assert "identical outputs: yes" in out


@pytest.mark.parametrize("args,message", [
    (["--int8", "draft", "--dtype", "float16", "--device", "cpu"],  # the fix names what to change, not the device
     r"--int8 runs on the CPU in float32 or bfloat16, not float16 on cpu: use --dtype float32 or bfloat16 \(or"),
    (["--int8", "both", "--draft", "ngram"], "--int8 both quantizes the draft model, and this run has none"),
    (["--int8", "draft", "--mode", "plain"], "--int8 draft quantizes the draft model, .*--mode plain"),
])
def test_int8_that_cannot_run_is_refused_before_loading(checkpoints, refused_before_loading, args, message):
    err = refused_before_loading("--target", checkpoints / "target", "--draft", checkpoints / "draft", *args)
    assert re.search(message, err), err
