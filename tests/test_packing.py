"""oneDNN packing (speculative_gpt2/packing.py): the same model, its products on packed weights, which cannot go stale.

Tried as an adversary would: fused optimizers, `.data` writes, optimizers made before packing, loading a state
dict, moving, copying, pickling, autocast, autograd and running out of memory mid-way.
"""

import copy
import pickle

import pytest
import torch
import torch.nn as nn

from gpt2_model import GPT2, GPT2Config
from speculative import autoregressive_sample, speculative_sample
from speculative_gpt2 import packing
from speculative_gpt2.drafters import PromptLookupDrafter
from speculative_gpt2.errors import OutOfMemory
from speculative_gpt2.int8 import quantize_int8
from speculative_gpt2.machine import native_bfloat16
from speculative_gpt2.packing import FrozenEmbedding, PackedLinear, pack, pack_linears, unpack_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="this torch build has no oneDNN: pack_linears packs nothing")
TOL = 1e-5


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=97, n_positions=32)).eval()


def _idx(seed, shape=(2, 6)):
    return torch.randint(0, 97, shape, generator=torch.Generator().manual_seed(seed))


def _linear_count(model):
    return sum(isinstance(m, nn.Linear) for m in model.modules())


def _logits(model, idx):
    with torch.no_grad():
        return model(idx)


def test_packing_swaps_every_linear_and_keeps_what_the_model_computes():
    model, idx = _tiny_model(), _idx(1)
    expected, n_linear = _logits(model, idx), _linear_count(model)
    assert pack_linears(model) is model
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == n_linear and _linear_count(model) == 0  # the tied LM head too
    assert isinstance(model.wte, FrozenEmbedding)
    torch.testing.assert_close(_logits(model, idx), expected, atol=TOL, rtol=0)
    tables = [m.packed for m in packed]
    pack_linears(model)  # again: nothing to do, nothing made anew
    assert [m.packed for m in model.modules() if isinstance(m, PackedLinear)] == tables
    # Every pass runs on the packed weights: spoil one and the logits change.
    c_fc = model.h[0].mlp.c_fc
    c_fc.packed = pack(torch.zeros(c_fc.out_features, c_fc.in_features))
    assert not torch.allclose(_logits(model, idx), expected, atol=1e-3)


def test_a_packed_weight_is_the_only_copy_and_cannot_be_reached_to_write():
    model = pack_linears(_tiny_model())
    params = dict(model.named_parameters())
    assert not any(name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for name in params)
    assert "wte.weight" not in params and "lm_head.weight" not in params
    with pytest.raises(AttributeError, match="packed for oneDNN.*unpack_linears"):
        model.h[0].mlp.c_fc.weight
    with pytest.raises(AttributeError, match="tied to the packed LM head.*unpack_linears"):
        model.wte.weight


def test_optimizers_data_writes_and_old_references_cannot_make_a_stale_copy():
    model, idx = _tiny_model(), _idx(2)
    old_wte, old_c_fc = model.wte.weight, model.h[0].mlp.c_fc.weight
    weights = [model.wte.weight] + [m.weight for m in model.modules() if isinstance(m, nn.Linear)
                                    and m.weight is not model.wte.weight]  # what packing packs
    before_packing = torch.optim.AdamW(weights, lr=1.0, fused=True)
    pack_linears(model)
    expected = _logits(model, idx)
    # An optimizer made before packing writes into the old Parameters; one made after sees none of the weights.
    for p in before_packing.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    before_packing.step()
    old_wte.data.mul_(3)  # `.data` writes bump no version counter
    old_c_fc.data.zero_()
    assert all(not p.requires_grad for p in model.parameters())  # an inference model
    torch.testing.assert_close(_logits(model, idx), expected, atol=TOL, rtol=0)


def test_state_dict_gives_copies_and_load_state_dict_packs_what_it_loads():
    model, other, idx = pack_linears(_tiny_model(0)), _tiny_model(1), _idx(3)
    state = model.state_dict()
    assert set(state) == set(other.state_dict())
    for key in ("wte.weight", "lm_head.weight", "h.0.mlp.c_fc.weight", "h.1.attn.c_attn.weight"):
        state[key].add_(1.0)  # the packed weights' entries are copies: the model does not change
    torch.testing.assert_close(_logits(model, idx), _logits(_tiny_model(0), idx), atol=TOL, rtol=0)
    model.load_state_dict(other.state_dict())  # loaded, then packed: never the old weights
    torch.testing.assert_close(_logits(model, idx), _logits(other, idx), atol=TOL, rtol=0)


