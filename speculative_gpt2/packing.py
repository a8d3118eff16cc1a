"""oneDNN packing: a model's Linear layers swapped for ones that multiply by a weight in oneDNN's blocked layout.

On CPU in float32, F.linear reads a weight more slowly than its size allows, at one row and more so at the few rows
of a verification; oneDNN's linear on a weight packed once runs those products faster (figures:
docs/bench-drafters.md, "oneDNN"). In bfloat16 the same holds where the CPU multiplies bfloat16 natively (AVX-512
BF16 or AMX): packed, a pass reads its weights near the memory's bandwidth (docs/results-history.md); elsewhere
oneDNN would emulate it, and bfloat16 models stay as they are. `pack_linears(model)` swaps every `nn.Linear` of a GPT2 for a `PackedLinear`
and the tied token embedding for a `FrozenEmbedding`, as torch.ao and IPEX swap modules; `unpack_linears(model)`
gives the plain modules back. The model's code does not change.

A packed weight is the weight's only copy (the tied LM head's excepted: the embedding keeps its rows), so it
cannot go stale: no optimizer, `.data` write or fused kernel reaches it, since the packed modules have no weight
Parameter (reading `.weight` is refused, naming `unpack_linears`); its other parameters stop requiring gradients
(`unpack_linears` turns them on again). `state_dict()` gives copies of the weights,
`load_state_dict` packs what it loads, `copy.deepcopy` and pickle repack on the way; moving or converting a
packed model is refused. Under autocast or with autograd recording, products step aside to F.linear on an unpacked
copy of the weight (slow, but in the autocast dtype, and differentiable in the input).
"""

from __future__ import annotations

import statistics
import time
import weakref
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2_model import GPT2
from speculative_gpt2.errors import OutOfMemory, is_out_of_memory
from speculative_gpt2.machine import native_bfloat16

# oneDNN lays a weight out one way for 1-row products and another for more rows; the second serves 1-row products
# about as fast, and few-row ones much faster (docs/bench-drafters.md, "oneDNN"): a packed model's one layout serves
# every pass (whether to pack at all: packing_pays).
PACK_ROWS = 2
# Plain weights must run a product this much faster before a model is left unpacked: packing stays the default, and
# a near tie between the layouts must not flip from run to run with the machine's noise.
CLEAR_MARGIN = 1.1
# A model whose linear weights fit in this many bytes is read from the CPU's caches, where either layout is fast: it
# is packed without a measurement, so that nothing about it depends on the machine's noise.
MEASURED_ABOVE = 64 * 2**20


def can_pack(model: GPT2) -> bool:
    """Whether this build and the model's device and dtype have packed weights: oneDNN, on the CPU, in float32, or
    in bfloat16 where the CPU runs it natively."""
    dtypes = (torch.float32, torch.bfloat16) if native_bfloat16() else (torch.float32,)
    return model.device.type == "cpu" and model.dtype in dtypes and torch.backends.mkldnn.is_available()


