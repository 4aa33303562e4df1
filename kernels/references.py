"""The plain-PyTorch references of the fused ops (attention's, with its masks, is in
qformer_attention.py): the torch path, and the oracle every Triton kernel is tested against.

This module imports no Triton, so the torch path runs where Triton is not installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def residual_layer_norm_reference(h: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                  eps: float, p: float = 0.0, keep_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch, as BERT writes it. With `keep_mask`, that mask replaces torch's dropout draw."""
    if keep_mask is not None:
        h = h * keep_mask / (1.0 - p)
    elif p > 0:
        h = F.dropout(h, p, training=True)
    return F.layer_norm(residual + h, (int(weight.shape[0]),), weight, bias, eps)  # a constant width when traced


def query_max_similarity_reference(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: materialises (B_i, B_t, Q); grads flow through the argmax query. fp32 out for
    16-bit and fp32 features; float64 stays float64."""
    s = torch.einsum("iqd,td->itq", img, txt).max(dim=-1).values
    return s.to(torch.promote_types(s.dtype, torch.float32))


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   bias: torch.Tensor | None = None, label_smoothing: float = 0.0,
                                   ignore_index: int = -100, chunk: int | None = None) -> torch.Tensor:
    """Plain PyTorch: full (N, V) logits; the same mean over labelled tokens (0 if there are none).
    16-bit logits are widened to fp32 for the loss; float64 stays float64."""
    # flattened first: on a strided (B, T, W) slice (the LM positions of a batch) F.linear runs as a
    # batched matmul over B copies of the weight, several times slower on a CPU than one (B*T, W) matmul
    logits = F.linear(hidden.flatten(0, -2), weight, bias)
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    lab = labels.reshape(-1)
    total = F.cross_entropy(logits, lab, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum")
    return total / (lab != ignore_index).sum().clamp(min=1)