def test_moving_or_converting_a_packed_model_is_refused_in_one_line():
    model = pack_linears(_tiny_model())
    assert model.to(torch.float32).cpu() is model  # no move: allowed
    for move in (lambda m: m.double(), lambda m: m.to(torch.bfloat16), lambda m: m.half()):
        with pytest.raises(ValueError, match=r"packed for oneDNN on the CPU in float32.*unpack_linears\(model\)"):
            move(model)


def test_copies_and_pickles_are_packed_and_equal():
    model, idx = pack_linears(_tiny_model()), _idx(6, (1, 6))
    expected = _logits(model, idx)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert isinstance(other.lm_head, PackedLinear) and other.lm_head.packed is not model.lm_head.packed
        torch.testing.assert_close(_logits(other, idx), expected, atol=0, rtol=0)


def test_unpacking_gives_plain_modules_with_the_same_weights_back():
    plain, idx = _tiny_model(), _idx(7)
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    model = unpack_linears(pack_linears(_tiny_model()))
    assert _linear_count(model) == _linear_count(plain) and isinstance(model.wte, nn.Embedding)
    assert model.lm_head.weight is model.wte.weight  # tied again
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.requires_grad for p in model.parameters())
    model(idx).sum().backward()  # trainable again
    assert model.h[0].mlp.c_fc.weight.grad is not None


def test_autocast_and_autograd_step_aside_to_f_linear():
    model, idx = pack_linears(_tiny_model()), _idx(8, (1, 6))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(idx).dtype == torch.bfloat16
    x = torch.randn(3, 64, requires_grad=True)  # an input that wants gradients: F.linear on a dense copy
    layer = model.h[0].mlp.c_fc
    out = layer(x)
    out.sum().backward()
    torch.testing.assert_close(x.grad, layer.dense_weight().sum(0).expand(3, 64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("DefaultCPUAllocator: not enough memory: you tried "
                                                               "to allocate 6400000000 bytes.")])
def test_running_out_of_memory_while_packing_leaves_the_model_as_it_was(monkeypatch, error):
    model, made, real_pack, idx = _tiny_model(), [], packing.pack, _idx(9)
    expected = _logits(model, idx)

    def pack_twice(weight, rows=packing.PACK_ROWS):  # memory runs out at the third packed weight
        if len(made) == 2:
            raise error
        made.append(weight)
        return real_pack(weight, rows)

    monkeypatch.setattr(packing, "pack", pack_twice)
    with pytest.raises(ValueError, match="out of memory while packing the weights .* runs unpacked"):
        pack_linears(model)
    assert len(made) == 2 and not any(isinstance(m, (PackedLinear, FrozenEmbedding)) for m in model.modules())
    assert model.lm_head.weight is model.wte.weight
    torch.testing.assert_close(_logits(model, idx), expected, atol=0, rtol=0)


def test_packing_inside_inference_mode_and_elsewhere():
    model = _tiny_model()
    with torch.inference_mode():  # as inside the samplers
        pack_linears(model)
    assert isinstance(model.lm_head, PackedLinear)
    assert not any(p.is_inference() for p in unpack_linears(model).parameters())
    # bfloat16 is packed where the CPU runs it natively, else left as it is; float16 never.
    bf16 = pack_linears(_tiny_model().to(torch.bfloat16))
    assert _linear_count(bf16) == (0 if native_bfloat16() else _linear_count(_tiny_model()))
    assert _linear_count(pack_linears(_tiny_model().to(torch.float16))) == _linear_count(_tiny_model())


def test_samplers_on_a_packed_model_give_the_plain_models_text():
    plain, prompt = _tiny_model(), [3, 5, 7, 11]
    expected = autoregressive_sample(plain, prompt, 20).tokens
    model = pack_linears(_tiny_model())
    assert autoregressive_sample(model, prompt, 20).tokens == expected
    assert speculative_sample(model, PromptLookupDrafter(), prompt, 20, exact=True).tokens == \
        autoregressive_sample(model, prompt, 20, exact=5).tokens


def test_packed_linear_computes_what_f_linear_does():
    gen = torch.Generator().manual_seed(5)
    w, b = torch.randn(48, 32, generator=gen), torch.randn(48, generator=gen)
    for bias in (b, None):
        layer = PackedLinear(w, bias)
        for shape in ((1, 1, 32), (1, 5, 32), (3, 2, 32), (40, 32)):
            x = torch.randn(*shape, generator=gen)
            with torch.no_grad():
                torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, bias), atol=1e-5, rtol=0)


