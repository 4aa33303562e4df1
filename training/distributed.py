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
    if device_type != "cuda" and os.environ.get("MASTER_ADDR", "127.0.0.1") in ("127.0.0.1", "localhost"):
        # One machine: keep gloo on loopback rather than whatever the hostname resolves to.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return True


def batch_sizes(b: int, device) -> list[int]:
    """Every rank's batch size (they differ when unreadable images were skipped)."""
    if not is_distributed():
        return [b]
    t = torch.tensor([b], device=device)
    parts = [torch.zeros_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t)
    return [int(p) for p in parts]


def offset(sizes: list[int]) -> int:
    """Where this rank's rows start in a gathered batch."""
    return sum(sizes[: rank()])


def _all_gather_padded(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    pad = max(sizes) - x.shape[0]
    xp = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x
    parts = [torch.empty_like(xp) for _ in sizes]
    dist.all_gather(parts, xp.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def gather_no_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """(B, ...) -> (sum of B, ...), rank order; no gradient through the gathered copies."""
    if not is_distributed():
        return x
    sizes = sizes or batch_sizes(x.shape[0], x.device)
    return _all_gather_padded(x.detach(), sizes)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes):
        ctx.sizes = sizes
        return _all_gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g)  # every rank's loss contributes to every rank's slice
        start = offset(ctx.sizes)
        return g[start: start + ctx.sizes[rank()]], None


def gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """(B, ...) -> (sum of B, ...), rank order, differentiable back to each rank's own slice."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x, sizes or batch_sizes(x.shape[0], x.device))


def shard_llm_layers(language_model: torch.nn.Module) -> int:
    """FSDP2-shards each decoder layer of the frozen LLM across the ranks (their weights are ~95% of
    a large LLM). Each layer is its own unit, unsharded only during its forward; the embeddings,
    the tied head and the final norm stay replicated, since blip2rt reads them outside the LLM's
    forward (soft-prompt inputs, the fused loss head). Returns the number of sharded layers."""
    from torch.distributed.fsdp import fully_shard

    kinds = set(getattr(language_model, "_no_split_modules", None) or [])
    layers = [m for m in language_model.modules() if type(m).__name__ in kinds]
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(language_model).__name__} to shard")
    for layer in layers:
        fully_shard(layer)
    return len(layers)
