"""CUDA graphs for the cached passes of decoding: captured once per (cache buffers, new tokens), then replayed.

Eager decoding on a GPU is bound by the CPU launching the hundreds of small kernels of a pass (GPT-2 XL: about
600); a captured graph launches them all at once. `CUDAGraphRunner(model)` wraps a model on a CUDA device and is
passed to the samplers in its place: it replays a graph for every cached pass of at most MAX_GRAPHED_ROWS new
tokens (draft passes, verification, plain decoding; in exact mode every such pass has the same rows, so one graph
serves them all); longer passes (a long prompt's prefill) and passes without a cache run eagerly. The static-shape
cache (gpt2_model.KVCache) is what makes this possible: a pass of T tokens has the same shapes wherever it is in
the sequence, its positions live in a device tensor, and nothing on the host decides a shape.

Graphs record the weights' addresses: after moving, converting or reloading the model, make a new runner.

Memory, kept until the runner is dropped: every graph's static inputs and output
logits (T, vocab), one pool of activations shared by all graphs of the model, and the cache buffers the graphs
were captured on. Those buffers are recycled: `new_cache` hands a dropped cache's buffers to the next call whose
buffer has the same length (whole key blocks, `KVCache.slots`), so that a later call replays the graphs of an
earlier one instead of capturing again. A cache of another length gets new buffers and new graphs.
"""

from __future__ import annotations

import weakref

import torch

from gpt2_model import KVCache
from speculative_gpt2.checks import check_integer

MAX_GRAPHED_ROWS = 16  # passes of more new tokens (a long prefill) run eagerly


class CUDAGraphRunner:
    """A GPT2 on a CUDA device whose cached passes replay captured graphs; used by the samplers as the model is."""

    def __init__(self, model):
        if model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {model.device}")
        self.model, self.config, self.device, self.dtype = model, model.config, model.device, model.dtype
        self.graphs = CUDAGraphs(model.device)

    def new_cache(self, batch_size: int = 1, max_len: int | None = None, room: int = 0):
        """As GPT2.new_cache, on recycled buffers, so that the next call replays this call's graphs."""
        return self.graphs.new_cache(self.config, check_integer("batch_size", batch_size, minimum=1),
                                     self.model.cache_length(max_len, room), self.model.dtype)

    def positions(self, idx: torch.Tensor, cache, rows: int | None = None) -> torch.Tensor:
        return self.model.positions(idx, cache, rows)

    def forward_at(self, idx: torch.Tensor, positions: torch.Tensor, cache, span: int | None = None,
                   logits: bool = True) -> torch.Tensor | None:
        # A prefill (no logits) runs eagerly, as a long one always did: a captured pass would run the LM head too.
        if cache is None or not logits or idx.shape[1] > MAX_GRAPHED_ROWS or torch.is_grad_enabled():
            return self.model.forward_at(idx, positions, cache, span, logits=logits)
        return self.graphs.run(self.model, idx, positions, cache)  # the whole buffer: one shape to capture

    def __call__(self, idx: torch.Tensor, cache=None, logits: bool = True) -> torch.Tensor | None:
        span = None if cache is None else cache.span(idx.shape[1])
        logits = self.forward_at(idx, self.positions(idx, cache), cache, span, logits=logits)
        if cache is not None:
            cache.lengths = [n + idx.shape[1] for n in cache.lengths]
        return logits

    def parameters(self):
        return self.model.parameters()


class CUDAGraphs:
    """The captured passes of one model on one CUDA device, and the cache buffers they were captured on."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, _Graph] = {}  # (keys' address, batch, new tokens) -> graph
        self.free: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # buffers of dropped caches

    def new_cache(self, config, batch_size: int, max_len: int, dtype: torch.dtype):
        """A cache of `max_len` positions on recycled buffers when some fit, else on new ones; its buffers come back
        here when it is dropped."""
        # Ordinary tensors even when called under inference_mode (as the samplers are): a buffer made there could
        # not be written outside it later.
        with torch.inference_mode(False):
            cache = KVCache(config, batch_size, max_len, dtype, self.device,
                            buffers=self._take(batch_size, max_len, dtype))
        weakref.finalize(cache, self.free.append, (cache.keys, cache.values, cache.key_positions))
        return cache

    def _take(self, batch_size: int, max_len: int, dtype: torch.dtype):
        for i, (keys, values, positions) in enumerate(self.free):
            if keys.shape[1] == batch_size and keys.shape[3] == KVCache.slots(max_len) and keys.dtype == dtype:
                keys.zero_(), values.zero_()  # what a previous call left (an overflow's inf) must not carry over
                return self.free.pop(i)
        return None

    def run(self, model, idx: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """model.forward_at(idx, positions, cache), from its graph (captured now if it is the first such pass)."""
        key = (cache.keys.data_ptr(), idx.shape[0], idx.shape[1])
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = _Graph(model, idx, positions, cache, self.pool)
        else:
            graph.idx.copy_(idx)
            graph.positions.copy_(positions)
            graph.graph.replay()
        return graph.logits.clone()  # the next replay overwrites the graph's own output


class _Graph:
    """One captured pass: static inputs idx (B, T) and positions (B, T), the cache's buffers, output logits."""

    def __init__(self, model, idx: torch.Tensor, positions: torch.Tensor, cache, pool):
        with torch.cuda.device(idx.device):  # capture on the model's GPU, whichever is current
            self._capture(model, idx, positions, cache, pool)

    def _capture(self, model, idx: torch.Tensor, positions: torch.Tensor, cache, pool) -> None:
        # The graph reads and writes these buffers by address: holding them keeps the address valid.
        self.buffers = (cache.keys, cache.values, cache.key_positions)
        with torch.inference_mode(False):  # static inputs that later calls may fill outside inference mode too
            self.idx, self.positions = idx.clone(), positions.clone()
        # Warm-up on a side stream, as capture requires (lazy initialisations, kernel choices). These passes write
        # the same keys and values at the same positions as the pass itself, so the cache ends as eager would leave it.
        stream = torch.cuda.Stream(device=idx.device)
        stream.wait_stream(torch.cuda.current_stream(idx.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                model.forward_at(self.idx, self.positions, cache)
        torch.cuda.current_stream(idx.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, stream=stream):
            self.logits = model.forward_at(self.idx, self.positions, cache)
        self.graph.replay()  # capturing records the kernels without running them: run this pass now
