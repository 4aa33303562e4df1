"""Every benchmark case runs once at tiny shapes on CPU (fused in the interpreter), so the GPU
benchmarks do not fail on their first real run. No timing here."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from training_kernel_cases import CASES, TINY_SHAPES  # noqa: E402


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("op", list(CASES))
def test_case_runs(op, impl):
    case = CASES[op](impl, torch.device("cpu"), torch.float32, **TINY_SHAPES[op])
    case.step()
    case.step()  # twice: grads are cleared between steps


@pytest.mark.parametrize("impl", ["fused", "eager", "sdpa"])
@pytest.mark.parametrize("kind", ["cross", "self"])
def test_attention_case_runs(kind, impl):
    from attention_cases import attention_case

    step = attention_case(kind, impl, torch.device("cpu"), torch.float32, batch=2, heads=2, head_dim=16,
                          queries=4, image_tokens=9, text=5, backward=True)
    step()
    step()


@pytest.mark.parametrize("impl", ["fused", "torch", "transformers"])
def test_qformer_forward_case_runs(impl):
    from attention_cases import qformer_forward_case

    qformer_forward_case(impl, torch.device("cpu"), torch.float32, "tiny", batch=1)()


@pytest.mark.parametrize("impl", ["triton", "torch", "lavis"])
def test_stage1_step_case_runs(impl):
    from train_step_cases import stage1_step

    step, flops = stage1_step(impl, torch.device("cpu"), "tiny", batch=3, text_len=6)
    step()
    assert flops > 0


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_stage2_step_case_runs(impl):
    from train_step_cases import stage2_step

    step, _ = stage2_step(impl, torch.device("cpu"), "tiny", batch=2, text_len=5)
    step()
