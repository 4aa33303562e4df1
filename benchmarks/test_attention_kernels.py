"""Layer 1-2: Q-Former attention kernels and the whole Q-Former.

- GPU (bf16, paper shapes): cross-attention and masked self-attention, fused vs eager vs SDPA,
  fwd and fwd+bwd; the Q-Former over ViT-g tokens at B = 1 and B = 32.
- CPU (fp32, `tiny` and `mini` shapes): the Q-Former forward and forward+backward, blip2rt's
  torch path vs transformers' Blip2QFormerModel (the Triton kernels need a GPU).

Run: blip2rt bench -k attention   (or pytest benchmarks/test_attention_kernels.py)
"""

import pytest
import torch

from attention_cases import PAPER, attention_case, qformer_forward_case
from kernel_floors import attention_flops, plan_bytes, record_kernel_floor
from timing import measure, per_second, skip_compiled_in_quick_mode

CPU_PRESETS = ["tiny", "blip2-mini"]


@pytest.mark.parametrize("impl", ["fused", "eager", "sdpa"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("batch", [1, 32, 128])
@pytest.mark.parametrize("kind", ["cross", "self"])
def test_attention(benchmark, cuda, kind, batch, backward, impl):
    benchmark.group = f"{kind}-attention B={batch} {'fwd+bwd' if backward else 'fwd'}"
    step = attention_case(kind, impl, cuda, torch.bfloat16, batch=batch, backward=backward, **PAPER)
    kernels = ("fused_attention._fwd_kernel",) + (("fused_attention._bwd_kernel",) if backward else ())
    measure(benchmark, step, device=cuda, expect=kernels)
    per_second(benchmark, "samples_per_s", batch)
    nbytes = plan_bytes(lambda device: attention_case(kind, "fused", device, torch.bfloat16, batch=batch,
                                                      backward=backward, **PAPER))
    record_kernel_floor(benchmark, nbytes, attention_flops(kind, batch, backward, **PAPER), cuda)


@pytest.mark.parametrize("impl", ["fused", "graphed", "torch", "compiled", "transformers"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("batch", [1, 32, 128])
def test_qformer_gpu(benchmark, cuda, batch, backward, impl):
    """BERT-base Q-Former over ViT-g tokens (257 x 1408); B = 1 is the latency case. "graphed"
    replays the fused forward from a CUDA graph (target at B = 1: 0.8 ms)."""
    if impl == "graphed" and backward:
        pytest.skip("CUDA graphs serve inference: the graphed case is forward only")
    benchmark.group = f"qformer blip2-itm-vit-g B={batch} {'fwd+bwd' if backward else 'fwd'}"
    step = qformer_forward_case(impl, cuda, torch.bfloat16, "blip2-itm-vit-g", batch=batch, backward=backward)
    measure(benchmark, step, device=cuda, expect=("fused_attention._fwd_kernel",))
    per_second(benchmark, "images_per_s", batch)


@pytest.mark.parametrize("impl", ["torch", "compiled", "transformers"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("preset", CPU_PRESETS)
def test_qformer_cpu(benchmark, preset, backward, impl):
    skip_compiled_in_quick_mode(impl)
    batch = 8
    benchmark.group = f"qformer {preset} B={batch} {'fwd+bwd' if backward else 'fwd'} (cpu)"
    step = qformer_forward_case(impl, torch.device("cpu"), torch.float32, preset, batch=batch, backward=backward)
    measure(benchmark, step, rounds=10, warmup=2)
    per_second(benchmark, "images_per_s", batch)
