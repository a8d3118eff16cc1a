"""The samplers' arguments, checked before any model runs: one-line ValueErrors naming the argument and the fix."""

from __future__ import annotations

from numbers import Integral

import torch

from gpt2_model import GPT2
from speculative_gpt2.checks import check_integer, check_real


def check_options(max_new_tokens, temperature, top_k, top_p, eos_token_id=None, generator=None) -> None:
    """Raises ValueError for sampling options of the wrong type or out of range."""
    check_integer("max_new_tokens", max_new_tokens, minimum=1)
    check_real("temperature", temperature, minimum=0)
    if top_k is not None:
        check_integer("top_k", top_k, minimum=1)
    if top_p is not None:
        check_real("top_p", top_p, 0, 1, open_below=True)
    if eos_token_id is not None:
        check_integer("eos_token_id", eos_token_id, minimum=0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator (or None), got {type(generator).__name__}")


def check_lookahead(K, rows: int | None = None, cap: bool = False) -> int:
    """A K that a lookahead policy chose: an integer >= 1 whose verification (K + 1 rows) fits exact mode's fixed
    passes of `rows` rows, if any (a longer pass would break exactness silently); with `cap`, cut down to fit."""
    try:
        K = check_integer("K", K, minimum=1)
    except ValueError:
        raise ValueError(f"the lookahead policy chose K={K!r}: it must choose an integer >= 1") from None
    if rows is not None and cap:
        return min(K, rows - 1)
    if rows is not None and K + 1 > rows:
        raise ValueError(f"K={K} needs verification passes of {K + 1} rows, but exact mode fixes them at {rows} "
                         f"rows: pass exact={K + 1} (or exact=True) or a K of at most {rows - 1}")
    return K


def batch_of_prompts(prompt) -> tuple[list, bool]:
    """The prompts of a call, and whether they came as a batch: a list or tuple of prompts, or a 2-D tensor or
    array; anything else is one prompt."""
    rows = getattr(prompt, "ndim", None) == 2 or (
        isinstance(prompt, (list, tuple)) and len(prompt) > 0
        and all(isinstance(p, (list, tuple)) or getattr(p, "ndim", 0) >= 1 for p in prompt))
    dtype = getattr(prompt, "dtype", None)
    if getattr(prompt, "ndim", None) == 2 and not (getattr(dtype, "kind", "") in ("i", "u") or isinstance(
            dtype, torch.dtype) and not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)):
        raise ValueError(f"prompt must hold integer token ids: got a batch (shape {list(prompt.shape)}) of {dtype}")
    if rows and len(prompt) == 0:
        raise ValueError("the batch is empty: give at least one prompt")
    return (list(prompt), True) if rows else ([prompt], False)


def check_models_and_prompts(prompts: list, max_new_tokens: int, generator, eos_token_id, *, target: GPT2,
                             draft: GPT2 | None = None) -> list[torch.Tensor]:
    """`check_models_and_prompt` for every prompt of a batch; an error names the prompt's index."""
    if len(prompts) == 1:
        return [check_models_and_prompt(prompts[0], max_new_tokens, generator, eos_token_id, target=target,
                                        draft=draft)]
    checked = []
    for i, prompt in enumerate(prompts):
        try:
            checked.append(check_models_and_prompt(prompt, max_new_tokens, generator, eos_token_id, target=target,
                                                   draft=draft))
        except ValueError as e:
            raise ValueError(f"prompt {i} of the batch: {e}") from None
    return checked


def check_models_and_prompt(prompt, max_new_tokens: int, generator, eos_token_id, *, target: GPT2,
                            draft: GPT2 | None = None) -> torch.Tensor:
    """Raises ValueError for models or a prompt that do not fit together; returns the prompt as a 1-D LongTensor
    on the models' device. `draft` is the draft model, if the drafter has one."""
    models = {"target": target} if draft is None else {"target": target, "draft": draft}
    for name, model in models.items():
        if not isinstance(getattr(model, "model", model), GPT2):  # a GPT2, or a runner of one (CUDA graphs)
            raise ValueError(f"{name} must be a GPT2 model, got {type(model).__name__}")
    devices = {m.device for m in models.values()}
    if len(devices) > 1:
        raise ValueError(f"the models are on different devices ({', '.join(map(str, devices))}): move both to one")
    vocab_sizes = {m.config.vocab_size for m in models.values()}
    if len(vocab_sizes) > 1:
        raise ValueError(f"the models have different vocabulary sizes {sorted(vocab_sizes)}: they must share one")
    device, vocab_size = devices.pop(), vocab_sizes.pop()
    prompt = token_list(prompt)
    if not prompt:
        raise ValueError("prompt is empty: give at least one token id")
    if not all(0 <= t < vocab_size for t in prompt):
        raise ValueError(f"prompt must hold token ids in [0, {vocab_size})")
    if eos_token_id is not None and eos_token_id >= vocab_size:
        raise ValueError(f"eos_token_id={eos_token_id} is not a token id of the models (vocabulary {vocab_size})")
    context = min(m.config.n_positions for m in models.values())
    if len(prompt) + max_new_tokens > context:
        raise ValueError(f"prompt ({len(prompt)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                         f"context of {context} positions: shorten one of them")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"the generator is on {generator.device} but the models are on {device}: make it there")
    return torch.tensor(prompt, dtype=torch.long, device=device)


def token_list(prompt) -> list[int]:
    """The prompt as a list of ints: from a list or tuple of integers, or a 1-D integer tensor or array."""
    if isinstance(prompt, str):
        raise ValueError("prompt is text: encode it first, e.g. prompt = load_tokenizer().encode(text)")
    if isinstance(prompt, torch.Tensor) or hasattr(prompt, "__array__"):  # a tensor or a numpy array
        dtype = prompt.dtype
        integer = (not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
                   if isinstance(prompt, torch.Tensor) else getattr(dtype, "kind", "") in ("i", "u"))
        if prompt.ndim != 1 or not integer:
            raise ValueError(f"prompt must be a 1-D array of token ids, got shape {list(prompt.shape)}, {prompt.dtype}")
        return [int(t) for t in prompt.tolist()]
    if not isinstance(prompt, (list, tuple)):
        raise ValueError(f"prompt must be a list of token ids or a 1-D tensor, got {type(prompt).__name__}")
    if not all(isinstance(t, Integral) and not isinstance(t, bool) for t in prompt):
        raise ValueError("prompt must hold integer token ids")
    return [int(t) for t in prompt]



def check_finite(finite: dict[str, bool], position: int) -> None:
    """Names the model whose logits (read back with the round's one sync) held NaN or inf."""
    for name, ok in finite.items():
        if not ok:
            raise ValueError(f"the {name} produced NaN or infinite logits (at new token {position}): its weights "
                             f"are broken or overflow in this dtype; check the checkpoint, or try float32")
