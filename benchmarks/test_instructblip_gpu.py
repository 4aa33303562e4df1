"""InstructBLIP on a GPU at Vicuna-7B's size (EVA ViT-g, the BERT-base Q-Former reading a 16-token
instruction, LLaMA-7B; random weights, bf16): a 10-token answer to a 24-token prompt, greedy, at
B = 1 and 8. blip2rt graphed (fused Q-Former; the static decoder's prefill and decode replayed from
CUDA graphs) vs blip2rt fused behind transformers' generate vs transformers'
InstructBlipForConditionalGeneration.generate. extra_info holds the memory-bandwidth floor.

Run: blip2rt bench -k instructblip_gpu   (or `make gpu-check ARGS="--only instructblip"`)
"""

import gc

import pytest
import torch

from caption_gpu_cases import instruct_case
from floors import caption_floor_seconds, cuda_copy_bandwidth, record_floor
from timing import measure, per_second

NEW_TOKENS = 10
PRESET = "instructblip-vicuna-7b"


@pytest.mark.parametrize("impl", ["graphed", "transformers", "fused"])
@pytest.mark.parametrize("batch", [1, 8])
def test_instructblip_gpu(benchmark, cuda, batch, impl):
    benchmark.group = f"answer {PRESET} B={batch} {NEW_TOKENS} tokens greedy (gpu)"
    gc.collect()  # the previous case's 16 GB model
    torch.cuda.empty_cache()
    step, model = instruct_case(impl, cuda, PRESET, batch, NEW_TOKENS)
    measure(benchmark, step, rounds=10, warmup=2, device=cuda,
            expect=("fused_attention._fwd_kernel",) if impl != "transformers" else ())
    per_second(benchmark, "tokens_per_s", NEW_TOKENS * batch)
    bw = cuda_copy_bandwidth(cuda)
    record_floor(benchmark, caption_floor_seconds(model, NEW_TOKENS, bw), bw)
