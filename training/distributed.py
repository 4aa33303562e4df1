"""Process-group helpers: world size and rank, and the two gathers BLIP-2 needs.

- `gather_no_grad`: the features of all ranks for ITC; the copies carry no gradient.
- `gather_with_grad`: the image embeddings of all ranks for ITM negatives; gradients flow back
  to the rank that produced them (LAVIS's GatherLayer).
Single process: both return the input itself (with its gradient, as LAVIS does).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def init_from_env(device_type: str) -> bool:
    """Joins the process group torchrun describes (RANK, WORLD_SIZE, ...); False when not launched so."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2 or is_distributed():
        return is_distributed()
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return True


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B * world, ...), rank order; no gradient through the gathered copies."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g)  # every rank's loss contributes to every rank's slice
        b = g.shape[0] // world_size()
        return g[rank() * b: (rank() + 1) * b]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B * world, ...), rank order, differentiable back to each rank's own slice."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)
