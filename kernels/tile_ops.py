"""Triton helpers shared by the kernels, and the launch-side choice of their dot precision."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import interpreting

# How a tile's tl.dot runs, by input dtype (a constexpr string each kernel takes as PRECISION):
# - 16-bit inputs: the tensor cores, accumulating in fp32 ("tf32" is ignored for them);
# - fp32 inputs: "tf32x3", three TF32 tensor-core products that keep about fp32's accuracy
#   (a plain "tf32" dot loses it: ~1e-3 relative). Full IEEE fp32 would run on the FMA units,
#   where 64-wide tiles spill registers (seen in the compile gate);
# - "upcast" (Triton's CPU interpreter only): bf16 operands widened to fp32 first. The
#   interpreter multiplies bf16 bit patterns as integers; fp32 products of bf16 values are exact,
#   so this is what a GPU's bf16 MMA computes.


def dot_precision(dtype: torch.dtype, device: torch.device | str) -> str:
    if dtype == torch.float32:
        return "tf32x3"
    if dtype == torch.bfloat16 and interpreting(device):
        return "upcast"
    return "tf32"


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b, accumulated in fp32 (see dot_precision)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)