@pytest.mark.skipif(not native_bfloat16(), reason="this CPU has no native bfloat16: bfloat16 models are not packed")
def test_bfloat16_is_packed_where_native_and_keeps_what_the_model_computes():
    model, idx = _tiny_model().to(torch.bfloat16), _idx(10)
    expected = _logits(model, idx)
    pack_linears(model)
    assert _linear_count(model) == 0 and model.lm_head.packed.dtype == torch.bfloat16
    torch.testing.assert_close(_logits(model, idx), expected, atol=0.05, rtol=0.02)  # bfloat16's rounding
    other = pack_linears(_tiny_model(1).to(torch.bfloat16))
    other.load_state_dict(model.state_dict())  # loaded in bfloat16, packed again: the same model
    assert torch.equal(_logits(other, idx), _logits(model, idx))
    with pytest.raises(ValueError, match=r"packed for oneDNN on the CPU in bfloat16.*unpack_linears"):
        model.float()
    assert unpack_linears(model).h[0].mlp.c_fc.weight.dtype == torch.bfloat16


def _load_outcome(model, state, strict):
    """What load_state_dict does to `model`: its error message or returned keys, and the logits after."""
    try:
        result = model.load_state_dict(state, strict=strict)
        outcome = (sorted(result.missing_keys), sorted(result.unexpected_keys))
    except RuntimeError as e:
        outcome = str(e)
    return outcome, _logits(model, _idx(11))


def _state_dicts():
    """State dicts a user may load: whole, hub-style without the tied head, with the head and the embedding apart,
    a wrong shape, a stray key, a missing layer."""
    full = _tiny_model(2).state_dict()
    other = _tiny_model(3).state_dict()
    wrong = dict(full)
    wrong["h.0.attn.c_attn.weight"] = torch.zeros(3 * 64, 32)
    return {
        "whole": (full, True),
        "without lm_head.weight": ({k: v for k, v in full.items() if k != "lm_head.weight"}, False),
        "lm_head apart from wte": (full | {"lm_head.weight": other["lm_head.weight"]}, True),
        "wte apart from lm_head": (full | {"wte.weight": other["wte.weight"]}, False),
        "a wrong shape": (wrong, True),
        "a stray key": (full | {"h.0.mlp.c_fc.scale": torch.ones(1)}, False),
        "a missing layer": ({k: v for k, v in full.items() if not k.startswith("h.1.mlp.c_fc")}, False),
    }


@pytest.mark.parametrize("case", list(_state_dicts()))
def test_a_packed_model_loads_what_the_plain_model_loads_and_refuses_what_it_refuses(case):
    state, strict = _state_dicts()[case]
    plain, packed = _tiny_model(), pack_linears(_tiny_model())
    plain_outcome, plain_logits = _load_outcome(plain, state, strict)
    packed_outcome, packed_logits = _load_outcome(packed, state, strict)
    assert packed_outcome == plain_outcome
    torch.testing.assert_close(packed_logits, plain_logits, atol=TOL, rtol=0)
    # The head stays tied to the embedding, as the plain model's is: unpacking gives the plain model back.
    torch.testing.assert_close(_logits(unpack_linears(packed), _idx(11)), plain_logits, atol=TOL, rtol=0)
    assert packed.lm_head.weight is packed.wte.weight


@pytest.mark.parametrize("convert", [lambda m: m.h[0].half(), lambda m: m.h.double(), lambda m: m.h[1].mlp.half(),
                                     lambda m: m.to(torch.float16)])
