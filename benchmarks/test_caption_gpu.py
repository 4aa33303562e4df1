"""Layer 5 on a GPU: caption latency (B = 1) and throughput (B = 8) at ViT-g + OPT-2.7B shapes,
30 new tokens, greedy: blip2rt fused vs blip2rt eager vs transformers' generate. extra_info holds
the memory-bandwidth floor (LLM bytes x tokens / measured copy bandwidth) and the ratio to it.

Run: blip2rt bench -k caption_gpu
Targets: B = 1 fused >= 3x transformers, and within 2x of the floor.
"""

import pytest

from caption_gpu_cases import caption_case, copy_bandwidth, floor_seconds
from timing import measure, per_second

NEW_TOKENS = 30


@pytest.mark.parametrize("impl", ["fused", "torch", "transformers"])
@pytest.mark.parametrize("batch", [1, 8])
def test_caption_gpu(benchmark, cuda, batch, impl):
    benchmark.group = f"caption blip2-opt-2.7b B={batch} {NEW_TOKENS} tokens greedy (gpu)"
    step, model = caption_case(impl, cuda, "blip2-opt-2.7b", batch, NEW_TOKENS)
    measure(benchmark, step, rounds=10, warmup=2, device=cuda, expect=("fused_attention._fwd_kernel",))
    per_second(benchmark, "tokens_per_s", NEW_TOKENS * batch)
    bw = copy_bandwidth(cuda)
    floor = floor_seconds(model, NEW_TOKENS, bw)
    benchmark.extra_info.update(copy_bandwidth_gb_s=round(bw / 1e9), floor_ms=round(1e3 * floor, 1),
                                x_floor=round(benchmark.stats.stats.median / floor, 2))
