"""Fused ops for blip2rt, each with its plain-PyTorch reference (`references.py`, and
`qformer_attention.py` for attention) and its Triton kernels in a module of their own.

The model and the trainer call the functions here only; `backend` ("torch" or "triton", from
`resolve_backend`) picks the implementation through one table (`dispatch.py`). Triton is imported
on the first fused call, so the torch path runs where Triton is not installed.
"""

from __future__ import annotations

import torch

from .backend import BACKENDS, ENV_VAR, resolve_backend
from .compile_cache import tag_compile_caches
from .dispatch import OPS, implementation
from .itc_loss import itc_loss
from .packed_grads import split_packed
from .qformer_attention import AttentionMode, qformer_attention_bias

tag_compile_caches()  # torch.compile's disk caches keyed on this package's code (compile_cache)

__all__ = ["AttentionMode", "BACKENDS", "ENV_VAR", "OPS", "implementation", "resolve_backend",
           "qformer_self_attention", "qformer_cross_attention", "qformer_attention_bias", "residual_layer_norm",
           "query_max_similarity", "itc_loss", "linear_cross_entropy", "split_packed"]


def qformer_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_queries: int,
                           text_mask: torch.Tensor | None, mode: AttentionMode, dropout_p: float = 0.0,
                           backend: str = "torch") -> torch.Tensor:
    """Masked self-attention over [queries ; text]; q (B, Lq, H, d), k/v (B, K, H, d) -> (B, Lq, H, d).

    Attention dropout runs inside the fused kernel (its mask drawn from a seed; a training forward keeps
    it as bits, a byte per 4 (row, key) pairs, for the backward).
    """
    return implementation("attention", backend)(q, k, v, mode=AttentionMode(mode), num_queries=num_queries,
                                                text_mask=text_mask, dropout_p=dropout_p)


def qformer_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_p: float = 0.0,
                            backend: str = "torch") -> torch.Tensor:
    """Queries attend to image tokens; q (B, Q, H, d), k/v (B, N, H, d) -> (B, Q, H, d)."""
    return implementation("attention", backend)(q, k, v, dropout_p=dropout_p)


def residual_layer_norm(h: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        eps: float, dropout_p: float = 0.0, backend: str = "torch") -> torch.Tensor:
    """LayerNorm(residual + dropout(h)) over the last dim: BERT's post-LN residual. (..., D) -> (..., D)."""
    return implementation("residual_layer_norm", backend)(h, residual, weight, bias, eps, dropout_p)


def query_max_similarity(img: torch.Tensor, txt: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """(B_i, Q, D), (B_t, D) -> (B_i, B_t) fp32: max over queries of img . txt."""
    return implementation("query_max_similarity", backend)(img, txt)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: torch.Tensor | None = None, label_smoothing: float = 0.0, ignore_index: int = -100,
                         backend: str = "torch") -> torch.Tensor:
    """Mean CE of hidden (..., H) @ weight (V, H)^T (+ bias) vs labels (...), over labelled tokens."""
    return implementation("linear_cross_entropy", backend)(hidden, weight, labels, bias, label_smoothing, ignore_index)
