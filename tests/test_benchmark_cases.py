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
