"""Host time per fused call: what the CPU spends before a kernel reaches the GPU.

On an H200 the fused Q-Former ops were host-bound at the paper's sizes (RESULTS.md): the fused
forward took longer at B = 1 than at B = 32. These cases time the launchers' Python on the CPU,
with every launch planned for an H100/H200 and not run (`launch.plan_for`) on tiny CPU tensors,
so what is timed is the host path alone: argument checks, launch sizes, allocations, autograd
and dispatch (Triton's own launch is not included). "fused" is the path eager calls take (an
autograd.Function); "fused-op" calls the same launchers through the torch.library custom op that
torch.compile traces.

Run: blip2rt bench -k host_overhead
"""

import pytest
import torch

from blip2rt.kernels import launch
from timing import measure


def _layer_norm(via_op: bool):
    from blip2rt.kernels import post_ln_residual as ln

    g = torch.Generator().manual_seed(0)
    h, r = (torch.randn(4, 768, generator=g).requires_grad_() for _ in range(2))
    w, b = torch.ones(768, requires_grad=True), torch.zeros(768, requires_grad=True)
    dy = torch.randn(4, 768, generator=g)

    def step():
        if via_op:
            y = ln.residual_layer_norm_forward_op(h, r, w, b, 1e-12, 0.1, 7)[0]
        else:
            y = ln.residual_layer_norm_triton(h, r, w, b, 1e-12, 0.1, seed=7)
        y.backward(dy)

    return step, "post_ln_residual._fwd_kernel"


def _attention(via_op: bool, grad: bool):
    from blip2rt.kernels import fused_attention as fa

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 32, 12, 64, generator=g).requires_grad_(grad)
    k, v = (torch.randn(1, 257, 12, 64, generator=g).requires_grad_(grad) for _ in range(2))
    do = torch.randn(1, 32, 12, 64, generator=g)
    p = 0.1 if grad else 0.0

    def step():
        with torch.set_grad_enabled(grad):
            if via_op:
                o = fa.attention_forward_op(q, k, v, None, fa.MODE_NONE, 0, 0, 1, p, 7)[0]
            else:
                o = fa.fused_attention(q, k, v, dropout_p=p, seed=7)
            if grad:
                o.backward(do)

    return step, "fused_attention._fwd_kernel"


CASES = {
    "residual LayerNorm fwd+bwd (dropout)": lambda via_op: _layer_norm(via_op),
    "cross-attention B=1 fwd+bwd (dropout)": lambda via_op: _attention(via_op, grad=True),
    "cross-attention B=1 inference": lambda via_op: _attention(via_op, grad=False),
}


@pytest.mark.parametrize("impl", ["fused", "fused-op"])
@pytest.mark.parametrize("case", list(CASES))
def test_host_overhead(benchmark, case, impl):
    benchmark.group = f"host per call: {case} (launches planned, not run)"
    run, kernel = CASES[case](impl == "fused-op")

    def step():
        with launch.plan_for(launch.H100):
            run()

    measure(benchmark, step, rounds=200, warmup=20, expect=(kernel,))
