"""Q-Former attention at the paper's shapes (GPU, bf16): fused vs eager vs SDPA, fwd and fwd+bwd,
and the whole Q-Former forward at B = 1.

Run: pytest benchmarks/test_attention_kernels.py --benchmark-columns=median,iqr,rounds
"""

import pytest
import torch

from attention_cases import PAPER, attention_case, qformer_forward_case
from timing import run_timed


@pytest.mark.parametrize("impl", ["fused", "eager", "sdpa"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("batch", [1, 32, 128])
@pytest.mark.parametrize("kind", ["cross", "self"])
def test_attention(benchmark, cuda, kind, batch, backward, impl):
    benchmark.group = f"{kind}-attention B={batch} {'fwd+bwd' if backward else 'fwd'}"
    step = attention_case(kind, impl, cuda, torch.bfloat16, batch=batch, backward=backward, **PAPER)
    peak = run_timed(benchmark, step)
    benchmark.extra_info.update(peak_mib=round(peak, 1), samples_per_s=round(batch / benchmark.stats.stats.median),
                                device=torch.cuda.get_device_name())


@pytest.mark.parametrize("impl", ["fused", "torch", "transformers"])
def test_qformer_forward_batch1(benchmark, cuda, impl):
    """BERT-base Q-Former over ViT-g tokens (257 x 1408) at B = 1: the latency case."""
    benchmark.group = "qformer forward B=1"
    step = qformer_forward_case(impl, cuda, torch.bfloat16, "blip2-itm-vit-g", batch=1)
    peak = run_timed(benchmark, step)
    benchmark.extra_info.update(peak_mib=round(peak, 1), device=torch.cuda.get_device_name())