def pack(weight: torch.Tensor, rows: int = PACK_ROWS) -> torch.Tensor:
    """`weight` (out, in), float32 or bfloat16 on CPU, in oneDNN's blocked layout for products of `rows` rows (any
    number of rows runs on it): an opaque tensor that only oneDNN's linear reads."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows)


class _Packed(nn.Module):
    """What the packed modules share: no `weight` to write to (reading it is refused, saying why), and no move."""

    refusal = ""  # the one line that says where the weight is

    def __getattr__(self, name: str):
        if name == "weight":
            raise AttributeError(self.refusal)
        return super().__getattr__(name)

    dtype = torch.float32  # the packed weights' dtype

    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros(1, dtype=self.dtype))  # where and in what dtype `.to()`, `.half()` ... would put it
        if probe.device.type != "cpu" or probe.dtype != self.dtype:
            raise ValueError(f"this model's weights are packed for oneDNN on the CPU in {str(self.dtype)[6:]} "
                             f"(pack_linears): call unpack_linears(model) before moving or converting it")
        return super()._apply(fn, recurse)


class PackedLinear(_Packed):
    """x @ W.T + b, with W (out, in) held only in oneDNN's blocked layout; b stays an ordinary Parameter."""

    refusal = ("this Linear's weight is packed for oneDNN (pack_linears), not an ordinary tensor: read a copy with "
               "dense_weight(), or unpack_linears(model) to change it")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int = PACK_ROWS):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.rows = rows  # the products the layout is made for; loads and copies pack for them again
        self.packed = pack(weight, rows)
        if bias is not None:  # an inference tensor (a model made under inference_mode) becomes an ordinary one
            bias = bias.detach().clone() if bias.is_inference() else bias.detach()
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled("cpu") or (torch.is_grad_enabled() and (
                x.requires_grad or (self.bias is not None and self.bias.requires_grad))):
            return F.linear(x, self.dense_weight(), self.bias)  # oneDNN's linear has no autograd or autocast here
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def dense_weight(self) -> torch.Tensor:
        """A new (out, in) tensor holding the weight: a copy, so writing to it changes nothing."""
        return self.packed.to_dense()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # nn.Linear's own loading, on a stand-in that holds this layer's bias: the same keys, checks and messages
        # as a plain model's; then the weight it took is packed.
        stand_in = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        stand_in.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, dtype=self.dtype),
                                       requires_grad=False)
        stand_in.bias = self.bias
        if _load_as(stand_in, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                    error_msgs, "weight"):
            self.packed = pack(stand_in.weight, self.rows)

    def __getstate__(self):  # the opaque tensor has no storage to copy: copies and pickles carry the dense weight
        return self.__dict__ | {"packed": self.dense_weight()}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.packed = pack(state["packed"], self.rows)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class FrozenEmbedding(_Packed):
    """The token embedding of a packed model, whose rows the tied LM head holds packed too: a table no optimizer or
    write reaches (it is no Parameter), so the two copies cannot part."""

    refusal = ("the token embedding is tied to the packed LM head (pack_linears): read a copy with state_dict(), or "
               "unpack_linears(model) to change it")

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.dtype = weight.dtype
        self.table = weight.detach().clone()  # not the old Parameter's memory: something may still write to that

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.table)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.table.clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        stand_in = nn.Embedding(*self.table.shape, device="meta")  # as PackedLinear loads
        stand_in.weight = nn.Parameter(torch.empty_like(self.table), requires_grad=False)
        if _load_as(stand_in, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                    error_msgs, "weight"):
            self.table = stand_in.weight.detach()


def _load_as(stand_in: nn.Module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
             error_msgs, key: str) -> bool:
    """Loads `state_dict` into `stand_in` by nn.Module's rules (missing and unexpected keys, shape checks, their
    messages); returns whether it took `prefix + key` without an error."""
    errors = len(error_msgs)
    with torch.inference_mode(False), torch.no_grad():
        nn.Module._load_from_state_dict(stand_in, state_dict, prefix, local_metadata, strict, missing_keys,
                                        unexpected_keys, error_msgs)
    return prefix + key in state_dict and len(error_msgs) == errors


def _keep_last_head(model, state_dict, prefix, *args) -> None:
    """A load_state_dict pre-hook of a packed model: notes what its one tied tensor ends with in a plain model,
    which writes the embedding, then the head, into the same tensor: the head's if given, else the embedding's
    (those of the right shape)."""
    tied = None
    for key in (prefix + "wte.weight", prefix + "lm_head.weight"):
        given = state_dict.get(key)
        if isinstance(given, torch.Tensor) and given.shape == model.wte.table.shape:
            tied = given
    model.__dict__["_tied_on_load"] = tied


def _tie_head_to_embedding(model, incompatible_keys) -> None:
    """The post-hook after `_keep_last_head`: embedding and head both get that tensor, as in the plain model."""
    tied = model.__dict__.pop("_tied_on_load", None)
    if tied is not None:
        with torch.inference_mode(False), torch.no_grad():
            model.wte.table = tied.detach().to(model.wte.table.dtype).clone()
            model.lm_head.packed = pack(model.wte.table, model.lm_head.rows)


