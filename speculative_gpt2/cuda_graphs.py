"""CUDA graphs for the cached passes of decoding: captured once per (cache buffers, new tokens), then replayed.

Eager decoding on a GPU is bound by the CPU launching the hundreds of small kernels of a pass (GPT-2 XL: about
600); a captured graph launches them all at once. With `model.use_cuda_graphs()`, `GPT2.forward` replays a graph
for every cached pass of at most gpt2_model.MAX_GRAPHED_ROWS new tokens (draft passes, verification, plain decoding); under
`model.fixed_pass_rows(n)` every such pass has n rows, so one graph serves them all; longer passes
(a long prompt's prefill) and passes without a cache stay eager. The static-shape cache (gpt2_model.KVCache) is
what makes this possible: a pass of T tokens has the same shapes wherever it is in the sequence, its positions
live in a device tensor, and nothing on the host decides a shape.

Graphs also record the weights' addresses: moving or converting the model (`.to`, `.half`) captures anew
(GPT2._apply), but weights replaced by hand (`load_state_dict(assign=True)`) need `use_cuda_graphs()` again.

Memory, kept until `model.use_cuda_graphs(False)` or the model is dropped: every graph's static inputs and output
logits (T, vocab), one pool of activations shared by all graphs of the model, and the cache buffers the graphs
were captured on. Those buffers are recycled: `new_cache` hands a dropped cache's buffers to the next call (its
length rounded up to a multiple of BUCKET), so that a later call replays the graphs of an earlier one instead of
capturing again. A cache of another length gets new buffers and new graphs.
"""

from __future__ import annotations

import weakref

import torch

BUCKET = 256  # cache lengths are rounded up to a multiple of this, so that calls of similar lengths share graphs


class CUDAGraphs:
    """The captured passes of one model on one CUDA device, and the cache buffers they were captured on."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, _Graph] = {}  # (keys' address, batch, new tokens) -> graph
        self.free: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # buffers of dropped caches

    def new_cache(self, cache_class, config, batch_size: int, max_len: int, dtype: torch.dtype):
        """A cache of at least `max_len` positions on recycled buffers when some fit, else on new ones; its
        buffers come back here when it is dropped."""
        # Never shorter than asked: under fixed_pass_rows the padding slots may reach past the context.
        max_len = max(max_len, min(-(-max_len // BUCKET) * BUCKET, config.n_positions))
        # Ordinary tensors even when called under inference_mode (as the samplers are): a buffer made there could
        # not be written outside it later.
        with torch.inference_mode(False):
            cache = cache_class(config, batch_size, max_len, dtype, self.device,
                                buffers=self._take(batch_size, max_len, dtype))
        weakref.finalize(cache, self.free.append, (cache.keys, cache.values, cache.key_positions))
        return cache

    def _take(self, batch_size: int, max_len: int, dtype: torch.dtype):
        for i, (keys, values, positions) in enumerate(self.free):
            if keys.shape[1] == batch_size and keys.shape[3] == max_len and keys.dtype == dtype:
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
