"""Launch sizes shared by the kernels: block widths, warps, and program counts.

Decided from shapes and the device, never by a multi-config autotune (that needs a GPU driver,
and the interpreter on CPU has none).
"""

from __future__ import annotations

import torch
import triton


def row_block(width: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for kernels that hold one row of `width` elements."""
    block = triton.next_power_of_2(width)
    warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    return block, warps


def backward_programs(rows: int, device: torch.device) -> int:
    """Programs for row-block reductions (dW/dB partials): one per SM on a GPU, a few on CPU."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, sms))
    return max(1, min(rows, 4))


def dot_blocks(depth: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK rows/cols, BLOCK_D) for tiled tl.dot kernels; 16 is the smallest tile a GPU takes."""
    if device.type == "cuda":
        return 64, min(64, max(16, triton.next_power_of_2(depth)))
    return 16, min(32, max(16, triton.next_power_of_2(depth)))  # the interpreter: small tiles are fast
