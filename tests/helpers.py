"""Small random GPT-2 models for the tests: random weights scaled up so that the logits are not flat."""

import torch

from gpt2_model import GPT2, GPT2Config


def random_model(config: GPT2Config, seed: int, scale: float = 1.0) -> GPT2:
    """A GPT-2 with N(0, 0.02 * scale) weight matrices."""
    torch.manual_seed(seed)
    model = GPT2(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


def noisy_copy(model: GPT2, noise: float, seed: int) -> GPT2:
    """The same model with Gaussian noise of `noise` times each tensor's std: a draft that agrees sometimes."""
    copy = GPT2(model.config).eval()
    copy.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise * p.std())
    return copy
