"""oneDNN packing: a model's Linear layers swapped for ones that multiply by a weight in oneDNN's blocked layout.

On CPU in float32, F.linear reads a weight more slowly than its size allows, at one row and more so at the few rows
of a verification; oneDNN's linear on a weight packed once runs those products faster (figures:
docs/bench-drafters.md, "oneDNN"). `pack_linears(model)` swaps every `nn.Linear` of a GPT2 for a `PackedLinear`
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

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2_model import GPT2
from speculative_gpt2.errors import OutOfMemory, is_out_of_memory

# oneDNN lays a weight out one way for 1-row products and another for more rows; the second serves 1-row products
# about as fast, and few-row ones much faster (docs/bench-drafters.md, "oneDNN"): one layout serves every pass.
PACK_ROWS = 2


def can_pack(model: GPT2) -> bool:
    """Whether this build and the model's device and dtype have packed weights: CPU, float32, oneDNN."""
    return model.device.type == "cpu" and model.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def pack(weight: torch.Tensor, rows: int = PACK_ROWS) -> torch.Tensor:
    """`weight` (out, in), float32 on CPU, in oneDNN's blocked layout for products of `rows` rows (any number of
    rows runs on it): an opaque tensor that only oneDNN's linear reads."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows)


class _Packed(nn.Module):
    """What the packed modules share: no `weight` to write to (reading it is refused, saying why), and no move."""

    refusal = ""  # the one line that says where the weight is

    def __getattr__(self, name: str):
        if name == "weight":
            raise AttributeError(self.refusal)
        return super().__getattr__(name)

    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros(1))  # where and in what dtype `.to()`, `.half()`, `.cuda()` ... would put a weight
        if probe.device.type != "cpu" or probe.dtype != torch.float32:
            raise ValueError("this model's weights are packed for oneDNN on the CPU in float32 (pack_linears): call "
                             "unpack_linears(model) before moving or converting it")
        return super()._apply(fn, recurse)


class PackedLinear(_Packed):
    """x @ W.T + b, with W (out, in) held only in oneDNN's blocked layout; b stays an ordinary Parameter."""

    refusal = ("this Linear's weight is packed for oneDNN (pack_linears), not an ordinary tensor: read a copy with "
               "dense_weight(), or unpack_linears(model) to change it")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int = PACK_ROWS):
        super().__init__()
        self.out_features, self.in_features = weight.shape
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
        if prefix + "weight" not in state_dict:
            missing_keys.append(prefix + "weight")
        else:
            self.packed = pack(state_dict[prefix + "weight"].to(torch.float32), self.rows)
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[prefix + "bias"])
            else:
                missing_keys.append(prefix + "bias")

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
        self.table = weight.detach().clone()  # not the old Parameter's memory: something may still write to that

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.table)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.table.clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "weight" in state_dict:
            self.table = state_dict[prefix + "weight"].detach().to(self.table.dtype).clone()
        else:
            missing_keys.append(prefix + "weight")


def pack_linears(model: GPT2, rows: int = PACK_ROWS) -> GPT2:
    """Swaps every Linear of `model` for a PackedLinear (and its token embedding for a FrozenEmbedding, the LM head
    being tied to it), where the model is on the CPU in float32 and torch has oneDNN; elsewhere changes nothing.
    `rows`: the products the layout is made for (the default serves every pass best, PACK_ROWS).
    Returns the model. All or nothing: if memory runs out, the model is left as it was and OutOfMemory (a
    ValueError) is raised."""
    if not can_pack(model) or isinstance(model.lm_head, PackedLinear):
        return model
    swapped = []
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
        raise OutOfMemory("out of memory while packing the weights for oneDNN (pack_linears: the LM head's size "
                          "once more, and one layer's while it is packed): the model runs unpacked, slower in "
                          "float32; free memory, or use bfloat16") from None
    return model


def unpack_linears(model: GPT2) -> GPT2:
    """The plain modules back: nn.Linear layers on dense weights, the embedding tied to the LM head again. Returns
    the model; an unpacked model is returned as it is."""
    if not isinstance(model.lm_head, PackedLinear):
        return model
    with torch.inference_mode(False), torch.no_grad():
        for parent, name, packed in _linears(model, PackedLinear):
            linear = nn.Linear(packed.in_features, packed.out_features, bias=packed.bias is not None, device="meta")
            linear.weight = nn.Parameter(packed.dense_weight())
            if packed.bias is not None:
                linear.bias = packed.bias
            setattr(parent, name, linear)
        model.wte = nn.Embedding.from_pretrained(model.wte.table, freeze=False)
        model.lm_head.weight = model.wte.weight
    return model.requires_grad_(True)


def _linears(model: GPT2, kind=nn.Linear) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute name, module) for every module of `kind` in the model."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, kind)]
