"""The one kernel-backend switch: `kernels="auto" | "triton" | "torch"`, or $BLIP2RT_KERNELS.

"auto" picks Triton on CUDA when Triton kernels exist for the ops, and the torch reference
everywhere else. No Triton kernels have landed yet, so "auto" resolves to "torch" and an
explicit "triton" is refused with the reason.
"""

from __future__ import annotations

import os

import torch

from blip2rt.errors import InputError

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "BLIP2RT_KERNELS"
# Set to True by the Triton attention kernels once they are registered.
TRITON_KERNELS_AVAILABLE = False


def resolve_backend(requested: str | None, device: torch.device | str | None) -> str:
    """The backend that will run: "triton" or "torch"."""
    choice = requested if requested is not None else os.environ.get(ENV_VAR, "auto")
    if choice not in BACKENDS:
        source = "kernels=" if requested is not None else f"${ENV_VAR}="
        raise InputError(f"{source}{choice!r} is not a kernel backend; expected one of {', '.join(BACKENDS)}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if (device.type == "cuda" and TRITON_KERNELS_AVAILABLE) else "torch"
    if not TRITON_KERNELS_AVAILABLE:
        raise InputError("kernels='triton' was asked for, but this build of blip2rt has no Triton kernels yet; "
                         "use kernels='torch' or 'auto'")
    return "triton"
