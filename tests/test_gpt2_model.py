"""The from-scratch GPT-2 against `transformers` on the same weights, its KV cache, and its loader's errors."""

import gc
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from speculative_gpt2.checkpoints import find_checkpoint
import gpt2_model
from gpt2_model import GPT2, GPT2Config, KVCache
from speculative_gpt2.cuda_graphs import CUDAGraphRunner
from speculative_gpt2.errors import CheckpointError

TOL = 1e-4  # fp32; the measured gap is about 1e-6


def reference_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def assert_parity(folder_or_model, reference, seed=1):
    ours = folder_or_model if isinstance(folder_or_model, GPT2) else GPT2.from_pretrained(folder_or_model)
    idx = torch.randint(0, 50257, (2, 23), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), reference_logits(reference, idx), atol=TOL, rtol=0)
    return ours


def test_parity_with_transformers_save_pretrained_layout(reference_folder):
    folder, reference = reference_folder
    assert next(iter(load_file(folder / "model.safetensors"))).startswith("transformer.")
    ours = assert_parity(folder, reference)
    assert not ours.training
    assert ours.wte.weight.dtype == torch.float32


def test_parity_with_hub_layout_and_mask_buffers(reference_folder, tmp_path):
    # The hub's files: no prefix, Conv1D weights, and causal-mask buffers that must be skipped.
    folder, reference = reference_folder
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(folder / "model.safetensors").items()}
    for i in range(reference.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 1024, 1024))
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    assert_parity(tmp_path, reference)


def test_parity_with_pytorch_model_bin(reference_folder, tmp_path):
    folder, reference = reference_folder
    state = load_file(folder / "model.safetensors") | {"lm_head.weight": reference.lm_head.weight.detach()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    assert_parity(tmp_path, reference)


def test_save_pretrained_round_trip_is_exact(reference_folder, tmp_path):
    folder, reference = reference_folder
    ours = GPT2.from_pretrained(folder)
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    saved = load_file(tmp_path / "model.safetensors")
    assert "h.0.attn.c_attn.weight" in saved and saved["h.0.attn.c_attn.weight"].shape == (96, 288)  # [in, out]
    again = GPT2.from_pretrained(tmp_path)
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert again.config == ours.config
    assert_parity(tmp_path, reference)


def test_transformers_reads_our_save_pretrained(reference_folder, tmp_path):
    from transformers import GPT2LMHeadModel

    folder, reference = reference_folder
    GPT2.from_pretrained(folder).save_pretrained(tmp_path)
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 50257, (1, 9))
    torch.testing.assert_close(reference_logits(theirs, idx), reference_logits(reference, idx), atol=TOL, rtol=0)


def test_cache_one_and_several_tokens_at_a_time_match_full_pass(reference_folder):
    folder, reference = reference_folder
    model = GPT2.from_pretrained(folder)
    idx = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(batch_size=2)
        pieces = [model(idx[:, :6], cache=cache)]  # a prompt
        pieces += [model(idx[:, t : t + 1], cache=cache) for t in range(6, 10)]  # one at a time
        pieces += [model(idx[:, 10:15], cache=cache), model(idx[:, 15:], cache=cache)]  # verification-sized
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=TOL, rtol=0)
    torch.testing.assert_close(full, reference_logits(reference, idx), atol=TOL, rtol=0)


def test_crop_then_refeed_different_tokens(reference_folder):
    model = GPT2.from_pretrained(reference_folder[0])
    gen = torch.Generator().manual_seed(3)
    prefix, rejected, replacement = (torch.randint(0, 50257, (1, n), generator=gen) for n in (8, 5, 4))
    with torch.no_grad():
        cache = model.new_cache()
        model(prefix, cache=cache)
        model(rejected, cache=cache)
        cache.crop(10)  # keep the prefix and two of the five: stale entries at 10..12 must not leak
        after_crop = model(replacement, cache=cache)
        full = model(torch.cat([prefix, rejected[:, :2], replacement], dim=1))
    assert cache.length == 14
    torch.testing.assert_close(after_crop, full[:, 10:], atol=TOL, rtol=0)


