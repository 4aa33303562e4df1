"""Linear + cross-entropy over a vocabulary, in chunks of tokens: full logits are never stored.

For each chunk of C tokens: logits = h W^T (+ b) with cuBLAS, then one Triton program per row
computes the row's loss (online log-sum-exp) and overwrites its logits with d(loss)/d(logits);
the chunk's grads of h, W and b follow with two matmuls. The forward therefore also does the
backward's work (as Liger-Kernel's fused linear cross-entropy does); backward only scales the
stored grads by the incoming grad. Peak extra memory: one (C, V) chunk instead of (N, V).

    loss_row = (1 - eps) (lse - z_y) + eps (lse - mean_j z_j)      (torch's label smoothing)
    loss     = sum of loss_row over labelled tokens / number of labelled tokens

Tokens labelled `ignore_index` contribute nothing; if no token is labelled the loss is 0 and
every grad is 0 (torch's mean would be 0/0).

NaN contract: a non-finite hidden state, weight or logit makes the loss NaN; a label outside
[0, V) (other than ignore_index) makes it NaN too, without a device sync to check it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _ce_rows_kernel(LOGITS, LABELS, LOSS, SCALE, V, stride, ignore_index, eps, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride
    y = tl.load(LABELS + row).to(tl.int32)
    scale = tl.load(SCALE)
    if y == ignore_index:
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            tl.store(ptr + cols, tl.zeros([BLOCK_V], dtype=tl.float32).to(LOGITS.dtype.element_ty), mask=cols < V)
        tl.store(LOSS + row, 0.0)
    else:
        valid = (y >= 0) & (y < V)
        y_safe = tl.where(valid, y, 0)
        m = float("-inf")
        s = 0.0
        zsum = 0.0
        for v0 in range(0, V, BLOCK_V):  # pass 1: online log-sum-exp, sum of logits
            cols = v0 + tl.arange(0, BLOCK_V)
            z = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            zsum += tl.sum(tl.where(cols < V, z, 0.0), axis=0)
            m = m_new
        lse = m + tl.log(s)
        z_y = tl.load(ptr + y_safe).to(tl.float32)
        loss = (1.0 - eps) * (lse - z_y) + eps * (lse - zsum / V)
        loss = tl.where(valid, loss, float("nan"))
        for v0 in range(0, V, BLOCK_V):  # pass 2: the logits' grad, in place
            cols = v0 + tl.arange(0, BLOCK_V)
            z = tl.load(ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) - eps / V
            g = tl.where(cols == y_safe, g - (1.0 - eps), g)
            tl.store(ptr + cols, (g * scale).to(LOGITS.dtype.element_ty), mask=cols < V)
        tl.store(LOSS + row, loss)


def default_chunk(tokens: int, vocab: int, hidden: int) -> int:
    """Tokens per chunk so that a chunk's logits are about as large as the hidden states."""
    ratio = triton.cdiv(vocab, hidden)
    return max(1, min(tokens, triton.next_power_of_2(triton.cdiv(tokens, ratio))))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, labels, eps: float, ignore_index: int, chunk: int | None):
        hidden = h.shape[-1]
        h2 = h.reshape(-1, hidden)
        lab = labels.reshape(-1)
        n, v = h2.shape[0], weight.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        n_valid = (lab != ignore_index).sum()
        scale = 1.0 / n_valid.clamp(min=1).float()  # a device tensor: no sync
        loss_rows = torch.empty(n, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h2) if need_h else None
        grad_w = torch.zeros(v, hidden, dtype=torch.float32, device=h.device) if need_w else None
        grad_b = torch.zeros(v, dtype=torch.float32, device=h.device) if need_b else None
        chunk = chunk or default_chunk(n, v, hidden)
        block = min(triton.next_power_of_2(v), 4096 if h.device.type == "cuda" else 1024)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            hc = h2[start:end]
            logits = F.linear(hc, weight, bias).contiguous()  # (C, V), becomes d(loss)/d(logits)
            _ce_rows_kernel[(end - start,)](logits, lab[start:end], loss_rows[start:end], scale, v,
                                            logits.stride(0), ignore_index, eps, BLOCK_V=block,
                                            num_warps=8 if block >= 2048 else 4)
            if need_h:
                grad_h[start:end] = logits @ weight
            if need_w:
                grad_w.addmm_(logits.t().float(), hc.float())
            if need_b:
                grad_b += logits.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.h_shape, ctx.w_dtype = h.shape, weight.dtype
        return loss_rows.sum() * scale

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        dh = (grad_h * g.to(grad_h.dtype)).view(ctx.h_shape) if grad_h is not None else None
        dw = (grad_w * g).to(ctx.w_dtype) if grad_w is not None else None
        db = (grad_b * g).to(ctx.w_dtype) if grad_b is not None else None
        return dh, dw, db, None, None, None, None


def linear_cross_entropy_triton(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                bias: torch.Tensor | None = None, label_smoothing: float = 0.0,
                                ignore_index: int = -100, chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden` (..., H) @ `weight` (V, H)^T (+ bias) against `labels` (...)."""
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, float(label_smoothing), int(ignore_index), chunk)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   bias: torch.Tensor | None = None, label_smoothing: float = 0.0,
                                   ignore_index: int = -100, chunk: int | None = None) -> torch.Tensor:
    """Plain PyTorch: full (N, V) logits; the same mean over labelled tokens (0 if there are none)."""
    logits = F.linear(hidden, weight, bias).float().flatten(0, -2)
    lab = labels.reshape(-1)
    total = F.cross_entropy(logits, lab, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum")
    return total / (lab != ignore_index).sum().clamp(min=1)
