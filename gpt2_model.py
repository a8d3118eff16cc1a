"""GPT-2 from scratch, with a preallocated KV cache built for speculative sampling, and reading a local checkpoint.

Reading order: GPT2Config, KVCache, the model (CausalSelfAttention, MLP, Block, GPT2), then reading a checkpoint
folder (`read_checkpoint`). Finding a checkpoint (presets, the Hugging Face cache) and downloading it live in
speculative_gpt2/checkpoints.py; the tokenizer in speculative_gpt2/tokenizer.py.

Module names equal the tensor names of the Hugging Face GPT-2 checkpoints (`wte`, `wpe`, `h.{i}.attn.c_attn`,
..., `ln_f`), so loading is a short list of transposed keys plus shape checks. The LM head is tied to `wte`.

The KV cache is written at explicit positions; rolling back after rejected draft tokens is `cache.crop(n)`,
an integer assignment: nothing is copied.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import re
from dataclasses import asdict, dataclass
from numbers import Integral
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# name: (n_layer, n_head, n_embd); parameter counts with the tied LM head.
PRESETS = {
    "distilgpt2": (6, 12, 768),  # 82M
    "gpt2": (12, 12, 768),  # 124M
    "gpt2-medium": (24, 16, 1024),  # 355M
    "gpt2-large": (36, 20, 1280),  # 774M
    "gpt2-xl": (48, 25, 1600),  # 1558M
}
CHECKPOINT_FILES = ("model.safetensors", "pytorch_model.bin")
MAX_GRAPHED_ROWS = 16  # passes of more new tokens (a long prefill) stay eager under use_cuda_graphs()
# fixed_pass_rows() rounds a pass up to a multiple of this: MKL's float32 kernels (F.linear: an unprepared model)
# compute the last rows of a 5-7 or 9-11-row product apart from the others, so there a row's result depends on its
# place (tests/test_exact_dtype.py); oneDNN's (`prepare`) are row-invariant at every count from 1 to 16.
PASS_ROW_MULTIPLE = 4
# oneDNN lays a weight out one way for 1-row products and another for more rows; the second runs 1-row products within
# a few percent as fast here and 5-row ones 1.7x faster (docs/bench-drafters.md, "oneDNN"): one copy serves every pass.
PACK_ROWS = 2


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5

    @classmethod
    def from_name(cls, name: str) -> GPT2Config:
        """The configuration of a preset: gpt2, gpt2-medium, gpt2-large, gpt2-xl or distilgpt2."""
        if name not in PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}: choose one of {', '.join(PRESETS)}")
        n_layer, n_head, n_embd = PRESETS[name]
        return cls(n_embd=n_embd, n_layer=n_layer, n_head=n_head)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> GPT2Config:
        """Reads a Hugging Face `config.json`, checking every field it uses (type and range) and refusing variants
        this model does not implement; keys it does not use are ignored. Raises ValueError naming the field."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read the config ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the config must be a JSON object, got {type(raw).__name__}")
        try:
            return cls._from_dict(raw)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def _from_dict(cls, raw: dict) -> GPT2Config:
        if raw.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"model_type {raw['model_type']!r} is not GPT-2: this loads GPT-2 checkpoints only")
        config = cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})  # checked in __post_init__
        # Variants this from-scratch model does not implement must not load silently with wrong maths; checked on
        # the resolved, typed values.
        n_inner = raw.get("n_inner")
        if n_inner is not None and (_not_int(n_inner) or n_inner != 4 * config.n_embd):
            raise ValueError(f"n_inner={n_inner!r} is not supported (only null or 4 * n_embd = {4 * config.n_embd})")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if raw.get(flag, False) is not False:
                raise ValueError(f"{flag}={raw[flag]!r} is not supported by this GPT-2 (only false)")
        for flag in ("scale_attn_weights", "tie_word_embeddings"):
            if raw.get(flag, True) is not True:
                raise ValueError(f"{flag}={raw[flag]!r} is not supported by this GPT-2 (only true: "
                                 + ("scaled attention)" if flag == "scale_attn_weights" else "the LM head is wte)"))
        if raw.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise ValueError(f"activation_function={raw['activation_function']!r} is not supported "
                             f"(only GPT-2's tanh GELU)")
        return config

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if _not_int(value) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ValueError(f"layer_norm_epsilon={eps!r} must be a number in (0, 1)")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")


