"""The one kernel-backend switch: `kernels="auto" | "triton" | "torch"`, or $BLIP2RT_KERNELS.

- "torch": the plain-PyTorch reference of every op.
- "triton": the fused Triton kernel of every op (`dispatch.OPS`).
  On a machine without a GPU this needs Triton's interpreter (TRITON_INTERPRET=1, what the
  tests use); it is refused otherwise, with the reason.
- "auto": Triton on CUDA once the kernels have been verified on a GPU, correct and faster than
  the torch path (`VERIFIED_ON_GPU`), torch everywhere else.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from blip2rt.errors import InputError

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "BLIP2RT_KERNELS"
# Correct on an H200 (every GPU test passed), but slower there than the torch path at the
# Q-Former's sizes (benchmarks/RESULTS.md): "auto" turns the kernels on once they measure faster.
VERIFIED_ON_GPU = False


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(requested: str | None, device: torch.device | str | None) -> str:
    """The backend that will run: "triton" or "torch"."""
    choice = requested if requested is not None else os.environ.get(ENV_VAR, "auto")
    if choice not in BACKENDS:
        source = "kernels=" if requested is not None else f"${ENV_VAR}="
        raise InputError(f"{source}{choice!r} is not a kernel backend; expected one of {', '.join(BACKENDS)}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    triton_installed = importlib.util.find_spec("triton") is not None
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if (device.type == "cuda" and triton_installed and VERIFIED_ON_GPU) else "torch"
    if not triton_installed:
        raise InputError("kernels='triton' needs the triton package, which is not installed")
    if device.type != "cuda" and not interpreter_active():
        raise InputError(f"kernels='triton' on {device.type}: Triton kernels run on CUDA GPUs, or on the CPU only "
                         "in Triton's (slow) interpreter; set TRITON_INTERPRET=1 for that, or use kernels='torch'")
    return "triton"
