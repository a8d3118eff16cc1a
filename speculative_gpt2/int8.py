"""Weight-only int8: a model's Linear layers swapped for ones that hold their weight as int8 with one scale per output.

Decoding one token reads every weight once, so a pass is bound by the bytes its weights take: int8 halves bfloat16's
and quarters float32's. `quantize_int8(model)` rounds each weight row to int8 (symmetric, its scale the row's
largest magnitude / 127) and swaps the Linear for an `Int8Linear` whose product is
`torch.ops.aten._weight_int8pack_mm`; the embedding keeps its own rows, so the tied LM head becomes an int8 copy of
them. The product takes its activations in bfloat16 whatever the model's dtype, its result going back to that dtype:
torch's int8 product with float32 activations read XL's weights several times more slowly than with bfloat16 ones on an
AVX-512 CPU without native bfloat16 (docs/results-history.md, "llama.cpp on a CPU without native bfloat16"), slower
than float32's own product; the activations' rounding is of the size of the weights'. As `pack_linears` does, it
swaps modules from outside and leaves the model's code as it is.

A quantized model is another model: its logits differ from the original's by the rounding. For a DRAFT that changes
only how often drafts are kept, never the text (speculative sampling is exact for any draft). For a TARGET it is the
int8 model's text that speculative sampling then reproduces exactly. There is no way back: the rounding is lossy.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gpt2_model import GPT2


# torch's int8 product reads its inputs in groups: on a width that is not a multiple of this it returned NaN or
# crashed the process (bfloat16, widths 8, 24, 100); GPT-2's widths (768 to 6400) all are.
WIDTH_MULTIPLE = 32
# The dtype of the product's activations and scales, whatever the model's (the module's docstring says why).
PRODUCT_DTYPE = torch.bfloat16


def can_quantize(model: GPT2) -> bool:
    """Whether this build has the int8 product for the model's device and dtype: the CPU, float32 or bfloat16."""
    return model.device.type == "cpu" and model.dtype in (torch.float32, torch.bfloat16)


def quantize_rows(weight: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` (out, in) as int8 (out, in) and one scale per row (out,) in `scale_dtype`: weight ~ int8 * scale. The
    int8 values are rounded against the scales as stored, so that a scale's own rounding adds no error of gain."""
    weight = weight.detach().float()
    scales = (weight.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny) / 127).to(scale_dtype)
    return (weight / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8), scales


class Int8Linear(nn.Module):
    """x @ (W_int8 * scale).T + b, W int8 (out, in), one scale per output row: the product in bfloat16, the result
    and b in `dtype`, the model's."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        int8, scales = quantize_rows(weight, PRODUCT_DTYPE)
        self.register_buffer("int8_weight", int8)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(PRODUCT_DTYPE).contiguous(),
                                               self.int8_weight, self.scales).to(self.dtype)
        y = y if self.bias is None else y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros(1, dtype=self.dtype))
        if probe.device != self.scales.device or probe.dtype != self.dtype:
            raise ValueError("this model's weights are int8 (quantize_int8), for the CPU in its dtype: load the "
                             "model again to move or convert it")
        module = super()._apply(fn, recurse)
        self.scales = self.scales.to(PRODUCT_DTYPE)  # a same-dtype .float() converts buffers too
        return module

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(model: GPT2) -> GPT2:
    """Swaps every Linear of `model` (the tied LM head too, as a copy) for an Int8Linear; returns the model.
    ValueError where the model's device or dtype has no int8 product (`can_quantize`), or where its layers are no
    longer plain Linears (packed: quantize a model as loaded)."""
    if not can_quantize(model):
        raise ValueError(f"int8 weights run on the CPU in float32 or bfloat16; this model is "
                         f"{str(model.dtype)[6:]} on {model.device}: load it there (or leave out int8)")
    if not isinstance(model.lm_head, nn.Linear):
        raise ValueError(f"quantize_int8 takes a model with plain Linear layers, not {type(model.lm_head).__name__}: "
                         f"quantize the model as loaded (instead of packing it)")
    if model.config.n_embd % WIDTH_MULTIPLE:
        raise ValueError(f"int8 weights need a model whose width is a multiple of {WIDTH_MULTIPLE} (torch's int8 "
                         f"product reads its inputs in such groups); this one's n_embd is {model.config.n_embd}")
    dtype = model.dtype
    with torch.inference_mode(False), torch.no_grad():
        layers = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
                  if isinstance(child, nn.Linear)]
        for parent, name, linear in layers:
            setattr(parent, name, Int8Linear(linear.weight, linear.bias, dtype))
    return model.requires_grad_(False)


def is_int8(model) -> bool:
    """Whether `model` (or the model a runner wraps) runs on int8 weights."""
    return isinstance(getattr(model, "model", model).lm_head, Int8Linear)
