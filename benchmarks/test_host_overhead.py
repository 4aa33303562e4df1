"""Host time per fused call: what the CPU spends before a kernel reaches the GPU.

On an H200 the fused Q-Former ops were host-bound at the paper's sizes (RESULTS.md): the fused
forward took longer at B = 1 than at B = 32. These cases time the launchers' Python on the CPU,
sized for an H100/H200 (`launch.host_only`), on CPU tensors: argument checks, the plan lookup,
allocations, autograd and dispatch, and the direct launch up to the compiled kernel's launcher,
which does nothing here. That is blip2rt's own host time per call. "fused" is the path eager
calls take (an autograd.Function, none for inference); "fused-op" calls the same launchers
through the torch.library custom op that torch.compile traces.

`test_triton_launch_python` times, beside them, the Python part of Triton's own launch for the
same launches (`kernel[grid](...)`: its binder, which specialises every argument, and its cache
key), which a planned launch skips after its first call. Triton's C launcher (cuLaunchKernel)
comes on top of both on a GPU.

Run: blip2rt bench -k host_overhead
"""

import pytest
import torch

from blip2rt.kernels import dropout_rng, launch
from timing import measure


def _layer_norm(via_op: bool):
    from blip2rt.kernels import post_ln_residual as ln

    g = torch.Generator().manual_seed(0)
    h, r = (torch.randn(4, 768, generator=g).requires_grad_() for _ in range(2))
    w, b = torch.ones(768, requires_grad=True), torch.zeros(768, requires_grad=True)
    dy = torch.randn(4, 768, generator=g)
    seed = dropout_rng.fixed(7, "cpu")

    def step():
        if via_op:
            y = ln.residual_layer_norm_forward_op(h, r, w, b, 1e-12, 0.1, seed)[0]
        else:
            y = ln.residual_layer_norm_triton(h, r, w, b, 1e-12, 0.1, seed=seed)
        y.backward(dy)

    return step, "post_ln_residual._fwd_kernel"


def _attention(via_op: bool, grad: bool):
    from blip2rt.kernels import fused_attention as fa

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 32, 12, 64, generator=g).requires_grad_(grad)
    k, v = (torch.randn(1, 257, 12, 64, generator=g).requires_grad_(grad) for _ in range(2))
    do = torch.randn(1, 32, 12, 64, generator=g)
    p = 0.1 if grad else 0.0
    seed = dropout_rng.fixed(7, "cpu") if grad else None

    def step():
        with torch.set_grad_enabled(grad):
            if via_op:
                o = fa.attention_forward_op(q, k, v, None, fa.MODE_NONE, 0, 0, 1, p, seed)[0]
            else:
                o = fa.fused_attention(q, k, v, dropout_p=p, seed=seed)
            if grad:
                o.backward(do)

    return step, "fused_attention._fwd_kernel"


class _AutogradFloor(torch.autograd.Function):
    """torch's own cost of one differentiable call that does nothing: apply, saving the inputs, one
    output, and a gradient for each input, through the same `.backward()`. The fused cases pay it
    too; what they take above it is blip2rt's."""

    @staticmethod
    def forward(ctx, *inputs):
        ctx.save_for_backward(*inputs)
        return torch.empty_like(inputs[0])

    @staticmethod
    def backward(ctx, dy):
        return tuple(torch.empty_like(t) for t in ctx.saved_tensors)


def _floor(case: str):
    g = torch.Generator().manual_seed(0)
    if case.startswith("residual"):
        inputs = [torch.randn(4, 768, generator=g).requires_grad_() for _ in range(2)]
        inputs += [torch.ones(768, requires_grad=True), torch.zeros(768, requires_grad=True)]
    else:
        inputs = [torch.randn(1, n, 12, 64, generator=g).requires_grad_() for n in (32, 257, 257)]
    dy = torch.randn_like(inputs[0])

    def step():
        _AutogradFloor.apply(*inputs).backward(dy)

    return step


CASES = {
    "residual LayerNorm fwd+bwd (dropout)": lambda via_op: _layer_norm(via_op),
    "cross-attention B=1 fwd+bwd (dropout)": lambda via_op: _attention(via_op, grad=True),
    "cross-attention B=1 inference": lambda via_op: _attention(via_op, grad=False),
}


@pytest.mark.parametrize("impl", ["fused", "fused-op", "autograd-floor"])
@pytest.mark.parametrize("case", list(CASES))
def test_host_overhead(benchmark, case, impl):
    benchmark.group = f"host per call: {case} (launches planned, not run)"
    if impl == "autograd-floor":
        if "bwd" not in case:
            pytest.skip("an inference call makes no autograd node")
        measure(benchmark, _floor(case), rounds=200, warmup=20)
        return
    run, kernel = CASES[case](impl == "fused-op")

    def step():
        with launch.host_only(launch.H100):
            run()

    measure(benchmark, step, rounds=200, warmup=20, expect=(kernel,))


def _triton_launch_python(launches: list) -> object:
    """What `kernel[grid](*args, **kwargs)` runs in Python before its C launcher, for each launch:
    Triton's binder (built for an sm_90 target) and its kernel cache key."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    steps = []
    for one in launches:
        jit = triton.JITFunction(one.kernel.fn)
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        kwargs = dict(one.kwargs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
        steps.append((binder, one.args, kwargs, {}))

    def run():
        for binder, args, kwargs, key_cache in steps:
            _, specialization, options = binder(*args, **kwargs)
            compute_cache_key(key_cache, specialization, options)

    return run


@pytest.mark.parametrize("case", list(CASES))
def test_triton_launch_python(benchmark, case):
    import triton

    benchmark.group = f"host per call: {case} (launches planned, not run)"
    run, _ = CASES[case](False)
    with launch.plan_for(launch.H100) as launches:
        run()
    benchmark.extra_info.update(launches=len(launches), triton=triton.__version__,
                                what="Triton's binder + cache key, per call (all its launches)")
    measure(benchmark, _triton_launch_python(launches), rounds=200, warmup=20)
