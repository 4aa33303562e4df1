"""Post-LN residual of the Q-Former (BERT): y = LayerNorm(residual + dropout(h)), fused.

Forward: one program per row; statistics in fp32 whatever the input dtype. Only the row's mean
and 1/std are kept: the backward recomputes the sum and regenerates the dropout mask from the
seed (Philox, `tl.rand(seed, row * D + col)` with 64-bit offsets), so neither the sum nor the
mask is stored. The output has the dtype the reference returns (`output_dtype`): fp32 under
CUDA autocast, as F.layer_norm there.
Backward: each program walks a block of rows, several rows per step, and keeps partial dW/dB in
registers; the partials are summed in torch (Liger-Kernel's layout).

NaN contract: a non-finite input makes its row of y non-finite, and every grad it touches;
nothing is clipped or dropped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import autocast_dtype, backward_programs, draw_seed, gpu_target, launch, row_block


@triton.jit
def _keep(seed, offsets, p):
    """The dropout keep mask at element offsets (int64, row * D + col): Philox, never stored."""
    return tl.rand(seed, offsets) >= p


@triton.jit
def _fwd_kernel(H, R, W, B, Y, MEAN, RSTD, M, D, eps, p, seed,
                HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """BLOCK_R rows per program (1 on a GPU; more in the interpreter, whose cost is per program)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rm = rows < M
    m = cols < D
    offs = rows[:, None] * D + cols[None, :]
    mask = rm[:, None] & m[None, :]
    h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        h = tl.where(_keep(seed, offs, p), h / (1.0 - p), 0.0)
    s = h + r
    mean = tl.sum(s, axis=1) / D
    xc = tl.where(mask, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + offs, (xc * rstd[:, None] * w[None, :] + b[None, :]).to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rm)
    tl.store(RSTD + rows, rstd, mask=rm)


