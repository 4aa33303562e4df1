"""Q-Former attention: masked self-attention over [queries ; text] and query cross-attention.

The torch functions here are the reference: the fallback path and the oracle for the fused
kernels. This module imports no Triton. Masks follow the BLIP-2 paper's three modes, with absolute positions: the first `num_queries`
keys are query positions, the rest are text positions 0..T-1.

- bidirectional (ITM): every position sees every non-padded position;
- multimodal_causal (ITG): queries see queries only; text token t sees all queries and text <= t;
- unimodal (ITC): queries see queries, text sees text.
Padded text keys are never seen. Masked scores get the dtype's minimum (not -inf), as BERT
does, so a row with nothing to see stays finite.
"""

from __future__ import annotations

import math
from enum import Enum

import torch
import torch.nn.functional as F


class AttentionMode(str, Enum):
    BIDIRECTIONAL = "bidirectional"
    MULTIMODAL_CAUSAL = "multimodal_causal"
    UNIMODAL = "unimodal"


# The one numbering of the masks inside the fused kernel (a constexpr there); None: cross-attention, no mask.
MODE_NONE, MODE_BIDIRECTIONAL, MODE_CAUSAL, MODE_UNIMODAL = 0, 1, 2, 3
KERNEL_MODE_IDS = {None: MODE_NONE, AttentionMode.BIDIRECTIONAL: MODE_BIDIRECTIONAL,
                   AttentionMode.MULTIMODAL_CAUSAL: MODE_CAUSAL, AttentionMode.UNIMODAL: MODE_UNIMODAL}


def kernel_mode_id(mode: AttentionMode | str | None) -> int:
    return KERNEL_MODE_IDS[None if mode is None else AttentionMode(mode)]


def qformer_attention_bias(
    num_queries: int,
    text_mask: torch.Tensor | None,  # (B, T) 1 = real token, 0 = padding; None: no text
    mode: AttentionMode,
    q_len: int,
    dtype: torch.dtype,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor | None:
    """Additive bias (B, 1, q_len, K) for the last q_len of K = num_queries + T positions; None if all visible."""
    num_text = 0 if text_mask is None else text_mask.shape[1]
    k_len = num_queries + num_text
    if num_text == 0:
        return None  # queries only: every mode lets queries see all queries
    rows = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # (q_len, 1) absolute positions
    cols = torch.arange(k_len, device=device)[None, :]  # (1, K)
    row_is_query, col_is_query = rows < num_queries, cols < num_queries
    if mode == AttentionMode.BIDIRECTIONAL:
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    elif mode == AttentionMode.UNIMODAL:
        allowed = row_is_query == col_is_query
    elif mode == AttentionMode.MULTIMODAL_CAUSAL:
        allowed = torch.where(row_is_query, col_is_query, col_is_query | (cols <= rows))
    else:
        raise ValueError(f"unknown attention mode {mode!r}")
    key_visible = torch.cat(
        [torch.ones(batch_size, num_queries, dtype=torch.bool, device=device), text_mask.to(device).bool()], dim=1
    )  # (B, K)
    allowed = allowed[None] & key_visible[:, None, :]  # (B, q_len, K)
    bias = torch.zeros(batch_size, 1, q_len, k_len, dtype=dtype, device=device)
    return bias.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


def self_attention_reference(
    q: torch.Tensor,  # (B, H, Lq, d)
    k: torch.Tensor,  # (B, H, K, d): [past ; current]
    v: torch.Tensor,  # (B, H, K, d)
    num_queries: int,
    text_mask: torch.Tensor | None,
    mode: AttentionMode,
    dropout_p: float = 0.0,
    keep_mask: torch.Tensor | None = None,  # (B, H, Lq, K) bool: this dropout mask instead of a fresh draw
) -> torch.Tensor:  # (B, H, Lq, d)
    bias = qformer_attention_bias(num_queries, text_mask, mode, q.shape[2], q.dtype, q.shape[0], q.device)
    if keep_mask is not None:
        return attention_with_keep_mask(q, k, v, bias, keep_mask, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)


def cross_attention_reference(
    q: torch.Tensor,  # (B, H, Q, d) query positions
    k: torch.Tensor,  # (B, H, N, d) image tokens
    v: torch.Tensor,  # (B, H, N, d)
    dropout_p: float = 0.0,
    keep_mask: torch.Tensor | None = None,  # (B, H, Q, N) bool
) -> torch.Tensor:  # (B, H, Q, d)
    if keep_mask is not None:
        return attention_with_keep_mask(q, k, v, None, keep_mask, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


def attention_reference(
    q: torch.Tensor,  # (B, Lq, H, d)
    k: torch.Tensor,  # (B, Lk, H, d): [past ; current] for self-attention, image tokens for cross-attention
    v: torch.Tensor,  # (B, Lk, H, d)
    *,
    mode: AttentionMode | None = None,  # None: cross-attention (no mask)
    num_queries: int = 0,
    text_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:  # (B, Lq, H, d)
    """The torch path in the fused kernel's layout and signature (`fused_attention`)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if mode is None:
        return cross_attention_reference(q, k, v, dropout_p).transpose(1, 2)
    return self_attention_reference(q, k, v, num_queries, text_mask, AttentionMode(mode), dropout_p).transpose(1, 2)


def attention_with_keep_mask(q, k, v, bias: torch.Tensor | None, keep_mask: torch.Tensor, dropout_p: float):
    """softmax(q k^T / sqrt(d) + bias), then dropout with a given keep mask (scaled by 1/(1 - p)),
    then @ v: what SDPA computes with its own draw, written out so a test can fix the draw."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(-1) * keep_mask / (1.0 - dropout_p)
    return probs @ v
