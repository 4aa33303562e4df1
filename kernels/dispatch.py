"""The one dispatch of the fused ops: each op's torch reference, and its Triton implementation,
which is imported on the first fused call (so the torch path never imports Triton).

Both implementations of an op take the same arguments; `implementation(op, backend)` returns one.
Backend "auto" returns a function that picks per call, from the measured table (auto_table.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .qformer_attention import attention_reference
from .references import linear_cross_entropy_reference, query_max_similarity_reference, residual_layer_norm_reference

_TORCH: dict[str, Callable] = {
    "attention": attention_reference,
    "residual_layer_norm": residual_layer_norm_reference,
    "query_max_similarity": query_max_similarity_reference,
    "linear_cross_entropy": linear_cross_entropy_reference,
}


# The fused Triton implementations, each imported by its loader on the first fused call (an import
# statement, which torch.compile traces; importlib's functions it does not).
def _attention_triton() -> Callable:
    from .fused_attention import fused_attention
    return fused_attention


def _residual_layer_norm_triton() -> Callable:
    from .post_ln_residual import residual_layer_norm_triton
    return residual_layer_norm_triton


def _query_max_similarity_triton() -> Callable:
    from .itc import query_max_similarity_triton
    return query_max_similarity_triton


def _linear_cross_entropy_triton() -> Callable:
    from .chunked_cross_entropy import linear_cross_entropy_triton
    return linear_cross_entropy_triton


_TRITON: dict[str, Callable[[], Callable]] = {
    "attention": _attention_triton,
    "residual_layer_norm": _residual_layer_norm_triton,
    "query_max_similarity": _query_max_similarity_triton,
    "linear_cross_entropy": _linear_cross_entropy_triton,
}
OPS = tuple(_TORCH)


def implementation(op: str, backend: str) -> Callable:
    """The function that runs `op` on `backend` ("torch", "triton" or "auto", from `resolve_backend`)."""
    if op not in _TORCH:
        raise KeyError(f"unknown kernel op {op!r}; ops: {', '.join(OPS)}")
    if backend == "torch":
        return _TORCH[op]
    if backend == "auto":
        return _AUTO.get(op) or _AUTO.setdefault(op, _per_call(op))
    if backend != "triton":
        raise ValueError(f"unknown kernel backend {backend!r}; expected 'torch', 'triton' or 'auto'")
    return _TRITON[op]()


_AUTO: dict[str, Callable] = {}


def _per_call(op: str, table: dict | None = None) -> Callable:
    """`op` choosing, per call, the path the table measured faster for the call's GPU and shape class
    (`table`: a given one, for tests; the checked-in one by default)."""
    from . import auto_table
    from .launch import gpu_target

    fused = _TRITON[op]()

    def run(*args, **kwargs):
        first = args[0]
        target = gpu_target(first.device)
        needs_grad = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        cls = auto_table.shape_class(op, args, needs_grad)
        if target is not None and auto_table.choose(op, target.arch, cls, table) == "triton":
            return fused(*args, **kwargs)
        return _TORCH[op](*args, **kwargs)

    return run