def _refuse_conversion(module: nn.Module, fn, recurse=True):
    """The `_apply` of a packed model's modules that hold packed layers below them: the conversion is tried on a
    probe first, so that what the packed layers refuse is refused before any layer is converted."""
    dtype = next(m.dtype for m in module.modules() if isinstance(m, _Packed))
    probe = fn(torch.zeros(1, dtype=dtype))
    if probe.device.type != "cpu" or probe.dtype != dtype:
        raise ValueError(f"this model's weights are packed for oneDNN on the CPU in {str(dtype)[6:]} (pack_linears): "
                         f"call unpack_linears(model) before moving or converting it")
    return type(module)._apply(module, fn, recurse)


def pack_linears(model: GPT2, rows: int = PACK_ROWS) -> GPT2:
    """Swaps every Linear of `model` for a PackedLinear (and its token embedding for a FrozenEmbedding, the LM head
    being tied to it), where `can_pack(model)` (oneDNN, the CPU, float32 or native bfloat16); elsewhere changes
    nothing.
    `rows`: the products the layout is made for (the default serves every pass best, PACK_ROWS).
    Returns the model. All or nothing: if memory runs out, the model is left as it was and OutOfMemory (a
    ValueError) is raised."""
    if not can_pack(model) or isinstance(model.lm_head, PackedLinear):
        return model
    swapped, dtype = [], model.dtype
    try:
        with torch.inference_mode(False), torch.no_grad():
            for parent, name, linear in _linears(model):
                setattr(parent, name, PackedLinear(linear.weight, linear.bias, rows))
                swapped.append((parent, name, linear))
            model.wte = FrozenEmbedding(model.wte.weight)
        model.requires_grad_(False)  # an inference model: products stay on the packed weights in any grad mode
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        for parent, name, linear in swapped:  # the plain modules were kept until now: put them back
            setattr(parent, name, linear)
        advice = "free memory, or use bfloat16" if dtype == torch.float32 else "free memory"
        raise OutOfMemory(f"out of memory while packing the weights for oneDNN (pack_linears: the LM head's size "
                          f"once more, and one layer's while it is packed): the model runs unpacked, slower; "
                          f"{advice}") from None
    # A plain model's head is its embedding: loading writes one tensor. The hooks make a packed model end alike.
    model.register_load_state_dict_pre_hook(_keep_last_head)
    model.register_load_state_dict_post_hook(_tie_head_to_embedding)
    for module in _holding_packed(model):  # `.half()` on a block is refused before its layer norms convert
        module.__dict__["_apply"] = partial(_refuse_conversion, module)
    return model


def unpack_linears(model: GPT2) -> GPT2:
    """The plain modules back: nn.Linear layers on dense weights, the embedding tied to the LM head again, every
    parameter an ordinary tensor (a model made under inference_mode included) that requires gradients. Returns
    the model; an unpacked model is returned as it is. All or nothing: the new modules are made before any is
    swapped in."""
    if not isinstance(model.lm_head, PackedLinear):
        return model
    with torch.inference_mode(False), torch.no_grad():
        swaps = []
        for parent, name, packed in _linears(model, PackedLinear):
            linear = nn.Linear(packed.in_features, packed.out_features, bias=packed.bias is not None, device="meta")
            linear.weight = nn.Parameter(packed.dense_weight())
            if packed.bias is not None:
                linear.bias = packed.bias
            swaps.append((parent, name, linear))
        embedding = nn.Embedding.from_pretrained(model.wte.table.clone(), freeze=False)
        # Parameters made under inference_mode cannot require gradients outside it: ordinary copies take their place.
        ordinary = [(owner, name, nn.Parameter(p.clone())) for owner in model.modules()
                    for name, p in owner.named_parameters(recurse=False) if p.is_inference()]
    for module in _holding_packed(model):
        module.__dict__.pop("_apply", None)
    for hooks, hook in ((model._load_state_dict_pre_hooks, _keep_last_head),
                        (model._load_state_dict_post_hooks, _tie_head_to_embedding)):
        for key in [key for key, value in hooks.items() if getattr(value, "hook", value) is hook]:
            del hooks[key]
    for parent, name, module in swaps:
        setattr(parent, name, module)
    for owner, name, parameter in ordinary:
        setattr(owner, name, parameter)
    model.wte = embedding
    model.lm_head.weight = model.wte.weight
    return model.requires_grad_(True)


