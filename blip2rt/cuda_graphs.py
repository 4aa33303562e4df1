"""Inference replayed from CUDA graphs: one launch for the whole visual prefix (ViT, Q-Former,
projection) instead of hundreds, each with its host time.

`GraphedByBatch` wraps a function of a batch, x (B, ...) -> (B, ...), whose rows do not depend on one
another (no batch statistics). Per batch-size bucket (1, 2, 4, ... 64) it captures the function once,
over a static input buffer; a call copies its rows into the bucket's buffer (the spare rows repeat
row 0), replays the graph and returns its rows of the output. Batches past the last bucket run
eagerly. The buckets share one memory pool.

`from_pretrained(..., cuda_graphs=True)` (or `Blip2.set_cuda_graphs(True)`) turns this on for the
visual prefix, and with it the static-cache decoding with a compiled decode step and prefill
(torch.compile's reduce-overhead mode: CUDA graphs too); captions stay token-identical to eager
(tests/test_cuda_graphs.py, on a GPU). The bucketing and copying are plain torch and are tested on the CPU
with the capture replaced by a direct call; the capture itself needs CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

BUCKETS = (1, 2, 4, 8, 16, 32, 64)

# capture(fn, static_input) -> (replay, static_output): runs fn once into a replayable form
Capture = Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], tuple[Callable[[], None], torch.Tensor]]


class CudaGraphCapture:
    """Captures into CUDA graphs that share one memory pool (after two warm-up calls on a side stream,
    which compile the Triton kernels and settle the allocator, as torch's graph docs prescribe)."""

    def __init__(self):
        self.pool = None

    def __call__(self, fn, static_input):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(static_input)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_output = fn(static_input)
        return graph.replay, static_output


class GraphedByBatch:
    """fn over a batch, replayed from one captured graph per batch-size bucket (see the module)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], buckets: Sequence[int] = BUCKETS,
                 capture: Capture | None = None):
        self.fn, self.buckets = fn, tuple(sorted(buckets))
        self.capture = capture if capture is not None else CudaGraphCapture()
        self.graphs: dict[tuple, tuple[torch.Tensor, Callable[[], None], torch.Tensor]] = {}

    def bucket(self, batch: int) -> int | None:
        """The smallest bucket that holds `batch` rows, or None past the largest."""
        return next((size for size in self.buckets if size >= batch), None)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        size = self.bucket(b)
        if size is None:
            return self.fn(x)
        key = (size, tuple(x.shape[1:]), x.dtype, x.device)
        entry = self.graphs.get(key)
        if entry is None:
            static_input = torch.empty((size, *x.shape[1:]), dtype=x.dtype, device=x.device)
            self._fill(static_input, x)
            replay, static_output = self.capture(self.fn, static_input)
            entry = self.graphs[key] = (static_input, replay, static_output)
        static_input, replay, static_output = entry
        self._fill(static_input, x)
        replay()
        return static_output[:b].clone()  # the next replay overwrites the static output

    @staticmethod
    def _fill(static_input: torch.Tensor, x: torch.Tensor) -> None:
        b = x.shape[0]
        static_input[:b].copy_(x)
        if b < static_input.shape[0]:  # spare rows: copies of row 0, so they compute nothing unusual
            static_input[b:].copy_(x[:1].expand(static_input.shape[0] - b, *x.shape[1:]))
