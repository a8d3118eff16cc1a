"""GPT-2 from scratch, with a preallocated KV cache built for speculative sampling, and reading a local checkpoint.

Reading order: GPT2Config, KVCache, the model (CausalSelfAttention, MLP, Block, GPT2), then reading a checkpoint
folder (`read_checkpoint`). Finding a checkpoint (presets, the Hugging Face cache) and downloading it live in
checkpoints.py; the tokenizer in tokenizer.py.

Module names equal the tensor names of the Hugging Face GPT-2 checkpoints (`wte`, `wpe`, `h.{i}.attn.c_attn`,
..., `ln_f`), so loading is a short list of transposed keys plus shape checks. The LM head is tied to `wte`.

The KV cache is written at explicit positions; rolling back after rejected draft tokens is `cache.crop(n)`,
an integer assignment: nothing is copied.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
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
        """Reads a Hugging Face `config.json`; keys this model does not use are ignored."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read the config ({e})") from None
        # Variants this from-scratch model does not implement must not load silently with wrong maths.
        if raw.get("n_inner") not in (None, 4 * raw.get("n_embd", 0)):
            raise ValueError(f"{path}: n_inner={raw['n_inner']} is not supported (only 4 * n_embd)")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if raw.get(flag):
                raise ValueError(f"{path}: {flag}=true is not supported by this GPT-2")
        if raw.get("scale_attn_weights") is False:
            raise ValueError(f"{path}: scale_attn_weights=false is not supported by this GPT-2")
        if raw.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise ValueError(f"{path}: activation_function={raw['activation_function']!r} is not supported "
                             f"(only GPT-2's tanh GELU)")
        fields = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        return cls(**fields)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")