def _not_int(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions; row b holds positions `[0, lengths[b])`.

    `keys` and `values` are (n_layer, B, n_head, max_len, head_dim). A pass writes each row's new keys and values at
    that row's positions and attends over the whole buffer, each new token masking out the positions after its own,
    so a pass of T new tokens has the same tensor shapes wherever each row is in its sequence: nothing is sliced to
    a length (what CUDA graphs need, what keeps cuDNN from planning anew for every key length, and what lets the
    rows of a batch sit at different lengths). It also keeps a position's rounding the same in every pass of a call:
    attention cut to the slots in use rounds differently per key length, and in bfloat16 the target as its own
    draft then kept 4.00 tokens per pass instead of 4.92 (docs/bench-batched.md).
    """

    def __init__(self, config: GPT2Config, batch_size: int, max_len: int, dtype, device, buffers=None):
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        if buffers is None:  # else (keys, values, key_positions) of a dropped cache of this shape (cuda_graphs.py)
            buffers = (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                       torch.arange(max_len, device=device))
        self.keys, self.values, self.key_positions = buffers  # key_positions (max_len,): each slot's position
        self.lengths = [0] * batch_size  # per row, on the host: the samplers decide with them

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    @property
    def length(self) -> int:
        """The length of every row, when they are equal (a single sequence); else read `lengths`."""
        if len(set(self.lengths)) > 1:
            raise ValueError(f"the rows of this cache have different lengths {self.lengths}: read cache.lengths")
        return self.lengths[0]

    @length.setter
    def length(self, length: int) -> None:
        self.lengths = [int(length)] * len(self.lengths)

    def crop(self, length) -> None:
        """Forgets every position from `length` on: one integer for every row, or a list of one per row. O(1):
        later writes overwrite the stale entries, and until then the mask hides them."""
        lengths = [length] * len(self.lengths) if not isinstance(length, (list, tuple)) else list(length)
        if len(lengths) != len(self.lengths) or not all(
                not isinstance(n, bool) and isinstance(n, Integral) and 0 <= n <= old
                for n, old in zip(lengths, self.lengths)):
            raise ValueError(f"cannot crop the cache to {length!r}: give an integer from 0 to the length of each row "
                             f"{self.lengths} (one, or a list of one per row)")
        self.lengths = [int(n) for n in lengths]


def pack(weight: torch.Tensor, rows: int = PACK_ROWS) -> torch.Tensor:
    """`weight` (out, in), float32 on CPU, copied into oneDNN's blocked layout for products of `rows` rows (any
    number of rows runs on it): the opaque tensor `linear` takes as `packed`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias for x (..., in) and weight (out, in); with `packed`, the same weight in oneDNN's blocked
    layout (`GPT2.prepare`), through oneDNN's linear, else through F.linear."""
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


class PackedWeight:
    """A oneDNN copy of a weight (`GPT2.prepare`) and the weight it was made from: its address and version.

    Never copied or pickled (a copy or a loaded model has new weights, for which it would be stale; and the opaque
    tensor has no storage to copy): `copy.deepcopy` and pickling give None in its place.
    """

    __slots__ = ("tensor", "address", "version")

    def __init__(self, tensor: torch.Tensor, weight: torch.Tensor):
        self.tensor, self.address, self.version = tensor, weight.data_ptr(), weight._version

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return type(None), ()


def packed_weight(module: nn.Module) -> torch.Tensor | None:
    """The oneDNN copy of `module.weight` that `GPT2.prepare` made, or None: none was made, the weight has changed
    since (loaded, trained in place or moved; a write through `.data` bumps no version and is not seen: call
    `prepare()` again), autograd is recording (oneDNN's linear has no backward here), or autocast is on (its products
    run in the autocast dtype, as F.linear's do)."""
    kept = getattr(module, "packed", None)
    if kept is None or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
        return None
    weight = module.weight
    return kept.tensor if weight.data_ptr() == kept.address and weight._version == kept.version else None


