"""Triton kernels of ITC's query-max similarity (the loss around it is itc_loss.py):

    s[i, t] = max_q img[i, q] . txt[t]

The kernels compute the (B_i, B_t) maxima and the winning query index directly, so the
(B_i, B_t, Q) similarity tensor is never stored. The backward sends each gradient to the argmax
query only, which is what autograd does through `max` in the reference (references.py).
Either side may be the gathered batch of every rank.

NaN contract: a NaN in the features makes the similarities it touches NaN (the running max keeps
a NaN once seen); it is never skipped by the max.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import autocast_dtype, gpu_target, launch, register_budget
from .tile_ops import dot, dot_precision


@triton.jit
def _qmax_fwd_kernel(IMG, TXT, S, ARG, BI, BT, Q, D, s_ib, s_iq, s_tb,
                     BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """s[i, t] = max_q img[i, q] . txt[t] and its argmax, for one (BLOCK_I, BLOCK_T) tile. A 1-D grid
    over the tiles: either side may be the gathered batch of every rank."""
    tiles_t = tl.cdiv(BT, BLOCK_T)
    pid_i = tl.program_id(0) // tiles_t
    pid_t = tl.program_id(0) % tiles_t
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mi = offs_i < BI
    mt = offs_t < BT
    best = tl.full([BLOCK_I, BLOCK_T], float("-inf"), dtype=tl.float32)
    arg = tl.zeros([BLOCK_I, BLOCK_T], dtype=tl.int32)
    for q in range(Q):
        acc = tl.zeros([BLOCK_I, BLOCK_T], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            md = offs_d < D
            img = tl.load(IMG + offs_i[:, None].to(tl.int64) * s_ib + q * s_iq + offs_d[None, :],
                          mask=mi[:, None] & md[None, :], other=0.0)
            txt = tl.load(TXT + offs_t[:, None].to(tl.int64) * s_tb + offs_d[None, :],
                          mask=mt[:, None] & md[None, :], other=0.0)
            acc = dot(img, tl.trans(txt), acc, PRECISION)
        # strict > keeps the first maximum (torch's choice); a NaN wins once and then stays
        better = ((acc > best) | (acc != acc)) & (best == best)
        best = tl.where(better, acc, best)
        arg = tl.where(better, q, arg)
    out = offs_i[:, None].to(tl.int64) * BT + offs_t[None, :]
    m = mi[:, None] & mt[None, :]
    tl.store(S + out, best, mask=m)
    tl.store(ARG + out, arg, mask=m)


@triton.jit
def _qmax_bwd_img_kernel(G, ARG, TXT, DIMG, BI, BT, D, s_tb, s_db, s_dq,
                         BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """dimg[i, q, :] = sum_t G[i, t] [arg[i, t] == q] txt[t, :]; one program per (i block, q, d block)."""
    pid_i = tl.program_id(0)
    q = tl.program_id(1)
    pid_d = tl.program_id(2)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mi = offs_i < BI
    md = offs_d < D
    acc = tl.zeros([BLOCK_I, BLOCK_D], dtype=tl.float32)
    for t0 in range(0, BT, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mt = offs_t < BT
        gm = mi[:, None] & mt[None, :]
        idx = offs_i[:, None].to(tl.int64) * BT + offs_t[None, :]
        g = tl.load(G + idx, mask=gm, other=0.0)
        a = tl.load(ARG + idx, mask=gm, other=-1)
        txt = tl.load(TXT + offs_t[:, None].to(tl.int64) * s_tb + offs_d[None, :], mask=mt[:, None] & md[None, :],
                      other=0.0)
        w = tl.where(a == q, g, 0.0).to(txt.dtype)
        acc = dot(w, txt, acc, PRECISION)
    tl.store(DIMG + offs_i[:, None].to(tl.int64) * s_db + q * s_dq + offs_d[None, :],
             acc.to(DIMG.dtype.element_ty), mask=mi[:, None] & md[None, :])


@triton.jit
def _qmax_bwd_txt_kernel(G, ARG, IMG, DTXT, BI, BT, Q, D, s_ib, s_iq,
                         BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """dtxt[t, :] = sum_i G[i, t] img[i, arg[i, t], :]; one program per (t block, d block)."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mt = offs_t < BT
    md = offs_d < D
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for i0 in range(0, BI, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        mi = offs_i < BI
        gm = mi[:, None] & mt[None, :]
        idx = offs_i[:, None].to(tl.int64) * BT + offs_t[None, :]
        g = tl.load(G + idx, mask=gm, other=0.0)
        a = tl.load(ARG + idx, mask=gm, other=-1)
        for q in range(Q):
            img = tl.load(IMG + offs_i[:, None].to(tl.int64) * s_ib + q * s_iq + offs_d[None, :],
                          mask=mi[:, None] & md[None, :], other=0.0)
            w = tl.trans(tl.where(a == q, g, 0.0).to(img.dtype))  # (BLOCK_T, BLOCK_I)
            acc = dot(w, img, acc, PRECISION)
    tl.store(DTXT + offs_t[:, None].to(tl.int64) * D + offs_d[None, :], acc.to(DTXT.dtype.element_ty),
             mask=mt[:, None] & md[None, :])


def itc_config(d: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tiles of the query-max kernels: BLOCK_I x BLOCK_T similarity tiles, the feature dim in BLOCK_D
    steps. The compile gate checks every choice made here."""
    precision = dot_precision(dtype, device)
    block_d = min(64, max(16, triton.next_power_of_2(d)))
    target = gpu_target(device)
    if target is None:
        return dict(BLOCK_I=16, BLOCK_T=16, BLOCK_D=min(32, block_d), PRECISION=precision)  # the interpreter
    if dtype == torch.float32:
        # tf32x3's three operand splits per tile: on sm_90, 64x64 tiles in 32-wide feature steps (wgmma);
        # sm_80's mma.sync spilled there and needs 32 image rows. The full register budget, as in attention.
        fp32 = dict(PRECISION=precision, num_warps=8, maxnreg=register_budget(8))
        if target.arch >= 90:
            return dict(BLOCK_I=64, BLOCK_T=64, BLOCK_D=min(32, block_d), **fp32)
        return dict(BLOCK_I=32, BLOCK_T=64, BLOCK_D=block_d, **fp32)
    return dict(BLOCK_I=64, BLOCK_T=64, BLOCK_D=block_d, PRECISION=precision, num_warps=4)


def launch_forward(img, txt):
    bi, q, d = img.shape
    bt = txt.shape[0]
    s = torch.empty(bi, bt, dtype=torch.float32, device=img.device)
    arg = torch.empty(bi, bt, dtype=torch.int32, device=img.device)
    cfg = itc_config(d, img.dtype, img.device)
    grid = (triton.cdiv(bi, cfg["BLOCK_I"]) * triton.cdiv(bt, cfg["BLOCK_T"]),)
    launch(_qmax_fwd_kernel, grid, img, txt, s, arg, bi, bt, q, d, img.stride(0), img.stride(1), txt.stride(0), **cfg)
    return s, arg


def launch_backward(g, arg, img, txt, need_img: bool, need_txt: bool):
    bi, q, d = img.shape
    bt = txt.shape[0]
    cfg = itc_config(d, img.dtype, img.device)
    dimg = dtxt = None
    if need_img:
        dimg = torch.empty_like(img)
        launch(_qmax_bwd_img_kernel, (triton.cdiv(bi, cfg["BLOCK_I"]), q, triton.cdiv(d, cfg["BLOCK_D"])),
               g, arg, txt, dimg, bi, bt, d, txt.stride(0), dimg.stride(0), dimg.stride(1), **cfg)
    if need_txt:
        dtxt = torch.empty_like(txt)
        launch(_qmax_bwd_txt_kernel, (triton.cdiv(bt, cfg["BLOCK_T"]), triton.cdiv(d, cfg["BLOCK_D"])),
               g, arg, img, dtxt, bi, bt, q, d, img.stride(0), img.stride(1), **cfg)
    return dimg, dtxt


class _QueryMaxSimilarity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, txt):
        img = img.contiguous()
        txt = txt.contiguous()
        s, arg = launch_forward(img, txt)
        ctx.save_for_backward(img, txt, arg)
        ctx.mark_non_differentiable(arg)
        return s, arg

    @staticmethod
    def backward(ctx, g, _):
        img, txt, arg = ctx.saved_tensors
        return launch_backward(g.contiguous().float(), arg, img, txt, *ctx.needs_input_grad[:2])


# Custom ops, so torch.compile treats the kernels as opaque, differentiable ops (as the attention's).
@torch.library.custom_op("blip2rt::query_max_similarity_fwd", mutates_args=())
def query_max_similarity_op(img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_forward(img.contiguous(), txt.contiguous())


@query_max_similarity_op.register_fake
def _(img, txt):
    return img.new_empty(img.shape[0], txt.shape[0], dtype=torch.float32), \
        img.new_empty(img.shape[0], txt.shape[0], dtype=torch.int32)


@torch.library.custom_op("blip2rt::query_max_similarity_bwd", mutates_args=())
def query_max_similarity_backward_op(g: torch.Tensor, arg: torch.Tensor, img: torch.Tensor, txt: torch.Tensor,
                                     need_img: bool, need_txt: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dimg, dtxt = launch_backward(g.contiguous().float(), arg, img, txt, need_img, need_txt)
    return (img.new_empty(0) if dimg is None else dimg), (txt.new_empty(0) if dtxt is None else dtxt)


@query_max_similarity_backward_op.register_fake
def _(g, arg, img, txt, need_img, need_txt):
    return (img.new_empty(img.shape) if need_img else img.new_empty(0)), \
        (txt.new_empty(txt.shape) if need_txt else txt.new_empty(0))


def _qmax_setup_context(ctx, inputs, output):
    img, txt = inputs
    ctx.save_for_backward(img.contiguous(), txt.contiguous(), output[1])
    ctx.mark_non_differentiable(output[1])


def _qmax_backward(ctx, g, _):
    img, txt, arg = ctx.saved_tensors
    need_img, need_txt = ctx.needs_input_grad[:2]
    dimg, dtxt = query_max_similarity_backward_op(g, arg, img, txt, need_img, need_txt)
    return (dimg if need_img else None), (dtxt if need_txt else None)


query_max_similarity_op.register_autograd(_qmax_backward, setup_context=_qmax_setup_context)


def query_max_similarity_triton(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """(B_i, Q, D), (B_t, D) -> (B_i, B_t) fp32: max over queries of the dot product.

    Under autocast the features arrive in fp32 (F.normalize runs in fp32 there), yet the product
    belongs to the training precision: they are cast to the autocast dtype, as the reference's
    einsum is, and the kernel accumulates in fp32.
    """
    dtype = autocast_dtype(img.device)
    if dtype is not None:
        img, txt = img.to(dtype), txt.to(dtype)
    if torch.compiler.is_compiling():
        return query_max_similarity_op(img, txt)[0]
    return _QueryMaxSimilarity.apply(img, txt)[0]
