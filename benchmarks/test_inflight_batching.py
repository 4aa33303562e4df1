"""In-flight batching on ONNX Runtime (CPU provider): 16 requests of 20 greedy tokens each through
one static KV buffer of 1, 4 or 16 slots (export/inflight.py). Each request is prefilled alone and
joins the batch at the next step; with one slot they run one after another, which is what a server
without in-flight batching does. The tokens are the same in every case (tests/test_inflight_batching.py).

Run: blip2rt bench -k inflight
"""

import functools

import numpy as np
import pytest

from ort_cases import model_and_export
from timing import measure, per_second, quick_mode

REQUESTS, NEW_TOKENS = 16, 20


@functools.lru_cache(maxsize=2)
def _requests(preset: str) -> tuple:
    """The export and the LLM inputs of 16 requests (random images, one prompt), made once."""
    _, rt = model_and_export(preset)
    from blip2rt.export import OrtBlip2

    rt = OrtBlip2(rt.dir, providers=["CPUExecutionProvider"], static_cache=True)
    rng = np.random.default_rng(0)
    size = rt.cfg.image_size
    ids, mask = rt.encode(["a photo of"])
    inputs = [rt.llm_inputs(rt.image_features(rng.standard_normal((1, 3, size, size)).astype(np.float32)), ids, mask)
              for _ in range(REQUESTS)]
    return rt, inputs


@pytest.mark.parametrize("slots", [1, 4, 16])
@pytest.mark.parametrize("preset", ["tiny", "blip2-mini"])
def test_inflight_batching(benchmark, preset, slots):
    if preset != "tiny" and quick_mode():
        pytest.skip("the quick run checks the batcher on tiny")
    from blip2rt.export.inflight import InflightBatcher

    rt, inputs = _requests(preset)
    benchmark.group = f"in-flight batching {preset} {REQUESTS} requests x {NEW_TOKENS} tokens (cpu)"
    longest = max(e.shape[1] for e, _ in inputs) + NEW_TOKENS
    batcher = InflightBatcher(rt.graphs, slots=slots, length=-(-longest // 32) * 32)

    def run():
        seqs = [batcher.submit(e[0], m[0], NEW_TOKENS, NEW_TOKENS) for e, m in inputs]
        batcher.run_until_done()
        assert all(len(s.tokens) == NEW_TOKENS for s in seqs)

    measure(benchmark, run, rounds=5, warmup=1)
    per_second(benchmark, "tokens_per_s", REQUESTS * NEW_TOKENS)
    per_second(benchmark, "requests_per_s", REQUESTS)