class Linear(nn.Linear):
    def forward(self, x):
        return linear(x, self.weight, self.bias, packed_weight(self))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = Linear(config.n_embd, config.n_embd)

    def forward(self, x, kv=None, slots=None, mask=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # Write each row's new keys/values at its own positions (B, T), then attend over the whole buffer; the
            # mask (B, 1, T, max_len) hides the positions a new token may not see, and the stale ones.
            # index_put_ at the (row, position) pairs `slots`, not scatter_: on CPU in bfloat16, scatter_ copies the
            # whole buffer at every call (figures: docs/bench-batched.md).
            cache_k, cache_v = kv  # (B, nh, max_len, hs)
            cache_k.transpose(1, 2).index_put_(slots, k.transpose(1, 2))  # (B, max_len, nh, hs) view
            cache_v.transpose(1, 2).index_put_(slots, v.transpose(1, 2))
            y = F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        # GPT-2 uses the tanh approximation of GELU; the exact one drifts from the reference logits.
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, kv=None, slots=None, mask=None):
        x = x + self.attn(self.ln_1(x), kv, slots, mask)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.apply(_init_weights)
        self.cuda_graphs = None  # a cuda_graphs.CUDAGraphs while use_cuda_graphs() is on
        self.pass_rows = None  # every cached pass is padded to this many rows while fixed_pass_rows() is on

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        """An empty KV cache for this model, on its device and in its dtype (default: the full context), for
        `max_len` positions; under `fixed_pass_rows(n)`, n - 1 slots longer, for the padding rows of the last pass."""
        max_len = self.config.n_positions if max_len is None else max_len
        for name, value, top in (("batch_size", batch_size, None), ("max_len", max_len, self.config.n_positions)):
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 1 or (top and value > top):
                raise ValueError(f"{name}={value!r} must be an integer from 1" + (f" to n_positions={top}" if top else ""))
        max_len += (self.pass_rows or 1) - 1
        if self.cuda_graphs is not None:  # recycled buffers, so that the next call replays this call's graphs
            return self.cuda_graphs.new_cache(KVCache, self.config, int(batch_size), int(max_len), self.wte.weight.dtype)
        return KVCache(self.config, int(batch_size), int(max_len), self.wte.weight.dtype, self.wte.weight.device)

    def prepare(self) -> GPT2:
        """Readies the weights for fast passes on the model's device; values and shapes do not change, results only
        within rounding (another kernel). Returns the model; raises OutOfMemory (a ValueError) if the copies do not
        fit, leaving none.

        The one place where a fast path changes the model, called by whoever owns it (the CLI, the benchmark, a
        notebook), never by the samplers. On CPU in float32 it keeps a copy of every projection weight and of the LM
        head in oneDNN's blocked layout, and passes run on those copies: F.linear reads a weight more slowly than
        its size allows, at one row and more so at the few rows of a verification, which oneDNN's copies run at
        less than a one-row pass costs (figures: docs/bench-drafters.md, "oneDNN"). The copies cost the weights'
        memory once more (GPT-2 XL: 6.2 GB in float32) and seconds to make; calling again keeps them while the
        weights are unchanged. Elsewhere (CUDA, bfloat16, a build without oneDNN) nothing is copied.
        """
        modules = self.linear_modules()
        try:
            with torch.inference_mode(False), torch.no_grad():
                for module in modules:
                    w = module.weight
                    if w.device.type != "cpu" or w.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
                        module.packed = None
                        continue
                    if packed_weight(module) is not None:  # still the weight's copy
                        continue
                    # A new Parameter made outside inference mode: an ordinary tensor that autograd can use later,
                    # where a model made under torch.inference_mode() has tensors with no version to check a copy by.
                    if w.is_inference():
                        w = module.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
                    module.packed = None  # a stale copy goes before the new one is made
                    module.packed = PackedWeight(pack(w.detach()), w)
        except (MemoryError, RuntimeError) as e:
            if not _is_out_of_memory(e):
                raise
            for module in modules:  # all or nothing: the memory goes back
                module.packed = None
            raise OutOfMemory("out of memory while making the oneDNN copies of the weights (GPT2.prepare: their size "
                              "once more): the model runs without them, slower in float32; free memory, or use "
                              "bfloat16") from None
        return self

    def linear_modules(self) -> list[nn.Module]:
        """The modules whose weight a matrix product reads: the tied LM head (`wte`) and every projection."""
        return [self.wte] + [m for m in self.modules() if isinstance(m, nn.Linear)]

    def fixed_pass_rows(self, rows: int | None) -> GPT2:
        """Pads every cached pass of up to `rows` new tokens to one fixed number of rows, `rows` rounded up to a
        multiple of PASS_ROW_MULTIPLE (`model.pass_rows`); None turns it off. Returns the model.

        What makes speculative sampling exact in every dtype. A matrix product rounds a row differently when it
        is computed among 1 or among K + 1 rows (another blocking, another order of the sums), so in bfloat16 or
        float16 plain decoding (1-row passes) and verification (K + 1 rows) can flip a near-tie and their greedy
        texts part. At one fixed number of rows a row's result does not depend on its place among the rows or on
        what the others hold (tests/test_exact_dtype.py checks this on the running platform), so every position's
        logits are the same whichever pass computed them, and greedy speculative output equals plain decoding's
        bit for bit. Speculative sampling then needs K + 1 <= pass_rows: fixed_pass_rows(K + 1) for a fixed K,
        fixed_pass_rows(max_lookahead + 1) for the adaptive lookahead. A longer pass (a long prompt's prefill, the
        same in both decoders) runs as it is. Padding rows go to cache slots past the new tokens: masked, then
        overwritten by the next pass (the cache has pass_rows - 1 extra slots, `new_cache`), never seen. Compared
        runs need the same weights too (`prepare` or not): they decide which kernel runs. The rounding to a
        multiple of PASS_ROW_MULTIPLE is for MKL's float32 kernels (unprepared models), row-invariant only at some
        counts.

        Like `prepare` and `use_cuda_graphs`, the choice of whoever owns the model; plain decoding pays for
        the padded rows (figures: docs/exact-dtype.md). Make caches after turning it on.
        """
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
            raise ValueError(f"rows must be an integer >= 1 (rows per pass) or None (off), got {rows!r}")
        self.pass_rows = None if rows is None else padded_rows(rows)
        return self

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) for the tokens `idx` (B, T).

        With a cache, `idx` holds only the new tokens: row b's at positions `cache.lengths[b] ...`, the rows of a
        batch each where its own sequence is; their keys and values are appended to the cache. Several new tokens
        at once are scored in one pass (draft verification). Under `fixed_pass_rows(n)`, a cached pass of T <= n
        tokens runs as a pass of n rows.
        """
        B, T = idx.shape
        if cache is not None:
            self._check_cache(cache, B)
        starts = [0] * B if cache is None else cache.lengths
        limit = self.config.n_positions if cache is None else min(cache.max_len, self.config.n_positions)
        if max(starts) + T > limit:
            raise ValueError(f"the context is full: {max(starts)} + {T} tokens exceed the limit of {limit} positions")
        rows = T
        if cache is not None and self.pass_rows is not None and T < self.pass_rows:
            rows = self.pass_rows
            if max(starts) + rows > cache.max_len:
                raise ValueError(f"this cache has no room for the padding rows of fixed {rows}-row passes: make it "
                                 f"with model.new_cache() after model.fixed_pass_rows()")
            idx = torch.cat([idx, idx.new_zeros(B, rows - T)], dim=1)  # (B, rows): padding rows hold token 0
        positions = _positions(starts, rows, idx.device)  # (B, rows)
        graphed = self.cuda_graphs is not None and cache is not None and rows <= MAX_GRAPHED_ROWS
        if graphed and not torch.is_grad_enabled():
            logits = self.cuda_graphs.run(self, idx, positions, cache)
        else:
            logits = self.forward_at(idx, positions, cache)
        if cache is not None:
            cache.lengths = [start + T for start in starts]
        return logits[:, :T]

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .half() ... give the weights new addresses: graphs captured on the old ones must go, and
        # oneDNN copies of the old weights (never used again: `packed_weight`) free their memory.
        module = super()._apply(fn, *args, **kwargs)
        for m in self.modules():
            if getattr(m, "packed", None) is not None and m.weight.data_ptr() != m.packed.address:
                m.packed = None
        if self.cuda_graphs is not None:
            self.use_cuda_graphs(self.wte.weight.device.type == "cuda")
        return module

    def use_cuda_graphs(self, enabled: bool = True) -> GPT2:
        """Replays captured CUDA graphs for the cached passes of decoding (cuda_graphs.py), or stops and frees them.

        Like `prepare`, a choice of whoever owns the model, made once and visibly: the samplers never make it.
        Call it after moving the model to its CUDA device; moving it later needs a new call. Results equal the
        eager passes'; the memory the graphs keep is described in cuda_graphs.py.
        """
        if enabled and self.wte.weight.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {self.wte.weight.device}")
        from speculative_gpt2.cuda_graphs import CUDAGraphs

        self.cuda_graphs = CUDAGraphs(self.wte.weight.device) if enabled else None
        return self

    def forward_at(self, idx: torch.Tensor, positions: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """Logits (B, T, vocab_size) for tokens `idx` (B, T) at `positions` (B, T), a device tensor; with a cache,
        their keys and values are written there. The static-shape core of `forward`: no host value decides a
        shape, so a pass of T tokens can be captured once and replayed anywhere in the sequence."""
        # Padding rows may lie past the context (their slots do not): any position embedding serves them.
        x = self.wte(idx) + self.wpe(positions.clamp_max(self.config.n_positions - 1))  # (B, T, C)
        # New token i of row b at position p may see the slots at positions <= p: (B, 1, T, max_len), the same for
        # every layer and head.
        mask = None if cache is None else (positions[:, :, None] >= cache.key_positions)[:, None]
        # Where every layer writes the new keys and values: (row, position) index pairs, each (B, T).
        slots = None if cache is None else (torch.arange(len(idx), device=idx.device)[:, None].expand_as(positions),
                                            positions)
        for i, block in enumerate(self.h):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x = block(x, kv, slots, mask)
        # Tied LM head: (B, T, vocab_size).
        return linear(self.ln_f(x), self.wte.weight, packed=packed_weight(self.wte))

    def _check_cache(self, cache: KVCache, batch_size: int) -> None:
        if not isinstance(cache, KVCache):
            raise ValueError(f"cache must be a KVCache made with model.new_cache(), got {type(cache).__name__}")
        c = self.config
        expected = (c.n_layer, batch_size, c.n_head, c.n_embd // c.n_head)
        actual = tuple(cache.keys.shape[i] for i in (0, 1, 2, 4))
        if actual != expected or cache.max_len > c.n_positions + (self.pass_rows or 1) - 1:
            raise ValueError(f"this cache (n_layer, batch, n_head, head_dim = {actual}, max_len {cache.max_len}) was "
                             f"not made for this model and batch {expected}, context {c.n_positions}: make it with "
                             f"model.new_cache()")
        if cache.keys.device != self.wte.weight.device or cache.keys.dtype != self.wte.weight.dtype:
            raise ValueError(f"the cache is {cache.keys.dtype} on {cache.keys.device}, the model "
                             f"{self.wte.weight.dtype} on {self.wte.weight.device}: make it with model.new_cache()")

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        weights_dir: str | os.PathLike | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        download: bool = True,
    ) -> GPT2:
        """Loads a Hugging Face GPT-2 checkpoint folder, or a preset (its name, `gpt2-xl`, or hub id,
        `openai-community/gpt2-xl`) from `weights_dir` (default: see `checkpoints.default_weights_dir`), the Hugging
        Face cache, or the hub (see speculative_gpt2/checkpoints.py). `dtype` is a torch.dtype or its name
        ("float32", "bfloat16", "float16"); `device` a torch.device or a name ("cpu", "cuda:0"). Returns the model
        in eval mode (`prepare` makes its fast weight copies)."""
        from speculative_gpt2.checkpoints import find_checkpoint, preset_of
        from speculative_gpt2.hardware import DTYPES, resolve_device

        if isinstance(dtype, str) and dtype in DTYPES:
            dtype = DTYPES[dtype]
        if dtype is not None and dtype not in DTYPES.values():
            raise ValueError(f"dtype={dtype!r} is not supported: use one of {', '.join(DTYPES)} (or torch's dtypes)")
        device = resolve_device(str(device or "cpu"))
        folder = find_checkpoint(name_or_path, weights_dir=weights_dir, allow_download=download)
        config = checkpoint_config(folder, preset_of(name_or_path))
        state = read_checkpoint(folder, config, dtype=dtype or torch.float32, device=device)  # checked, then read
        with torch.device("meta"):  # no memory and no random init for weights about to be replaced
            model = cls(config)
        model.load_state_dict(state, assign=True)
        model.checkpoint_folder = folder  # where it was loaded from, for reports
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Writes `config.json` and `model.safetensors` in the hub's layout (no prefix, Conv1D [in, out])."""
        from safetensors.torch import save_file

        folder = Path(folder)
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        try:
            tensors = {
                k: (v.t() if _is_conv1d(k) else v).contiguous().cpu() for k, v in self.state_dict().items()
            }
            write_atomically(folder / "model.safetensors", lambda tmp: save_file(tensors, tmp, {"format": "pt"}))
            config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new"}
            config |= asdict(self.config)
            write_atomically(folder / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
        except BaseException:
            if created:  # a folder this call made holds nothing of the user's: a failed write leaves no trace
                shutil.rmtree(folder, ignore_errors=True)
            raise


def _positions(starts: list[int], rows: int, device) -> torch.Tensor:
    """(B, rows): row b's new tokens at starts[b], starts[b] + 1, ..."""
    if len(set(starts)) == 1:  # one sequence, or rows in step: no copy from the host
        return torch.arange(starts[0], starts[0] + rows, device=device).expand(len(starts), rows)
    return torch.tensor(starts, device=device)[:, None] + torch.arange(rows, device=device)


def padded_rows(rows: int) -> int:
    """The rows a pass of `rows` tokens runs as under `GPT2.fixed_pass_rows(rows)`: rounded up to a multiple of
    PASS_ROW_MULTIPLE."""
    return -(-rows // PASS_ROW_MULTIPLE) * PASS_ROW_MULTIPLE


def _init_weights(module):
    # GPT-2's initialisation: N(0, 0.02) weights, zero biases (LayerNorm keeps its ones and zeros).
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear):
        nn.init.zeros_(module.bias)


def _is_conv1d(key: str) -> bool:
    # The checkpoint stores these four projections as Conv1D weights, [in, out]; nn.Linear wants [out, in].
    return re.fullmatch(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight", key) is not None


# ----------------------------------------------------------------------------------------------------------
# Loading checkpoints


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not match its config."""


def checkpoint_config(folder: Path, preset: str | None = None) -> GPT2Config:
    """The config of the checkpoint in `folder`: its config.json, or the preset's when it has none."""
    if (folder / "config.json").exists():
        return GPT2Config.from_json(folder / "config.json")
    if preset in PRESETS:
        return GPT2Config.from_name(preset)
    raise ValueError(f"{folder}: no config.json; add one (it says n_layer, n_head, n_embd)")


def same_shape(config: GPT2Config, other: GPT2Config) -> bool:
    return (config.n_layer, config.n_head, config.n_embd) == (other.n_layer, other.n_head, other.n_embd)


def checkpoint_files(folder: Path) -> list[Path] | None:
    """The checkpoint files in `folder`: one file, or the shards its index lists (`save_pretrained` shards large
    models as `model-00001-of-00002.safetensors` ... with a `model.safetensors.index.json`); None if it has none."""
    for filename in CHECKPOINT_FILES:
        if (folder / filename).is_file():
            return [folder / filename]
        index = folder / f"{filename}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                shards = []
            if not shards or not all(isinstance(f, str) and Path(f).name == f for f in shards):
                raise CheckpointError(f"{index}: not a shard index (a JSON object whose weight_map maps tensor "
                                      f"names to files in this folder)") from None
            missing = [f for f in shards if not (folder / f).is_file()]
            if missing:
                raise CheckpointError(f"{index} lists {missing[0]}, which is not in the folder "
                                      f"({len(missing)} of {len(shards)} shards missing)")
            return [folder / f for f in shards]
    return None


def read_checkpoint(folder: Path, config: GPT2Config, *, dtype=torch.float32, device="cpu") -> dict:
    """Our state dict from a checkpoint folder, checked against `config`: every tensor present once, shaped right.

    Both layouts found in the wild load: the hub's (no prefix, with `attn.bias` mask buffers) and
    `save_pretrained`'s (a `transformer.` prefix, no buffers), in one file or in shards. The files' tensor names,
    shapes and dtypes are checked first, from their headers, before any weight is read or any memory is taken;
    then tensors are read one at a time from a memory map and converted on the way, so no second full copy of
    the model is built. An `lm_head.weight` must equal `wte.weight` (GPT-2 ties them): an untied head is refused,
    never dropped.
    """
    files = checkpoint_files(folder)
    where, lm_head = check_tensors(folder, files, config)
    state = {}
    for path in files:
        with _TensorFile(path) as tensors:
            for key, raw_key in where[path]:
                t = tensors.get(raw_key)
                t = t.t() if _is_conv1d(key) else t
                # Always a copy of our own: a tensor left on the memory map would keep the whole file's pages
                # mapped (gigabytes of resident memory with GPT-2 XL, whose wte needs no conversion in float32).
                state[key] = _allocate(path, config, dtype, device, lambda: torch.empty(t.shape, dtype=dtype,
                                                                                       device=device).copy_(t))
    if lm_head is not None:
        with _TensorFile(lm_head[0]) as tensors:
            head = tensors.get(lm_head[1])
            if not torch.equal(head.to(device, dtype), state["wte.weight"]):
                raise CheckpointError(f"{lm_head[0]}: lm_head.weight differs from wte.weight (an untied LM head): "
                                      f"not supported, this GPT-2 ties its LM head to the token embedding")
    return state


def check_tensors(folder: Path, files: list[Path], config: GPT2Config) -> tuple[dict, tuple | None]:
    """Checks the checkpoint's tensor names, shapes and dtypes against `config`, from the file headers only (no
    weights read, no model built: a config that claims 10,000 layers over a 1-layer file is refused at once).
    Returns {file: [(our key, the file's key)]} and where an `lm_head.weight` is, if anywhere."""
    expected = expected_shapes(config)
    where, names, lm_head = {}, {}, None
    for path in files:
        where[path] = []
        with _TensorFile(path) as tensors:
            for raw_key in tensors.keys():
                key = raw_key.removeprefix("transformer.")
                if key.endswith((".attn.bias", ".attn.masked_bias")):
                    continue  # causal-mask buffers: nothing to load
                if key in names:
                    raise CheckpointError(f"{path}: holds {key!r} twice (as {names[key]!r} and {raw_key!r}): "
                                          f"which one is meant is unclear")
                names[key] = raw_key
                if key != "lm_head.weight" and key not in expected:
                    raise CheckpointError(f"{path}: unexpected tensor {raw_key!r} for {describe(config)}"
                                          + _layer_note(names, config))
                shape, not_floating = tensors.header(raw_key)
                if not_floating:  # int8, bool, complex ...: converting them to weights would be silently wrong
                    raise CheckpointError(f"{path}: tensor {raw_key!r} is {not_floating}, not floating point: GPT-2 "
                                          f"weights are float32, float16 or bfloat16; this is not a GPT-2 "
                                          f"checkpoint (or a quantized one, which this model cannot load)")
                shape = shape[::-1] if _is_conv1d(key) else shape
                want = expected.get(key, expected["wte.weight"])  # a tied lm_head has wte's shape
                if shape != want:
                    raise CheckpointError(f"{path}: tensor {raw_key!r} has shape {list(shape)}, expected "
                                          f"{list(want)} for {describe(config)}")
                if key == "lm_head.weight":
                    lm_head = (path, raw_key)
                else:
                    where[path].append((key, raw_key))
    missing = sorted(set(expected) - set(names))
    if missing:
        place = files[0] if len(files) == 1 else f"{folder} (shards)"
        raise CheckpointError(f"{place}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)"
                              + _layer_note(names, config))
    return where, lm_head


def _layer_note(names: dict, config: GPT2Config) -> str:
    # Whole layers missing or extra: say so in the config's terms, the likely mistake.
    layers = {int(m.group(1)) for k in names if (m := re.match(r"h\.(\d+)\.", k))}
    if layers and len(layers) != config.n_layer:
        return (f": the file holds {len(layers)} layer{'s' if len(layers) != 1 else ''}, config.json says "
                f"n_layer={config.n_layer}")
    return ""


def expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of a GPT-2 with this config (Linear weights [out, in]), computed from the config
    alone: no module is built."""
    C = config.n_embd
    shapes = {"wte.weight": (config.vocab_size, C), "wpe.weight": (config.n_positions, C),
              "ln_f.weight": (C,), "ln_f.bias": (C,)}
    layer = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (3 * C, C), "attn.c_attn.bias": (3 * C,),
             "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
             "mlp.c_fc.weight": (4 * C, C), "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (C, 4 * C),
             "mlp.c_proj.bias": (C,)}
    for i in range(config.n_layer):
        shapes |= {f"h.{i}.{name}": shape for name, shape in layer.items()}
    return shapes


class OutOfMemory(CheckpointError):
    """Memory ran out while loading: the checkpoint is not to blame, and must not be deleted."""


def _allocate(path: Path, config: GPT2Config, dtype, device, make):
    try:
        return make()
    except (MemoryError, RuntimeError) as e:
        if not _is_out_of_memory(e):
            raise
        raise OutOfMemory(_out_of_memory_message(path, config, dtype, device)) from None


def _is_out_of_memory(error: BaseException) -> bool:
    """MemoryError, torch's OutOfMemoryError, or an allocator's refusal reported as another error."""
    text = str(error).lower()
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or any(
        s in text for s in ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory",
                            "os error 12"))


def _out_of_memory_message(path: Path, config: GPT2Config, dtype, device) -> str:
    return (f"out of memory while loading {path} ({describe(config)}) as {str(dtype).removeprefix('torch.')} on "
            f"{device}: the file is not at fault; free memory, or use a smaller model or dtype (bfloat16 needs "
            f"half of float32)")


def describe(config: GPT2Config) -> str:
    return f"n_layer={config.n_layer}, n_head={config.n_head}, n_embd={config.n_embd}, vocab={config.vocab_size}"


class _TensorFile:
    """`keys()` and `get(key)` over a safetensors file (memory-mapped) or a pytorch_model.bin. A file that cannot be
    read, or that would run code when unpickled, or that is not a dict of named tensors, raises CheckpointError
    with one line saying which, whatever way safetensors or torch.load report it."""

    def __init__(self, path: Path):
        self.path, self._file = path, None

    def __enter__(self):
        try:
            open(self.path, "rb").close()
        except OSError as e:  # permissions, a folder in its place: not the file's content, so no advice to delete it
            raise CheckpointError(f"{self.path}: cannot be read ({e.strerror or e})") from None
        if self.path.suffix == ".safetensors":
            from safetensors import safe_open

            self._file = self._read(lambda: safe_open(str(self.path), framework="pt"))
            self._keys, self._get = self._file.keys, self._file.get_tensor
        else:
            try:
                state = self._read(lambda: torch.load(self.path, map_location="cpu", weights_only=True, mmap=True))
            except _Corrupt:  # files in torch's legacy (pre-1.6) format cannot be memory-mapped
                state = self._read(lambda: torch.load(self.path, map_location="cpu", weights_only=True))
            if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in state.items())):
                raise CheckpointError(f"{self.path}: does not hold a dict of named tensors (got "
                                      f"{type(state).__name__}): not a GPT-2 state dict")
            self._keys, self._get = state.keys, state.__getitem__
        return self

    def __exit__(self, *exc):
        self._keys = self._get = self._file = None

    def keys(self):
        return self._read(self._keys)

    def get(self, key: str) -> torch.Tensor:
        return self._read(lambda: self._get(key))

    def header(self, key: str) -> tuple[tuple[int, ...], str | None]:
        """The tensor's shape, and its dtype's name if it is not floating point (else None); no data read."""
        if self._file is not None:
            info = self._read(lambda: self._file.get_slice(key))
            kind = info.get_dtype()  # "F32", "BF16", "F8_E4M3", "I64", "BOOL", "C64" ...
            return tuple(info.get_shape()), None if kind.startswith(("F", "BF")) else kind
        t = self.get(key)  # a memory map or a loaded dict: no copy
        return tuple(t.shape), None if t.dtype.is_floating_point else str(t.dtype).removeprefix("torch.")

    def _read(self, read):
        try:
            return read()
        except (MemoryError, RuntimeError, OSError) as e:
            if not _is_out_of_memory(e):
                raise _Corrupt(self.path, e) from None
            raise OutOfMemory(f"out of memory while reading {self.path}: the file is not at fault; free memory, "
                              f"or use a smaller model or dtype (bfloat16 needs half of float32)") from None
        except pickle.UnpicklingError as e:
            if "weights only" not in str(e).lower():
                raise _Corrupt(self.path, e) from None
            raise CheckpointError(f"{self.path}: refused: unpickling it would run code (it holds objects other than "
                                  f"tensors); use a safetensors checkpoint") from None
        except Exception as e:  # truncation and corruption surface as many exception types
            raise _Corrupt(self.path, e) from None


class _Corrupt(CheckpointError):
    def __init__(self, path: Path, error: Exception):
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        super().__init__(f"{path}: cannot read the checkpoint, it may be truncated or corrupt ({detail}); delete it "
                         f"and download it again")


def write_atomically(dest: Path, write) -> None:
    """Calls write(temporary path) beside `dest`, syncs, then renames: a crash or an error never leaves a
    half-written file under `dest`'s name.

    The temporary path lies in a folder made for this call in `dest`'s folder, with a unique name, created
    exclusively and private (0700: `mkdtemp`): nothing planted under a guessable name (a symlink, a user's own
    `run.html.tmp`) is followed or consumed, whatever `write` does with the path (safetensors replaces the file
    it writes). The file gets the permissions of any new file, 0666 minus the umask, then is renamed over `dest`.
    """
    dest = Path(dest)
    folder = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    tmp = folder / dest.name
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o22)
    os.umask(mask)
    return mask
