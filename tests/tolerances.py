"""Tolerances for fused ops, per input dtype, and flash-attention's rule for low precision.

fp32: the fused kernel and the reference do the same math in another order: 1e-5 absolute and
relative; a call may widen atol where a long reduction adds up, and says why. Both are also held
to the float64 run of an independent formula (tests/formulas.py) at that tolerance.
fp16/bf16: the error against a float64 reference may be at most 2x the error of plain PyTorch
in the same dtype, plus a floor (relative to the output's scale) for values PyTorch happens to
get exactly.
"""

import torch

LOW_PRECISION_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_matches(fused: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype,
                   what: str = "", fp32_atol: float = 1e-5) -> None:
    """fused and eager computed from inputs in `dtype`; ref64 the same computation in float64."""
    assert fused.shape == eager.shape == ref64.shape, what
    if dtype == torch.float32:
        assert ref64.dtype == torch.float64, f"{what}: the reference ran in {ref64.dtype}, not float64"
        torch.testing.assert_close(fused.float(), eager.float(), atol=fp32_atol, rtol=1e-5,
                                   msg=lambda m: f"{what}, fused vs eager: {m}")
        for name, t in (("fused", fused), ("eager", eager)):
            torch.testing.assert_close(t.double(), ref64, atol=fp32_atol, rtol=1e-5,
                                       msg=lambda m: f"{what}, {name} vs float64: {m}")
        return
    err_fused = (fused.double() - ref64).abs().max().item()
    err_eager = (eager.double() - ref64).abs().max().item()
    floor = LOW_PRECISION_FLOOR[dtype] * max(1.0, ref64.abs().max().item())
    assert err_fused <= 2 * err_eager + floor, f"{what}: fused error {err_fused:.3g} vs eager {err_eager:.3g}"
