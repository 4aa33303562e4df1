"""Launching the Triton kernels: the GPU a launch targets, launch sizes, and the one launch call.
(This module imports no Triton: the trainer reads MAX_BATCH from it on any platform.)

Launch sizes are decided from shapes and the target GPU, never by a multi-config autotune (that
needs a GPU driver, and the interpreter on CPU has none).

Every kernel in blip2rt.kernels is launched through `launch()`, which gives:
- a clear error when a grid would pass CUDA's limits, before the driver refuses it;
- `record()`: the launches that ran (kernel, grid, argument dtypes), so tests and benchmarks can
  assert that the fused path really executed;
- `plan_for(target)`: launches recorded instead of run, with the launch sizes of a chosen GPU.
  Run on meta tensors, the launchers then list the exact kernel configurations they would use
  on that GPU; the ahead-of-time compile gate (`blip2rt.kernels.compile_gate`) builds its list this way.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch

# CUDA's grid limits: x up to 2^31 - 1 blocks, y and z up to 65,535.
GRID_LIMITS = (2**31 - 1, 65535, 65535)
# The largest batch per process the trainer accepts. The compile gate checks every launch grid
# at this batch (ITM runs 3x it); memory runs out long before.
MAX_BATCH = 65536
# Shared memory one block may opt into, by compute capability (CUDA programming guide).
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}


@dataclass(frozen=True)
class GpuTarget:
    """The GPU a launch is sized for."""

    arch: int  # compute capability as major * 10 + minor: 90 for H100/H200, 80 for A100
    sm_count: int
    name: str = ""

    @property
    def max_shared_bytes(self) -> int:
        return MAX_SHARED_BYTES.get(self.arch, 101376)


# Reference machines for planning without a GPU.
H100 = GpuTarget(90, 132, "H100/H200 (sm_90)")
A100 = GpuTarget(80, 108, "A100 (sm_80)")


@dataclass
class Launch:
    """One kernel launch: what `kernel[grid](*args, **kwargs)` was (or would have been) called with."""

    kernel: object  # triton.JITFunction
    grid: tuple[int, int, int]
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        """module.kernel, e.g. fused_attention._fwd_kernel."""
        return f"{self.kernel.fn.__module__.rsplit('.', 1)[-1]}.{self.kernel.fn.__name__}"

    def arg_dtypes(self) -> list[torch.dtype]:
        return [a.dtype for a in self.args if isinstance(a, torch.Tensor)]


@dataclass
class _Recorder:
    launches: list[Launch] = field(default_factory=list)
    target: GpuTarget | None = None  # plan_for: every device is sized as this GPU
    run: bool = True  # False: record only (plan_for)
    keep: bool = True  # False: nothing listed (host_only)
    stand_in: bool = False  # host_only: planned launches go to a compiled kernel whose launcher does nothing


# Active recorders, innermost last. A plain list (not a ContextVar): torch.compile traces the
# launchers' Python, and it reads a module-level list but not a ContextVar. Recording is for
# one thread at a time (tests, benchmarks, the compile gate).
_RECORDERS: list[_Recorder] = []
_CUDA_TARGETS: dict[int, GpuTarget] = {}


def _cuda_target(index: int) -> GpuTarget:
    if index not in _CUDA_TARGETS:
        props = torch.cuda.get_device_properties(index)
        _CUDA_TARGETS[index] = GpuTarget(props.major * 10 + props.minor, props.multi_processor_count, props.name)
    return _CUDA_TARGETS[index]


def gpu_target(device: torch.device | str) -> GpuTarget | None:
    """The GPU that launches on `device` are sized for; None on the CPU (Triton's interpreter)."""
    for rec in reversed(_RECORDERS):
        if rec.target is not None:
            return rec.target
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


def check_grid(name: str, grid: tuple[int, ...]) -> None:
    for axis, (size, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if size > limit:
            raise ValueError(f"{name}: grid {tuple(grid)} passes CUDA's limit of {limit} blocks on axis "
                             f"{'xyz'[axis]}; the batch is too large for one launch")


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)`, with the grid checked and the launch recorded where asked."""
    grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
    check_grid(kernel.fn.__name__, grid)
    if not _RECORDERS or _note(kernel, grid, args, kwargs)[0]:
        kernel[grid](*args, **kwargs)


def _note(kernel, grid: tuple[int, int, int], args: tuple, kwargs: dict) -> tuple[bool, bool]:
    """Lists the launch where a recorder asks: (whether it runs, whether host_only stands in for it)."""
    run, stand_in = True, False
    for rec in _RECORDERS:
        if rec.keep:
            rec.launches.append(Launch(kernel, grid, args, dict(kwargs)))
        run = run and rec.run
        stand_in = rec.stand_in or stand_in
    return run, stand_in


class Planned:
    """One kernel's launch with its grid and constexprs fixed, made once per shapes, dtypes, strides
    and device and kept by the launcher that made it (the plan's key must hold every scalar argument
    it is called with). Calling it with the runtime arguments launches.

    The first GPU launch goes through Triton (`kernel[grid](...)`: its binder specialises the
    arguments, and compiles or finds the kernel). Its compiled kernel is kept, and later calls hand
    the arguments straight to the compiled kernel's launcher: no binder, no cache key, no option
    parsing per call. Triton specialises pointers on 16-byte alignment, so a call whose tensors are
    not all aligned goes through Triton again (the kept kernel may assume alignment). With a launch
    hook set (Triton's profiler), every call goes through Triton."""

    __slots__ = ("kernel", "grid", "meta", "tail", "compiled", "pointers")

    def __init__(self, kernel, grid: tuple[int, ...], meta: dict):
        self.grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        check_grid(kernel.fn.__name__, self.grid)
        self.kernel, self.meta = kernel, meta
        self.tail = direct_tail(kernel, meta)
        self.compiled = None
        self.pointers: tuple[int, ...] | None = None  # the positions of the tensor arguments

    def __call__(self, *args) -> None:
        compiled = self.compiled
        if _RECORDERS:
            run, stand_in = _note(self.kernel, self.grid, args, self.meta)
            if not run:
                if not stand_in or self.tail is None:
                    return
                compiled = _STAND_IN  # host_only: the direct path, to a launcher that does nothing
        if compiled is not None and self._aligned(args) and not _launch_hooks():
            g = self.grid
            compiled.run(g[0], g[1], g[2], _current_stream(args[0]), compiled.function, compiled.packed_metadata,
                         None, None, None, *args, *self.tail)
            return
        if compiled is _STAND_IN:
            return
        result = self.kernel[self.grid](*args, **self.meta)
        if self.tail is not None and hasattr(result, "packed_metadata") and self._aligned(args):
            self.compiled = result  # a GPU launch (the interpreter returns no compiled kernel)

    def _aligned(self, args: tuple) -> bool:
        """Every pointer on a 16-byte boundary, as Triton's specialisation assumes of the kept kernel."""
        if self.pointers is None:
            self.pointers = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
        bits = 0
        for i in self.pointers:
            bits |= args[i].data_ptr()
        return bits & 15 == 0


def direct_tail(kernel, meta: dict) -> tuple | None:
    """The constexpr values, in the kernel's parameter order, that follow the runtime arguments in a
    direct launch (Triton's launcher takes every parameter in order and skips the constexprs); None
    where the constexprs do not all come last, or the plan leaves one unset without a default."""
    params = getattr(kernel, "params", None)
    if params is None:  # Triton's interpreter: it never hands back a compiled kernel
        return None
    first = next((i for i, p in enumerate(params) if p.is_constexpr), len(params))
    if any(not p.is_constexpr for p in params[first:]):
        return None
    tail = []
    for p in params[first:]:
        if p.name in meta:
            tail.append(meta[p.name])
        elif p.default is not inspect.Parameter.empty:
            tail.append(p.default)
        else:
            return None
    return tuple(tail)


def _launch_hooks() -> bool:
    import triton  # imported by then: a compiled kernel exists

    runtime = triton.knobs.runtime
    return _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook)


def _hooked(hook) -> bool:
    """Whether a Triton launch hook does something: Triton 3.6 and later keep a chain of hooks there,
    empty unless a profiler adds one."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _current_stream(tensor: torch.Tensor) -> int:
    device = tensor.device
    if device.type != "cuda":  # host_only on the CPU
        return 0
    return torch._C._cuda_getCurrentRawStream(device.index if device.index is not None else torch.cuda.current_device())


class _NoLaunch:
    """host_only's stand-in for a compiled kernel: its launcher takes the arguments and does nothing."""

    function = None
    packed_metadata = None

    @staticmethod
    def run(*args) -> None:
        pass


_STAND_IN = _NoLaunch()


@contextlib.contextmanager
def _recording(rec: _Recorder):
    _RECORDERS.append(rec)
    try:
        yield rec.launches
    finally:
        _RECORDERS.remove(rec)


# the launchers' plan caches (shapes -> their launches), registered by the kernel modules
_PLAN_CACHES: list[dict] = []


def plan_cache() -> dict:
    """A new plan cache for a launcher module, which `forget_plans` clears."""
    cache: dict = {}
    _PLAN_CACHES.append(cache)
    return cache


def forget_plans() -> None:
    """Clears every launcher's plans, so the next calls plan afresh from the launchers' current
    choices (the compile gate does this before it lists them)."""
    for cache in _PLAN_CACHES:
        cache.clear()


def record():
    """`with record() as launches:` lists every kernel launch inside the block (they still run)."""
    return _recording(_Recorder())


def plan_for(target: GpuTarget):
    """`with plan_for(H100) as launches:` records launches without running them, sized for `target`.

    Use meta tensors inside: the launchers' torch ops then cost nothing and allocate nothing.
    """
    return _recording(_Recorder(target=target, run=False))


def host_only(target: GpuTarget):
    """`with host_only(H100):` launchers run their host path in full, sized for `target`, up to the
    compiled kernel's launcher, which does nothing (nothing is listed): the host time blip2rt itself
    adds to a call, as benchmarks/test_host_overhead.py times it. Planned launches take their direct
    path; launches through `launch()` are skipped as under plan_for."""
    return _recording(_Recorder(target=target, run=False, keep=False, stand_in=True))


class ScratchAllocator:
    """Triton's allocator for the global scratch a kernel asks for at launch (the attention backward
    builds its tensor descriptors there: 128 bytes a program). One buffer per (device, stream), kept
    and grown: kernels on one stream run one after another, so one buffer serves them all. Under CUDA
    graph capture every launch gets a buffer of the graph's own pool instead, so no replay shares
    memory with work outside it."""

    def __init__(self, device=None, capturing=None):
        self._device = device or (lambda: torch.device("cuda", torch.cuda.current_device()))
        self._capturing = capturing or torch.cuda.is_current_stream_capturing
        self._buffers: dict[tuple, torch.Tensor] = {}

    def __call__(self, size: int, alignment: int, stream) -> torch.Tensor:
        device = self._device()
        if self._capturing():
            return torch.empty(size, dtype=torch.uint8, device=device)
        key = (device, stream)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < size:
            buffer = self._buffers[key] = torch.empty(size, dtype=torch.uint8, device=device)
        return buffer


SCRATCH = ScratchAllocator()


def ensure_scratch_allocator() -> None:
    """Makes `SCRATCH` Triton's allocator in this context where none is set. Triton keeps its allocator
    in a context variable, so a thread starts without one (autograd runs the backward on a thread of
    its own); an allocator the user set is kept."""
    global _ALLOCATION
    if _ALLOCATION is None:
        from triton.runtime import _allocation

        _ALLOCATION = _allocation
    if isinstance(_ALLOCATION._allocator.get(), _ALLOCATION.NullAllocator):
        _ALLOCATION._allocator.set(SCRATCH)


_ALLOCATION = None  # triton.runtime._allocation, once imported


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on `device`'s type, or None where it is off."""
    kind = torch.device(device).type
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def interpreting(device: torch.device | str) -> bool:
    """True when launches on `device` run in Triton's CPU interpreter (bf16 dots need help there)."""
    return gpu_target(device) is None


def register_budget(num_warps: int) -> int:
    """`maxnreg` for a block of `num_warps`: every register one block may hold (at most 255).

    Without it ptxas may spill a few bytes to fit more blocks per SM. The compile gate saw that
    in the fp32 (tf32x3) tiles: 4-12 byte spills at 96-128 registers, gone with this budget. The
    16-bit tiles do not spill without it, and keep ptxas's leaner choice (an explicit budget
    raised their registers by 20-30 on average, which costs occupancy).
    """
    return min(255, 65536 // (32 * num_warps))


def row_block(width: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for kernels that hold one row of `width` elements."""
    block = 1 << (width - 1).bit_length()  # the next power of two
    warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    return block, warps


def backward_programs(rows: int, device: torch.device, blocks_per_sm: int = 2) -> int:
    """Programs for row-block reductions (dW/dB partials): `blocks_per_sm` per SM on a GPU, one on CPU
    (the interpreter's cost is per program)."""
    target = gpu_target(device)
    if target is not None:
        return max(1, min(rows, blocks_per_sm * target.sm_count))
    return 1
