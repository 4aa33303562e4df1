"""Planned launches (kernels.launch.Planned): a launch worked out once, then handed straight to the
compiled kernel's launcher on later calls.

The direct launch skips Triton's binder, so it must pass exactly what Triton itself would pass
(every parameter in the kernel's order, the constexprs included), and fall back to Triton where the
kept kernel may not fit (a misaligned pointer, a launch hook). The GPU runs it for real
(tests/test_kernels_gpu.py); here a stand-in for Triton's compiled kernel records what it gets.
"""

import inspect

import pytest
import torch
import triton

from blip2rt.kernels import fused_attention as fa
from blip2rt.kernels import launch
from blip2rt.kernels import post_ln_residual as ln


def _planned_launches() -> list[launch.Launch]:
    """Every launch the attention and LayerNorm launchers plan for an H100, forward and backward,
    with dropout and a text mask (meta tensors: nothing runs)."""
    meta = dict(device="meta")
    with launch.plan_for(launch.H100) as launches:
        q = torch.empty(2, 64, 12, 64, dtype=torch.bfloat16, **meta)
        k = torch.empty(2, 80, 12, 64, dtype=torch.bfloat16, **meta)
        mask = torch.empty(2, 48, dtype=torch.int8, **meta)
        seed = torch.empty(1, dtype=torch.int64, **meta)
        for lq, kk, mode, nq, t in ((64, k, fa.MODE_NONE, 0, None), (80, k, fa.MODE_BIDIRECTIONAL, 32, mask),
                                    (32, k, fa.MODE_NONE, 0, None)):
            qq = torch.empty(2, lq, 12, 64, dtype=torch.bfloat16, **meta)
            off = kk.shape[1] - lq if mode != fa.MODE_NONE else 0
            o, lse, keep = fa.launch_forward(qq, kk, kk, mode, nq, off, t, 1, 0.1, seed)
            fa.launch_backward(torch.empty_like(o), qq, kk, kk, o, lse, keep, t, mode, nq, off, 0.1)
        fa.launch_forward(q, k, k, fa.MODE_NONE, 0, 0, None, store_lse=False)
        h = torch.empty(64, 768, dtype=torch.bfloat16, **meta)
        w = torch.empty(768, dtype=torch.float32, **meta)
        y, stats, bits = ln.launch_forward(h, h.float(), w, w, 1e-12, 0.1, seed)
        ln.launch_backward(torch.empty_like(y), h, h.float(), w, stats, bits, 0.1, seed)
    return launches


def _jit(kernel) -> triton.JITFunction:
    """The kernel as Triton's JIT holds it (the interpreter, which these tests run under, wraps it
    differently)."""
    return kernel if isinstance(kernel, triton.JITFunction) else triton.JITFunction(kernel.fn)


def test_every_planned_launch_can_go_direct_with_the_arguments_triton_would_pass():
    launches = _planned_launches()
    names = {rec.name for rec in launches}
    assert {"fused_attention._fwd_kernel", "fused_attention._bwd_kernel",
            "post_ln_residual._fwd_kernel", "post_ln_residual._bwd_kernel"} <= names
    for rec in launches:
        jit = _jit(rec.kernel)
        tail = launch.direct_tail(jit, rec.kwargs)
        assert tail is not None, f"{rec.name}: no direct launch (constexprs not last, or one unset)"
        # what Triton's binder hands its launcher: every parameter, in order, defaults applied
        sig = inspect.signature(jit.fn)
        bound = sig.bind(*rec.args, **{k: v for k, v in rec.kwargs.items() if k in sig.parameters})
        bound.apply_defaults()
        triton_order = list(bound.arguments.values())
        direct = [*rec.args, *tail]
        assert len(direct) == len(triton_order), rec.name
        for i, (a, b) in enumerate(zip(direct, triton_order)):
            assert a is b or a == b, f"{rec.name}: parameter {jit.arg_names[i]} differs"


def test_a_kernel_whose_constexprs_are_not_last_gets_no_direct_launch():
    @triton.jit
    def mixed(X, BLOCK: triton.language.constexpr, n):
        pass

    @triton.jit
    def unset(X, n, BLOCK: triton.language.constexpr):
        pass

    @triton.jit
    def defaulted(X, n, BLOCK: triton.language.constexpr, FLAG: triton.language.constexpr = True):
        pass

    assert launch.direct_tail(_jit(mixed), dict(BLOCK=16)) is None
    assert launch.direct_tail(_jit(unset), {}) is None
    assert launch.direct_tail(_jit(defaulted), dict(BLOCK=16, num_warps=4)) == (16, True)


class _FakeCompiled:
    """Stands in for Triton's CompiledKernel: `run` is the C launcher."""

    function = object()
    packed_metadata = ("packed",)

    def __init__(self):
        self.calls = []

    def run(self, *args):
        self.calls.append(args)


class _FakeKernel:
    """Stands in for a JITFunction: `kernel[grid](*args, **meta)` compiles (once) and launches."""

    def __init__(self, real):
        self.fn, self.params = real.fn, real.params
        self.compiled = _FakeCompiled()
        self.through_triton = []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.through_triton.append((grid, args, meta))
            return self.compiled
        return run


