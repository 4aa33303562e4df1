"""The training precision a device runs fastest: the one rule behind the trainer's `amp: auto`, the
demo and the CPU benchmarks.

bf16 autocast pays only where the hardware computes in bf16:
- on the CPU, AVX512-BF16 (Cooper Lake, Sapphire Rapids, AMD Zen 4 and later) or AMX tiles. oneDNN
  also "supports" bf16 on any AVX-512 BW/VL CPU (Ice Lake, Cascade Lake, Skylake-SP), but there it
  converts to fp32 and back around every op, and trains slower than plain fp32 (benchmarks/RESULTS.md
  has the figures). So its answer (`torch.ops.mkldnn._is_mkldnn_bf16_supported`) is not asked;
- on CUDA, compute capability 8.0 and later (Ampere, Hopper). Older GPUs stay in fp32 unless fp16
  autocast (with its loss scaling) is asked for explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    """A training precision and why it was chosen."""

    amp: str  # "bf16" | "none": the trainer's `amp` value
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.amp == "bf16" else None

    def describe(self) -> str:
        """e.g. "fp32: this CPU has no native bf16 (AVX-512 without BF16)"."""
        return f"{'bf16 autocast' if self.amp == 'bf16' else 'fp32'}: {self.reason}"


def cpu_instruction_set() -> str:
    """The CPU's widest vector and matrix extensions that matter for bf16, in words."""
    cpu = torch.cpu
    if cpu._is_amx_tile_supported():
        return "AMX" + (" and AVX512-BF16" if cpu._is_avx512_bf16_supported() else "")
    if cpu._is_avx512_bf16_supported():
        return "AVX512-BF16"
    if cpu._is_avx512_supported():
        return "AVX-512 without BF16"
    if cpu._is_avx2_supported():
        return "AVX2, no AVX-512"
    return "no AVX2"


def native_bf16_cpu() -> bool:
    """True where the CPU computes bf16 itself (AVX512-BF16 or AMX), not by converting to fp32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def training_precision(device: str | torch.device | None = None, allow_bf16: bool = True) -> Precision:
    """bf16 autocast where `device` has native bf16, else fp32; `allow_bf16=False` forces fp32.

    device: the training device (None: CUDA if available, else the CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if not allow_bf16:
        return Precision("none", "bf16 turned off")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return Precision("bf16", f"this GPU has native bf16 (sm_{major}{minor})")
        return Precision("none", f"this GPU has no native bf16 (sm_{major}{minor}); amp fp16 is the explicit "
                                 "alternative, with loss scaling")
    if device.type == "cpu":
        isa = cpu_instruction_set()
        if native_bf16_cpu():
            return Precision("bf16", f"this CPU has native bf16 ({isa})")
        return Precision("none", f"this CPU has no native bf16 ({isa})")
    return Precision("none", f"bf16 autocast is not chosen automatically on {device.type}")