def test_converting_part_of_a_packed_model_is_refused_before_anything_changes(convert):
    model, idx = pack_linears(_tiny_model()), _idx(12)
    expected = _logits(model, idx)
    with pytest.raises(ValueError, match="packed for oneDNN .*unpack_linears"):
        convert(model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the layer norms too
    assert torch.equal(_logits(model, idx), expected)
    copy.deepcopy(model).h[0].float()  # a conversion that changes nothing is allowed, in copies too


def test_unpacking_a_model_made_under_inference_mode_gives_a_model_that_runs_and_trains():
    with torch.inference_mode():
        model = _tiny_model()
    idx = _idx(13)
    expected = _logits(pack_linears(model), idx)
    unpack_linears(model)
    assert not any(p.is_inference() for p in model.parameters()) and model.lm_head.weight is model.wte.weight
    loss = model(idx).sum()  # outside no_grad: the forward records, and gradients flow
    loss.backward()
    assert model.h[0].ln_1.weight.grad is not None
    torch.testing.assert_close(_logits(model, idx), expected, atol=TOL, rtol=0)


# Which layout runs a model's passes faster -------------------------------------------------------------------------


def test_a_model_read_from_the_caches_is_packed_without_a_measurement(monkeypatch):
    monkeypatch.setattr(packing, "_plain_seconds", lambda *a: pytest.fail("a tiny model was measured"))
    assert packing.packing_pays(_tiny_model(), 1) and packing.packing_pays(_tiny_model(), 5)


@pytest.fixture
def measured(monkeypatch):
    """A model above MEASURED_ABOVE whose products' times are given: {rows: (plain s, packed s)}; counts the
    measurements made."""
    monkeypatch.setattr(packing, "MEASURED_ABOVE", 0)
    monkeypatch.setattr(packing, "_verdicts", {})
    times, counted = {}, []
    monkeypatch.setattr(packing, "_plain_seconds", lambda weights, rows: counted.append(rows) or times[rows][0])
    monkeypatch.setattr(packing, "_packed_seconds", lambda weights, rows: times[rows][1])
    return times, counted


def test_plain_weights_must_be_clearly_faster_and_each_row_count_is_measured_once(measured):
    times, counted = measured
    times.update({1: (1.0, 1.2), 2: (1.0, 1.05), 5: (1.6, 1.0)})  # plain 1.2x faster; a near tie; packed faster
    model = _tiny_model()
    assert [packing.packing_pays(model, rows) for rows in (1, 2, 5, 1, 2, 5)] == [False, True, True] * 2
    assert counted == [1, 2, 5]  # once per process, shape and row count


def test_lay_out_switches_layouts_and_each_layout_computes_what_it_did(measured):
    times, _ = measured
    times.update({1: (1.0, 2.0), 5: (2.0, 1.0)})
    model, idx = _tiny_model(), _idx(2)
    plain = _logits(model, idx)
    assert packing.lay_out(model, 5) and isinstance(model.lm_head, PackedLinear)
    packed = _logits(model, idx)
    assert not packing.lay_out(model, 5)  # already so
    assert packing.lay_out(model, 1) and not isinstance(model.lm_head, PackedLinear)
    assert torch.equal(_logits(model, idx), plain)
    assert packing.lay_out(model, 5) and torch.equal(_logits(model, idx), packed)


def test_the_command_line_times_each_run_in_the_layout_its_passes_prefer(measured, monkeypatch, run_cli, tmp_path):
    # Here 1-row products prefer plain weights, more rows packed ones: plain decoding and the draft run plain,
    # the verifications and exact mode's padded passes packed, and the texts still compare equal.
    times, _ = measured
    times.update({1: (1.0, 2.0), 8: (2.0, 1.0)})
    from speculative_gpt2 import cli

    for name in ("autoregressive_sample", "speculative_sample"):
        def recorded(target, *args, _run=getattr(cli, name), _name=name, **kwargs):
            draft = args[0] if _name == "speculative_sample" else None
            seen.append((_name, kwargs.get("exact") is not None, isinstance(target.lm_head, PackedLinear),
                         draft is not None and isinstance(draft.lm_head, PackedLinear)))
            return _run(target, *args, **kwargs)
        monkeypatch.setattr(cli, name, recorded)
    seen = []
    config = GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2)
    for role, seed in (("target", 0), ("draft", 1)):
        torch.manual_seed(seed)
        GPT2(config).save_pretrained(tmp_path / role)
    status, out, err = run_cli("--target", tmp_path / "target", "--draft", tmp_path / "draft", "--prompt", "Hello",
                               "--max-new-tokens", "6", "--ignore-eos", "--device", "cpu", "--dtype", "float32",
                               "--lookahead", "4", "--no-stream")
    assert status == 0, err
    assert set(seen) == {("autoregressive_sample", False, False, False), ("autoregressive_sample", True, True, False),
                         ("speculative_sample", True, True, False)}, seen
    assert "target: weights plain (F.linear) for its 1-row passes" in err
    assert "target: weights packed for oneDNN for its 8-row passes" in err
    assert "identical outputs: yes" in out


def test_a_layout_that_ran_out_of_memory_is_left_and_not_tried_again(measured, monkeypatch):
    times, _ = measured
    times.update({5: (2.0, 1.0)})
    calls = []

    def no_memory(model, rows=packing.PACK_ROWS):
        calls.append(rows)
        raise OutOfMemory("out of memory while packing the weights for oneDNN")

    monkeypatch.setattr(packing, "pack_linears", no_memory)
    model, idx = _tiny_model(), _idx(3)
    plain = _logits(model, idx)
    with pytest.raises(OutOfMemory):
        packing.lay_out(model, 5)
    assert not packing.lay_out(model, 5) and len(calls) == 1  # said once; the model keeps running as it was
    assert not isinstance(model.lm_head, PackedLinear) and torch.equal(_logits(model, idx), plain)


def test_int8_weights_are_never_laid_out(measured):
    model = quantize_int8(_tiny_model())
    assert not packing.packing_pays(model, 1) and not packing.lay_out(model, 5)
