"""Layer 5 on a GPU: caption latency (B = 1) and throughput (B = 8) at ViT-g + OPT-2.7B shapes,
30 new tokens, greedy: blip2rt graphed (cuda_graphs: the visual prefix, prefill and decode steps
replayed from CUDA graphs) vs blip2rt fused vs blip2rt eager vs blip2rt's static KV cache with its
decode step compiled vs transformers' generate. extra_info holds the memory-bandwidth floor (LLM bytes x
tokens / measured copy bandwidth) and the ratio to it.

Run: blip2rt bench -k caption_gpu
Targets at B = 1: graphed >= 3x transformers, and within 2x of the floor.
"""

import pytest

from caption_gpu_cases import caption_case
from floors import caption_floor_seconds, cuda_copy_bandwidth, record_floor
from timing import measure, per_second

NEW_TOKENS = 30


@pytest.mark.parametrize("impl", ["graphed", "fused", "torch", "static-compiled", "transformers"])
@pytest.mark.parametrize("batch", [1, 8])
def test_caption_gpu(benchmark, cuda, batch, impl):
    benchmark.group = f"caption blip2-opt-2.7b B={batch} {NEW_TOKENS} tokens greedy (gpu)"
    step, model = caption_case(impl, cuda, "blip2-opt-2.7b", batch, NEW_TOKENS)
    measure(benchmark, step, rounds=10, warmup=2, device=cuda, expect=("fused_attention._fwd_kernel",))
    per_second(benchmark, "tokens_per_s", NEW_TOKENS * batch)
    bw = cuda_copy_bandwidth(cuda)
    record_floor(benchmark, caption_floor_seconds(model, NEW_TOKENS, bw), bw)