@triton.jit
def _bwd_kernel(DY, H, R, W, MEAN, RSTD, DRES, DH, DW_PART, DB_PART, M, D, rows_per_program, p, seed,
                HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """A block of rows per program, BLOCK_R rows per step (several rows' loads in flight at once);
    partial dW/dB stay in registers and are written once per program."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    m = cols < D
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rm = rows < row_end
        offs = rows[:, None] * D + cols[None, :]
        mask = rm[:, None] & m[None, :]
        h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rm, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rm, other=0.0)
        if HAS_DROPOUT:
            keep = _keep(seed, offs, p)
            h = tl.where(keep, h / (1.0 - p), 0.0)
        xhat = tl.where(mask, (h + r - mean[:, None]) * rstd[:, None], 0.0)
        dw += dy * xhat
        db += dy
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, axis=1) / D
        c2 = tl.sum(wdy, axis=1) / D
        ds = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]  # d(loss)/d(residual + dropout(h))
        tl.store(DRES + offs, ds.to(DRES.dtype.element_ty), mask=mask)
        if HAS_DROPOUT:
            ds = tl.where(keep, ds / (1.0 - p), 0.0)
        tl.store(DH + offs, ds.to(DH.dtype.element_ty), mask=mask)
    tl.store(DW_PART + pid * D + cols, tl.sum(dw, axis=0), mask=m)
    tl.store(DB_PART + pid * D + cols, tl.sum(db, axis=0), mask=m)


@triton.jit
def _keep_mask_kernel(OUT, D, p, seed, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    tl.store(OUT + row * D + cols, _keep(seed, row * D + cols, p).to(tl.int8), mask=cols < D)


def dropout_keep_mask(shape: tuple[int, ...], p: float, seed: int, device) -> torch.Tensor:
    """The keep mask the fused kernel draws for (p, seed): bool, `shape`. For tests and debugging."""
    d = shape[-1]
    rows = 1
    for s in shape[:-1]:
        rows *= s
    out = torch.empty(rows, d, dtype=torch.int8, device=device)
    launch(_keep_mask_kernel, (rows,), out, d, p, seed, BLOCK_D=triton.next_power_of_2(d))
    return out.bool().view(shape)


def output_dtype(h: torch.Tensor, residual: torch.Tensor) -> torch.dtype:
    """What the reference, F.layer_norm(residual + h), returns: CUDA's autocast runs layer_norm in
    fp32; elsewhere the sum's promoted dtype. The residual stream then keeps one dtype whichever
    backend runs."""
    if h.device.type == "cuda" and autocast_dtype(h.device) is not None:
        return torch.float32
    return torch.promote_types(h.dtype, residual.dtype)


def backward_rows(d: int) -> int:
    """Rows per step of the backward: about 2048 elements in flight per loaded tensor (4096
    spilled in fp32 with Triton 3.6)."""
    return max(1, min(8, 2048 // triton.next_power_of_2(d)))


def launch_forward(h, residual, weight, bias, eps: float, p: float, seed: int):
    d = h.shape[-1]
    h2 = h.reshape(-1, d).contiguous()
    r2 = residual.reshape(-1, d).contiguous()
    rows = h2.shape[0]
    y = torch.empty(rows, d, dtype=output_dtype(h, residual), device=h.device)
    mean = torch.empty(rows, dtype=torch.float32, device=h.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=h.device)
    block, warps = row_block(d)
    block_r = 1 if gpu_target(h.device) is not None else max(1, 4096 // block)
    launch(_fwd_kernel, (triton.cdiv(rows, block_r),), h2, r2, weight, bias, y, mean, rstd, rows, d, eps, p, seed,
           HAS_DROPOUT=p > 0, BLOCK_R=block_r, BLOCK_D=block, num_warps=warps)
    return y.view(h.shape), mean, rstd


def launch_backward(dy, h, residual, weight, mean, rstd, p: float, seed: int):
    d = h.shape[-1]
    h2 = h.reshape(-1, d).contiguous()
    r2 = residual.reshape(-1, d).contiguous()
    rows = h2.shape[0]
    dy = dy.reshape(rows, d).contiguous()
    dres = torch.empty_like(r2)
    dh = torch.empty_like(h2)
    programs = backward_programs(rows, h2.device)
    rows_per_program = triton.cdiv(rows, programs)
    dw_part = torch.empty(programs, d, dtype=torch.float32, device=h2.device)
    db_part = torch.empty(programs, d, dtype=torch.float32, device=h2.device)
    block, _ = row_block(d)
    block_r = backward_rows(d)
    launch(_bwd_kernel, (programs,), dy, h2, r2, weight, mean, rstd, dres, dh, dw_part, db_part, rows, d,
           rows_per_program, p, seed, HAS_DROPOUT=p > 0, BLOCK_R=block_r, BLOCK_D=block,
           num_warps=8 if block_r * block >= 2048 else 4)
    return dh.view(h.shape), dres.view(h.shape), dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)


# Custom ops, so torch.compile treats the kernels as opaque, differentiable ops.
@torch.library.custom_op("blip2rt::residual_layer_norm_fwd", mutates_args=())
def residual_layer_norm_forward_op(h: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                   bias: torch.Tensor, eps: float, p: float,
                                   seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_forward(h, residual, weight, bias, eps, p, seed)


@residual_layer_norm_forward_op.register_fake
def _(h, residual, weight, bias, eps, p, seed):
    rows = h.numel() // h.shape[-1]
    return (h.new_empty(h.shape, dtype=output_dtype(h, residual)), h.new_empty(rows, dtype=torch.float32),
            h.new_empty(rows, dtype=torch.float32))


@torch.library.custom_op("blip2rt::residual_layer_norm_bwd", mutates_args=())
def residual_layer_norm_backward_op(dy: torch.Tensor, h: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                    mean: torch.Tensor, rstd: torch.Tensor, p: float,
                                    seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_backward(dy, h, residual, weight, mean, rstd, p, seed)


@residual_layer_norm_backward_op.register_fake
def _(dy, h, residual, weight, mean, rstd, p, seed):
    return h.new_empty(h.shape), residual.new_empty(residual.shape), weight.new_empty(weight.shape), \
        weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    h, residual, weight, _, _, p, seed = inputs
    _, mean, rstd = output
    ctx.save_for_backward(h, residual, weight, mean, rstd)
    ctx.p, ctx.seed = p, seed


def _backward(ctx, dy, _dmean, _drstd):
    h, residual, weight, mean, rstd = ctx.saved_tensors
    dh, dres, dw, db = residual_layer_norm_backward_op(dy, h, residual, weight, mean, rstd, ctx.p, ctx.seed)
    return dh, dres, dw, db, None, None, None


residual_layer_norm_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerResidualLayerNorm(torch.autograd.Function):
    """The same launchers as the custom ops, for eager mode: a custom op's Python dispatch costs
    more host time per call than the kernel takes at the Q-Former's sizes (benchmarks/RESULTS.md)."""

    @staticmethod
    def forward(ctx, h, residual, weight, bias, eps, p, seed):
        y, mean, rstd = launch_forward(h, residual, weight, bias, eps, p, seed)
        ctx.save_for_backward(h, residual, weight, mean, rstd)
        ctx.p, ctx.seed = p, seed
        return y

    @staticmethod
    def backward(ctx, dy):
        h, residual, weight, mean, rstd = ctx.saved_tensors
        dh, dres, dw, db = launch_backward(dy, h, residual, weight, mean, rstd, ctx.p, ctx.seed)
        return dh, dres, dw, db, None, None, None


def residual_layer_norm_triton(h: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                               eps: float, p: float = 0.0, seed: int | None = None) -> torch.Tensor:
    """Fused LayerNorm(residual + dropout(h, p)); h, residual (..., D). `seed` fixes the dropout mask.

    Eager mode calls the launchers through an autograd.Function; under torch.compile the custom
    op keeps the kernels opaque to the tracer. Both run the same launchers."""
    if p > 0 and seed is None:
        seed = draw_seed()
    args = (h, residual, weight, bias, float(eps), float(p), int(seed or 0))
    if torch.compiler.is_compiling():
        return residual_layer_norm_forward_op(*args)[0]
    return _EagerResidualLayerNorm.apply(*args)
