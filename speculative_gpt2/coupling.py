"""Coupled sampling: every sampled token is the Gumbel-max of its distribution, with noise fixed by a seed and the
token's position, so that one seed gives one text whatever decodes it.

Gumbel-max: argmax_x (log q(x) + g(x)), with g(x) independent Gumbel(0, 1) draws, is an exact sample from q. If g
depends only on (seed, position), plain decoding and speculative sampling meet the same g at every position, so
they emit the same token there whenever they score it with the same q. Speculative sampling keeps a draft iff it
equals the target's Gumbel-max at its position, and the first mismatch gives way to the target's Gumbel-max: every
token is then the plain sampler's, whatever K, drafter or batch (Daliri, Musco and Suresh 2024, "Drafter-Invariant
Speculative Decoding"). A draft model proposes its own Gumbel-max with the same g, which agrees with the target's
most of the time when p is near q; the price is some acceptance against Chen's rule (docs/design.md, "Coupled
sampling").

The noise of a position comes from Philox, a counter-based generator (numpy's `np.random.Philox`), keyed by the
pair (seed, position): its key has 128 bits, so every seed from 0 to 2**63 - 1 and every position have a stream of
their own (torch's CPU generator keeps 32 bits of its seed: packing seed and position into that seed gave seeds
4096 apart the same noise). It is drawn on the CPU, the same on every device, for every batch and pass shape.
"""

from __future__ import annotations

import numpy as np
import torch

from speculative_gpt2.checks import check_integer

MAX_SEED = 2**63 - 1  # a seed is one 64-bit word of the key, the position the other


def check_coupling(coupled, seed, generator, batch_size: int, vocab_size: int, device) -> GumbelNoise | None:
    """The samplers' `coupled` and `seed` arguments, checked: the call's noise, or None when not coupled."""
    if not isinstance(coupled, bool):
        raise ValueError(f"coupled must be True or False, got {coupled!r}")
    if not coupled:
        if seed is not None:
            raise ValueError("seed is for coupled sampling: pass coupled=True too, or a generator instead")
        return None
    if generator is not None:
        raise ValueError("coupled sampling draws its noise from seed, not from a generator: pass seed=..., "
                         "not generator")
    if seed is None:
        raise ValueError("coupled sampling needs seed=<an integer>, or a list of one per prompt")
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * batch_size
    if len(seeds) != batch_size:
        raise ValueError(f"seed must be an integer or a list of one per prompt ({batch_size}), got {len(seeds)}")
    return GumbelNoise([check_integer("seed", s, 0, MAX_SEED) for s in seeds], vocab_size, device)


def gumbel_noise(seed: int, position: int, vocab_size: int) -> torch.Tensor:
    """g (V,) float32 on the CPU: independent Gumbel(0, 1) draws for the token at `position` under `seed`."""
    raw = np.random.Philox(key=np.array([seed, position], dtype=np.uint64)).random_raw(vocab_size)  # (V,) uint64
    # The top 23 bits k as u = (2k + 1) / 2**24: exact in float32, uniform, never 0 or 1 (whose logs are infinite).
    odd = (raw >> np.uint64(41)).astype(np.float32) * 2 + 1
    u = torch.from_numpy(odd / np.float32(2**24))
    return -torch.log(-torch.log(u))


# The draws a call keeps per row: a draft model asks for the positions that the target verifies next, and a rejected
# position is asked again the next round (up to K + 1 <= 13 each); past that they are drawn again, identically.
RECENT = 32


class GumbelNoise:
    """The noise of a call: row b's tokens draw theirs from seeds[b]; each (row, position) drawn once while recent."""

    def __init__(self, seeds: list[int], vocab_size: int, device):
        self.seeds, self.vocab_size, self.device = seeds, vocab_size, device
        self.drawn: dict[tuple[int, int], torch.Tensor] = {}  # (row, position) -> g (V,) on the device

    def at(self, starts: list[int], count: int) -> torch.Tensor:
        """(B, count, V) on the device: row b's noise at positions starts[b] ... starts[b] + count - 1."""
        if len(self.drawn) > RECENT * len(self.seeds):
            self.drawn.clear()
        for b, (seed, start) in enumerate(zip(self.seeds, starts)):
            for position in range(start, start + count):
                if (b, position) not in self.drawn:
                    self.drawn[b, position] = gumbel_noise(seed, position, self.vocab_size).to(self.device)
        return torch.stack([torch.stack([self.drawn[b, start + i] for i in range(count)])
                            for b, start in enumerate(starts)])


def gumbel_max(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """argmax(log probs + noise) over the last dimension: a sample from probs (..., V), zeros never chosen."""
    return (probs.log() + noise).argmax(-1)
