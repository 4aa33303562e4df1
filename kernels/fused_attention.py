"""Flash-style attention for the Q-Former: query cross-attention and masked self-attention.

One kernel family (FlashAttention-2: online softmax, only the log-sum-exp kept, recomputation
in the backward) serves both:
- cross-attention: 32 queries against N image tokens, no mask;
- self-attention over [queries ; text]: the mask is computed in the kernel from the mode
  (bidirectional / multimodal-causal / unimodal, see qformer_attention.py), the number of
  query positions, the absolute position of the first row (so a cached query past works), and
  the (B, T) text padding vector. No (B, 1, L, L) mask exists.

Tensors are (B, L, H, d) strided views, read in place: q/k/v straight from the projection
outputs (including the packed image K/V of all layers) and o written in the (B, L, H*d) layout
the output projection reads. The last dimension must be contiguous.

Grid: (B*H, query tiles, key splits): B*H on axis x, whose limit (2^31 - 1) no batch reaches.

Backward, key-major: where B*H fills the GPU, one program per (batch, head) (or, where gpu-tune chose
it, a persistent grid walking them) makes dQ, dK and dV in one pass, reading K/V once and needing no
atomics, when every key fits one block (Lk <= BLOCK_N: the Q-Former's self-attention, 32 queries + 32
text; the program walks the 32-row query tiles) or every row one tile (Lq <= BLOCK_M: the 32 queries
against the image; it walks the key blocks). On sm_90 it moves K, V, dK and dV (and, walking query
tiles, q, dO, O and dQ) through tensor descriptors made once per (batch, head), where the pointers and
strides are on 16-byte steps (`tma_ready`; else pointer tiles). Longer rows and keys, and a small
batch, get programs of their own for each key block (dK/dV) and query tile (dQ).

Split-KV: for inference at small B*H (B = 1 is 12 programs) over more than 512 keys, the keys
are split across programs and the partial softmax states combined, so the GPU fills.

Eager calls reach the launchers through an autograd.Function (inference calls skip autograd and
keep no log-sum-exp); torch.compile sees custom ops (opaque to its tracer) that call the same
launchers. A launcher plans its launches once per shapes, strides, dtype and device (LaunchPlan)
and later calls only allocate their outputs and launch. The backward computes delta = rowsum(dO*O)
itself, from O, where each query tile is loaded.

Tiles per dtype and GPU come from `attention_config`, which the compile gate checks on sm_90 and
sm_80 (blip2rt.kernels.compile_gate).

Rows with nothing to see (only when a sample's whole text is padding, in a mode where text
sees text only) give 0 here; the reference gives the mean of all values.

Attention dropout is fused: the forward draws the mask from a counter-based RNG (Philox, four
outputs a call, kernels.philox) at an offset per (batch, head, row, key), from a seed the kernels
read from the device (kernels.dropout_rng). A forward that a backward will follow also stores the
mask as bits, a byte per 4 (row, key) pairs, which the backward reads instead of drawing again: no
Philox in the backward, whose registers it would cost (the compile gate's tables). Any program
draws the same mask from the seed; `attention_keep_mask` materialises it for tests.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from . import dropout_rng, tuned
from .packed_grads import grad_slot
from .philox import spread_rows, uniform4
from .launch import GpuTarget, Planned, ensure_scratch_allocator, gpu_target, launch, plan_cache, register_budget
from .qformer_attention import MODE_BIDIRECTIONAL, MODE_CAUSAL, MODE_NONE, MODE_UNIMODAL, AttentionMode, kernel_mode_id
from .tile_ops import dot, dot_precision

__all__ = ["fused_attention", "attention_keep_mask", "attention_config", "MODE_NONE", "MODE_BIDIRECTIONAL",
           "MODE_CAUSAL", "MODE_UNIMODAL"]


@triton.jit
def _allowed(rows, cols, Lk, NQ, TM, b, T, MODE: tl.constexpr, HAS_TEXT_MASK: tl.constexpr):
    """bool, the broadcast of rows and cols: may absolute row position `rows` attend to key position
    `cols`. Rows and cols come as 2-D index tiles, (M, 1) and (1, N) query-major or (1, M) and (N, 1)
    key-major, so both layouts share this one rule."""
    ok = (cols < Lk) & (rows >= 0)
    if HAS_TEXT_MASK:
        t = cols - NQ
        is_text = (t >= 0) & (cols < Lk)
        pad = tl.load(TM + b * T + tl.where(is_text, t, 0), mask=is_text, other=1)
        ok = ok & ((pad != 0) | (cols < NQ))
    if MODE == 2:  # multimodal causal
        ok = ok & tl.where(rows < NQ, cols < NQ, (cols < NQ) | (cols <= rows))
    if MODE == 3:  # unimodal
        ok = ok & ((rows < NQ) == (cols < NQ))
    return ok


@triton.jit
def _keep_rows(seed, dropout_p, pid_bh, m_start, offs_n, Lq, Lk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The attention-dropout keep mask of query rows m_start.. and keys offs_n of (batch, head) pid_bh,
    twice: (BLOCK_M, BLOCK_N) bool, query-major, and (BLOCK_M / 4, BLOCK_N) uint8 whose bit i in row j is
    row m_start + 4j + i (the form `_store_keep` stores). Each Philox call covers four consecutive rows
    of one key: counter (pid_bh * ceil(Lq / 4) + row // 4) * Lk + key, output row % 4 (kernels.philox)."""
    groups = m_start // 4 + tl.arange(0, BLOCK_M // 4)
    counters = (pid_bh.to(tl.int64) * tl.cdiv(Lq, 4) + groups[:, None]) * Lk + offs_n[None, :]
    u0, u1, u2, u3 = uniform4(seed, counters)
    k0, k1, k2, k3 = u0 >= dropout_p, u1 >= dropout_p, u2 >= dropout_p, u3 >= dropout_p
    bits = k0.to(tl.uint8) | (k1.to(tl.uint8) << 1) | (k2.to(tl.uint8) << 2) | (k3.to(tl.uint8) << 3)
    return spread_rows(k0, k1, k2, k3, BLOCK_M, BLOCK_N), bits


@triton.jit
def _store_keep(KEEP, bits, pid_bh, m_start, offs_n, Lq, Lk, BLOCK_M: tl.constexpr):
    """Stores `_keep_rows`'s bits: byte (pid_bh, row // 4, key) of the (B*H, ceil(Lq / 4), Lk) uint8 mask
    holds rows 4j..4j+3 of that key, row 4j + i in bit i, so the backward reads the mask instead of
    drawing it again. A byte per 4 (row, key) pairs: at the Q-Former's sizes about 3% of the bytes the
    forward moves anyway (cross-attention at B = 128: 3.2 MB beside 114 MB)."""
    groups = m_start // 4 + tl.arange(0, BLOCK_M // 4)
    n_groups = tl.cdiv(Lq, 4)
    tl.store(KEEP + (pid_bh.to(tl.int64) * n_groups + groups[:, None]) * Lk + offs_n[None, :], bits,
             mask=(groups < n_groups)[:, None] & (offs_n < Lk)[None, :])