def _holding_packed(model: GPT2) -> list[nn.Module]:
    """The modules above packed ones: the model, its block list, blocks, attention and MLP layers."""
    return [m for m in model.modules() if not isinstance(m, _Packed)
            and any(isinstance(c, _Packed) for c in m.modules() if c is not m)]


def _linears(model: GPT2, kind=nn.Linear) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute name, module) for every module of `kind` in the model."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, kind)]


_verdicts: dict[tuple, bool] = {}  # (dtype, n_embd, rows) -> whether packing pays, once per process


def packing_pays(model: GPT2, rows: int) -> bool:
    """Whether products of `rows` rows run faster on weights packed for oneDNN than on plain ones (F.linear, which
    calls MKL) on this CPU, for this model's shapes and dtype. Which wins depends on the CPU and the row count: on
    some, MKL's 1-row products read a weight faster than oneDNN's packed layout while oneDNN wins from 4 rows
    (docs/design.md, "Packed weights"). Measured once per process on the MLP's first projection of up to 8 layers,
    their weights cycled through memory as a pass reads them; packed unless plain weights are CLEAR_MARGIN faster.
    False where the model cannot be packed (can_pack)."""
    if not can_pack(model) or not isinstance(model.lm_head, (nn.Linear, PackedLinear)):  # int8 weights: neither
        return False
    config = model.config
    linear_bytes = (12 * config.n_layer * config.n_embd ** 2 + config.vocab_size * config.n_embd) * model.dtype.itemsize
    if linear_bytes <= MEASURED_ABOVE:
        return True
    key = (model.dtype, config.n_embd, rows)
    if key not in _verdicts:
        with torch.no_grad():
            weights = [_dense(block.mlp.c_fc) for block in list(model.h)[:8]]  # (4 n_embd, n_embd) each
            _verdicts[key] = _packed_seconds(weights, rows) <= _plain_seconds(weights, rows) * CLEAR_MARGIN
    return _verdicts[key]


def _dense(linear: nn.Module) -> torch.Tensor:
    return linear.dense_weight() if isinstance(linear, PackedLinear) else linear.weight.detach()


def _plain_seconds(weights: list[torch.Tensor], rows: int, repeats: int = 5) -> float:
    x = torch.randn(rows, weights[0].shape[1], dtype=weights[0].dtype)
    return _median_sweep(lambda w: F.linear(x, w), weights, repeats)


def _packed_seconds(weights: list[torch.Tensor], rows: int, repeats: int = 5) -> float:
    x = torch.randn(rows, weights[0].shape[1], dtype=weights[0].dtype)
    packed = [pack(w) for w in weights]
    return _median_sweep(lambda w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), packed, repeats)


def _median_sweep(product, weights: list[torch.Tensor], repeats: int) -> float:
    """The median time of one product with each weight in turn; a first sweep warms up, untimed."""
    times = []
    for repeat in range(repeats + 1):
        started = time.perf_counter()
        for weight in weights:
            product(weight)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


_stuck: weakref.WeakSet = weakref.WeakSet()  # models a change of layout ran out of memory for: left as they are


def lay_out(model: GPT2, rows: int) -> bool:
    """Packs `model` for oneDNN (pack_linears) or unpacks it (unpack_linears), whichever runs its products of `rows`
    rows faster on this CPU (packing_pays); returns whether the layout changed. The layouts' products differ in
    their last bits, so two runs compare bit for bit only in one layout (exact mode's runs share one). If memory runs
    out, the model is left as it was, OutOfMemory (a ValueError) says so, and its layout is not changed again."""
    packed = isinstance(model.lm_head, PackedLinear)
    wanted = packing_pays(model, rows)
    if wanted == packed or model in _stuck:
        return False
    try:
        if wanted:
            pack_linears(model)
        else:
            try:
                unpack_linears(model)
            except (MemoryError, RuntimeError) as e:
                if not is_out_of_memory(e):
                    raise
                raise OutOfMemory("out of memory while unpacking the weights (unpack_linears: a dense copy of every "
                                  "weight beside the packed ones): the model stays packed; free memory") from None
    except OutOfMemory:
        _stuck.add(model)
        raise
    return True
