"""Training-step throughput at paper shapes (GPU): ViT-g + BERT-base Q-Former (stage 1, B = 64),
ViT-g + OPT-2.7B (stage 2, B = 32); kernels="triton" vs "torch" vs a LAVIS-style eager step.

Run: pytest benchmarks/test_train_step.py --benchmark-columns=median,rounds
MFU uses the H100/H200 dense bf16 peak (989 TFLOP/s); the FLOP counts are estimates (see the cases).
"""

import pytest
import torch

from timing import run_timed
from train_step_cases import stage1_step, stage2_step

PEAK_BF16 = 989e12


@pytest.mark.parametrize("impl", ["triton", "torch", "lavis"])
def test_stage1_step(benchmark, cuda, impl):
    benchmark.group = "stage-1 step, blip2-itm-vit-g, B=64"
    step, flops = stage1_step(impl, cuda, "blip2-itm-vit-g", batch=64)
    peak = run_timed(benchmark, step, rounds=10, warmup=2)
    t = benchmark.stats.stats.median
    benchmark.extra_info.update(samples_per_s=round(64 / t, 1), mfu=round(flops / t / PEAK_BF16, 3), peak_mib=round(peak),
                                device=torch.cuda.get_device_name())


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_stage2_step(benchmark, cuda, impl):
    benchmark.group = "stage-2 step, blip2-opt-2.7b, B=32"
    step, flops = stage2_step(impl, cuda, "blip2-opt-2.7b", batch=32)
    peak = run_timed(benchmark, step, rounds=10, warmup=2)
    t = benchmark.stats.stats.median
    benchmark.extra_info.update(samples_per_s=round(32 / t, 1), mfu=round(flops / t / PEAK_BF16, 3), peak_mib=round(peak),
                                device=torch.cuda.get_device_name())
