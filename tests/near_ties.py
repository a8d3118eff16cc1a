"""Models that meet near-ties at every step, as trained models do often: token 2i + 1's embedding is token 2i's
with relative noise of the dtype's epsilon, and the LM head is tied to the embedding, so the two tokens' logits
differ in their last bits and any rounding that moves with the surroundings flips the argmax (or the Gumbel-max).
"""

from functools import lru_cache

import torch

from gpt2_model import GPT2Config
from speculative_gpt2.packing import pack_linears
from speculative_gpt2.random_checkpoint import random_model

VOCAB = 512


@lru_cache(maxsize=None)
def near_tie_model(dtype_name: str, n_layer: int = 2, seed: int = 0, vocab_size: int = VOCAB, pack: bool = True):
    """A random GPT-2 (head size 64, as GPT-2's) whose tokens come in pairs with near-equal embeddings; in float32
    packed for oneDNN (as the command line runs it) unless `pack` is False."""
    config = GPT2Config(vocab_size=vocab_size, n_positions=1024, n_embd=256, n_layer=n_layer, n_head=4)
    dtype = getattr(torch, dtype_name)
    model = random_model(config, seed=seed, scale=5).to(dtype)
    with torch.no_grad():
        wte = model.wte.weight.float()
        pairs = vocab_size // 2
        noise = torch.randn(pairs, config.n_embd, generator=torch.Generator().manual_seed(seed))
        model.wte.weight[1 : 2 * pairs : 2] = (wte[0 : 2 * pairs : 2] * (1 + torch.finfo(dtype).eps * noise)).to(dtype)
    return pack_linears(model) if dtype_name == "float32" and pack else model