def test_planned_goes_through_triton_once_then_direct_and_back_where_alignment_differs(monkeypatch):
    @triton.jit
    def k(X, Y, n, p, BLOCK: triton.language.constexpr, FLAG: triton.language.constexpr = False):
        pass

    fake = _FakeKernel(_jit(k))
    monkeypatch.setattr(launch, "_current_stream", lambda t: 1234)
    monkeypatch.setattr(launch, "_launch_hooks", lambda: False)
    planned = launch.Planned(fake, (3, 2), dict(BLOCK=32, num_warps=4))
    assert planned.grid == (3, 2, 1)
    x, y = torch.zeros(64), torch.zeros(64)
    planned(x, y, 64, 0.5)
    assert len(fake.through_triton) == 1 and fake.compiled.calls == []
    planned(x, y, 64, 0.5)
    planned(x, y, 64, 0.5)
    assert len(fake.through_triton) == 1
    assert len(fake.compiled.calls) == 2
    g0, g1, g2, stream, function, packed, meta, enter, leave, *args = fake.compiled.calls[-1]
    assert (g0, g1, g2, stream, function, packed) == (3, 2, 1, 1234, _FakeCompiled.function, ("packed",))
    assert (meta, enter, leave) == (None, None, None)
    assert args[0] is x and args[1] is y
    assert args[2:] == [64, 0.5, 32, False]  # the constexprs in order, FLAG at its default
    # a pointer 4 bytes off a 16-byte boundary: the kept kernel may assume alignment, so Triton again
    planned(x[1:], y, 64, 0.5)
    assert len(fake.through_triton) == 2 and len(fake.compiled.calls) == 2
    # a launch hook (Triton's profiler): Triton again
    monkeypatch.setattr(launch, "_launch_hooks", lambda: True)
    planned(x, y, 64, 0.5)
    assert len(fake.through_triton) == 3 and len(fake.compiled.calls) == 2


def test_a_misaligned_first_launch_keeps_no_kernel(monkeypatch):
    @triton.jit
    def k(X, n, BLOCK: triton.language.constexpr):
        pass

    fake = _FakeKernel(_jit(k))
    monkeypatch.setattr(launch, "_current_stream", lambda t: 0)
    monkeypatch.setattr(launch, "_launch_hooks", lambda: False)
    planned = launch.Planned(fake, (1,), dict(BLOCK=16))
    x = torch.zeros(64)
    planned(x[1:], 63)
    planned(x, 64)
    assert len(fake.through_triton) == 2  # a kernel first compiled for a misaligned pointer is not kept
    planned(x, 64)
    assert len(fake.through_triton) == 2 and len(fake.compiled.calls) == 1


def test_recording_sees_planned_launches_and_plan_for_runs_none():
    fake = _FakeKernel(_jit(fa._fwd_kernel))
    planned = launch.Planned(fake, (4,), dict(BLOCK_M=32))
    with launch.plan_for(launch.H100) as launches:
        planned(torch.zeros(4))
    assert [(r.grid, r.kwargs) for r in launches] == [((4, 1, 1), dict(BLOCK_M=32))]
    assert fake.through_triton == []


def test_a_grid_past_cudas_limit_is_refused_when_planned():
    with pytest.raises(ValueError, match="limit"):
        launch.Planned(_FakeKernel(_jit(fa._fwd_kernel)), (1, 70000), {})


def test_scratch_allocator_keeps_one_buffer_per_stream_and_a_fresh_one_under_capture():
    """Triton's global scratch (the backward's tensor descriptors): reused per (device, stream) and grown
    when a launch asks for more; a launch being captured into a CUDA graph gets a buffer of its own."""
    capturing = [False]
    alloc = launch.ScratchAllocator(device=lambda: torch.device("cpu"), capturing=lambda: capturing[0])
    a = alloc(256, 128, 7)
    assert a.numel() == 256 and alloc(128, 128, 7) is a
    b = alloc(512, 128, 7)
    assert b.numel() == 512 and alloc(256, 128, 7) is b
    assert alloc(256, 128, 8) is not b  # another stream
    capturing[0] = True
    assert alloc(256, 128, 7) is not b and alloc(256, 128, 7) is not alloc(256, 128, 7)


def test_the_scratch_allocator_is_set_in_each_thread_and_never_over_the_users():
    """Triton keeps its allocator per context: a new thread (autograd's backward thread) starts without
    one. `ensure_scratch_allocator` sets blip2rt's there, and keeps one the user set."""
    import threading

    from triton.runtime import _allocation

    def in_a_thread(user_allocator):
        seen = []

        def run():
            if user_allocator is not None:
                triton.set_allocator(user_allocator)
            before = _allocation._allocator.get()
            launch.ensure_scratch_allocator()
            seen.append((before, _allocation._allocator.get()))

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        return seen[0]

    before, after = in_a_thread(None)
    assert isinstance(before, _allocation.NullAllocator) and after is launch.SCRATCH

    def users(size, alignment, stream):
        return torch.empty(size, dtype=torch.uint8)

    assert in_a_thread(users) == (users, users)