def test_context_overflow_and_bad_crop_raise():
    model = GPT2(GPT2Config(n_positions=16, n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    cache = model.new_cache(max_len=8)
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="context is full"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    assert cache.length == 6  # the failed call changed nothing
    with pytest.raises(ValueError, match="cannot crop the cache to 7"):
        cache.crop(7)
    with pytest.raises(ValueError, match="context is full"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len"):
        model.new_cache(max_len=17)


def test_bfloat16_and_dtype_option(reference_folder):
    model = GPT2.from_pretrained(reference_folder[0], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(torch.zeros(1, 3, dtype=torch.long)).dtype == torch.bfloat16


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_model_does_not_keep_the_checkpoint_mapped(reference_folder, tmp_path, dtype):
    GPT2.from_pretrained(reference_folder[0]).save_pretrained(tmp_path)  # hub layout: wte needs no transpose
    model = GPT2.from_pretrained(tmp_path, dtype=dtype)
    gc.collect()
    assert str(tmp_path / "model.safetensors") not in Path("/proc/self/maps").read_text()
    assert model.wte.weight.dtype == dtype


def test_presets_and_config_json(tmp_path):
    assert GPT2Config.from_name("gpt2-xl") == GPT2Config(n_layer=48, n_head=25, n_embd=1600)
    assert GPT2Config.from_name("distilgpt2").n_layer == 6
    with pytest.raises(ValueError, match="unknown GPT-2 preset 'gpt3'"):
        GPT2Config.from_name("gpt3")
    (tmp_path / "config.json").write_text(json.dumps({"n_layer": 2, "n_head": 4, "n_embd": 64, "use_cache": True}))
    assert GPT2Config.from_json(tmp_path / "config.json") == GPT2Config(n_layer=2, n_head=4, n_embd=64)
    for unsupported in ({"activation_function": "relu"}, {"scale_attn_weights": False}, {"n_inner": 100}):
        (tmp_path / "config.json").write_text(json.dumps({"n_layer": 2, "n_head": 4, "n_embd": 64} | unsupported))
        with pytest.raises(ValueError, match="not supported"):
            GPT2Config.from_json(tmp_path / "config.json")


# Loader errors ------------------------------------------------------------------------------------------


def rewritten_checkpoint(reference_folder, tmp_path, edit):
    folder, _ = reference_folder
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    return tmp_path


def test_missing_tensor_is_named(reference_folder, tmp_path):
    folder = rewritten_checkpoint(reference_folder, tmp_path, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'h\.1\.mlp\.c_fc\.bias' is missing"):
        GPT2.from_pretrained(folder)


def test_wrong_shape_is_named(reference_folder, tmp_path):
    def edit(t):
        t["transformer.wpe.weight"] = torch.zeros(512, 96)

    folder = rewritten_checkpoint(reference_folder, tmp_path, edit)
    with pytest.raises(CheckpointError, match=r"'transformer\.wpe\.weight' has shape \[512, 96\], expected \[1024, 96\]"):
        GPT2.from_pretrained(folder)


def test_config_that_does_not_match_tensors(reference_folder, tmp_path):
    folder, _ = reference_folder
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"n_layer": 2}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'transformer.h.2.*n_layer=2"):
        GPT2.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config | {"n_embd": 128}))
    with pytest.raises(CheckpointError, match="has shape"):
        GPT2.from_pretrained(tmp_path)


def test_truncated_file(reference_folder, tmp_path):
    folder, _ = reference_folder
    data = (folder / "model.safetensors").read_bytes()
    for cut in (len(data) // 2, 100, 4):
        (tmp_path / "model.safetensors").write_bytes(data[:cut])
        (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
        with pytest.raises(CheckpointError, match="model.safetensors: cannot read the checkpoint, it may be truncated"):
            GPT2.from_pretrained(tmp_path)


def test_missing_files_without_download(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint for gpt2 in .* downloading is off"):
        GPT2.from_pretrained("gpt2", weights_dir=tmp_path, download=False)
    with pytest.raises(CheckpointError, match="no model.safetensors or pytorch_model.bin"):
        GPT2.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist, and it is not a preset"):
        GPT2.from_pretrained(tmp_path / "nowhere")


def test_preset_found_in_hugging_face_cache(reference_folder, tmp_path, monkeypatch):
    folder, reference = reference_folder
    snapshot = tmp_path / "hf" / "hub" / "models--openai-community--gpt2" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # any network use would fail

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    empty_weights = tmp_path / "weights"
    assert find_checkpoint("gpt2", weights_dir=empty_weights) == snapshot
    assert_parity(GPT2.from_pretrained("gpt2", weights_dir=empty_weights), reference)
    assert not empty_weights.exists()


# Static shapes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 5])
def test_cached_passes_match_a_full_pass_at_every_position_after_crops(reference_folder, rows):
    # As in speculative sampling: at every position, rows that get rejected are fed and cropped away first, then
    # the kept rows; the logits must equal a full pass's wherever the pass lands in the buffer.
    model = GPT2.from_pretrained(reference_folder[0])
    gen = torch.Generator().manual_seed(5)
    idx, junk = torch.randint(0, 50257, (1, 36), generator=gen), torch.randint(0, 50257, (1, rows), generator=gen)
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(max_len=40)
        model(idx[:, :1], cache=cache)
        for start in range(1, 36 - rows + 1, rows):
            model(junk, cache=cache)
            cache.crop(start)
            torch.testing.assert_close(model(idx[:, start : start + rows], cache=cache), full[:, start : start + rows],
                                       atol=1e-5, rtol=0)


def test_a_pass_over_the_whole_buffer_has_one_shape_anywhere_and_the_logits_of_its_span(monkeypatch):
    # forward_at(..., span=None) attends over the whole buffer, so the shapes of a T-token pass do not depend on
    # where it is (what a CUDA graph needs); `forward` attends over the key blocks in use only, and that changes
    # the work, not one bit of the result (the slots past a row's position add exact zeros).
    model = GPT2(GPT2Config(n_positions=600, n_embd=16, n_layer=1, n_head=2, vocab_size=50)).eval()
    shapes = []
    attend = gpt2_model.attend

    def record(q, k, v, mask):
        shapes.append((tuple(q.shape), tuple(k.shape), tuple(mask.shape)))
        return attend(q, k, v, mask)

    monkeypatch.setattr(gpt2_model, "attend", record)
    idx = torch.randint(0, 50, (1, 280), generator=torch.Generator().manual_seed(0))
    whole, spans = model.new_cache(max_len=600), model.new_cache(max_len=600)
    with torch.no_grad():
        for cache in (whole, spans):
            model(idx[:, :250], cache=cache)
        shapes.clear()
        for start in range(250, 280, 3):
            new = idx[:, start : start + 3]
            at = model.forward_at(new, model.positions(new, whole), whole)
            whole.lengths = [start + 3]
            assert torch.equal(at, model(new, cache=spans))
    slots = gpt2_model.KVCache.slots(600)  # 600 positions in whole key blocks
    assert shapes[::2] == [((1, 2, 3, 8), (1, 2, slots, 8), (1, 1, 3, slots))] * 10
    # The spans: the blocks up to the pass's last position (252 to 282).
    assert {s[1][2] for s in shapes[1::2]} == {gpt2_model.KVCache.slots(n) for n in (253, 282)}


def test_a_cache_zeroes_the_blocks_its_text_reaches_and_what_lies_past_them_changes_nothing():
    # A new cache is not cleared: its memory may hold anything (here NaN, the worst), and a key block is zeroed when
    # a pass first reaches it. The logits are those of a cache made of zeros, bit for bit, and the blocks no pass
    # reached are never touched: a cache costs what its text reaches.
    config = GPT2Config(n_positions=600, n_embd=32, n_layer=2, n_head=2, vocab_size=50)
    model = GPT2(config).eval()
    idx = torch.randint(0, 50, (2, 300), generator=torch.Generator().manual_seed(1))
    fresh = model.new_cache(2, max_len=600)
    fresh.keys.fill_(float("nan")), fresh.values.fill_(float("nan"))
    shape = fresh.keys.shape
    zeros = KVCache(config, 2, 600, torch.float32, "cpu", buffers=(torch.zeros(shape), torch.zeros(shape),
                                                                  torch.arange(shape[3])))
    with torch.no_grad():
        for start in range(0, 300, 7):
            new = idx[:, start : start + 7]
            assert torch.equal(model(new, cache=fresh), model(new, cache=zeros))
    reached = KVCache.slots(300)
    assert fresh.ready == reached < shape[3]
    assert fresh.keys[..., reached:, :].isnan().all() and fresh.values[..., reached:, :].isnan().all()


def test_a_pass_without_logits_fills_the_cache_alike_and_the_samplers_prefill_skips_the_lm_head():
    # A prefill needs only the prompt's keys and values: with logits=False the LM head (GPT-2 small's costliest
    # product at a prompt's rows) is not run, and the cache holds the same values bit for bit.
    config = GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2, vocab_size=50)
    model = GPT2(config).eval()
    idx = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with_logits, without = model.new_cache(2), model.new_cache(2)
        assert model(idx, cache=with_logits).shape == (2, 9, 50)
        assert model(idx, cache=without, logits=False) is None
        assert without.lengths == with_logits.lengths == [9, 9]
        reached = KVCache.slots(9)
        assert torch.equal(without.keys[..., :reached, :], with_logits.keys[..., :reached, :])
        assert torch.equal(without.values[..., :reached, :], with_logits.values[..., :reached, :])
    from speculative import autoregressive_sample, speculative_sample

    rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[1]))
    autoregressive_sample(model, list(range(20)), 3)
    speculative_sample(model, model, list(range(20)), 3, lookahead=2)
    speculative_sample(model, model, list(range(20)), 3, lookahead=2, exact=True)
    assert rows and max(rows) <= 4  # one pending token or a verification's rows: never the prompt's 19


def test_a_cache_that_does_not_fit_the_model_is_refused():
    small = GPT2(GPT2Config(n_positions=16, n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    large = GPT2(GPT2Config(n_positions=64, n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    other = GPT2(GPT2Config(n_positions=16, n_embd=32, n_layer=2, n_head=2, vocab_size=50))
    ids = torch.zeros(1, 2, dtype=torch.long)
    for cache in (large.new_cache(max_len=40), other.new_cache(), small.new_cache(batch_size=2)):
        with pytest.raises(ValueError, match="not made for this model"):
            small(ids, cache=cache)
    with pytest.raises(ValueError, match="cache must be a KVCache"):
        small(ids, cache="cache")
    with pytest.raises(ValueError, match="this model.s caches are torch.float32"):
        small(ids, cache=KVCache(small.config, 1, 8, torch.bfloat16, "cpu"))


@pytest.mark.parametrize("bad", [2.5, True, -1, 7, "2"])
def test_crop_takes_an_integer_within_the_cache(bad):
    cache = GPT2(GPT2Config(n_positions=16, n_embd=16, n_layer=1, n_head=2, vocab_size=50)).new_cache()
    cache.length = 6
    with pytest.raises(ValueError, match="cannot crop the cache to"):
        cache.crop(bad)
    assert cache.length == 6
    cache.crop(np.int64(2))
    assert cache.length == 2 and type(cache.length) is int


@pytest.mark.parametrize("bad", [2.5, 0, True, 17, "8"])
def test_new_cache_takes_an_integer_length(bad):
    model = GPT2(GPT2Config(n_positions=16, n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="max_len must be an integer from 1 to 16"):
        model.new_cache(max_len=bad)
    assert model.new_cache(max_len=np.int64(8)).max_len == 8


# Sharded checkpoints and other architectures -------------------------------------------------------------


def test_sharded_safetensors_load(reference_folder, tmp_path):
    folder, reference = reference_folder
    reference.save_pretrained(tmp_path, max_shard_size="1MB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    assert_parity(tmp_path, reference)


def write_sharded_bin(reference_folder, folder, drop=None):
    """A pytorch_model.bin.index.json with two .bin shards, as older save_pretrained wrote them."""
    state = load_file(reference_folder[0] / "model.safetensors")
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    folder.mkdir(exist_ok=True)
    for name, part in shards.items():
        if name != drop:
            torch.save({k: state[k] for k in part}, folder / name)
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_bytes((reference_folder[0] / "config.json").read_bytes())
    return folder


def test_sharded_bin_loads(reference_folder, tmp_path):
    assert_parity(write_sharded_bin(reference_folder, tmp_path), reference_folder[1])


def test_a_missing_shard_is_named(reference_folder, tmp_path):
    folder = write_sharded_bin(reference_folder, tmp_path, drop="pytorch_model-00002-of-00002.bin")
    with pytest.raises(CheckpointError, match="lists pytorch_model-00002-of-00002.bin, which is not in the folder"):
        GPT2.from_pretrained(folder)
    (folder / "pytorch_model.bin.index.json").write_text("[]")
    with pytest.raises(CheckpointError, match="not a shard index"):
        GPT2.from_pretrained(folder)


def test_another_architecture_says_what_it_is(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    save_file({"model.embed_tokens.weight": torch.zeros(10, 4)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model_type 'llama' is not GPT-2"):
        GPT2.from_pretrained(tmp_path)


def test_cuda_graphs_need_a_cuda_model():
    model = GPT2(GPT2Config(n_positions=16, n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device, not cpu"):
        CUDAGraphRunner(model)
