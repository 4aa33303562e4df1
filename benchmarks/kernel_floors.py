"""The floor of a fused-kernel benchmark case: the bytes its launch plan moves over the measured copy
bandwidth, or its FLOPs over the GPU's dense bf16 peak, whichever is larger.

Bytes come from the plan: the case's fused step runs on meta tensors under `launch.plan_for(H100)`,
and each launch's distinct tensor arguments count once each (read or written once: a kernel that
re-reads a tile pays more). Intermediates that one launch writes and the next reads (the forward's O
and log-sum-exp) count in both, as the fused path must move them. GEMMs outside Triton (cuBLAS in the
linear+CE) are not launches; their FLOPs are in the case's count. Every case of a group (fused, eager,
SDPA, compiled) records the same floor, so `x_floor` compares them on one scale.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from blip2rt.kernels import launch
from floors import cuda_copy_bandwidth, record_floor

PEAK_BF16 = 989e12  # dense bf16 tensor-core FLOP/s of an H100/H200 SXM


def plan_bytes(build_step: Callable[[torch.device], Callable[[], None]]) -> int:
    """Bytes the fused plan of a case moves: build_step(device) gives the case's step on that device."""
    step = build_step(torch.device("meta"))
    with launch.plan_for(launch.H100) as launches:
        step()
    total = 0
    for one in launches:
        distinct = {id(a): a for a in one.args if isinstance(a, torch.Tensor)}
        total += sum(a.numel() * a.element_size() for a in distinct.values())
    return total


def attention_flops(kind: str, batch: int, backward: bool, heads: int, head_dim: int, queries: int,
                    image_tokens: int, text: int) -> float:
    """S = QK^T and PV forward (2 products); the backward recomputes S and makes dP, dV, dK, dQ (5)."""
    lq = queries if kind == "cross" else queries + text
    lk = image_tokens if kind == "cross" else lq
    products = 7 if backward else 2
    return products * 2.0 * batch * heads * lq * lk * head_dim


@functools.lru_cache(maxsize=4)
def _bandwidth(device: str) -> float:
    return cuda_copy_bandwidth(torch.device(device))


def record_kernel_floor(benchmark, nbytes: int, flops: float, device) -> None:
    """extra_info: floor_bytes, floor_flops, and (record_floor) the bandwidth, floor_ms and x_floor."""
    bandwidth = _bandwidth(str(device))
    benchmark.extra_info.update(floor_bytes=nbytes, floor_flops=flops)
    record_floor(benchmark, max(nbytes / bandwidth, flops / PEAK_BF16), bandwidth)
