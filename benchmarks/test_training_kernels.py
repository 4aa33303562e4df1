"""Fused vs eager for the training kernels at the paper's shapes (GPU, bf16), fwd + bwd.

Run: pytest benchmarks/test_training_kernels.py --benchmark-columns=median,iqr,rounds
Each case records the peak CUDA memory of one step and the throughput in extra_info; compare
fused against eager within one run (same machine, same moment).
"""

import pytest
import torch

from timing import run_timed
from training_kernel_cases import CASES, PAPER_SHAPES


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("op", list(CASES))
def test_training_kernel(benchmark, cuda, op, impl):
    benchmark.group = f"{op} {PAPER_SHAPES[op]}"
    case = CASES[op](impl, cuda, torch.bfloat16, **PAPER_SHAPES[op])
    peak = run_timed(benchmark, case.step)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(peak_mib=round(peak, 1), dtype="bf16", shape=PAPER_SHAPES[op],
                                tflops=round(case.flops / median / 1e12, 2) if case.flops else None,
                                device=torch.cuda.get_device_name())
