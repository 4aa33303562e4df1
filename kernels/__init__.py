"""Fused ops for blip2rt, each with its plain-PyTorch reference beside it (one file per op).

The model and the trainer call the functions here only; `backend` ("torch" or "triton", from
`resolve_backend`) picks the implementation. Triton is imported lazily, on the first fused call.
"""

from __future__ import annotations

import torch

from .backend import BACKENDS, ENV_VAR, FUSED_OPS, resolve_backend
from .qformer_attention import (
    AttentionMode,
    cross_attention_reference,
    qformer_attention_bias,
    self_attention_reference,
)

__all__ = ["AttentionMode", "BACKENDS", "ENV_VAR", "FUSED_OPS", "resolve_backend", "qformer_self_attention",
           "qformer_cross_attention", "qformer_attention_bias", "residual_layer_norm", "query_max_similarity",
           "itc_loss", "linear_cross_entropy"]


_MODE_IDS = {AttentionMode.BIDIRECTIONAL: 1, AttentionMode.MULTIMODAL_CAUSAL: 2, AttentionMode.UNIMODAL: 3}


def qformer_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_queries: int,
                           text_mask: torch.Tensor | None, mode: AttentionMode, dropout_p: float = 0.0,
                           backend: str = "torch") -> torch.Tensor:
    """Masked self-attention over [queries ; text]; q (B, Lq, H, d), k/v (B, K, H, d) -> (B, Lq, H, d).

    Attention dropout runs inside the fused kernel (its mask drawn from a seed, never stored).
    """
    if backend == "triton":
        from .fused_attention import fused_attention

        return fused_attention(q, k, v, mode=_MODE_IDS[AttentionMode(mode)], num_queries=num_queries,
                               text_mask=text_mask, dropout_p=dropout_p)
    out = self_attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), num_queries, text_mask,
                                   mode, dropout_p)
    return out.transpose(1, 2)


def qformer_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_p: float = 0.0,
                            backend: str = "torch") -> torch.Tensor:
    """Queries attend to image tokens; q (B, Q, H, d), k/v (B, N, H, d) -> (B, Q, H, d)."""
    if backend == "triton":
        from .fused_attention import fused_attention

        return fused_attention(q, k, v, dropout_p=dropout_p)
    return cross_attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p).transpose(1, 2)


def residual_layer_norm(h: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        eps: float, dropout_p: float = 0.0, backend: str = "torch") -> torch.Tensor:
    """LayerNorm(residual + dropout(h)) over the last dim: BERT's post-LN residual. (..., D) -> (..., D)."""
    if backend == "triton":
        from .post_ln_residual import residual_layer_norm_triton

        return residual_layer_norm_triton(h, residual, weight, bias, eps, dropout_p)
    from .post_ln_residual import residual_layer_norm_reference

    return residual_layer_norm_reference(h, residual, weight, bias, eps, dropout_p)


def query_max_similarity(img: torch.Tensor, txt: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """(B_i, Q, D), (B_t, D) -> (B_i, B_t) fp32: max over queries of img . txt."""
    from .itc import query_max_similarity_reference, query_max_similarity_triton

    return (query_max_similarity_triton if backend == "triton" else query_max_similarity_reference)(img, txt)


def itc_loss(img: torch.Tensor, txt: torch.Tensor, temp: torch.Tensor, *, backend: str = "torch", **kwargs):
    """BLIP-2 ITC loss; returns (loss, sim_i2t, sim_t2i). See kernels/itc_loss.py for the arguments."""
    from .itc import itc_loss as _itc_loss

    return _itc_loss(img, txt, temp, fused=backend == "triton", **kwargs)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: torch.Tensor | None = None, label_smoothing: float = 0.0, ignore_index: int = -100,
                         backend: str = "torch") -> torch.Tensor:
    """Mean CE of hidden (..., H) @ weight (V, H)^T (+ bias) vs labels (...), over labelled tokens."""
    if backend == "triton":
        from .chunked_cross_entropy import linear_cross_entropy_triton as fn
    else:
        from .chunked_cross_entropy import linear_cross_entropy_reference as fn
    return fn(hidden, weight, labels, bias, label_smoothing, ignore_index)
