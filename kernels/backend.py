"""The one kernel-backend switch: `kernels="auto" | "triton" | "torch"`, or $BLIP2RT_KERNELS.

- "torch": the plain-PyTorch reference of every op.
- "triton": the fused Triton kernel of every op (`dispatch.OPS`).
  On a machine without a GPU this needs Triton's interpreter (TRITON_INTERPRET=1, what the
  tests use); it is refused otherwise, with the reason.
- "auto": on a CUDA GPU whose architecture the measured table holds (`auto_table.py`), each op
  and shape class takes the path measured faster there; torch everywhere else (other GPUs, CPUs).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from blip2rt.errors import InputError

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "BLIP2RT_KERNELS"


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(requested: str | None, device: torch.device | str | None) -> str:
    """The backend that will run: "triton", "torch", or "auto" (per op and shape class, from the table of
    measurements for this GPU's architecture; only on a GPU the table holds)."""
    choice = requested if requested is not None else os.environ.get(ENV_VAR, "auto")
    if choice not in BACKENDS:
        source = "kernels=" if requested is not None else f"${ENV_VAR}="
        raise InputError(f"{source}{choice!r} is not a kernel backend; expected one of {', '.join(BACKENDS)}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    triton_installed = importlib.util.find_spec("triton") is not None
    if choice == "torch":
        return "torch"
    if choice == "auto":
        if device.type != "cuda" or not triton_installed:
            return "torch"
        from . import auto_table
        from .launch import gpu_target

        return "auto" if auto_table.measured(gpu_target(device).arch) else "torch"
    if not triton_installed:
        raise InputError("kernels='triton' needs the triton package, which is not installed")
    if device.type != "cuda" and not interpreter_active():
        raise InputError(f"kernels='triton' on {device.type}: Triton kernels run on CUDA GPUs, or on the CPU only "
                         "in Triton's (slow) interpreter; set TRITON_INTERPRET=1 for that, or use kernels='torch'")
    return "triton"
