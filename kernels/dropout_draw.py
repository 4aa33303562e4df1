"""The dropout seed draw as one Triton kernel (kernels.dropout_rng.draw on a GPU): a handful of torch
ops there would each be a launch, some fifty times a Q-Former step."""

import triton
import triton.language as tl


@triton.jit
def draw_kernel(STATE, SEED, STRIDE: tl.constexpr, MOD: tl.constexpr):
    """SEED[0] = (base + count * STRIDE) mod MOD, then count += 1; STATE (2,) int64 = [base, count].
    The count is reduced mod MOD first, so the product stays inside int64 for any count."""
    base = tl.load(STATE)
    count = tl.load(STATE + 1)
    tl.store(SEED, (base + (count % MOD) * STRIDE) % MOD)
    tl.store(STATE + 1, count + 1)
