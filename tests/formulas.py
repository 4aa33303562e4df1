"""The fused ops written again from their definitions, in float64: the oracle of the kernel tests,
independent of blip2rt's references (which are the eager path, checked beside the kernels)."""

import math

import torch


def qformer_allowed(mode: str, num_queries: int, text_mask: torch.Tensor | None, lq: int, lk: int) -> torch.Tensor:
    """(B, Lq, Lk) bool, one position at a time: rows are the last lq of the lk positions, the first
    num_queries positions are queries, the rest text (visible where text_mask is 1).
    bidirectional: every visible key; unimodal: queries see queries, text sees visible text;
    multimodal_causal: queries see queries, text sees the queries and visible text up to itself."""
    b = 1 if text_mask is None else text_mask.shape[0]
    out = torch.zeros(b, lq, lk, dtype=torch.bool)
    for s in range(b):
        for i in range(lq):
            row = lk - lq + i
            for j in range(lk):
                visible = j < num_queries or bool(text_mask[s, j - num_queries])
                row_query, key_query = row < num_queries, j < num_queries
                if mode == "bidirectional":
                    ok = visible
                elif mode == "unimodal":
                    ok = visible and row_query == key_query
                elif mode == "multimodal_causal":
                    ok = key_query if row_query else visible and (key_query or j <= row)
                else:
                    raise ValueError(mode)
                out[s, i, j] = ok
    return out


def attention64(q, k, v, allowed: torch.Tensor | None = None, keep: torch.Tensor | None = None, p: float = 0.0):
    """softmax(q k^T / sqrt(d)) over the allowed keys, dropout by `keep` (B, H, Lq, Lk) scaled by
    1/(1 - p), then @ v; (B, L, H, d) in and out, float64."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # (B, H, L, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = scores.softmax(-1)
    if keep is not None:
        probs = probs * keep / (1 - p)
    return (probs @ v).transpose(1, 2)


def residual_layer_norm64(h, residual, weight, bias, eps: float, keep=None, p: float = 0.0):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last dim, x = residual + dropout(h)."""
    h = h.double() if keep is None else h.double() * keep / (1 - p)
    x = residual.double() + h
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.double() + bias.double()


def linear_cross_entropy64(hidden, weight, labels, bias=None, label_smoothing: float = 0.0, ignore_index=-100):
    """Mean over labelled tokens of (1 - e) * -log p(y) + e * mean_j -log p(j), p = softmax(h W^T + b)."""
    z = hidden.double().reshape(-1, hidden.shape[-1]) @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    logp = z - torch.logsumexp(z, dim=-1, keepdim=True)
    y = labels.reshape(-1)
    rows = (y != ignore_index).nonzero().flatten()
    if rows.numel() == 0:
        return z.sum() * 0.0
    picked = logp[rows, y[rows]]
    per_row = (1 - label_smoothing) * -picked + label_smoothing * -logp[rows].mean(-1)
    return per_row.mean()
