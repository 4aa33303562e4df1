"""Dropout's random numbers: four uniforms from each Philox call (Triton's `randint4x`), laid out along
a tile's rows or its columns, so a tile of n elements costs n / 4 Philox calls, not n.

Philox4x32 with 7 rounds: the fewest at which its authors found it passes TestU01's BigCrush
(Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", 2011); Triton's default is 10, a
margin above that. The tests check what dropout needs of it: the keep fraction, independence of
neighbouring draws, and one mask per seed (tests/test_kernel_attention_dropout.py,
tests/test_kernel_post_ln_residual.py).

A counter c gives outputs 0..3; which element each lands on is the caller's layout: `uniform4_cols`
puts output i of counter j at column 4j + i; `uniform4` gives the four outputs as tiles of their own,
which `spread_rows` lays at rows 4j + i (the attention, which also packs them into its stored mask).
"""

import triton
import triton.language as tl
from triton.language.random import uint_to_uniform_float

ROUNDS = tl.constexpr(7)


@triton.jit
def uniform4_cols(seed, counters):
    """(R, C) counters -> (R, 4C) uniforms in [0, 1): column 4j + i is output i of counters[:, j]."""
    r0, r1, r2, r3 = tl.randint4x(seed, counters, ROUNDS)
    return uint_to_uniform_float(tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3)))


@triton.jit
def uniform4(seed, counters):
    """(R, C) counters -> the four outputs of each, as four (R, C) tiles of uniforms in [0, 1)."""
    r0, r1, r2, r3 = tl.randint4x(seed, counters, ROUNDS)
    return uint_to_uniform_float(r0), uint_to_uniform_float(r1), uint_to_uniform_float(r2), uint_to_uniform_float(r3)


@triton.jit
def spread_rows(t0, t1, t2, t3, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Four (ROWS / 4, COLS) tiles -> one (ROWS, COLS) tile whose row 4j + i is row j of t_i."""
    quad = tl.join(tl.join(t0, t1), tl.join(t2, t3))  # (ROWS / 4, COLS, 2, 2): [j, c, x, y] = t_(2y + x)
    return tl.reshape(tl.permute(quad, (0, 3, 2, 1)), (ROWS, COLS))
