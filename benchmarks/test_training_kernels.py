"""Layer 1: the fused training kernels (residual+LayerNorm, ITC, linear+CE) vs eager at the
paper's shapes (GPU, bf16), fwd + bwd; peak CUDA memory and TFLOP/s in extra_info.

Run: blip2rt bench -k training_kernel
"""

import pytest
import torch

from kernel_floors import plan_bytes, record_kernel_floor
from timing import measure
from training_kernel_cases import CASES, FUSED_KERNEL, PAPER_SHAPES


@pytest.mark.parametrize("impl", ["fused", "eager", "compiled"])
@pytest.mark.parametrize("op", list(CASES))
def test_training_kernel(benchmark, cuda, op, impl):
    benchmark.group = f"{op} {PAPER_SHAPES[op]}"
    case = CASES[op](impl, cuda, torch.bfloat16, **PAPER_SHAPES[op])
    measure(benchmark, case.step, device=cuda, expect=(FUSED_KERNEL[op],))
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(dtype="bf16", shape=PAPER_SHAPES[op],
                                tflops=round(case.flops / median / 1e12, 2) if case.flops else None)
    nbytes = plan_bytes(lambda device: CASES[op]("fused", device, torch.bfloat16, **PAPER_SHAPES[op]).step)
    record_kernel_floor(benchmark, nbytes, case.flops, cuda)
