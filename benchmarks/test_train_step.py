"""Layer 3: one optimiser step of each stage.

- GPU (paper shapes): ViT-g + BERT-base Q-Former (stage 1, B = 64) and ViT-g + OPT-2.7B
  (stage 2, B = 32); kernels="triton" vs "torch" vs "compiled" (the torch path under torch.compile)
  vs a LAVIS-style eager stage-1 step. MFU uses
  the H100/H200 dense bf16 peak (989 TFLOP/s); the FLOP counts are estimates (see the cases).
- CPU (`tiny` and `mini` shapes, random weights): "torch" and "compiled" (the same under torch.compile)
  vs the LAVIS-style step, in the precision
  the trainer's `amp: auto` picks on this CPU ("auto": bf16 autocast only where the CPU has native
  bf16) and in fp32 with bf16 forced off ("fp32"), as a CPU without native bf16 runs. Where "auto" is
  fp32 too, its case is skipped as a repeat.

Run: blip2rt bench -k train_step
"""

import pytest
import torch

from timing import measure, per_second, skip_compiled_in_quick_mode
from train_step_cases import FUSED_STAGE1, FUSED_STAGE2, check_attention_dropout, stage1_step, stage2_step, step_precision

PEAK_BF16 = 989e12
CPU = torch.device("cpu")
CPU_CASES = [("tiny", 8), ("blip2-mini", 8)]


def _mfu(benchmark, flops):
    benchmark.extra_info["mfu"] = round(flops / benchmark.stats.stats.median / PEAK_BF16, 3)


@pytest.mark.parametrize("impl", ["triton", "torch", "compiled", "lavis"])
def test_stage1_step_gpu(benchmark, cuda, impl):
    benchmark.group = "stage-1 step blip2-itm-vit-g B=64"
    step, flops = stage1_step(impl, cuda, "blip2-itm-vit-g", batch=64)
    ran = measure(benchmark, step, rounds=10, warmup=2, device=cuda, expect=FUSED_STAGE1)
    if impl == "triton":
        check_attention_dropout(benchmark, ran)
    per_second(benchmark, "samples_per_s", 64)
    _mfu(benchmark, flops)


@pytest.mark.parametrize("impl", ["triton", "torch", "compiled"])
def test_stage2_step_gpu(benchmark, cuda, impl):
    benchmark.group = "stage-2 step blip2-opt-2.7b B=32"
    step, flops = stage2_step(impl, cuda, "blip2-opt-2.7b", batch=32)
    ran = measure(benchmark, step, rounds=10, warmup=2, device=cuda, expect=FUSED_STAGE2)
    if impl == "triton":
        check_attention_dropout(benchmark, ran)
    per_second(benchmark, "samples_per_s", 32)
    _mfu(benchmark, flops)


def _cpu_precision(benchmark, precision: str) -> bool:
    """Records the case's precision and why; False for bf16 on (auto) when auto is fp32 here."""
    chosen = step_precision(CPU, bf16=precision == "auto")
    if precision == "auto" and chosen.amp == "none":
        pytest.skip(f"amp auto is fp32 on this CPU ({chosen.reason}): the fp32 case times it")
    benchmark.extra_info.update(precision=chosen.describe())
    return precision == "auto"


@pytest.mark.parametrize("precision", ["auto", "fp32"])
@pytest.mark.parametrize("impl", ["torch", "compiled", "lavis"])
@pytest.mark.parametrize("preset,batch", CPU_CASES)
def test_stage1_step_cpu(benchmark, preset, batch, impl, precision):
    skip_compiled_in_quick_mode(impl)
    benchmark.group = f"stage-1 step {preset} B={batch} (cpu, {precision})"
    step, _ = stage1_step(impl, CPU, preset, batch=batch, text_len=16, bf16=_cpu_precision(benchmark, precision))
    measure(benchmark, step, rounds=5, warmup=1)
    per_second(benchmark, "samples_per_s", batch)


@pytest.mark.parametrize("precision", ["auto", "fp32"])
@pytest.mark.parametrize("impl", ["torch", "compiled"])
@pytest.mark.parametrize("preset,batch", CPU_CASES)
def test_stage2_step_cpu(benchmark, preset, batch, impl, precision):
    skip_compiled_in_quick_mode(impl)
    benchmark.group = f"stage-2 step {preset} B={batch} (cpu, {precision})"
    step, _ = stage2_step(impl, CPU, preset, batch=batch, text_len=16, bf16=_cpu_precision(benchmark, precision))
    measure(benchmark, step, rounds=5, warmup=1)
    per_second(benchmark, "samples_per_s", batch)
