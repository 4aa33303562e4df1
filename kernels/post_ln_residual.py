"""Post-LN residual of the Q-Former (BERT): y = LayerNorm(residual + dropout(h)), fused.

Forward: one program per row; statistics in fp32 whatever the input dtype. Only the row's mean
and 1/std are kept, and the backward recomputes the sum. The dropout mask comes from the seed (Philox,
four columns a call: counter row * ceil(D / 4) + col // 4, output col % 4, in 64 bits, kernels.philox;
the seed read from the device, kernels.dropout_rng). The backward either draws it again (the default:
nothing stored) or reads it as bits the forward saved, one per element, 8 a byte (`backward_config`'s
"saved_mask", which gpu-tune measures: a 1/16 extra of the bf16 input's bytes written and read, against
a second Philox draw). Both give the same mask, so the same numbers, bit for bit. The output has the
dtype the reference returns (`output_dtype`): fp32 under CUDA autocast, as F.layer_norm there.
Backward: BLOCKS_PER_SM programs an SM (one wave, at the blocks per SM the compile gate holds the
kernel to), each walking its share of the rows, several rows per step, with partial dW/dB in
registers, written once per program; one sum over the programs finishes them. Beside the designs it
was compared with: Liger-Kernel's backward has one program per SM walking one row a step, with the
same per-program partials summed in torch; flash-attn's CUDA backward keeps partials per block of
rows in a workspace and finishes them in a second kernel. Several rows a step keep more loads in
flight than one; the finishing sum is one small op over (2, programs, D) either way.
Each launcher plans its launch once per shape, dtypes and device, and later calls only allocate
their outputs and launch (benchmarks/test_host_overhead.py times the host path).

NaN contract: a non-finite input makes its row of y non-finite, and every grad it touches;
nothing is clipped or dropped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import dropout_rng, tuned
from .philox import uniform4_cols
from .launch import Planned, autocast_dtype, backward_programs, gpu_target, launch, plan_cache, row_block


@triton.jit
def _call_seed(SEED, HAS_DROPOUT: tl.constexpr):
    """This call's dropout seed, read from the device (kernels.dropout_rng); 0 without dropout."""
    if HAS_DROPOUT:
        return tl.load(SEED)
    else:
        return 0


