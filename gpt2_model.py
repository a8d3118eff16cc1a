"""GPT-2 from scratch, with a preallocated KV cache built for speculative sampling.

Reading order: GPT2Config, KVCache, CausalSelfAttention, MLP, Block, GPT2. Module names equal the tensor names of
the Hugging Face GPT-2 checkpoints (`wte`, `wpe`, `h.{i}.attn.c_attn`, ..., `ln_f`); the LM head is tied to `wte`.

The KV cache is written at explicit positions; rolling back after rejected draft tokens is `cache.crop(n)`, an
integer assignment: nothing is copied. Reading and writing checkpoint folders live in speculative_gpt2/state_dict.py,
finding and downloading them in speculative_gpt2/checkpoints.py. Speed is applied to a model from outside: oneDNN
packing (speculative_gpt2/packing.py), CUDA graphs (speculative_gpt2/cuda_graphs.py).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from speculative_gpt2.checkpoints import PRESETS, checkpoint_config, find_checkpoint, preset_of
from speculative_gpt2.checks import check_integer, check_real
from speculative_gpt2.machine import check_dtype, resolve_device
from speculative_gpt2.state_dict import read_config, read_state_dict, write_checkpoint


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
        """The configuration of a preset: distilgpt2, gpt2, gpt2-medium, gpt2-large or gpt2-xl."""
        if name not in PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}: choose one of {', '.join(PRESETS)}")
        n_layer, n_head, n_embd = PRESETS[name]
        return cls(n_embd=n_embd, n_layer=n_layer, n_head=n_head)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> GPT2Config:
        """A Hugging Face `config.json`, checked field by field (speculative_gpt2/state_dict.py)."""
        fields = read_config(path)
        try:
            return cls(**fields)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            check_integer(name, getattr(self, name), minimum=1)
        check_real("layer_norm_epsilon", self.layer_norm_epsilon, 0, 1, open_below=True)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")


# Attention works on the keys in blocks of this many slots, one block after another (`attend`); a pass reads the
# blocks up to its last position, so a short text reads little (docs/design.md, "The KV cache").
KEY_BLOCK = 128


def block_end(n: int) -> int:
    """The end of the key block that holds slot n - 1: the slots a cache (or a pass) of n positions spans."""
    return -(-n // KEY_BLOCK) * KEY_BLOCK


def key_blocks(span: int) -> list[slice]:
    """The key blocks of the first `span` slots (a block end), in order."""
    return [slice(start, start + KEY_BLOCK) for start in range(0, span, KEY_BLOCK)]


# Attention computes every query among at least this many: a matrix product rounds a 1-row product differently from a
# row of a larger one, and from 4 rows on a row's result no longer depends on how many rows the pass has
# (tests/test_exact_dtype.py), so a plain decoding step attends as one row of a verification does.
QUERY_ROWS = 4


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions; row b holds positions `[0, lengths[b])`.

    `keys` and `values` are (n_layer, B, n_head, slots, head_dim) in the model's dtype, `slots` being `max_len`
    rounded up to whole key blocks. A pass writes each row's new keys and values at that row's positions and attends
    over the blocks up to its last position (`span`), each new token masking out the positions after its own; slots
    a token may not see add exact zeros (`attend`), so the rows of a batch sit at different lengths, and a row's
    result does not depend on the buffer's length or on its batch-mates. The buffers are not cleared when made: a
    block is zeroed when a pass first reaches it (`reach`), so a cache costs what its text reaches, not its length.
    Design: docs/design.md, "The KV cache".
    """

    def __init__(self, config: GPT2Config, batch_size: int, max_len: int, dtype, device, buffers=None):
        shape = (config.n_layer, batch_size, config.n_head, self.slots(max_len), config.n_embd // config.n_head)
        if buffers is None:
            buffers = (torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device),
                       torch.arange(shape[3], device=device))
            self.ready = 0  # slots [0, ready) hold finite values (zeros, or keys and values written since)
        else:  # (keys, values, key_positions) of a dropped cache of this shape, zeroed (cuda_graphs.py)
            self.ready = shape[3]
        self.keys, self.values, self.key_positions = buffers  # key_positions (slots,): each slot's position
        self.max_len = max_len  # the positions a pass may write
        self.config = config  # the model's it was made for
        self.lengths = [0] * batch_size  # per row, on the host: the samplers decide with them

    @staticmethod
    def slots(max_len: int) -> int:
        """The buffer's length for `max_len` positions: whole key blocks."""
        return block_end(max_len)

    def span(self, rows: int) -> int:
        """The slots a pass of `rows` new tokens per row attends: the key blocks up to the last position it writes
        (every row's further slots would only add zeros)."""
        return min(self.keys.shape[3], self.slots(max(self.lengths) + rows))

    def reach(self, span: int) -> None:
        """Makes the first `span` slots ready to be read: the blocks not reached before are zeroed now. A masked slot
        adds weight 0 times its value, which is exactly 0 only if the value is finite, and fresh memory may hold
        anything."""
        if span > self.ready:
            self.keys[..., self.ready : span, :].zero_()
            self.values[..., self.ready : span, :].zero_()
            self.ready = span

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
        lengths = list(length) if isinstance(length, (list, tuple)) else [length] * len(self.lengths)
        try:
            if len(lengths) != len(self.lengths):
                raise ValueError
            lengths = [check_integer("length", n, 0, old) for n, old in zip(lengths, self.lengths)]
        except ValueError:
            raise ValueError(f"cannot crop the cache to {length!r}: give an integer from 0 to the length of each row "
                             f"{self.lengths} (one, or a list of one per row)") from None
        self.lengths = lengths


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs), masked) v in float32, one KEY_BLOCK of slots after another: the scores of a block
    are one product of a fixed shape, and the sum over keys adds the blocks' products in order, so a query's result
    depends only on the keys its mask lets it see, bit for bit, not on how many slots follow (the buffer's length, a
    batch-mate's longer text) or on the other queries of the pass. A fused kernel (scaled_dot_product_attention)
    splits a long sum where the length tells it to, so its rounding moves with the buffer (docs/design.md, "The KV
    cache"). Masked slots get weight exactly 0 and add exact zeros.

    q (B, nh, T, hs); k, v (B, nh, S, hs) as the cache stores them, S a block end (`block_end`); mask (B, 1, T, S).
    Returns (B, nh, T, hs) float32."""
    T = q.shape[2]
    if T < QUERY_ROWS:  # fewer queries: padded with copies of the first, whose results are dropped
        q = torch.cat([q, q[:, :, :1].expand(-1, -1, QUERY_ROWS - T, -1)], 2)
        mask = torch.cat([mask, mask[:, :, :1].expand(-1, -1, QUERY_ROWS - T, -1)], 2)
    q = q.float() * q.shape[-1] ** -0.5
    # Each block is converted to float32 on its own: a block's copy stays in the CPU's caches, where a copy of the
    # whole span would be written to memory and read back.
    blocks = key_blocks(k.shape[2])
    scores = [q @ k[:, :, block].float().transpose(-1, -2) for block in blocks]
    scores = scores[0] if len(scores) == 1 else torch.cat(scores, -1)  # (B, nh, T, S)
    weights = torch.softmax(scores.masked_fill_(~mask, float("-inf")), -1)
    y = weights[..., blocks[0]] @ v[:, :, blocks[0]].float()
    for block in blocks[1:]:
        y = y + weights[..., block] @ v[:, :, block].float()
    return y[:, :, :T]


def attend_each(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                reads: torch.Tensor) -> torch.Tensor:
    """`attend` for queries that each read their own arrangement of the keys: query t of row b finds at slot s the
    keys and values of slot reads[b, t, s]. A token tree's node reads its ancestors at the slots of their positions,
    where plain decoding has them, so its sums add the same terms in the same order as plain decoding's
    (speculative_gpt2/trees.py). Each query is one batch entry of `attend`. q (B, nh, T, hs); k, v (B, nh, S, hs);
    mask (B, 1, T, S); reads (B, T, S). Returns (B, nh, T, hs) float32."""
    B, nh, T, hs = q.shape
    S = k.shape[2]
    index = reads[:, None, :, :, None].expand(B, nh, T, S, hs)
    k, v = (t[:, :, None].expand(B, nh, T, S, hs).gather(3, index) for t in (k, v))  # (B, nh, T, S, hs)

    def each(t):  # (B, nh, T, ...) -> (B * T, nh, ...): a query per batch entry
        return t.transpose(1, 2).reshape(B * T, nh, *t.shape[3:])

    y = attend(each(q[:, :, :, None]), each(k), each(v), mask.transpose(1, 2).reshape(B * T, 1, 1, S))
    return y.view(B, T, nh, hs).transpose(1, 2)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, kv=None, slots=None, mask=None, reads=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # Write each row's new keys/values at its own (row, position) `slots`, then attend over the cache's
            # span; the mask (B, 1, T, S) hides the positions a new token may not see, and the stale ones.
            # index_put_, not scatter_, which copies the whole buffer per call in bfloat16 on CPU.
            cache_k, cache_v = kv  # (B, nh, S, hs)
            cache_k.transpose(1, 2).index_put_(slots, k.transpose(1, 2).to(cache_k.dtype))  # (B, S, nh, hs) view
            cache_v.transpose(1, 2).index_put_(slots, v.transpose(1, 2).to(cache_v.dtype))
            y = (attend(q, cache_k, cache_v, mask) if reads is None else
                 attend_each(q, cache_k, cache_v, mask, reads)).to(x.dtype)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

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

    def forward(self, x, kv=None, slots=None, mask=None, reads=None):
        x = x + self.attn(self.ln_1(x), kv, slots, mask, reads)
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
        # The LM head is tied to the token embedding (made on "meta": no memory, no random draws, then tied).
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False, device="meta")
        self.lm_head.weight = self.wte.weight

    @property
    def device(self) -> torch.device:
        return self.ln_f.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.ln_f.weight.dtype

    def new_cache(self, batch_size: int = 1, max_len: int | None = None, room: int = 0) -> KVCache:
        """An empty KV cache on the model's device and in its dtype (`attend` sums in float32 whatever it stores:
        docs/design.md, "The KV cache"), for `max_len` positions (default: the full
        context), plus `room` slots past them: for the padding rows of fixed-shape passes (speculative_gpt2/exact.py)
        and for a token tree's nodes (speculative_gpt2/trees.py)."""
        return KVCache(self.config, check_integer("batch_size", batch_size, minimum=1),
                       self.cache_length(max_len, room), self.dtype, self.device)

    def cache_length(self, max_len: int | None = None, room: int = 0) -> int:
        """The positions of a cache for `max_len` (default: the context) and `room` more, checked."""
        max_len = self.config.n_positions if max_len is None else max_len
        return check_integer("max_len", max_len, 1, self.config.n_positions) + check_integer("room", room, 0)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, logits: bool = True) -> torch.Tensor | None:
        """Logits (B, T, vocab_size) for the tokens `idx` (B, T).

        With a cache, `idx` holds only the new tokens: row b's at positions `cache.lengths[b] ...`, the rows of a
        batch each where its own sequence is; their keys and values are appended to the cache. Several new tokens
        at once are scored in one pass (draft verification). `logits=False` (a prefill, which only fills the cache)
        skips the LM head and returns None."""
        positions = self.positions(idx, cache)
        logits = self.forward_at(idx, positions, cache, None if cache is None else cache.span(idx.shape[1]),
                                 logits=logits)
        if cache is not None:
            cache.lengths = [n + idx.shape[1] for n in cache.lengths]
        return logits

    def positions(self, idx: torch.Tensor, cache: KVCache | None, rows: int | None = None) -> torch.Tensor:
        """(B, rows) positions of a pass of the new tokens `idx` (B, T) and, past them, rows - T padding rows (whose
        slots must fit in the cache): row b's from cache.lengths[b] on. Checks the cache and the context."""
        B, T = idx.shape
        if cache is not None:
            self._check_cache(cache, B)
        starts = [0] * B if cache is None else cache.lengths
        limit = self.config.n_positions if cache is None else min(cache.max_len, self.config.n_positions)
        if max(starts) + T > limit:
            raise ValueError(f"the context is full: {max(starts)} + {T} tokens exceed the limit of {limit} positions")
        rows = rows or T
        if cache is not None and max(starts) + rows > cache.max_len:
            raise ValueError(f"this cache has no room for {rows - T} padding rows: make it with new_cache(room=...)")
        if len(set(starts)) == 1:  # one sequence, or rows in step: no copy from the host
            return torch.arange(starts[0], starts[0] + rows, device=idx.device).expand(B, rows)
        return torch.tensor(starts, device=idx.device)[:, None] + torch.arange(rows, device=idx.device)

    def forward_at(self, idx: torch.Tensor, positions: torch.Tensor, cache: KVCache | None,
                   span: int | None = None, slots: torch.Tensor | None = None,
                   sees: torch.Tensor | None = None, reads: torch.Tensor | None = None,
                   logits: bool = True) -> torch.Tensor | None:
        """Logits (B, T, vocab_size) for tokens `idx` (B, T) at `positions` (B, T), a device tensor; with a cache,
        their keys and values are written there, and attention reads its first `span` slots (`cache.span(T)`;
        None: all, the same result with more work). The static-shape core of `forward`: with span None no host
        value decides a shape, so a pass of T tokens can be captured once and replayed anywhere in the sequence.
        A token tree's pass (speculative_gpt2/trees.py) gives each token a slot of its own, `slots` (B, T), and says
        which slots each may see, `sees` (B, T, span); by default a token's slot is its position and it sees the
        slots of the positions up to its own. Exact mode's tree pass gives instead `reads` (B, T, span), the slot each
        token reads at each slot (`attend_each`): its ancestors at their positions' slots. `logits=False`: None,
        without the LM head (a prefill's rows need only their keys and values)."""
        span = None if cache is None else span or cache.keys.shape[3]
        if cache is not None:
            cache.reach(span)
        # Only padding rows lie past the context (their cache slots do not): any position embedding serves them.
        x = self.wte(idx) + self.wpe(positions.clamp_max(self.config.n_positions - 1))  # (B, T, C)
        # New token i of row b at position p may see the slots at positions <= p: (B, 1, T, span), the same for
        # every layer and head.
        if sees is None and cache is not None:
            sees = positions[:, :, None] >= cache.key_positions[:span]
        mask = None if cache is None else sees[:, None]
        # Where every layer writes the new keys and values: (row, slot) index pairs, each (B, T).
        slots = positions if slots is None else slots
        slots = None if cache is None else (torch.arange(len(idx), device=idx.device)[:, None].expand_as(slots), slots)
        for i, block in enumerate(self.h):
            x = block(x, None if cache is None else (cache.keys[i, ..., :span, :], cache.values[i, ..., :span, :]),
                      slots, mask, reads)
        return self.lm_head(self.ln_f(x)) if logits else None  # (B, T, vocab_size)

    def _check_cache(self, cache: KVCache, batch_size: int) -> None:
        if not isinstance(cache, KVCache):
            raise ValueError(f"cache must be a KVCache made with model.new_cache(), got {type(cache).__name__}")
        if cache.config != self.config or len(cache.lengths) != batch_size:
            raise ValueError(f"this cache (batch {len(cache.lengths)}) was not made for this model and batch "
                             f"{batch_size}: make it with model.new_cache()")
        if cache.keys.device != self.device or cache.keys.dtype != self.dtype:
            raise ValueError(f"the cache is {cache.keys.dtype} on {cache.keys.device}, this model's caches are "
                             f"{self.dtype} on {self.device}: make it with model.new_cache()")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, weights_dir: str | os.PathLike | None = None,
                        dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
                        download: bool = True) -> GPT2:
        """A Hugging Face GPT-2 checkpoint folder, or a preset (`gpt2-xl`, or its hub id `openai-community/gpt2-xl`)
        found in `weights_dir`, the Hugging Face cache or the hub (speculative_gpt2/checkpoints.py); `dtype` float32,
        bfloat16 or float16 (default float32), `device` e.g. "cpu", "cuda:0". Returns the model in eval mode."""
        dtype, device = check_dtype(dtype or torch.float32), resolve_device(str(device or "cpu"))
        folder = find_checkpoint(name_or_path, weights_dir=weights_dir, allow_download=download)
        config = GPT2Config(**checkpoint_config(folder, preset_of(name_or_path)))
        state = read_state_dict(folder, config, dtype=dtype, device=device)  # checked, then read
        with torch.device("meta"):  # no memory and no random init for weights about to be replaced
            model = cls(config)
        model.load_state_dict(state | {"lm_head.weight": state["wte.weight"]}, assign=True)
        model.lm_head.weight = model.wte.weight  # assign=True replaced both Parameters: tie them again
        model.checkpoint_folder = folder  # where it was loaded from, for reports
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Writes `config.json` and `model.safetensors` in the hub's layout (speculative_gpt2/state_dict.py)."""
        state = {k: v for k, v in self.state_dict().items() if k != "lm_head.weight"}  # tied: wte holds it
        write_checkpoint(folder, state, asdict(self.config))


def _init_weights(module):
    # GPT-2's initialisation: N(0, 0.02) weights, zero biases (LayerNorm keeps its ones and zeros).
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear):
        nn.init.zeros_(module.bias)
