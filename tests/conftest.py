"""Shared fixtures: tiny random GPT-2 checkpoints written by `transformers`, the reference implementation."""

import pytest
import torch


def make_reference(n_layer=2, n_embd=64, n_head=4, seed=0, std=0.02):
    """A random `transformers.GPT2LMHeadModel` with the real 50257-token vocabulary, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, initializer_range=std))
    return model.eval()


@pytest.fixture(scope="session")
def reference_folder(tmp_path_factory):
    """A `save_pretrained` folder of a 3-layer, 96-wide reference model, and the model itself."""
    model = make_reference(n_layer=3, n_embd=96, n_head=4)
    folder = tmp_path_factory.mktemp("reference")
    model.save_pretrained(folder)
    return folder, model