class KVCache:
    """Keys and values of every layer, preallocated up to `max_len` positions.

    `keys` and `values` are (n_layer, B, n_head, max_len, head_dim); positions `[0, length)` are valid.
    """

    def __init__(self, config: GPT2Config, batch_size: int, max_len: int, dtype, device):
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def crop(self, length: int) -> None:
        """Forgets every position from `length` on. O(1): later writes overwrite the stale entries."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop the cache to {length}: it holds {self.length} positions")
        self.length = length


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias for x (..., in) and weight (out, in), whichever way round the weight lies in memory
    (see `GPT2.prepare_for`).

    On CPU in float32, a few rows (the K + 1 rows of a verification pass) on [out, in] memory go through
    (weight @ x.T).T, which MKL runs 2-3x faster than F.linear's small-M path (figures: README, "Results").
    Elsewhere, F.linear.
    """
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or x.dtype != torch.float32 or not 1 < rows <= 16 or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    # (in, rows) as a transposed view of contiguous rows: MKL is several times slower when the (in, rows) operand is
    # itself contiguous, as the output of a previous linear would make it.
    xt = x.reshape(rows, x.shape[-1]).contiguous().t()
    y = torch.mm(weight, xt) if bias is None else torch.addmm(bias[:, None], weight, xt)  # (out, rows)
    return y.t().reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    def forward(self, x):
        return linear(x, self.weight, self.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = Linear(config.n_embd, config.n_embd)

    def forward(self, x, kv=None, start=0, mask=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # Write the new keys/values at their absolute positions, then attend over the whole prefix.
            cache_k, cache_v = kv  # (B, nh, max_len, hs)
            cache_k[:, :, start : start + T] = k
            cache_v[:, :, start : start + T] = v
            k, v = cache_k[:, :, : start + T], cache_v[:, :, : start + T]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
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

    def forward(self, x, kv=None, start=0, mask=None):
        x = x + self.attn(self.ln_1(x), kv, start, mask)
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

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        """An empty KV cache for this model, on its device and in its dtype (default: the full context)."""
        max_len = self.config.n_positions if max_len is None else max_len
        if not 1 <= max_len <= self.config.n_positions:
            raise ValueError(f"max_len={max_len} must be between 1 and n_positions={self.config.n_positions}")
        return KVCache(self.config, batch_size, max_len, self.wte.weight.dtype, self.wte.weight.device)

    def prepare_for(self, rows: int) -> GPT2:
        """Lays out the weights in memory for passes of `rows` new tokens; values and shapes do not change.

        The one place where a fast path changes the model, called by whoever owns it (the CLI, the benchmark, a
        notebook), never by the samplers. On CPU in float32, one row (plain decoding) runs fastest as x @ W on
        [in, out] memory, except for contracting layers (the MLP's c_proj), and 2-16 rows (speculative sampling:
        drafting after a full acceptance, verification) as (W @ x.T).T on [out, in] memory, the layout a model is
        loaded in (figures: README, "Results"). Elsewhere (CUDA, bfloat16) the weights stay [out, in]. A change of
        layout copies the weights once (GPT-2 XL: seconds).
        """
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows must be an integer >= 1 (new tokens per pass), got {rows!r}")
        one_row = rows == 1 and self.wte.weight.device.type == "cpu" and self.wte.weight.dtype == torch.float32
        # Outside inference mode, so that the new weights are ordinary tensors that autograd can still use later.
        with torch.inference_mode(False), torch.no_grad():
            for p in [self.wte.weight] + [m.weight for m in self.modules() if isinstance(m, nn.Linear)]:
                # One row: [in, out], except where the layer contracts (in > out: the MLP's c_proj), which MKL runs
                # faster on [out, in].
                to_in_out = one_row and p.shape[1] <= p.shape[0]
                if p.is_contiguous() == to_in_out:  # [out, in] memory is the contiguous one
                    p.data = p.data.t().contiguous().t() if to_in_out else p.data.contiguous()
        return self

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) for the tokens `idx` (B, T).

        With a cache, `idx` holds only the new tokens, at positions `cache.length ...`; their keys and values
        are appended to the cache. Several new tokens at once are scored in one pass (draft verification).
        """
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        limit = self.config.n_positions if cache is None else cache.max_len
        if start + T > limit:
            raise ValueError(f"the context is full: {start} + {T} tokens exceed the limit of {limit} positions")
        if cache is not None and cache.keys.shape[1] != B:
            raise ValueError(f"batch size {B} does not match the cache's {cache.keys.shape[1]}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        # New token i sits at position start + i and may see positions 0 .. start + i. One new token sees all.
        mask = None
        if cache is not None and T > 1:
            mask = torch.ones(T, start + T, dtype=torch.bool, device=idx.device).tril(diagonal=start)
        for i, block in enumerate(self.h):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x = block(x, kv, start, mask)
        if cache is not None:
            cache.length = start + T
        return linear(self.ln_f(x), self.wte.weight)  # tied LM head: (B, T, vocab_size)

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
        """Loads a Hugging Face GPT-2 checkpoint folder, or a preset name from `weights_dir` (default: ./weights
        beside this file), the Hugging Face cache, or the hub (see checkpoints.py). Returns the model in eval mode,
        its weights [out, in] (`prepare_for` changes that)."""
        from checkpoints import find_checkpoint

        folder = find_checkpoint(name_or_path, weights_dir=weights_dir, allow_download=download)
        if (folder / "config.json").exists():
            config = GPT2Config.from_json(folder / "config.json")
        elif str(name_or_path) in PRESETS:
            config = GPT2Config.from_name(str(name_or_path))
        else:
            raise ValueError(f"{folder}: no config.json; add one (it says n_layer, n_head, n_embd)")
        with torch.device("meta"):  # no memory and no random init for weights about to be replaced
            model = cls(config)
        state = read_checkpoint(folder, config, dtype=dtype or torch.float32, device=device or "cpu")
        model.load_state_dict(state, assign=True)
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Writes `config.json` and `model.safetensors` in the hub's layout (no prefix, Conv1D [in, out])."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            k: (v.t() if _is_conv1d(k) else v).contiguous().cpu() for k, v in self.state_dict().items()
        }
        _write_atomically(folder / "model.safetensors", lambda tmp: save_file(tensors, tmp, {"format": "pt"}))
        config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new"}
        config |= asdict(self.config)
        _write_atomically(folder / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))


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


def checkpoint_file(folder: Path) -> Path | None:
    """The checkpoint file in `folder`, or None."""
    for filename in CHECKPOINT_FILES:
        if (folder / filename).is_file():
            return folder / filename
    return None


def read_checkpoint(folder: Path, config: GPT2Config, *, dtype=torch.float32, device="cpu") -> dict:
    """Our state dict from a checkpoint file, checked against `config`: every tensor present, shaped right.

    Both layouts found in the wild load: the hub's (no prefix, with `attn.bias` mask buffers) and
    `save_pretrained`'s (a `transformer.` prefix, no buffers). Tensors are read one at a time from a
    memory map and converted on the way, so no second full copy of the model is built.
    """
    path = checkpoint_file(folder)
    expected = {k: tuple(v.shape) for k, v in _shape_model(config).state_dict().items()}
    state = {}
    with _TensorFile(path) as tensors:
        for raw_key in tensors.keys():
            key = raw_key.removeprefix("transformer.")
            if key == "lm_head.weight" or key.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # tied to wte, and causal-mask buffers: nothing to load
            if key not in expected:
                raise CheckpointError(f"{path}: unexpected tensor {raw_key!r} for {_describe(config)}")
            t = tensors.get(raw_key)
            t = t.t() if _is_conv1d(key) else t
            if tuple(t.shape) != expected[key]:
                raise CheckpointError(
                    f"{path}: tensor {raw_key!r} has shape {list(t.shape)}, expected {list(expected[key])} "
                    f"for {_describe(config)}"
                )
            # Always a copy of our own: a tensor left on the memory map would keep the whole file's pages mapped
            # (gigabytes of resident memory with GPT-2 XL, whose wte needs no conversion in float32).
            state[key] = torch.empty(t.shape, dtype=dtype, device=device).copy_(t)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{path}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    return state


def _shape_model(config: GPT2Config) -> GPT2:
    with torch.device("meta"):
        return GPT2(config)


def _describe(config: GPT2Config) -> str:
    return f"n_layer={config.n_layer}, n_head={config.n_head}, n_embd={config.n_embd}, vocab={config.vocab_size}"


class _TensorFile:
    """`keys()` and `get(key)` over a safetensors file (memory-mapped) or a pytorch_model.bin; a file that cannot
    be read raises CheckpointError, whatever way safetensors or torch.load report it."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        if self.path.suffix == ".safetensors":
            from safetensors import safe_open

            self._file = self._read(lambda: safe_open(str(self.path), framework="pt"))
            self._keys, self._get = self._file.keys, self._file.get_tensor
        else:
            try:
                state = self._read(lambda: torch.load(self.path, map_location="cpu", weights_only=True, mmap=True))
            except CheckpointError:  # files in torch's legacy (pre-1.6) format cannot be memory-mapped
                state = self._read(lambda: torch.load(self.path, map_location="cpu", weights_only=True))
            self._keys, self._get = state.keys, state.__getitem__
        return self

    def __exit__(self, *exc):
        self._keys = self._get = self._file = None

    def keys(self):
        return self._read(self._keys)

    def get(self, key: str) -> torch.Tensor:
        return self._read(lambda: self._get(key))

    def _read(self, read):
        try:
            return read()
        except Exception as e:  # truncation and corruption surface as many exception types
            raise CheckpointError(
                f"{self.path}: cannot read the checkpoint, it may be truncated or corrupt ({e}); delete it and "
                f"download it again"
            ) from None


def _write_atomically(dest: Path, write) -> None:
    # Write beside the destination, sync, then rename: a crash never leaves a half-written file under its name.
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