@triton.jit
def _load_keep_t(KEEP, pid_bh, offs_m, offs_n, mm, mn, Lq, Lk):
    """The keep mask `_store_keep` stored, key-major: (len(offs_n), len(offs_m)) bool for keys offs_n and
    rows offs_m, in range where mn and mm. Every element loads its byte (the 4 rows sharing one come
    from the same cache line)."""
    byte = tl.load(KEEP + (pid_bh.to(tl.int64) * tl.cdiv(Lq, 4) + offs_m[None, :] // 4) * Lk + offs_n[:, None],
                   mask=mm[None, :] & mn[:, None], other=0)
    return ((byte >> (offs_m[None, :] % 4).to(tl.uint8)) & 1) != 0


@triton.jit
def _call_seed(SEED, DROPOUT: tl.constexpr):
    """This call's dropout seed, read from the device (kernels.dropout_rng); 0 without dropout, where
    SEED is any pointer and is not read."""
    if DROPOUT:
        return tl.load(SEED)
    else:
        return 0


@triton.jit
def _load_tile(PTR, b, offs, h, s_b, s_n, s_h, offs_d, rows_ok, d_ok):
    """(len(offs), BLOCK_D) tile of head h of sample b from a (B, L, H, d) strided tensor; 0 outside."""
    return tl.load(PTR + b.to(tl.int64) * s_b + offs[:, None] * s_n + h * s_h + offs_d[None, :],
                   mask=rows_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _head_descriptor(PTR, b, h, s_b, s_n, s_h, L, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """Head h of sample b of a (B, L, H, d) strided tensor as an (L, d) tensor descriptor read and written
    in (BLOCK_N, BLOCK_D) blocks: rows past L and columns past d read as 0 and are not written. Needs
    PTR + b * s_b + h * s_h on a 16-byte boundary and s_n a multiple of 16 bytes (`tma_ready`)."""
    return tl.make_tensor_descriptor(PTR + b.to(tl.int64) * s_b + h * s_h, shape=[L, HEAD_DIM], strides=[s_n, 1],
                                     block_shape=[BLOCK_N, BLOCK_D])


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, M_PART, L_PART, TM, KEEP,
                sm_scale, Lq, Lk, NQ, q_offset, T, H, keys_per_split, dropout_p, SEED,
                s_qb, s_qm, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_ob, s_om, s_oh,
                MODE: tl.constexpr, HAS_TEXT_MASK: tl.constexpr, SPLIT: tl.constexpr, DROPOUT: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                HEAD_DIM: tl.constexpr, STORE_LSE: tl.constexpr = True):
    """Online softmax over key blocks. With DROPOUT, the probabilities that multiply V are dropped and
    scaled by 1/(1 - p) (the normaliser and the log-sum-exp are not): softmax, then dropout, then V; a
    call that keeps its log-sum-exp for a backward also stores the keep mask, as bits (`_store_keep`)."""
    seed = _call_seed(SEED, DROPOUT)
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    md = offs_d < HEAD_DIM
    mm = offs_m < Lq
    q = _load_tile(Q, b, offs_m, h, s_qb, s_qm, s_qh, offs_d, mm, md)
    rows = q_offset + offs_m
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_start = pid_s * keys_per_split
    k_end = tl.minimum(k_start + keys_per_split, Lk)
    for start_n in range(k_start, k_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mn = offs_n < k_end
        k = _load_tile(K, b, offs_n, h, s_kb, s_kn, s_kh, offs_d, mn, md)
        s = dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION) * sm_scale
        ok = _allowed(rows[:, None], offs_n[None, :], k_end, NQ, TM, b, T, MODE, HAS_TEXT_MASK)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_tile(V, b, offs_n, h, s_vb, s_vn, s_vh, offs_d, mn, md)
        if DROPOUT:
            keep, bits = _keep_rows(seed, dropout_p, pid_bh, pid_m * BLOCK_M, offs_n, Lq, Lk, BLOCK_M, BLOCK_N)
            if STORE_LSE:
                _store_keep(KEEP, bits, pid_bh, pid_m * BLOCK_M, offs_n, Lq, k_end, BLOCK_M)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], PRECISION)
        m_i = m_new
    if SPLIT:
        # unnormalised partial state of this split: (B*H, S, Lq, d), (B*H, S, Lq) x2
        base = (pid_bh.to(tl.int64) * tl.num_programs(2) + pid_s) * Lq
        tl.store(O + (base + offs_m[:, None]) * HEAD_DIM + offs_d[None, :], acc, mask=mm[:, None] & md[None, :])
        tl.store(M_PART + base + offs_m, m_i, mask=mm)
        tl.store(L_PART + base + offs_m, l_i, mask=mm)
    else:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        _store_tile(O, b, offs_m, h, s_ob, s_om, s_oh, offs_d, mm, md, out)
        if STORE_LSE:  # the backward's; an inference call has none to keep
            tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, m_i + tl.log(l_safe), mask=mm)


@triton.jit
def _store_tile(PTR, b, offs, h, s_b, s_n, s_h, offs_d, rows_ok, d_ok, value):
    """Writes a (len(offs), BLOCK_D) tile into head h of sample b of a (B, L, H, d) strided tensor."""
    tl.store(PTR + b.to(tl.int64) * s_b + offs[:, None] * s_n + h * s_h + offs_d[None, :],
             value.to(PTR.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])


@triton.jit
def _row_state(Q, DO, O, LSE, b, h, pid_bh, offs_m, mm, offs_d, md, Lq,
               s_qb, s_qm, s_qh, s_dob, s_dom, s_doh, s_ob, s_om, s_oh):
    """What the backward needs of the query rows offs_m: q, dO, the log-sum-exp, and rowsum(dO * O),
    computed here from the forward's output (no separate pass over dO and O)."""
    q = _load_tile(Q, b, offs_m, h, s_qb, s_qm, s_qh, offs_d, mm, md)
    do = _load_tile(DO, b, offs_m, h, s_dob, s_dom, s_doh, offs_d, mm, md)
    o = _load_tile(O, b, offs_m, h, s_ob, s_om, s_oh, offs_d, mm, md)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * Lq + offs_m, mask=mm, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    return q, do, lse, delta