@triton.jit
def _keep(seed, rows, D, p, BLOCK_D: tl.constexpr):
    """(len(rows), BLOCK_D) dropout keep mask of rows (int64) at columns 0..BLOCK_D-1: one Philox call
    per four columns (kernels.philox), never stored."""
    counters = rows[:, None] * tl.cdiv(D, 4) + tl.arange(0, BLOCK_D // 4)[None, :]
    return uniform4_cols(seed, counters) >= p


@triton.jit
def _pack_bits(keep, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_R, BLOCK_D) bool -> (BLOCK_R, BLOCK_D // 8) uint8: bit i of byte j is column 8j + i."""
    bits = tl.reshape(keep.to(tl.int32), (BLOCK_R, BLOCK_D // 8, 8))
    return tl.sum(bits << tl.arange(0, 8)[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def _unpack_bits(packed, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """`_pack_bits` undone: (BLOCK_R, BLOCK_D // 8) uint8 -> (BLOCK_R, BLOCK_D) bool."""
    bits = (packed.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_R, BLOCK_D)) != 0


@triton.jit
def _mask_bytes(BITS, rows, row_ok, D, BLOCK_D: tl.constexpr):
    """Pointers and mask of rows' packed keep bits in BITS (M, ceil(D / 8)) uint8."""
    nbytes = tl.cdiv(D, 8)
    byte_cols = tl.arange(0, BLOCK_D // 8)
    return BITS + rows[:, None] * nbytes + byte_cols[None, :], row_ok[:, None] & (byte_cols < nbytes)[None, :]


@triton.jit
def _fwd_kernel(H, R, W, B, Y, STATS, BITS, M, D, eps, p, SEED,
                HAS_DROPOUT: tl.constexpr, SAVE_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """BLOCK_R rows per program (1 on a GPU; more in the interpreter, whose cost is per program).
    STATS (2, M) fp32: each row's mean, then its 1/std. SAVE_MASK: the keep mask goes to BITS as well
    (`_pack_bits`)."""
    seed = _call_seed(SEED, HAS_DROPOUT)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rm = rows < M
    m = cols < D
    offs = rows[:, None] * D + cols[None, :]
    mask = rm[:, None] & m[None, :]
    h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = _keep(seed, rows, D, p, BLOCK_D)
        h = tl.where(keep, h / (1.0 - p), 0.0)
        if SAVE_MASK:
            bit_ptrs, bit_mask = _mask_bytes(BITS, rows, rm, D, BLOCK_D)
            tl.store(bit_ptrs, _pack_bits(keep, BLOCK_R, BLOCK_D), mask=bit_mask)
    s = h + r
    mean = tl.sum(s, axis=1) / D
    xc = tl.where(mask, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + offs, (xc * rstd[:, None] * w[None, :] + b[None, :]).to(Y.dtype.element_ty), mask=mask)
    tl.store(STATS + rows, mean, mask=rm)
    tl.store(STATS + M + rows, rstd, mask=rm)


@triton.jit
def _bwd_kernel(DY, H, R, W, STATS, BITS, DRES, DH, PARTS, M, D, rows_per_program, p, SEED,
                HAS_DROPOUT: tl.constexpr, SAVED_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """A block of rows per program, BLOCK_R rows per step (several rows' loads in flight at once);
    partial dW/dB stay in registers and are written once per program: PARTS (2, programs, D) fp32,
    the dW partials, then the dB partials. SAVED_MASK: the keep mask is read from the forward's BITS,
    not drawn again."""
    seed = _call_seed(SEED, HAS_DROPOUT)
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
        mean = tl.load(STATS + rows, mask=rm, other=0.0)
        rstd = tl.load(STATS + M + rows, mask=rm, other=0.0)
        if HAS_DROPOUT:
            if SAVED_MASK:
                bit_ptrs, bit_mask = _mask_bytes(BITS, rows, rm, D, BLOCK_D)
                keep = _unpack_bits(tl.load(bit_ptrs, mask=bit_mask, other=0), BLOCK_R, BLOCK_D)
            else:
                keep = _keep(seed, rows, D, p, BLOCK_D)
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
    tl.store(PARTS + pid * D + cols, tl.sum(dw, axis=0), mask=m)
    tl.store(PARTS + (tl.num_programs(0) + pid) * D + cols, tl.sum(db, axis=0), mask=m)


@triton.jit
def _keep_mask_kernel(OUT, D, p, SEED, BLOCK_D: tl.constexpr):
    seed = tl.load(SEED)
    rows = tl.program_id(0).to(tl.int64) + tl.zeros([1], dtype=tl.int64)
    cols = tl.arange(0, BLOCK_D)[None, :]
    tl.store(OUT + rows[:, None] * D + cols, _keep(seed, rows, D, p, BLOCK_D).to(tl.int8), mask=cols < D)


def dropout_keep_mask(shape: tuple[int, ...], p: float, seed: int | torch.Tensor, device) -> torch.Tensor:
    """The keep mask the fused kernel draws for (p, seed): bool, `shape`. For tests and debugging."""
    d = shape[-1]
    rows = 1
    for s in shape[:-1]:
        rows *= s
    out = torch.empty(rows, d, dtype=torch.int8, device=device)
    launch(_keep_mask_kernel, (rows,), out, d, p, dropout_rng.call_seed(seed, device), BLOCK_D=_block(d, True))
    return out.bool().view(shape)


def output_dtype(h: torch.Tensor, residual: torch.Tensor) -> torch.dtype:
    """What the reference, F.layer_norm(residual + h), returns: CUDA's autocast runs layer_norm in
    fp32; elsewhere the sum's promoted dtype. The residual stream then keeps one dtype whichever
    backend runs."""
    if h.device.type == "cuda" and autocast_dtype(h.device) is not None:
        return torch.float32
    return torch.promote_types(h.dtype, residual.dtype)


# The backward's grid: this many blocks per SM, each walking its share of the rows. The compile gate holds
# the kernel to at least this many blocks per SM (its floor for post_ln_residual._bwd_kernel), so the grid
# is one wave: no block waits for another's SM.
BLOCKS_PER_SM = 2


def backward_rows(d: int) -> int:
    """Rows per step of the backward: about 2048 elements in flight per loaded tensor (4096
    spilled in fp32 with Triton 3.6)."""
    return max(1, min(8, 2048 // triton.next_power_of_2(d)))


class _Plan:
    """One launch of a shape, dtype and device, worked out once (launch.Planned) with what the
    launcher needs around it."""

    __slots__ = ("launch", "rows", "d", "out_dtype", "programs", "rows_per_program", "mask_bytes")

    def __init__(self, launch_, rows: int, d: int, out_dtype: torch.dtype, programs: int = 0, saves_mask: bool = False):
        self.launch, self.rows, self.d, self.out_dtype, self.programs = launch_, rows, d, out_dtype, programs
        self.rows_per_program = triton.cdiv(rows, programs) if programs else 0
        self.mask_bytes = triton.cdiv(d, 8) if saves_mask else 0  # a row's saved mask bits: 0 where none are


_PLANS: dict[tuple, _Plan] = plan_cache()


def backward_config(d: int, dtype: torch.dtype, p: float, device: torch.device) -> dict:
    """Rows per step, warps, blocks per SM of the backward, and whether its dropout mask is saved by the
    forward as bits (`saved_mask`): gpu-tune's measured choice for this architecture (kernels.tuned) where
    there is one, else `backward_rows` rows a step on 8 warps from 2048 elements a step (4 below),
    BLOCKS_PER_SM blocks an SM, and the mask drawn again."""
    target = gpu_target(device)
    if target is not None:
        found = tuned.lookup(target.arch, tuned.layer_norm_key(d, str(dtype).removeprefix("torch."), p > 0))
        if found is not None:
            return dict(found, saved_mask=bool(found.get("saved_mask", False)))
    block_r = backward_rows(d)
    return dict(block_r=block_r, warps=8 if block_r * row_block(d)[0] >= 2048 else 4, blocks_per_sm=BLOCKS_PER_SM,
                saved_mask=False)


def saves_mask(h: torch.Tensor, p: float) -> bool:
    """Whether the forward saves its dropout mask as bits for the backward (`backward_config`)."""
    return p > 0 and backward_config(h.shape[-1], h.dtype, p, h.device)["saved_mask"]


def _block(d: int, dropout: bool) -> int:
    """BLOCK_D: the row's width to a power of two; with dropout at least 8, a Philox call's four columns
    and a byte of saved mask bits."""
    block = row_block(d)[0]
    return max(block, 8) if dropout else block


def _forward_plan(h, residual, p: float) -> _Plan:
    d = h.shape[-1]
    rows = h.numel() // d
    save = saves_mask(h, p)
    block, warps = _block(d, p > 0), row_block(d)[1]
    block_r = 1 if gpu_target(h.device) is not None else max(1, 4096 // block)
    planned = Planned(_fwd_kernel, (triton.cdiv(rows, block_r),),
                      dict(HAS_DROPOUT=p > 0, SAVE_MASK=save, BLOCK_R=block_r, BLOCK_D=block, num_warps=warps))
    return _Plan(planned, rows, d, output_dtype(h, residual), saves_mask=save)


def _backward_plan(h, residual, weight, p: float, saved_mask: bool) -> _Plan:
    d = h.shape[-1]
    rows = h.numel() // d
    cfg = backward_config(d, h.dtype, p, h.device)
    programs = backward_programs(rows, h.device, cfg["blocks_per_sm"])
    planned = Planned(_bwd_kernel, (programs,), dict(HAS_DROPOUT=p > 0, SAVED_MASK=saved_mask, BLOCK_R=cfg["block_r"],
                                                      BLOCK_D=_block(d, p > 0), num_warps=cfg["warps"]))
    return _Plan(planned, rows, d, weight.dtype, programs)


def _key(kind: str, h, residual, weight, p: float, device: torch.device) -> tuple:
    # one flat tuple of plain values (torch.Size compares through Python); CUDA's autocast changes
    # the output dtype (output_dtype), so whether it is on is part of the key
    return (kind, *h.shape, h.dtype, residual.dtype, weight.dtype, device, p > 0, gpu_target(device),
            device.type == "cuda" and torch.is_autocast_enabled("cuda"))


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t itself where it is contiguous (the kernels index rows x D from its start), else a copy."""
    return t if t.is_contiguous() else t.contiguous()


def launch_forward(h, residual, weight, bias, eps: float, p: float, seed: torch.Tensor | None):
    """(y, stats, bits): stats (2, rows) fp32, each row's mean and 1/std, for the backward; bits the
    dropout mask saved for it, (rows, ceil(D / 8)) uint8 (`_pack_bits`), or None where the backward
    draws it again (`saves_mask`). seed: this call's dropout seed, a (1,) int64 tensor on h's device
    (kernels.dropout_rng); read only with dropout."""
    device = h.device
    key = _key("fwd", h, residual, weight, p, device)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _forward_plan(h, residual, p)
    y = torch.empty(h.shape, dtype=plan.out_dtype, device=device)
    stats = torch.empty(2, plan.rows, dtype=torch.float32, device=device)
    bits = None
    if plan.mask_bytes:
        bits = torch.empty(plan.rows, plan.mask_bytes, dtype=torch.uint8, device=device)
    plan.launch(_dense(h), _dense(residual), weight, bias, y, stats, stats if bits is None else bits, plan.rows,
                plan.d, eps, p, stats if seed is None else seed)
    return y, stats, bits


def launch_backward(dy, h, residual, weight, stats, bits: torch.Tensor | None, p: float, seed: torch.Tensor | None):
    """(dh, dresidual, dweight_dbias): the last (2, D), dW then dB, in the weight's dtype. bits: the
    forward's saved dropout mask, or None to draw it again from `seed`."""
    device = h.device
    key = _key("bwd" if bits is None else "bwd, saved mask", h, residual, weight, p, device)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _backward_plan(h, residual, weight, p, bits is not None)
    dres = torch.empty(h.shape, dtype=residual.dtype, device=device)
    dh = torch.empty(h.shape, dtype=h.dtype, device=device)
    parts = torch.empty(2, plan.programs, plan.d, dtype=torch.float32, device=device)  # summed below
    plan.launch(_dense(dy), _dense(h), _dense(residual), weight, stats, stats if bits is None else bits, dres, dh,
                parts, plan.rows, plan.d, plan.rows_per_program, p, stats if seed is None else seed)
    dwdb = parts.sum(1)
    return dh, dres, dwdb if plan.out_dtype == torch.float32 else dwdb.to(plan.out_dtype)


def _no_bits(h: torch.Tensor) -> torch.Tensor:
    """The custom ops' stand-in for "no saved mask": an op returns tensors, never None."""
    return h.new_empty(0, dtype=torch.uint8)


# Custom ops, so torch.compile treats the kernels as opaque, differentiable ops.
@torch.library.custom_op("blip2rt::residual_layer_norm_fwd", mutates_args=())
def residual_layer_norm_forward_op(h: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                   bias: torch.Tensor, eps: float, p: float,
                                   seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, stats, bits = launch_forward(h, residual, weight, bias, eps, p, seed)
    return y, stats, _no_bits(h) if bits is None else bits


@residual_layer_norm_forward_op.register_fake
def _(h, residual, weight, bias, eps, p, seed):
    d = h.shape[-1]
    rows = h.numel() // d
    bits = h.new_empty(rows, triton.cdiv(d, 8), dtype=torch.uint8) if saves_mask(h, p) else _no_bits(h)
    return h.new_empty(h.shape, dtype=output_dtype(h, residual)), h.new_empty(2, rows, dtype=torch.float32), bits


@torch.library.custom_op("blip2rt::residual_layer_norm_bwd", mutates_args=())
def residual_layer_norm_backward_op(dy: torch.Tensor, h: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                    stats: torch.Tensor, bits: torch.Tensor, p: float,
                                    seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_backward(dy, h, residual, weight, stats, bits if bits.numel() else None, p, seed)


@residual_layer_norm_backward_op.register_fake
def _(dy, h, residual, weight, stats, bits, p, seed):
    return h.new_empty(h.shape), residual.new_empty(residual.shape), weight.new_empty(2, weight.shape[0])


def _setup_context(ctx, inputs, output):
    h, residual, weight, _, _, p, seed = inputs
    ctx.save_for_backward(h, residual, weight, output[1], output[2])
    ctx.p, ctx.seed = p, seed


def _backward(ctx, dy, _dstats, _dbits):
    h, residual, weight, stats, bits = ctx.saved_tensors
    dh, dres, dwdb = residual_layer_norm_backward_op(dy, h, residual, weight, stats, bits, ctx.p, ctx.seed)
    dw, db = dwdb.unbind(0)
    return dh, dres, dw, db, None, None, None


residual_layer_norm_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerResidualLayerNorm(torch.autograd.Function):
    """The same launchers as the custom ops, for eager mode: a custom op's Python dispatch costs
    more host time per call than the kernel takes at the Q-Former's sizes (benchmarks/RESULTS.md)."""

    @staticmethod
    def forward(ctx, h, residual, weight, bias, eps, p, seed):
        y, stats, bits = launch_forward(h, residual, weight, bias, eps, p, seed)
        ctx.save_for_backward(h, residual, weight, stats, bits)
        ctx.p, ctx.seed = p, seed
        return y

    @staticmethod
    def backward(ctx, dy):
        h, residual, weight, stats, bits = ctx.saved_tensors
        dh, dres, dwdb = launch_backward(dy, h, residual, weight, stats, bits, ctx.p, ctx.seed)
        dw, db = dwdb.unbind(0)
        return dh, dres, dw, db, None, None, None


def residual_layer_norm_triton(h: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                               eps: float, p: float = 0.0, seed: int | torch.Tensor | None = None) -> torch.Tensor:
    """Fused LayerNorm(residual + dropout(h, p)); h, residual (..., D). `seed` (an int, or a (1,) int64
    tensor on the device) fixes the dropout mask; by default each call draws one on the device
    (kernels.dropout_rng), with no host sync.

    Eager mode calls the launchers through an autograd.Function; under torch.compile the custom
    op keeps the kernels opaque to the tracer. Both run the same launchers."""
    seed = dropout_rng.call_seed(seed, h.device) if p > 0 else None
    args = (h, residual, weight, bias, float(eps), float(p), seed)
    if torch.compiler.is_compiling():
        return residual_layer_norm_forward_op(*args)[0]
    return _EagerResidualLayerNorm.apply(*args)
