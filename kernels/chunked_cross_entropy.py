"""Linear + cross-entropy over a vocabulary, in chunks of tokens: full logits are never stored.

For each chunk of C tokens: logits = h W^T (+ b) with cuBLAS into rows padded to 16 elements,
then one Triton program per row computes the row's loss (online log-sum-exp) and overwrites its
logits with d(loss)/d(logits); the chunk's grads of h, W and b follow with two matmuls. The
matmuls run in the training precision (autocast's dtype, or the inputs'); dW accumulates in
fp32 across chunks. The forward therefore also does the
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
import triton
import triton.language as tl

from . import tuned
from .launch import autocast_dtype, gpu_target, launch


@triton.jit
def _lse_step(z, m, s):
    """Online log-sum-exp: fold the block z into the running max m and sum s (at max m)."""
    m_new = tl.maximum(m, tl.max(z, axis=0))
    return m_new, s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)


@triton.jit
def _ce_rows_kernel(LOGITS, LABELS, LOSS, SCALE, V, V_MAIN, stride, ignore_index, eps, BLOCK_V: tl.constexpr):
    """One row of logits: its loss, and its logits overwritten with d(loss)/d(logits) * SCALE.

    The row is walked in BLOCK_V steps: an unmasked main loop over [0, V_MAIN) and one masked
    tail. With the row stride a multiple of 16 elements, the main loop's loads and stores are
    128-bit at any vocabulary size (a mask that ends mid-vector would make them scalar).
    """
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride
    cols = tl.arange(0, BLOCK_V)
    tail = V_MAIN + cols
    in_tail = tail < V
    y = tl.load(LABELS + row).to(tl.int32)
    scale = tl.load(SCALE)
    if y == ignore_index:
        zero = tl.zeros([BLOCK_V], dtype=tl.float32).to(LOGITS.dtype.element_ty)
        for v0 in range(0, V_MAIN, BLOCK_V):
            tl.store(ptr + v0 + cols, zero)
        tl.store(ptr + tail, zero, mask=in_tail)
        tl.store(LOSS + row, 0.0)
    else:
        valid = (y >= 0) & (y < V)
        y_safe = tl.where(valid, y, 0)
        m = float("-inf")
        s = 0.0
        zsum = 0.0
        for v0 in range(0, V_MAIN, BLOCK_V):  # pass 1: online log-sum-exp, sum of logits
            z = tl.load(ptr + v0 + cols).to(tl.float32)
            m, s = _lse_step(z, m, s)
            zsum += tl.sum(z, axis=0)
        z = tl.load(ptr + tail, mask=in_tail, other=float("-inf")).to(tl.float32)
        m, s = _lse_step(z, m, s)
        zsum += tl.sum(tl.where(in_tail, z, 0.0), axis=0)
        lse = m + tl.log(s)
        z_y = tl.load(ptr + y_safe).to(tl.float32)
        loss = (1.0 - eps) * (lse - z_y) + eps * (lse - zsum / V)
        loss = tl.where(valid, loss, float("nan"))
        for v0 in range(0, V_MAIN, BLOCK_V):  # pass 2: the logits' grad, in place
            z = tl.load(ptr + v0 + cols).to(tl.float32)
            g = tl.exp(z - lse) - eps / V
            g = tl.where(v0 + cols == y_safe, g - (1.0 - eps), g)
            tl.store(ptr + v0 + cols, (g * scale).to(LOGITS.dtype.element_ty))
        z = tl.load(ptr + tail, mask=in_tail, other=0.0).to(tl.float32)
        g = tl.exp(z - lse) - eps / V
        g = tl.where(tail == y_safe, g - (1.0 - eps), g)
        tl.store(ptr + tail, (g * scale).to(LOGITS.dtype.element_ty), mask=in_tail)
        tl.store(LOSS + row, loss)


# Logit rows are padded to a multiple of this many elements, so every row starts 16-byte aligned.
ROW_ALIGN = 16


# Each chunk reads the whole weight (V, H) once per product with it (logits, and d(loss)/dh), and does
# 2 C H V FLOPs per product: C FLOPs per weight byte at 16 bits. Chunks of 128 tokens sat under an
# H200's ridge (about 180 FLOP a byte) and streamed OPT's 257 MB head 20 times a step. So a chunk takes
# at least a third of the tokens (the weight read at most 3 times), within a memory budget for its
# logits: that is what bounds a chunk where the tokens are many.
MAX_WEIGHT_PASSES = 3
LOGITS_BUDGET_BYTES = 256 << 20


def default_chunk(tokens: int, vocab: int, element_bytes: int) -> int:
    """Tokens per chunk: the fewest passes over the weight, at most MAX_WEIGHT_PASSES, whose (C, V) logits
    fit LOGITS_BUDGET_BYTES (rows padded as the launcher pads them); more passes only where they do not."""
    row_bytes = triton.cdiv(vocab, ROW_ALIGN) * ROW_ALIGN * element_bytes
    by_memory = max(1, LOGITS_BUDGET_BYTES // row_bytes)
    return max(1, min(tokens, by_memory, triton.cdiv(tokens, min(MAX_WEIGHT_PASSES, tokens))))


def ce_rows_config(vocab: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Launch sizes of the row kernel: gpu-tune's measured choice for this architecture (kernels.tuned)
    where there is one. The compile gate checks these for 128-bit main-loop access."""
    target = gpu_target(device)
    if target is not None:
        found = tuned.lookup(target.arch, tuned.ce_rows_key(vocab, str(dtype).removeprefix("torch.")))
        if found is not None:
            return found
    block = min(triton.next_power_of_2(vocab), 4096 if target is not None else 1024)
    return dict(BLOCK_V=block, num_warps=max(1, min(8, block // 256)))  # >= 8 logits a thread: a 128-bit access


def launch_rows(logits: torch.Tensor, labels: torch.Tensor, loss_rows: torch.Tensor, scale: torch.Tensor,
                 eps: float, ignore_index: int) -> None:
    """logits (C, V) with unit column stride, becomes the grad; labels (C,) contiguous; loss_rows (C,)."""
    v = logits.shape[1]
    cfg = ce_rows_config(v, logits.device, logits.dtype)
    v_main = v // cfg["BLOCK_V"] * cfg["BLOCK_V"]
    launch(_ce_rows_kernel, (logits.shape[0],), logits, labels, loss_rows, scale, v, v_main, logits.stride(0),
           ignore_index, eps, **cfg)


_FP32_ACCUMULATE: dict[str, str] = {}


def _fp32_accumulate_mode(device: torch.device) -> str:
    """How acc (fp32) += a @ b runs for 16-bit a, b on this device, found once per process:
    "addmm": one GEMM in the inputs' dtype writing fp32 (torch's addmm with out_dtype, CUDA);
    "mm": the same GEMM into an fp32 temporary, then added (torch versions whose addmm wants
    `self` in the inputs' dtype); "upcast": both operands widened to fp32 (CPU, where torch has
    no mixed-dtype GEMM: only the interpreter's tests run there)."""
    if device.type != "cuda":
        return "upcast"
    if device.type not in _FP32_ACCUMULATE:
        a = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
        acc = torch.ones(16, 16, dtype=torch.float32, device=device)
        mode = "upcast"
        for candidate, fn in (("addmm", lambda: torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)),
                              ("mm", lambda: acc.add_(torch.mm(a, a, out_dtype=torch.float32)))):
            try:
                fn()
                if acc[0, 0].item() == 17.0:
                    mode = candidate
                    break
            except (RuntimeError, TypeError):
                pass
            acc.fill_(1.0)
        _FP32_ACCUMULATE[device.type] = mode
    return _FP32_ACCUMULATE[device.type]


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b; 16-bit operands stay 16-bit on the tensor cores, accumulating in fp32."""
    mode = "fp32" if a.dtype == torch.float32 else _fp32_accumulate_mode(acc.device)
    if mode == "addmm":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif mode == "mm":
        acc += torch.mm(a, b, out_dtype=torch.float32)
    elif mode == "upcast":
        acc.addmm_(a.float(), b.float())
    else:
        acc.addmm_(a, b)


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear(h, weight) computes in: autocast's where it is on, else the promoted one."""
    return autocast_dtype(h.device) or torch.promote_types(h.dtype, weight.dtype)


def _forward_and_grads(h, weight, bias, labels, eps: float, ignore_index: int, chunk: int | None, need_h: bool,
                       need_w: bool, need_b: bool):
    """The mean loss, and d(loss)/d(h, weight, bias) where asked (None elsewhere), computed in the
    same pass over the chunks: the backward only scales them by the incoming grad."""
    hidden = h.shape[-1]
    h2 = h.reshape(-1, hidden)
    lab = labels.reshape(-1).contiguous()  # the row kernel reads labels at unit stride
    n, v = h2.shape[0], weight.shape[0]
    dtype = _compute_dtype(h, weight)
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    n_valid = (lab != ignore_index).sum()
    scale = 1.0 / n_valid.clamp(min=1).float()  # a device tensor: no sync
    loss_rows = torch.empty(n, dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h2) if need_h else None
    grad_w = torch.zeros(v, hidden, dtype=torch.float32, device=h.device) if need_w else None
    grad_b = torch.zeros(v, dtype=torch.float32, device=h.device) if need_b else None
    chunk = chunk or default_chunk(n, v, dtype.itemsize)
    rows = torch.empty(min(chunk, n), triton.cdiv(v, ROW_ALIGN) * ROW_ALIGN, dtype=dtype, device=h.device)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        hc = h2[start:end].to(dtype)
        logits = rows[: end - start, :v]  # (C, V) in padded rows; becomes d(loss)/d(logits)
        if b is None:
            torch.mm(hc, w.t(), out=logits)
        else:
            torch.addmm(b, hc, w.t(), out=logits)
        launch_rows(logits, lab[start:end], loss_rows[start:end], scale, eps, ignore_index)
        if need_h:
            grad_h[start:end] = logits @ w
        if need_w:
            _accumulate(grad_w, logits.t(), hc)
        if need_b:
            grad_b += logits.sum(0, dtype=torch.float32)
    return loss_rows.sum() * scale, grad_h, grad_w, grad_b


def _scaled_grads(g, grad_h, grad_w, grad_b, h_shape, w_dtype):
    dh = (grad_h * g.to(grad_h.dtype)).view(h_shape) if grad_h is not None else None
    dw = (grad_w * g).to(w_dtype) if grad_w is not None else None
    db = (grad_b * g).to(w_dtype) if grad_b is not None else None
    return dh, dw, db


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, labels, eps: float, ignore_index: int, chunk: int | None):
        need_b = bias is not None and ctx.needs_input_grad[2]
        loss, grad_h, grad_w, grad_b = _forward_and_grads(h, weight, bias, labels, eps, ignore_index, chunk,
                                                          ctx.needs_input_grad[0], ctx.needs_input_grad[1], need_b)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.h_shape, ctx.w_dtype = h.shape, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        return (*_scaled_grads(g, *ctx.saved_tensors, ctx.h_shape, ctx.w_dtype), None, None, None, None)


# A custom op, so torch.compile treats the chunked loop and its kernel as one opaque, differentiable op;
# the grads it does not compute come back as empty tensors (a custom op returns tensors only).
@torch.library.custom_op("blip2rt::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                            eps: float, ignore_index: int, chunk: int | None, need_h: bool, need_w: bool,
                            need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, grad_h, grad_w, grad_b = _forward_and_grads(h, weight, bias, labels, eps, ignore_index, chunk, need_h,
                                                      need_w, need_b)
    return loss, *(h.new_empty(0, dtype=torch.float32) if t is None else t for t in (grad_h, grad_w, grad_b))


@linear_cross_entropy_op.register_fake
def _(h, weight, bias, labels, eps, ignore_index, chunk, need_h, need_w, need_b):
    n, hidden, v = h.numel() // h.shape[-1], h.shape[-1], weight.shape[0]
    return (h.new_empty((), dtype=torch.float32),
            h.new_empty(n, hidden, dtype=h.dtype) if need_h else h.new_empty(0, dtype=torch.float32),
            h.new_empty(v, hidden, dtype=torch.float32) if need_w else h.new_empty(0, dtype=torch.float32),
            h.new_empty(v, dtype=torch.float32) if need_b else h.new_empty(0, dtype=torch.float32))


def _ce_setup_context(ctx, inputs, output):
    h, weight, _, _, _, _, _, need_h, need_w, need_b = inputs
    _, grad_h, grad_w, grad_b = output
    ctx.save_for_backward(grad_h, grad_w, grad_b)
    ctx.need = (need_h, need_w, need_b)
    ctx.h_shape, ctx.w_dtype = h.shape, weight.dtype


def _ce_backward(ctx, g, *_):
    grads = [t if need else None for t, need in zip(ctx.saved_tensors, ctx.need)]
    return (*_scaled_grads(g, *grads, ctx.h_shape, ctx.w_dtype), None, None, None, None, None, None, None)


linear_cross_entropy_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


def linear_cross_entropy_triton(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                bias: torch.Tensor | None = None, label_smoothing: float = 0.0,
                                ignore_index: int = -100, chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden` (..., H) @ `weight` (V, H)^T (+ bias) against `labels` (...)."""
    if torch.compiler.is_compiling():
        grad = torch.is_grad_enabled()
        need = (grad and hidden.requires_grad, grad and weight.requires_grad,
                grad and bias is not None and bias.requires_grad)
        return linear_cross_entropy_op(hidden, weight, bias, labels, float(label_smoothing), int(ignore_index), chunk,
                                       *need)[0]
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, float(label_smoothing), int(ignore_index), chunk)