@triton.jit
def _bwd_tile_t(q, do, lse, delta, k, v, offs_m, offs_n, mm, mn, q_offset, Lq, Lk, NQ, TM, b, T, pid_bh, sm_scale,
                dropout_p, KEEP, MODE: tl.constexpr, HAS_TEXT_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (key block, query tile) of the backward, key-major: (BLOCK_N, BLOCK_M) each, the transposed
    probabilities that multiplied V (dropped and scaled under dropout) for dV, and d(scores)^T for dK and
    dQ. Keys are the rows of every product, so each is a 64-row wgmma on sm_90 and none needs a
    transpose of a register tile (the operands read transposed, q and dO, come from shared memory).

    With dropout, O = (P * Z / (1 - p)) V for the keep mask Z: dP = (dO V^T) * Z / (1 - p) and
    dS = P * (dP - rowsum(dO * O)), as FlashAttention's backward."""
    zeros = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    st = dot(k, tl.trans(q), zeros, PRECISION) * sm_scale
    ok = _allowed((q_offset + offs_m)[None, :], offs_n[:, None], Lk, NQ, TM, b, T, MODE, HAS_TEXT_MASK) & mm[None, :]
    pt = tl.where(ok, tl.exp(st - lse[None, :]), 0.0)
    dpt = dot(v, tl.trans(do), zeros, PRECISION)
    pt_v = pt
    if DROPOUT:
        keep = _load_keep_t(KEEP, pid_bh, offs_m, offs_n, mm, mn, Lq, Lk)
        dpt = tl.where(keep, dpt, 0.0) * (1.0 / (1.0 - dropout_p))
        pt_v = tl.where(keep, pt, 0.0)  # the 1 / (1 - p) goes on dV as it is stored (`_dv_scale`)
    return pt_v, pt * (dpt - delta[None, :])


@triton.jit
def _dv_scale(dropout_p, DROPOUT: tl.constexpr):
    """dV's dropout scale, applied once to the finished block instead of to every probability."""
    if DROPOUT:
        return 1.0 / (1.0 - dropout_p)
    else:
        return 1.0


@triton.jit(do_not_specialize=["BH"])  # read only by a persistent grid: one compile for any batch
def _bwd_kernel(Q, K, V, DO, LSE, O, DQ, DK, DV, TM, KEEP,
                sm_scale, Lq, Lk, NQ, q_offset, T, H, BH, dropout_p,
                s_qb, s_qm, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_dob, s_dom, s_doh, s_ob, s_om, s_oh,
                s_dqb, s_dqm, s_dqh, s_gb, s_gn, s_gh,
                MODE: tl.constexpr, HAS_TEXT_MASK: tl.constexpr, DROPOUT: tl.constexpr, ONE_TILE: tl.constexpr,
                ALL_KEYS: tl.constexpr, PERSISTENT: tl.constexpr, TMA: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """dQ, dK and dV, key-major (keys are the rows of every product).

    One program per (batch, head) pair, in one pass that reads K/V once and needs no atomics, where the
    pair fits it:
    - ONE_TILE (every query row in one tile: the Q-Former's 32 queries against the image): the
      program holds q, dO and O, walks the key blocks, writes each block's dK and dV as it finishes it,
      and accumulates dQ^T = K^T dS^T. The full key blocks run unmasked; the last, partial one is peeled
      off and masked.
    - ALL_KEYS (every key in one block: self-attention over 32 queries + 32 text): the program holds K
      and V, walks the query tiles, accumulates dK and dV, and writes each tile's dQ, which is complete
      as this block holds every key.
    PERSISTENT: a grid of a few programs an SM, each walking the (batch, head) pairs pid, pid + grid, ...
    of the BH. TMA (Hopper): K and V come in, and dK and dV go out (and, ALL_KEYS, q, dO and O in and dQ
    out, a query tile at a time), through tensor descriptors made once per pair, so no address or bound
    is computed per element (the tensor-memory unit zero-fills and clips at the bounds).
    Otherwise, grid (B*H, key blocks + query tiles): the first programs make dK/dV of their key block
    over every query tile, the rest dQ of their query tile over every key block."""
    pid_bh = tl.program_id(0)
    pid = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    md = offs_d < HEAD_DIM
    if ONE_TILE or ALL_KEYS:
        if PERSISTENT:
            programs = tl.num_programs(0)
            for i in range(0, tl.cdiv(BH - pid_bh, programs)):  # pairs pid_bh, pid_bh + programs, ...
                _pair_backward(Q, K, V, DO, LSE, O, DQ, DK, DV, TM, KEEP, pid_bh + i * programs, offs_d, md,
                               sm_scale, Lq, Lk, NQ, q_offset, T, H, dropout_p,
                               s_qb, s_qm, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_dob, s_dom, s_doh, s_ob, s_om,
                               s_oh, s_dqb, s_dqm, s_dqh, s_gb, s_gn, s_gh, MODE, HAS_TEXT_MASK, DROPOUT, ALL_KEYS,
                               TMA, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM)
        else:
            _pair_backward(Q, K, V, DO, LSE, O, DQ, DK, DV, TM, KEEP, pid_bh, offs_d, md,
                           sm_scale, Lq, Lk, NQ, q_offset, T, H, dropout_p,
                           s_qb, s_qm, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_dob, s_dom, s_doh, s_ob, s_om,
                           s_oh, s_dqb, s_dqm, s_dqh, s_gb, s_gn, s_gh, MODE, HAS_TEXT_MASK, DROPOUT, ALL_KEYS,
                           TMA, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM)
    else:
        b = pid_bh // H
        h = pid_bh % H
        key_blocks = tl.cdiv(Lk, BLOCK_N)
        if pid < key_blocks:  # dK and dV of key block pid, over every query tile
            _key_block(Q, K, V, DO, LSE, O, DQ, DK, DV, TM, KEEP, pid * BLOCK_N, b, h, pid_bh, offs_d, md,
                       sm_scale, Lq, Lk, NQ, q_offset, T, dropout_p,
                       s_qb, s_qm, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_dob, s_dom, s_doh, s_ob, s_om, s_oh,
                       s_dqb, s_dqm, s_dqh, s_gb, s_gn, s_gh, MODE, HAS_TEXT_MASK, DROPOUT, False, False,
                       PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        else:  # dQ of query tile pid - key_blocks, over every key block
            offs_m = (pid - key_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
            mm = offs_m < Lq
            q, do, lse, delta = _row_state(Q, DO, O, LSE, b, h, pid_bh, offs_m, mm, offs_d, md, Lq,
                                           s_qb, s_qm, s_qh, s_dob, s_dom, s_doh, s_ob, s_om, s_oh)
            dqt = tl.zeros([BLOCK_D, BLOCK_M], dtype=tl.float32)
            for start_n in range(0, Lk, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                mn = offs_n < Lk
                k = _load_tile(K, b, offs_n, h, s_kb, s_kn, s_kh, offs_d, mn, md)
                v = _load_tile(V, b, offs_n, h, s_vb, s_vn, s_vh, offs_d, mn, md)
                _, dst = _bwd_tile_t(q, do, lse, delta, k, v, offs_m, offs_n, mm, mn, q_offset, Lq, Lk, NQ, TM, b, T,
                                     pid_bh, sm_scale, dropout_p, KEEP, MODE, HAS_TEXT_MASK, DROPOUT, PRECISION,
                                     BLOCK_M, BLOCK_N)
                dqt = dot(tl.trans(k), dst.to(k.dtype), dqt, PRECISION)
            _store_tile_t(DQ, b, offs_m, h, s_dqb, s_dqm, s_dqh, offs_d, mm, md, dqt * sm_scale)


@triton.jit
def _key_block(Q, K, V, DO, LSE, O, DQ, DK, DV, TM, KEEP, start_n, b, h, pid_bh, offs_d, md,
               sm_scale, Lq, Lk, NQ, q_offset, T, dropout_p,
               s_qb, s_qm, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_dob, s_dom, s_doh, s_ob, s_om, s_oh,
               s_dqb, s_dqm, s_dqh, s_gb, s_gn, s_gh, MODE: tl.constexpr, HAS_TEXT_MASK: tl.constexpr,
               DROPOUT: tl.constexpr, WITH_DQ: tl.constexpr, TMA: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dK and dV of the key block at start_n, over every query tile. WITH_DQ (the block holds every key):
    each tile's dQ too, complete once this block's part is in. TMA: K, V, DK and DV are the pair's
    tensor descriptors (`_head_descriptor`)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    mn = offs_n < Lk
    k, v = _load_kv(K, V, start_n, b, offs_n, h, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, offs_d, mn, md, TMA)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, Lq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mm = offs_m < Lq
        if TMA:
            q = Q.load([start_m, 0])
            do = DO.load([start_m, 0])
            lse = tl.load(LSE + pid_bh.to(tl.int64) * Lq + offs_m, mask=mm, other=0.0)
            delta = tl.sum(do.to(tl.float32) * O.load([start_m, 0]).to(tl.float32), axis=1)
        else:
            q, do, lse, delta = _row_state(Q, DO, O, LSE, b, h, pid_bh, offs_m, mm, offs_d, md, Lq,
                                           s_qb, s_qm, s_qh, s_dob, s_dom, s_doh, s_ob, s_om, s_oh)
        pt, dst = _bwd_tile_t(q, do, lse, delta, k, v, offs_m, offs_n, mm, mn, q_offset, Lq, Lk, NQ, TM, b, T, pid_bh,
                              sm_scale, dropout_p, KEEP, MODE, HAS_TEXT_MASK, DROPOUT, PRECISION, BLOCK_M, BLOCK_N)
        dv = dot(pt.to(do.dtype), do, dv, PRECISION)
        dk = dot(dst.to(q.dtype), q, dk, PRECISION)
        if WITH_DQ:
            dqt = dot(tl.trans(k), dst.to(k.dtype), tl.zeros([BLOCK_D, BLOCK_M], dtype=tl.float32), PRECISION)
            if TMA:
                DQ.store([start_m, 0], tl.trans(dqt * sm_scale).to(DQ.dtype))
            else:
                _store_tile_t(DQ, b, offs_m, h, s_dqb, s_dqm, s_dqh, offs_d, mm, md, dqt * sm_scale)
    dk = dk * sm_scale
    dv = dv * _dv_scale(dropout_p, DROPOUT)
    _store_kv_grads(DK, DV, dk, dv, start_n, b, offs_n, h, s_gb, s_gn, s_gh, offs_d, mn, md, TMA)


@triton.jit
def _pair_backward(Q, K, V, DO, LSE, O, DQ, DK, DV, TM, KEEP, pid_bh, offs_d, md,
                   sm_scale, Lq, Lk, NQ, q_offset, T, H, dropout_p,
                   s_qb, s_qm, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_dob, s_dom, s_doh, s_ob, s_om, s_oh,
                   s_dqb, s_dqm, s_dqh, s_gb, s_gn, s_gh,
                   MODE: tl.constexpr, HAS_TEXT_MASK: tl.constexpr, DROPOUT: tl.constexpr, ALL_KEYS: tl.constexpr,
                   TMA: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The whole backward of (batch, head) pair pid_bh in one program: ALL_KEYS, its one key block over
    every query tile (`_key_block`); else its one query tile over every key block."""
    b = pid_bh // H
    h = pid_bh % H
    if TMA:  # this pair's (Lk, d) slices of K, V, dK and dV as tensor descriptors
        K = _head_descriptor(K, b, h, s_kb, s_kn, s_kh, Lk, HEAD_DIM, BLOCK_N, BLOCK_D)
        V = _head_descriptor(V, b, h, s_vb, s_vn, s_vh, Lk, HEAD_DIM, BLOCK_N, BLOCK_D)
        DK = _head_descriptor(DK, b, h, s_gb, s_gn, s_gh, Lk, HEAD_DIM, BLOCK_N, BLOCK_D)
        DV = _head_descriptor(DV, b, h, s_gb, s_gn, s_gh, Lk, HEAD_DIM, BLOCK_N, BLOCK_D)
    if ALL_KEYS:
        if TMA:  # and its (Lq, d) slices of Q, dO, O and dQ, read and written a query tile at a time
            Q = _head_descriptor(Q, b, h, s_qb, s_qm, s_qh, Lq, HEAD_DIM, BLOCK_M, BLOCK_D)
            DO = _head_descriptor(DO, b, h, s_dob, s_dom, s_doh, Lq, HEAD_DIM, BLOCK_M, BLOCK_D)
            O = _head_descriptor(O, b, h, s_ob, s_om, s_oh, Lq, HEAD_DIM, BLOCK_M, BLOCK_D)
            DQ = _head_descriptor(DQ, b, h, s_dqb, s_dqm, s_dqh, Lq, HEAD_DIM, BLOCK_M, BLOCK_D)
        _key_block(Q, K, V, DO, LSE, O, DQ, DK, DV, TM, KEEP, 0, b, h, pid_bh, offs_d, md,
                   sm_scale, Lq, Lk, NQ, q_offset, T, dropout_p,
                   s_qb, s_qm, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_dob, s_dom, s_doh, s_ob, s_om, s_oh,
                   s_dqb, s_dqm, s_dqh, s_gb, s_gn, s_gh, MODE, HAS_TEXT_MASK, DROPOUT, True, TMA,
                   PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        offs_m = tl.arange(0, BLOCK_M)
        mm = offs_m < Lq
        q, do, lse, delta = _row_state(Q, DO, O, LSE, b, h, pid_bh, offs_m, mm, offs_d, md, Lq,
                                       s_qb, s_qm, s_qh, s_dob, s_dom, s_doh, s_ob, s_om, s_oh)
        dqt = tl.zeros([BLOCK_D, BLOCK_M], dtype=tl.float32)
        full = (Lk // BLOCK_N) * BLOCK_N
        for start_n in range(0, full, BLOCK_N):
            dqt = _one_tile_keys(q, do, lse, delta, dqt, K, V, DK, DV, start_n, offs_m, mm, offs_d, md, b, h, pid_bh,
                                 q_offset, Lq, Lk, NQ, TM, T, sm_scale, dropout_p, KEEP,
                                 s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_gb, s_gn, s_gh, False,
                                 MODE, HAS_TEXT_MASK, DROPOUT, TMA, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        if full < Lk:
            dqt = _one_tile_keys(q, do, lse, delta, dqt, K, V, DK, DV, full, offs_m, mm, offs_d, md, b, h, pid_bh,
                                 q_offset, Lq, Lk, NQ, TM, T, sm_scale, dropout_p, KEEP,
                                 s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_gb, s_gn, s_gh, True,
                                 MODE, HAS_TEXT_MASK, DROPOUT, TMA, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        _store_tile_t(DQ, b, offs_m, h, s_dqb, s_dqm, s_dqh, offs_d, mm, md, dqt * sm_scale)


@triton.jit
def _one_tile_keys(q, do, lse, delta, dqt, K, V, DK, DV, start_n, offs_m, mm, offs_d, md, b, h, pid_bh,
                   q_offset, Lq, Lk, NQ, TM, T, sm_scale, dropout_p, KEEP,
                   s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_gb, s_gn, s_gh, TAIL: tl.constexpr,
                   MODE: tl.constexpr, HAS_TEXT_MASK: tl.constexpr, DROPOUT: tl.constexpr, TMA: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One key block of the one-tile backward: writes its dK and dV, returns dQ^T with its part added.
    A full block (TAIL False) loads and stores without a key bound. TMA: K, V, DK and DV are the pair's
    tensor descriptors (`_head_descriptor`)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if TAIL:
        mn = offs_n < Lk
    else:  # every key in range: no bound to test
        mn = tl.full([BLOCK_N], 1, tl.int1)
    k, v = _load_kv(K, V, start_n, b, offs_n, h, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, offs_d, mn, md, TMA)
    pt, dst = _bwd_tile_t(q, do, lse, delta, k, v, offs_m, offs_n, mm, mn, q_offset, Lq, Lk, NQ, TM, b, T, pid_bh,
                          sm_scale, dropout_p, KEEP, MODE, HAS_TEXT_MASK, DROPOUT, PRECISION, BLOCK_M, BLOCK_N)
    zeros = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = dot(pt.to(do.dtype), do, zeros, PRECISION)
    dk = dot(dst.to(q.dtype), q, zeros, PRECISION) * sm_scale
    dv = dv * _dv_scale(dropout_p, DROPOUT)
    _store_kv_grads(DK, DV, dk, dv, start_n, b, offs_n, h, s_gb, s_gn, s_gh, offs_d, mn, md, TMA)
    return dot(tl.trans(k), dst.to(k.dtype), dqt, PRECISION)


@triton.jit
def _load_kv(K, V, start_n, b, offs_n, h, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, offs_d, mn, md, TMA: tl.constexpr):
    """The key block at start_n of K and V: through the pair's tensor descriptors (TMA), else pointer tiles."""
    if TMA:
        return K.load([start_n, 0]), V.load([start_n, 0])
    else:
        return (_load_tile(K, b, offs_n, h, s_kb, s_kn, s_kh, offs_d, mn, md),
                _load_tile(V, b, offs_n, h, s_vb, s_vn, s_vh, offs_d, mn, md))


@triton.jit
def _store_kv_grads(DK, DV, dk, dv, start_n, b, offs_n, h, s_gb, s_gn, s_gh, offs_d, mn, md, TMA: tl.constexpr):
    """dK and dV of the key block at start_n (one set of strides, `launch_backward`), as `_load_kv` reads."""
    if TMA:
        DK.store([start_n, 0], dk.to(DK.dtype))
        DV.store([start_n, 0], dv.to(DV.dtype))
    else:
        _store_tile(DK, b, offs_n, h, s_gb, s_gn, s_gh, offs_d, mn, md, dk)
        _store_tile(DV, b, offs_n, h, s_gb, s_gn, s_gh, offs_d, mn, md, dv)


@triton.jit
def _store_tile_t(PTR, b, offs, h, s_b, s_n, s_h, offs_d, rows_ok, d_ok, value_t):
    """Writes a transposed (BLOCK_D, len(offs)) tile into head h of sample b of a (B, L, H, d) tensor."""
    tl.store(PTR + b.to(tl.int64) * s_b + offs[None, :] * s_n + h * s_h + offs_d[:, None],
             value_t.to(PTR.dtype.element_ty), mask=rows_ok[None, :] & d_ok[:, None])


@dataclass(frozen=True)
class AttentionConfig:
    """Launch sizes of the attention kernels for one call."""

    block_m: int  # query rows per tile
    block_n: int  # keys per block
    block_d: int  # head dim, padded to a power of two
    warps: int
    stages: int
    precision: str  # tile_ops.dot_precision
    maxnreg: int | None = None  # launch.register_budget where ptxas would otherwise spill
    per_pair: bool = True  # backward: one program per (batch, head) when its rows fit one tile or its keys one block
    persistent: int = 0  # one-tile backward: this many programs an SM walk the (batch, head) pairs; 0: one each
    tma: bool = True  # one-tile backward on sm_90: K, V and their grads through tensor descriptors where aligned

    def meta(self, head_dim: int) -> dict:
        extra = {} if self.maxnreg is None else dict(maxnreg=self.maxnreg)
        return dict(PRECISION=self.precision, BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_D=self.block_d,
                    HEAD_DIM=head_dim, num_warps=self.warps, num_stages=self.stages, **extra)


def attention_config(lq: int, lk: int, d: int, dtype: torch.dtype, device: torch.device, backward: bool = False,
                     dropout: bool = False, causal: bool = False, descriptors: bool = False) -> AttentionConfig:
    """Tiles for Lq rows against Lk keys of head dim d on the target GPU (worked out once per shape and
    GPU); causal: the multimodal-causal mask (ITG), a tuned table's key of its own; descriptors: the
    backward that moves its tiles through tensor descriptors (fewer registers than pointer tiles). A
    configuration that gpu-tune measured fastest on this architecture (kernels.tuned) comes first: it
    was timed on the descriptor backward, and a pointer fallback keeps its tiles."""
    target = gpu_target(device)
    precision = dot_precision(dtype, device)
    if target is not None:
        found = tuned.lookup(target.arch, tuned.attention_key(backward, lq, lk, d, str(dtype).removeprefix("torch."),
                                                              dropout, causal))
        if found is not None:
            return AttentionConfig(precision=precision, **found)
    return _attention_config(lq, lk, d, dtype, target, precision, backward, dropout, descriptors)


@functools.lru_cache(maxsize=256)
def _attention_config(lq: int, lk: int, d: int, dtype: torch.dtype, target: GpuTarget | None, precision: str,
                      backward: bool, dropout: bool, descriptors: bool = False) -> AttentionConfig:
    """Every choice made here is compiled for sm_90 and sm_80 by the compile gate
    (blip2rt.kernels.compile_gate), which checks spills, shared memory and wgmma; the comments say what it
    found."""
    block_d = max(16, triton.next_power_of_2(d))
    if target is None:
        # the interpreter: its cost is per program and per loop step; tests reach the edges and the
        # several-tile paths with their shapes (rows and keys past 32)
        return AttentionConfig(32, 32, block_d, 4, 1, precision)
    if dtype == torch.float32:
        # tf32x3 holds three operand splits per tile: 32x32 tiles on 8 warps fit registers at d = 64
        # in the forward, 16x16 on 4 warps below; the backward takes 32 rows x 16 keys (at 32 keys it
        # spilled 4-8 bytes once it loads O for delta itself); with the full register budget (without
        # it ptxas spilled a few bytes)
        block, warps = (32, 8) if d >= 64 else (16, 4)
        if backward:  # key-major: 16 x 16 tiles on 4 warps, rows and keys in separate programs (the
            # one-program form spilled 8-170 bytes at every tile the gate tried)
            return AttentionConfig(16, 16, block_d, 4, 2, precision, register_budget(4), per_pair=False)
        return AttentionConfig(block, block, block_d, warps, 2, precision, register_budget(warps))
    block_m = 64 if lq > 32 else 32  # Q-Former rows: 32 queries, or 32 queries + 32 text
    wide = d >= 32
    if not backward:
        keys = 64 if wide or target.arch >= 90 else 32
        if dropout:  # the Philox draws spilled on 4 warps: 8, which fit 128 registers at head dim 64 (two
            # blocks an SM; 131-159 without the budget), at 32 rows, and at 64 on sm_90 (wgmma: 123-128 in
            # Triton 3.6 and 3.8; sm_80's mma.sync spilled 396-404 bytes); at head dims 16 and 32, 128 spilled 4-24
            # bytes: the full budget
            fits = d >= 64 and (block_m == 32 or target.arch >= 90)
            return AttentionConfig(block_m, keys, block_d, 8, 2, precision, 128 if fits else register_budget(8))
        return AttentionConfig(block_m, keys, block_d, 4, 2, precision)
    # the backward, key-major (keys are every product's rows). sm_90: 64-key blocks make all five
    # products wgmma, over 32-row tiles. Through tensor descriptors (no per-element addresses):
    # - walking the key blocks (cross-attention), 8 warps fit a 128-register budget at 3 stages without
    #   spilling (two blocks an SM), dropout included; 2 stages spilled 4 bytes with dropout;
    # - walking the query tiles (self-attention: every key in one block), 4 warps at 2 stages take 146-168
    #   registers without a budget, three blocks an SM, in Triton 3.6 and 3.8 alike, dropout and ITG's
    #   causal mask included; 8 warps under 128 spilled 8-36 bytes at 3 stages in fp16 with dropout, and
    #   16 at 2 stages in Triton 3.6 under ITG's mask with dropout.
    # 64-row tiles (every row of 32 queries + 32 text in one) took 188-235 and kept one block an SM. Through pointer tiles (no descriptors: a
    # misaligned call, or separate key and row programs at a small batch) 128 spilled 4-32 bytes with
    # dropout, and 16 without it where K/V rows are off 16-byte steps, so those keep the full budget at
    # 2 stages. (4 warps: three blocks an SM through descriptors, no spill; gpu-tune measures which wins)
    # sm_80 (mma.sync, every operand through registers): the one-program form spilled 96-1000 bytes at
    # every tile tried; rows and keys in separate programs do not, at 32 keys (16 beside 64-row tiles,
    # where 32 spilled 28 bytes at head dim 32)
    if target.arch >= 90:
        if descriptors:
            if lk <= 64:  # every key in one block: 4 warps walk the 32-row query tiles
                return AttentionConfig(32, 64, block_d, 4, 2, precision)
            return AttentionConfig(32, 64, block_d, 8, 3, precision, 128)
        return AttentionConfig(32, 64, block_d, 8, 2, precision)
    keys = 32 if block_m == 32 else 16
    return AttentionConfig(block_m, keys, block_d, 8, 2, precision, register_budget(8), per_pair=False)


# Up to this many keys a row is not split: the split's partial states are combined by about 20
# small torch ops, whose launches cost more than the programs it saves (measured on an H200 at
# 257 keys: benchmarks/RESULTS.md).
MAX_KEYS_UNSPLIT = 512


def _num_splits(bh: int, m_blocks: int, lk: int, block_n: int, device: torch.device) -> int:
    """Key splits so that B*H*(query blocks)*splits covers the SMs (inference over long key sets only)."""
    target = gpu_target(device)
    if target is None or lk <= MAX_KEYS_UNSPLIT:
        return 1
    programs = bh * m_blocks
    if programs >= target.sm_count:
        return 1
    return max(1, min(triton.cdiv(target.sm_count, programs), triton.cdiv(lk, block_n), 16))


@dataclass(frozen=True)
class LaunchPlan:
    """One call's launches, worked out once per shapes, strides, dtype, mode and device, and kept: the
    kernels with their grids and constexprs (launch.Planned), and the scalar arguments and strides. A
    call then only allocates what it returns and launches (the host path is part of the kernel's
    cost: benchmarks/test_host_overhead.py)."""

    launches: tuple  # launch.Planned: one kernel, forward or backward
    scalars: tuple  # the arguments between the pointers and the strides
    strides: tuple


_PLANS: dict[tuple, LaunchPlan] = plan_cache()


def _plan_key(kind: str, q, k, v, mode, num_queries, q_offset, text_mask, dropout_p, extra=()) -> tuple:
    # one flat tuple of plain values: torch.Size compares through Python, a tuple of ints does not
    return (kind, *q.shape, *q.stride(), k.shape[1], *k.stride(), *v.stride(), q.dtype, q.device, mode, num_queries,
            q_offset, -1 if text_mask is None else text_mask.shape[1], dropout_p, gpu_target(q.device), *extra)


def _forward_plan(q, k, v, mode, num_queries, q_offset, text_mask, dropout_p, store_lse: bool) -> LaunchPlan:
    b, lq, h, d = q.shape
    lk = k.shape[1]
    cfg = attention_config(lq, lk, d, q.dtype, q.device, dropout=dropout_p > 0)
    if cfg.maxnreg is not None and not all(_descriptor_strides(t.stride()[:3], t.element_size()) for t in (q, k, v)):
        # a budget is chosen for rows on 16-byte steps: rows off them load in narrower pieces, and the
        # dropout forward spilled 12 bytes under its 128 (the compile gate)
        cfg = replace(cfg, maxnreg=register_budget(cfg.warps))
    meta = dict(MODE=mode, HAS_TEXT_MASK=text_mask is not None, DROPOUT=dropout_p > 0, SPLIT=False,
                STORE_LSE=store_lse, **cfg.meta(d))
    t = 0 if text_mask is None else text_mask.shape[1]
    o_strides = (lq * h * d, h * d, d)  # the output: (B, Lq, H, d), contiguous
    return LaunchPlan((Planned(_fwd_kernel, (b * h, triton.cdiv(lq, cfg.block_m)), meta),),
                      (1.0 / math.sqrt(d), lq, lk, num_queries, q_offset, t, h, lk, dropout_p),
                      (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o_strides))


def _backward_plan(do, q, k, v, mode, num_queries, q_offset, text_mask, dropout_p) -> LaunchPlan:
    b, lq, h, d = q.shape
    lk = k.shape[1]
    choice = dict(backward=True, dropout=dropout_p > 0, causal=mode == MODE_CAUSAL)
    cfg = attention_config(lq, lk, d, q.dtype, q.device, **choice)
    # one program per (batch, head) only where that fills the GPU: below one wave (a small batch) the keys
    # and rows go to separate programs, (key blocks + query tiles) per (batch, head), which fill more SMs
    # for the price of computing the scores twice
    target = gpu_target(q.device)
    per_pair = cfg.per_pair and (target is None or b * h >= target.sm_count)
    launches = (_backward_launch(cfg, False, _pair_form(per_pair, lq, lk, cfg), mode, text_mask, dropout_p, b * h,
                                 lq, lk, d, target),)
    # tensor descriptors (sm_90's tensor-memory unit; the interpreter too) for a one-program form, where K's
    # and V's strides allow (the all-keys form moves q, dO, O and dQ through them too, so theirs as well); a
    # call whose pointers or grad strides do not takes the pointer launch after it (`tma_ready`)
    if target is None or target.arch >= 90:
        by_descriptor = attention_config(lq, lk, d, q.dtype, q.device, descriptors=True, **choice)
        form = _pair_form(per_pair, lq, lk, by_descriptor)
        rows = (q, do) if form == "all keys" else ()
        if (by_descriptor.tma and form != "split"
                and all(_descriptor_strides(t.stride()[:3], q.element_size()) for t in (k, v, *rows))):
            launches = (_backward_launch(by_descriptor, True, form, mode, text_mask, dropout_p, b * h, lq, lk, d,
                                         target), *launches)
    t = 0 if text_mask is None else text_mask.shape[1]
    o_strides = (lq * h * d, h * d, d)  # the forward's output, as launch_forward allocates it
    return LaunchPlan(launches, (1.0 / math.sqrt(d), lq, lk, num_queries, q_offset, t, h, b * h, dropout_p),
                      (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *o_strides))


def _pair_form(per_pair: bool, lq: int, lk: int, cfg: AttentionConfig) -> str:
    """How the backward's programs split a (batch, head) pair: "one tile" (one program; every query row
    in one tile, walking the key blocks), "all keys" (one program; every key in one block, walking the
    query tiles) or "split" (a program per key block and per query tile)."""
    if per_pair and lk <= cfg.block_n:
        return "all keys"
    if per_pair and lq <= cfg.block_m:
        return "one tile"
    return "split"


def launch_form(meta: dict) -> str:
    """The `_pair_form` a backward launch was planned with, read back from its constexprs."""
    return "one tile" if meta["ONE_TILE"] else "all keys" if meta.get("ALL_KEYS") else "split"


def _backward_launch(cfg: AttentionConfig, tma: bool, form: str, mode, text_mask, dropout_p, pairs: int, lq: int,
                     lk: int, d: int, target: GpuTarget | None) -> Planned:
    # persistent (a tuned choice): a few programs an SM walk the pairs, where there are more pairs than that
    sms = 1 if target is None else target.sm_count  # the interpreter: `persistent` programs in all
    per_pair = form != "split"
    persistent = per_pair and 0 < cfg.persistent * sms < pairs
    meta = dict(MODE=mode, HAS_TEXT_MASK=text_mask is not None, DROPOUT=dropout_p > 0, ONE_TILE=form == "one tile",
                ALL_KEYS=form == "all keys", PERSISTENT=persistent, TMA=tma, **cfg.meta(d))
    if per_pair:
        grid = (cfg.persistent * sms if persistent else pairs, 1)
    else:
        grid = (pairs, triton.cdiv(lk, cfg.block_n) + triton.cdiv(lq, cfg.block_m))
    return Planned(_bwd_kernel, grid, meta)


def _descriptor_strides(strides: tuple[int, ...], element_size: int) -> bool:
    """Whether (B, L, H) strides keep every head's rows on 16-byte steps, as a tensor descriptor needs."""
    return all(s * element_size % 16 == 0 for s in strides)


def tma_ready(k: torch.Tensor, v: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, rows: tuple = ()) -> bool:
    """Whether this call's K, V and grads can go through the backward's tensor descriptors: every
    pointer on a 16-byte boundary and the grads' strides on 16-byte steps (K's and V's strides are
    checked once, when the call is planned). rows: (q, dO, O, dQ) where the all-keys form moves them
    through descriptors too (q's and dO's strides are planned; O is the forward's, contiguous)."""
    s = dk.stride()  # dv's are the same (launch_backward)
    e = dk.element_size()
    bits = k.data_ptr() | v.data_ptr() | dk.data_ptr() | dv.data_ptr() | s[0] * e | s[1] * e | s[2] * e
    if rows:
        q, do, o, dq = rows
        s = dq.stride()
        bits |= q.data_ptr() | do.data_ptr() | o.data_ptr() | dq.data_ptr() | s[0] * e | s[1] * e | s[2] * e
    return bits & 15 == 0


def launch_forward(q, k, v, mode, num_queries, q_offset, text_mask, splits: int = 1, dropout_p: float = 0.0,
                   seed: torch.Tensor | None = None, store_lse: bool = True):
    """(o (B, Lq, H, d), lse (B*H, Lq) fp32, keep) for the backward; lse and keep are None with
    store_lse=False (an inference call), keep also without dropout: else the keep mask as bits, (B*H,
    ceil(Lq / 4), Lk) uint8 (`_store_keep`). text_mask: (B, T) int8 (see `text_mask_arg`); seed: this
    call's dropout seed, a (1,) int64 tensor on q's device (kernels.dropout_rng), read only with dropout."""
    if splits > 1:
        return _launch_split_forward(q, k, v, mode, num_queries, q_offset, text_mask, splits, dropout_p, seed)
    key = _plan_key("fwd", q, k, v, mode, num_queries, q_offset, text_mask, dropout_p, (store_lse,))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _forward_plan(q, k, v, mode, num_queries, q_offset, text_mask, dropout_p, store_lse)
    b, lq, h, d = q.shape
    o = torch.empty(b, lq, h, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b * h, lq, dtype=torch.float32, device=q.device) if store_lse else None
    keep = None
    if store_lse and dropout_p > 0:
        keep = torch.empty(b * h, triton.cdiv(lq, 4), k.shape[1], dtype=torch.uint8, device=q.device)
    spare = o if lse is None else lse  # pointers a launch does not read
    plan.launches[0](q, k, v, o, spare, spare, spare, spare if text_mask is None else text_mask,
                     spare if keep is None else keep, *plan.scalars, spare if seed is None else seed, *plan.strides)
    return o, lse, keep


def launch_backward(do, q, k, v, o, lse, keep, text_mask, mode, num_queries, q_offset, dropout_p: float = 0.0):
    """(dq, dk, dv) from the forward's o, lse and keep (its dropout mask as bits; None without dropout)."""
    if (keep is None) != (dropout_p == 0):
        raise ValueError(f"launch_backward: dropout_p={dropout_p} needs the forward's keep mask exactly when it is > 0")
    do = do if do.stride(-1) == 1 else do.contiguous()
    key = _plan_key("bwd", q, k, v, mode, num_queries, q_offset, text_mask, dropout_p, do.stride())
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _backward_plan(do, q, k, v, mode, num_queries, q_offset, text_mask, dropout_p)
    # the grads go where packed_grads says: a slice of the packed projection's grad when q, k or v came
    # from split_packed (no copy behind it), else new tensors
    dq, dk, dv = grad_slot(q), grad_slot(k), grad_slot(v)
    if dk.stride() != dv.stride():  # the kernel writes dK and dV with one set of strides
        dk, dv = torch.empty_like(k, memory_format=torch.contiguous_format), torch.empty_like(v, memory_format=torch.contiguous_format)
    tail = (lse if text_mask is None else text_mask, lse if keep is None else keep, *plan.scalars, *plan.strides)
    launcher = plan.launches[0]
    if len(plan.launches) > 1:  # the first makes tensor descriptors on the device
        if not tma_ready(k, v, dk, dv, (q, do, o, dq) if launcher.meta["ALL_KEYS"] else ()):
            launcher = plan.launches[1]
        elif q.is_cuda:
            ensure_scratch_allocator()
    launcher(q, k, v, do, lse, o, dq, dk, dv, *tail, *dq.stride()[:3], *dk.stride()[:3])
    return dq, dk, dv


def text_mask_arg(text_mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """The text mask as the kernels read it: (B, T) int8, contiguous, on `device`. A no-op for one
    that already is (the Q-Former converts its mask once for all its layers)."""
    if text_mask is None:
        return None
    return text_mask.to(device=device, dtype=torch.int8).contiguous()


def _launch_split_forward(q, k, v, mode, num_queries, q_offset, text_mask, splits, dropout_p, seed):
    """Inference over long key sets at small B*H: each row's keys split across programs, whose
    partial softmax states are then combined."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    cfg = attention_config(lq, lk, d, q.dtype, q.device, dropout=dropout_p > 0)
    m_blocks = triton.cdiv(lq, cfg.block_m)
    meta = dict(MODE=mode, HAS_TEXT_MASK=text_mask is not None, DROPOUT=dropout_p > 0, **cfg.meta(d))
    per_split = triton.cdiv(triton.cdiv(lk, splits), cfg.block_n) * cfg.block_n
    splits = triton.cdiv(lk, per_split)
    if gpu_target(q.device) is not None:
        # fewer programs than SMs by construction, so occupancy is moot: the block's full register
        # budget (Triton 3.6's ptxas spilled 28 B at 96 registers at head dim 16 without it)
        meta["maxnreg"] = register_budget(cfg.warps)
    acc = torch.empty(b * h, splits, lq, d, dtype=torch.float32, device=q.device)
    m_part = torch.empty(b * h, splits, lq, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    t = 0 if text_mask is None else text_mask.shape[1]
    launch(_fwd_kernel, (b * h, m_blocks, splits), q, k, v, acc, m_part, m_part, l_part,
           m_part if text_mask is None else text_mask, m_part, 1.0 / math.sqrt(d), lq, lk, num_queries, q_offset, t, h,
           per_split, dropout_p, m_part if seed is None else seed, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
           0, 0, 0, SPLIT=True, **meta)
    # combine the splits' softmax states: (B*H, S, Lq) -> (B*H, Lq)
    m = m_part.amax(dim=1)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(m_part - m_safe[:, None]) * l_part  # each split's mass at the common max
    l_tot = w.sum(1)
    out = (torch.exp(m_part - m_safe[:, None])[..., None] * acc).sum(1) / l_tot.clamp(min=1e-30)[..., None]
    o = out.view(b, h, lq, d).transpose(1, 2).contiguous().to(q.dtype)
    lse = m_safe + torch.log(l_tot.clamp(min=1e-30))
    return o, lse, None


# Registered as custom ops so torch.compile treats the kernels as opaque, differentiable ops.
@torch.library.custom_op("blip2rt::qformer_attention_fwd", mutates_args=())
def attention_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_mask: torch.Tensor | None,
                         mode: int, num_queries: int, q_offset: int, splits: int, dropout_p: float,
                         seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, lse, keep): keep is empty without dropout (an op returns tensors only)."""
    o, lse, keep = launch_forward(q, k, v, mode, num_queries, q_offset, text_mask, splits, dropout_p, seed)
    return o, lse, q.new_empty(0, dtype=torch.uint8) if keep is None else keep


@attention_forward_op.register_fake
def _(q, k, v, text_mask, mode, num_queries, q_offset, splits, dropout_p, seed):
    b, lq, h, d = q.shape
    keep = (b * h, triton.cdiv(lq, 4), k.shape[1]) if dropout_p > 0 else (0,)
    return q.new_empty(b, lq, h, d), q.new_empty(b * h, lq, dtype=torch.float32), q.new_empty(keep, dtype=torch.uint8)


@torch.library.custom_op("blip2rt::qformer_attention_bwd", mutates_args=())
def attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                          lse: torch.Tensor, keep: torch.Tensor, text_mask: torch.Tensor | None, mode: int,
                          num_queries: int, q_offset: int,
                          dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_backward(do, q, k, v, o, lse, keep if dropout_p > 0 else None, text_mask, mode, num_queries,
                           q_offset, dropout_p)


@attention_backward_op.register_fake
def _(do, q, k, v, o, lse, keep, text_mask, mode, num_queries, q_offset, dropout_p):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, text_mask, mode, num_queries, q_offset, _, dropout_p, _ = inputs
    o, lse, keep = output
    ctx.save_for_backward(q, k, v, o, lse, keep, text_mask)
    ctx.mode, ctx.num_queries, ctx.q_offset, ctx.dropout_p = mode, num_queries, q_offset, dropout_p


def _backward(ctx, do, _dlse, _dkeep):
    q, k, v, o, lse, keep, text_mask = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(do, q, k, v, o, lse, keep, text_mask, ctx.mode, ctx.num_queries, ctx.q_offset,
                                       ctx.dropout_p)
    return dq, dk, dv, None, None, None, None, None, None, None


attention_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same launchers as the custom ops, for eager mode: a custom op's Python dispatch costs
    more host time per call than the kernel takes at the Q-Former's sizes (benchmarks/RESULTS.md)."""

    @staticmethod
    def forward(ctx, q, k, v, text_mask, mode, num_queries, q_offset, splits, dropout_p, seed):
        o, lse, keep = launch_forward(q, k, v, mode, num_queries, q_offset, text_mask, splits, dropout_p, seed)
        ctx.save_for_backward(q, k, v, o, lse, keep, text_mask)
        ctx.mode, ctx.num_queries, ctx.q_offset, ctx.dropout_p = mode, num_queries, q_offset, dropout_p
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, keep, text_mask = ctx.saved_tensors
        dq, dk, dv = launch_backward(do, q, k, v, o, lse, keep, text_mask, ctx.mode, ctx.num_queries, ctx.q_offset,
                                     ctx.dropout_p)
        return dq, dk, dv, None, None, None, None, None, None, None


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mode: AttentionMode | None = None,
                    num_queries: int = 0, text_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                    seed: int | torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Lq, H, d), k/v (B, Lk, H, d), strided views with a contiguous last dim -> (B, Lq, H, d).
    `mode` None is cross-attention (no mask); the torch path with this signature is
    `qformer_attention.attention_reference`.

    For self-attention, the rows are the last Lq of the Lk positions (a cached past comes first).
    Without grad, the keys may be split across programs to fill the GPU. dropout_p drops attention
    probabilities inside the kernel: `seed` (an int, or a (1,) int64 tensor on the device) fixes the
    mask; by default each call draws one on the device (kernels.dropout_rng), with no host sync.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"fused_attention: {name} needs a contiguous last dimension, got strides {t.stride()}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"fused_attention: dropout_p must be in [0, 1), got {dropout_p}")
    seed = dropout_rng.call_seed(seed, q.device) if dropout_p > 0 else None
    mode = kernel_mode_id(mode)
    q_offset = k.shape[1] - q.shape[1] if mode != MODE_NONE else 0
    text_mask = text_mask_arg(text_mask, q.device)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    splits = forward_splits(q, k, needs_grad)
    if torch.compiler.is_compiling():
        return attention_forward_op(q, k, v, text_mask, mode, num_queries, q_offset, splits, float(dropout_p), seed)[0]
    if not needs_grad:  # inference: no autograd node, and no log-sum-exp to keep
        return launch_forward(q, k, v, mode, num_queries, q_offset, text_mask, splits, dropout_p, seed, store_lse=False)[0]
    return _EagerAttention.apply(q, k, v, text_mask, mode, num_queries, q_offset, splits, float(dropout_p), seed)


def forward_splits(q: torch.Tensor, k: torch.Tensor, needs_grad: bool) -> int:
    """How many programs share each row's keys: 1 in training, more at small B*H in inference."""
    if needs_grad or k.shape[1] <= MAX_KEYS_UNSPLIT:
        return 1
    b, lq, h, d = q.shape
    cfg = attention_config(lq, k.shape[1], d, q.dtype, q.device)
    return _num_splits(b * h, triton.cdiv(lq, cfg.block_m), k.shape[1], cfg.block_n, q.device)


@triton.jit
def _keep_mask_kernel(OUT, Lq, Lk, dropout_p, SEED, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    seed = tl.load(SEED)
    pid_bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep_rows(seed, dropout_p, pid_bh, tl.program_id(1) * BLOCK_M, offs_n, Lq, Lk, BLOCK_M, BLOCK_N)[0]
    out = (pid_bh.to(tl.int64) * Lq + offs_m[:, None]) * Lk + offs_n[None, :]
    tl.store(OUT + out, keep.to(tl.int8), mask=(offs_m < Lq)[:, None] & (offs_n < Lk)[None, :])


def attention_keep_mask(batch: int, heads: int, lq: int, lk: int, dropout_p: float, seed: int | torch.Tensor,
                        device) -> torch.Tensor:
    """The keep mask the kernels draw for (dropout_p, seed): bool (B, H, Lq, Lk), rows being this call's
    query rows and columns its keys. For tests and debugging (a training forward stores it packed:
    `_store_keep`)."""
    out = torch.empty(batch * heads, lq, lk, dtype=torch.int8, device=device)
    block_n = min(512, triton.next_power_of_2(lk))
    launch(_keep_mask_kernel, (batch * heads, triton.cdiv(lq, 16), triton.cdiv(lk, block_n)), out, lq, lk, dropout_p,
           dropout_rng.call_seed(seed, device), BLOCK_M=16, BLOCK_N=block_n)
    return out.bool().view(batch, heads, lq, lk)
