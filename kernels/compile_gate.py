"""Ahead-of-time compile of every blip2rt Triton kernel for NVIDIA GPUs, on a machine without one.

Triton's interpreter checks the arithmetic; it cannot see what a GPU rejects or slows down. This
gate compiles each kernel configuration that the launchers choose, for sm_90 (H100/H200) and
sm_80 (A100), and reads what the compiler made of it:

1. The launchers run on meta tensors under `launch.plan_for(target)`, at the paper's shapes and
   at the `tiny` and `blip2-mini` presets' shapes, in bf16, fp16 and fp32. They pick tiles, warps
   and grids for that GPU exactly as they would on it, and record the launches instead of
   running them. So the configurations come from the launchers' own code.
2. Each distinct configuration is bound as Triton's JIT binds it at a launch (the same argument
   specialisation), compiled to TTGIR, PTX and a cubin, and `ptxas -v` reports its registers
   and spills. Compiles run in parallel processes and are cached by Triton (by source hash).
3. Checks, for every compile: it succeeds and ptxas reported its registers (a report that does
   not parse is an error, never 0 registers); shared memory fits the architecture's per-block
   limit; no spill stores or loads; every `tl.dot` of the source (`DOTS`) is in the compiled
   kernel; on sm_90 every 16-bit `tl.dot` is a wgmma unless its tile cannot be
   (`WGMMA_EXCEPTIONS`, with the reason); the cross-entropy row kernel moves logits
   with 128-bit loads and stores. And every launch grid stays within CUDA's limits at the
   largest batch the trainer accepts (`launch.MAX_BATCH`).

    python -m blip2rt.kernels.compile_gate                          # everything; prints the table
    python -m blip2rt.kernels.compile_gate --arch 90 --shapes paper --dtypes bf16 --markdown table.md
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from . import launch
from .launch import A100, H100, MAX_BATCH, GpuTarget, Launch

ARCHS = {90: H100, 80: A100}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The one place that says which 16-bit tiles cannot lower to wgmma on sm_90, and why:
# (kernel, BLOCK_M) -> (how many of its dots must still be wgmma, reason). Every other 16-bit dot
# on sm_90 must be wgmma.
# How many tl.dot each kernel holds in its source (attention: S and P.V forward; S, dP, dV, dK and, in
# the row kernel, dQ backward; ITC: one product a program). A compile with fewer lost a product or
# lowered it to something the gate cannot see; every other kernel (LayerNorm, CE rows, dropout masks)
# has none.
DOTS = {
    ("fused_attention", "_fwd_kernel"): 2,
    # the backward, by its form (fused_attention._pair_form): one tile, S^T, dP^T, dV, dK and dQ^T for the
    # full key blocks and again for the peeled tail (10); all keys, the five once; split, a dK/dV branch
    # (4) and a dQ branch (S^T, dP^T, dQ^T: 3)
    ("fused_attention", "_bwd_kernel"): {"one tile": 10, "all keys": 5, "split": 7},
    ("itc", "_qmax_fwd_kernel"): 1,
    ("itc", "_qmax_bwd_img_kernel"): 1,
    ("itc", "_qmax_bwd_txt_kernel"): 1,
}
WGMMA_EXCEPTIONS = {
    # module.kernel -> (meta, dots) -> (how many dots must still be wgmma, why) for a tile that cannot be all
    # wgmma, or None where every one must be
    "fused_attention._fwd_kernel": lambda meta, dots: (0, "32 query rows (cross-attention, the query and text passes): wgmma "
                                          "needs 64 rows per warpgroup, and a 64-row tile would be half padding in "
                                          "a kernel bound by reading K/V") if meta.get("BLOCK_M") == 32 else None,
    "fused_attention._bwd_kernel": lambda meta, dots: (dots - dots // 5, "head dim under 64: dQ^T = K^T dS^T has head-dim rows, "
                                                         "fewer than wgmma's 64; the four products with 64 keys "
                                                         "as rows are wgmma") if meta.get("BLOCK_D", 64) < 64 else None,
}
# Occupancy: the fewest blocks per SM each kernel must keep at its compiled registers, shared memory and
# warps (`ctas_per_sm`), on either architecture. Raise a kernel's floor when a redesign lifts it; a
# change that lowers a kernel below it fails the gate.
MIN_CTAS_PER_SM = {
    "fused_attention._fwd_kernel": 1,  # with dropout at head dims 16-32, or rows off 16-byte steps: 185-210 registers
    # key-major at 64 keys through pointer tiles (a misaligned call, or a small batch's key and row programs):
    # 143-159 registers with dropout; through tensor descriptors, DESCRIPTOR_MIN_CTAS_PER_SM
    "fused_attention._bwd_kernel": 1,
    "chunked_cross_entropy._ce_rows_kernel": 2,
    "post_ln_residual._bwd_kernel": 2,  # its grid is post_ln_residual.BLOCKS_PER_SM blocks an SM: one wave
    # the ITC grids are under one wave (16-512 blocks), so their blocks per SM are not what limits them
    "itc._qmax_fwd_kernel": 1,
    "itc._qmax_bwd_img_kernel": 1,
    "itc._qmax_bwd_txt_kernel": 1,
}
DEFAULT_MIN_CTAS_PER_SM = 2  # the row kernels (LayerNorm, masks, the seed draw): small blocks, few registers
# the attention backward through tensor descriptors (sm_90, one program a (batch, head)): two blocks an SM or
# more (128 registers at 8 warps walking key blocks, 136-168 at 4 walking query tiles: three), so one block's
# loads overlap another's products
DESCRIPTOR_MIN_CTAS_PER_SM = 2
SM_SHARED_BYTES = {90: 233472, 80: 167936}  # shared memory an SM holds (a block may use less: launch.MAX_SHARED_BYTES)
SM_MAX_WARPS, SM_MAX_BLOCKS, SM_REGISTERS = 64, 32, 65536


def ctas_per_sm(arch: int, registers: int, shared: int, warps: int) -> int:
    """Blocks of this kernel one SM holds at once (sm_80 and sm_90 alike: 64K registers allocated per warp
    in units of 256, 1 KB of shared memory reserved per block, 64 warps, 32 blocks)."""
    warp_registers = -(-registers * 32 // 256) * 256
    by_registers = (SM_REGISTERS // warp_registers) // warps if registers else SM_MAX_BLOCKS
    by_shared = SM_SHARED_BYTES[arch] // (shared + 1024)
    return min(by_registers, by_shared, SM_MAX_WARPS // warps, SM_MAX_BLOCKS)


@dataclass(frozen=True)
class Shapes:
    """One model size: what the Q-Former, ITC and the two vocabulary heads see."""

    name: str
    batch: int  # images per process
    hidden: int
    heads: int
    queries: int
    image_tokens: int
    image_width: int
    cross_layers: int
    text: int  # Q-Former text length
    embed: int  # ITC feature width
    heads_ce: tuple[tuple[int, int, bool], ...]  # (hidden, vocab, trainable) of each linear + CE head

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def shapes_of(name: str, batch: int | None = None) -> Shapes:
    """paper (BLIP-2 with ViT-g and OPT-2.7B, ITC at batch 256), tiny, or mini (blip2-mini)."""
    from blip2rt.presets import preset_config  # the model's sizes; imported only when the gate runs

    preset = {"paper": "blip2-opt-2.7b", "tiny": "tiny", "mini": "blip2-mini"}[name]
    cfg = preset_config(preset)
    q, v = cfg.qformer_config, cfg.vision_config
    llm = cfg.text_config
    return Shapes(name=name, batch=batch or (256 if name == "paper" else 8), hidden=q.hidden_size,
                  heads=q.num_attention_heads, queries=cfg.num_query_tokens, image_tokens=v.num_patches + 1,
                  image_width=v.hidden_size,
                  cross_layers=sum(q.has_cross_attention(i) for i in range(q.num_hidden_layers)),
                  text=32, embed=cfg.image_text_hidden_size,
                  heads_ce=((q.hidden_size, q.vocab_size, True), (llm["hidden_size"], llm["vocab_size"], False)))


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _workloads(s: Shapes, dtype: torch.dtype) -> list[tuple[str, Callable[[], None]]]:
    """Every launch the model and trainer make at these shapes, as (op, run on meta tensors)."""
    from blip2rt.kernels import chunked_cross_entropy as ce
    from blip2rt.kernels import dropout_rng
    from blip2rt.kernels import fused_attention as fa
    from blip2rt.kernels import itc
    from blip2rt.kernels import post_ln_residual as ln
    from blip2rt.kernels.qformer_attention import MODE_BIDIRECTIONAL, MODE_CAUSAL, MODE_NONE, MODE_UNIMODAL

    b, d, h, hd, nq, t = s.batch, s.hidden, s.heads, s.head_dim, s.queries, s.text

    def heads_view(batch: int, n: int) -> torch.Tensor:  # a Linear's output, split into heads: a view
        return _meta(batch, n, d, dtype=dtype).view(batch, n, h, hd)

    def image_kv(batch: int) -> tuple[torch.Tensor, torch.Tensor]:  # one layer's K/V in the packed buffer
        packed = _meta(batch, s.image_tokens, s.cross_layers * 2 * d, dtype=dtype)
        kv = packed.view(batch, s.image_tokens, s.cross_layers, 2, h, hd).unbind(2)[0]
        return kv.unbind(2)

    def attention(q, k, v, mode=MODE_NONE, num_queries=0, text=False, grad=True, dropout=0.1):
        """Training (grad) runs with the paper's attention dropout; inference without."""
        p = dropout if grad else 0.0

        def run():
            batch, lq = q.shape[:2]
            mask = _meta(batch, k.shape[1] - num_queries, dtype=torch.int8) if text else None  # text_mask_arg's
            q_offset = k.shape[1] - lq if mode != MODE_NONE else 0
            seed = _meta(1, dtype=torch.int64)  # the call's dropout seed, on the device
            o, lse, keep = fa.launch_forward(q, k, v, mode, num_queries, q_offset, mask, fa.forward_splits(q, k, grad),
                                             p, seed)
            if grad:
                fa.launch_backward(torch.empty_like(o), q, k, v, o, lse, keep, mask, mode, num_queries, q_offset, p)
        return run

    def post_ln(h_dtype, r_dtype, p):
        def run():
            hh, r = _meta(b * nq, d, dtype=h_dtype), _meta(b * nq, d, dtype=r_dtype)
            w, bias = _meta(d, dtype=r_dtype), _meta(d, dtype=r_dtype)
            seed = _meta(1, dtype=torch.int64)
            y, stats, bits = ln.launch_forward(hh, r, w, bias, 1e-12, p, seed)
            ln.launch_backward(torch.empty_like(y), hh, r, w, stats, bits, p, seed)
        return run

    def itc_loss():
        img, txt = _meta(b, nq, s.embed, dtype=dtype), _meta(b, s.embed, dtype=dtype)
        sim, arg = itc.launch_forward(img, txt)
        itc.launch_backward(sim, arg, img, txt, True, True)

    def linear_ce(hidden, vocab, trainable):
        def run():
            tokens = b * (t - 1)
            hh = _meta(tokens, hidden, dtype=dtype).requires_grad_()
            w = _meta(vocab, hidden, dtype=dtype).requires_grad_(trainable)
            bias = _meta(vocab, dtype=dtype).requires_grad_(trainable) if trainable else None
            labels = _meta(b, t, dtype=torch.int64)[:, 1:]  # ITG's shifted labels: a strided view
            ce.linear_cross_entropy_triton(hh, w, labels, bias, 0.1)
        return run

    kv = image_kv(b)
    training = [  # (op, q/k/v, mode, num_queries, text mask)
        ("cross-attention", (heads_view(b, nq), *kv), MODE_NONE, 0, False),
        ("self-attention, queries", tuple(heads_view(b, nq) for _ in range(3)), MODE_BIDIRECTIONAL, nq, False),
        ("self-attention, text (ITC)", tuple(heads_view(b, t) for _ in range(3)), MODE_BIDIRECTIONAL, 0, True),
        ("self-attention, ITM", tuple(heads_view(3 * b, nq + t) for _ in range(3)), MODE_BIDIRECTIONAL, nq, True),
        ("self-attention, unimodal", tuple(heads_view(b, nq + t) for _ in range(3)), MODE_UNIMODAL, nq, True),
        ("self-attention, ITG", (heads_view(b, t), *(_meta(b, nq + t, h, hd, dtype=dtype) for _ in range(2))),
         MODE_CAUSAL, nq, True),
    ]
    out = [(op, attention(*qkv, mode, n, text=txt)) for op, qkv, mode, n, txt in training]
    if s.name == "paper":  # training without dropout (eval-mode grads, a dropout-free config): the paper's shapes
        out += [(f"{op}, no dropout", attention(*qkv, mode, n, text=txt, dropout=0.0))
                for op, qkv, mode, n, txt in training]
        # K/V rows off 16-byte steps: the backward's pointer launch, which a call that cannot take tensor
        # descriptors falls back to
        odd = tuple(_meta(b, s.image_tokens, h, hd + 4, dtype=dtype)[..., :hd] for _ in range(2))
        out += [("cross-attention, K/V off 16-byte steps", attention(heads_view(b, nq), *odd)),
                ("cross-attention, K/V off 16-byte steps, no dropout", attention(heads_view(b, nq), *odd, dropout=0.0))]
    out += [
        ("cross-attention, B=1 inference", attention(heads_view(1, nq), *image_kv(1), grad=False)),
        # a batch whose (batch, head) programs are under one wave: the backward in separate key and row programs
        ("cross-attention, B=1 training", attention(heads_view(1, nq), *image_kv(1))),
        # 1,025 keys (a 448-pixel ViT's tokens): enough key blocks for the split-KV path
        ("cross-attention, B=1 inference, split keys",
         attention(heads_view(1, nq), *(_meta(1, 1025, h, hd, dtype=dtype) for _ in range(2)), grad=False)),
        ("residual LayerNorm", post_ln(dtype, dtype, 0.1)),
        ("residual LayerNorm, inference", post_ln(dtype, dtype, 0.0)),
        ("ITC", itc_loss),
        *((f"linear+CE {hidden}->{vocab}", linear_ce(hidden, vocab, trainable))
          for hidden, vocab, trainable in s.heads_ce),
        ("dropout keep mask", lambda: ln.dropout_keep_mask((b * nq, d), 0.1, 1, "meta")),
        ("attention dropout keep mask", lambda: fa.attention_keep_mask(b, h, nq + t, nq + t, 0.1, 1, "meta")),
        ("dropout seed draw", lambda: dropout_rng.draw_in_kernel(_meta(2, dtype=torch.int64))),
    ]
    if dtype != torch.float32:  # autocast: 16-bit sublayer output, fp32 residual stream
        out.append(("residual LayerNorm, autocast", post_ln(dtype, torch.float32, 0.1)))
    return out


def plan(target: GpuTarget, shape_names: Iterable[str], dtype_names: Iterable[str], batch: int | None = None
         ) -> list[tuple[str, str, str, Launch]]:
    """(shapes, dtype, op, launch) for every launch the workloads make on `target`, from the
    launchers' current choices (their kept plans are dropped first)."""
    launch.forget_plans()
    rows = []
    for shape_name in shape_names:
        s = shapes_of(shape_name, batch)
        for dtype_name in dtype_names:
            for op, run in _workloads(s, DTYPES[dtype_name]):
                with launch.plan_for(target) as launches:
                    run()
                rows += [(shape_name, dtype_name, op, one) for one in launches]
    return rows


def check_grids_at_max_batch(target: GpuTarget = H100) -> list[str]:
    """Runs every workload at the trainer's largest batch; returns the ops whose grid fails."""
    failures = []
    for shape_name in ("paper", "tiny", "mini"):
        for op, run in _workloads(shapes_of(shape_name, MAX_BATCH), torch.bfloat16):
            try:
                with launch.plan_for(target):
                    run()
            except ValueError as e:
                failures.append(f"{shape_name} {op}: {e}")
    return failures


# ---- binding and compiling, as Triton's JIT does at a launch ----

@dataclass(frozen=True)
class CompileRequest:
    module: str
    kernel: str
    arch: int
    signature: tuple
    constexprs: tuple
    attrs: tuple
    options: tuple

    @property
    def meta(self) -> dict:
        return dict(self.constexprs)


def bind(one: Launch, arch: int) -> CompileRequest:
    """What `kernel[grid](*args, **kwargs)` would compile on a GPU of `arch` (Triton's own binder)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = one.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(one.kwargs, debug=kernel.debug or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*one.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    names = kernel.arg_names
    named = tuple((names[path[0]], _plain(v)) for path, v in sorted(constexprs.items()))
    return CompileRequest(kernel.fn.__module__, kernel.fn.__name__, arch, tuple(sorted(signature.items())), named,
                          tuple(sorted((k, tuple(map(tuple, v))) for k, v in attrs.items())),
                          tuple(sorted((k, _hashable(v)) for k, v in options.__dict__.items())))


def _plain(v):
    return getattr(v, "value", v)


def _hashable(v):
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    return v


@dataclass
class CompileResult:
    request: CompileRequest
    error: str | None = None
    shared: int = 0
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    dots: int = 0  # tl.dot ops in the TTGIR
    wgmma_dots: int = 0  # of which warp-group (wgmma) dots
    mma: str = ""  # wgmma | mma | fma (a dot on the FMA units) | "" (no dot)
    v4_loads: int = 0  # 128-bit global loads / stores in the PTX
    v4_stores: int = 0
    tma: int = 0  # tensor-memory (cp.async.bulk.tensor) copies in the PTX
    seconds: float = 0.0


def compile_request(req: CompileRequest) -> CompileResult:
    """Compiles one configuration (in a worker process) and reads registers, spills, MMA kind."""
    import contextlib
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    kernel = getattr(importlib.import_module(req.module), req.kernel)
    names = kernel.arg_names
    constexprs = {(names.index(k),): v for k, v in req.constexprs}
    attrs = {k: [list(a) for a in v] for k, v in req.attrs}
    log = io.StringIO()
    try:
        knobs.nvidia.dump_ptxas_log = True  # Triton's own `ptxas -v` log, printed when it compiles afresh
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, dict(req.signature), constexprs, attrs),
                                      target=GPUTarget("cuda", req.arch, 32), options=dict(req.options))
        ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
        regs, stores, loads = _ptxas_report(ptx, req.arch, log.getvalue())
    except Exception as e:  # a compile failure is a finding, reported per configuration
        return CompileResult(req, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}",
                             seconds=time.perf_counter() - start)
    wgmma = len(re.findall(r"ttng\.warp_group_dot ", ttgir))
    dots = wgmma + len(re.findall(r"tt\.dot ", ttgir))
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "fma" if dots else ""
    return CompileResult(req, shared=compiled.metadata.shared, registers=regs, spill_stores=stores, spill_loads=loads,
                         dots=dots, wgmma_dots=wgmma, mma=mma, v4_loads=len(re.findall(r"ld\.global[\w.]*\.v4", ptx)),
                         v4_stores=len(re.findall(r"st\.global[\w.]*\.v4", ptx)),
                         tma=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)), seconds=time.perf_counter() - start)


def _ptxas_report(ptx: str, arch: int, triton_log: str = "") -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) of `ptxas -v` on this PTX.

    From Triton's own log when it just compiled the kernel; otherwise from the report cached
    beside Triton's cache (keyed by the PTX's hash), or from running ptxas with Triton's flags.
    """
    import hashlib
    import json

    import triton
    from triton import knobs

    key = hashlib.sha256(f"{triton.__version__}:{arch}:{ptx}".encode()).hexdigest()
    cache = os.path.join(knobs.cache.dir, "blip2rt-gpu-compile")
    path = os.path.join(cache, f"{key}.json")
    if os.path.exists(path):
        with open(path) as f:
            cached = tuple(json.load(f))
        if cached[0] > 0:  # (a report cached before unreadable ones were refused may hold 0 registers)
            return cached
    report = triton_log if "Used" in triton_log else _run_ptxas(ptx, arch)
    out = parse_ptxas_report(report)
    os.makedirs(cache, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=cache, delete=False, suffix=".tmp") as f:
        json.dump(out, f)
    os.replace(f.name, path)
    return out


def parse_ptxas_report(report: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v`'s report. A report without a
    register count (ptxas changed its wording, or printed an error) raises: read as 0 registers and 0
    spills it would pass every check it was meant to feed."""
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if not regs or not spills or int(regs.group(1)) <= 0:
        raise ValueError(f"ptxas -v reported no register count and spills: {report.strip()[:300]!r}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def _run_ptxas(ptx: str, arch: int) -> str:
    """`ptxas -v` with the flags this Triton passes (3.8 adds --regAllocOptLevel=2; 3.6 does not)."""
    import inspect

    from triton.backends.nvidia import compiler
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    flags = ["--regAllocOptLevel=2"] if "regAllocOptLevel" in inspect.getsource(compiler.CUDABackend.make_cubin) else []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        return subprocess.run([get_ptxas(arch).path, "-v", *flags, f"--gpu-name={sm_arch_from_capability(arch)}", src,
                               "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True).stderr


def compile_all(requests: list[CompileRequest], jobs: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> list[CompileResult]:
    jobs = jobs or os.cpu_count() or 1
    results = []
    if jobs == 1:
        for i, req in enumerate(requests):
            results.append(compile_request(req))
            if progress:
                progress(i + 1, len(requests))
        return results
    with ProcessPoolExecutor(jobs) as pool:
        for i, res in enumerate(pool.map(compile_request, requests, chunksize=1)):
            results.append(res)
            if progress:
                progress(i + 1, len(requests))
    return results


# ---- the gate ----

@dataclass
class Row:
    """One distinct compile, with the workloads (shape, dtype, op) that launch it."""

    result: CompileResult
    uses: list[tuple[str, str, str]]
    programs: int = 0  # the largest grid (blocks) it is launched with in the gate's plan

    @property
    def kernel(self) -> str:
        return _name(self.result.request)

    @property
    def ctas_per_sm(self) -> int:
        r = self.result
        return ctas_per_sm(r.request.arch, r.registers, r.shared, _warps(r.request))

    @property
    def waves(self) -> float:
        """Rounds of blocks the largest grid takes to run on the reference GPU of its architecture."""
        return self.programs / max(1, self.ctas_per_sm * ARCHS[self.result.request.arch].sm_count)


def run_gate(archs: Iterable[int] = (90, 80), shape_names: Iterable[str] = ("paper", "tiny", "mini"),
             dtype_names: Iterable[str] = ("bf16", "fp16", "fp32"), jobs: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> list[Row]:
    shape_names, dtype_names = list(shape_names), list(dtype_names)
    uses: dict[CompileRequest, list[tuple[str, str, str]]] = {}
    programs: dict[CompileRequest, int] = {}
    for arch in archs:
        for shape_name, dtype_name, op, one in plan(ARCHS[arch], shape_names, dtype_names):
            req = bind(one, arch)
            uses.setdefault(req, []).append((shape_name, dtype_name, op))
            programs[req] = max(programs.get(req, 0), one.grid[0] * one.grid[1] * one.grid[2])
    requests = list(uses)
    return [Row(res, uses[res.request], programs[res.request]) for res in compile_all(requests, jobs, progress)]


def failures(rows: list[Row]) -> list[str]:
    """Every check that a compile fails, one line each."""
    out = []
    for row in rows:
        r, req = row.result, row.result.request
        where = f"{_name(req)} sm_{req.arch} {_dtypes(req)} {_config(req)} ({_uses(row)})"
        if r.error:
            out.append(f"{where}: compile failed: {r.error}")
            continue
        limit = ARCHS[req.arch].max_shared_bytes
        if r.shared > limit:
            out.append(f"{where}: {r.shared} bytes of shared memory, over sm_{req.arch}'s {limit}")
        if r.registers <= 0:
            out.append(f"{where}: ptxas reported {r.registers} registers: the compile was not read")
        if r.spill_stores or r.spill_loads:
            out.append(f"{where}: spills {r.spill_stores} bytes stored, {r.spill_loads} loaded ({r.registers} registers)")
        dots = expected_dots(req)
        if r.dots < dots:
            out.append(f"{where}: {r.dots} dots in the compiled kernel, want the source's {dots}")
        if req.arch == 90 and dots and _sixteen_bit_dots(req):
            exception = WGMMA_EXCEPTIONS.get(_name(req), lambda meta, dots: None)(req.meta, dots)
            want = dots if exception is None else exception[0]
            if r.wgmma_dots < want:
                out.append(f"{where}: {r.wgmma_dots} of {r.dots} dots are wgmma, want {want}")
        floor = min_ctas_per_sm(req)
        if row.ctas_per_sm < floor:
            out.append(f"{where}: {row.ctas_per_sm} blocks per SM ({r.registers} registers, {r.shared} B shared, "
                       f"{_warps(req)} warps), want at least {floor}")
        if req.meta.get("TMA") and req.arch >= 90 and r.tma < 4:  # K and V in, dK and dV out
            out.append(f"{where}: {r.tma} tensor-memory copies in the PTX, want K's and V's loads and "
                       f"dK's and dV's stores (4 or more): the descriptors were lowered to pointers")
        per_pass = _vector_ops_per_block(req) if req.kernel == "_ce_rows_kernel" else 0
        if per_pass:  # (a block too small for one 128-bit access per thread has nothing to check)
            if r.v4_loads < 2 * per_pass or r.v4_stores < 2 * per_pass:
                out.append(f"{where}: the main loops move logits in narrower than 128-bit accesses: "
                           f"{r.v4_loads} v4 loads and {r.v4_stores} v4 stores, want {2 * per_pass} each")
    return out


def expected_dots(req: CompileRequest) -> int:
    dots = DOTS.get((req.module.rsplit(".", 1)[-1], req.kernel), 0)
    if isinstance(dots, dict):  # the attention backward
        from .fused_attention import launch_form

        return dots[launch_form(req.meta)]
    return dots


def _name(req: CompileRequest) -> str:
    """module.kernel, without the package: fused_attention._fwd_kernel."""
    return f"{req.module.rsplit('.', 1)[-1]}.{req.kernel}"


def _sixteen_bit_dots(req: CompileRequest) -> bool:
    meta = req.meta
    return meta.get("PRECISION") not in (None, "tf32x3", "upcast") and any(
        v in ("*bf16", "*fp16") for _, v in req.signature)


def _vector_ops_per_block(req: CompileRequest) -> int:
    """128-bit accesses each thread makes for one BLOCK_V of logits: what a fully vectorised pass
    over a block takes. The row kernel has two such passes that load, and two that store (the
    gradient, and the zeros of an ignored row)."""
    elem = {"*bf16": 2, "*fp16": 2, "*fp32": 4}[dict(req.signature)["LOGITS"]]
    threads = 32 * dict(req.options)["num_warps"]
    return req.meta["BLOCK_V"] * elem // (16 * threads)


def min_ctas_per_sm(req: CompileRequest) -> int:
    if req.meta.get("TMA") and req.arch >= 90:
        return DESCRIPTOR_MIN_CTAS_PER_SM
    return MIN_CTAS_PER_SM.get(_name(req), DEFAULT_MIN_CTAS_PER_SM)


def _warps(req: CompileRequest) -> int:
    return dict(req.options)["num_warps"]


def _config(req: CompileRequest) -> str:
    meta = req.meta
    opts = dict(req.options)
    blocks = "x".join(f"{meta[k]}" for k in ("BLOCK_M", "BLOCK_N", "BLOCK_I", "BLOCK_T", "BLOCK_R", "BLOCK_V", "BLOCK_D")
                      if k in meta)
    off = _off_sixteen_bytes(req)
    return f"{blocks} w{opts.get('num_warps')} s{opts.get('num_stages')}" + (f", {', '.join(off)} off 16 B" if off else "")


def _off_sixteen_bytes(req: CompileRequest) -> list[str]:
    """The pointer arguments Triton's binder did not find on a 16-byte boundary (so compiled for narrower
    accesses): what tells apart two compiles of one configuration, e.g. a strided view of shifted labels."""
    names = getattr(importlib.import_module(req.module), req.kernel).arg_names
    aligned = {path[0] for path, attrs in req.attrs if ("tt.divisibility", 16) in attrs}
    return [name for name, kind in req.signature if isinstance(kind, str) and kind.startswith("*")
            and names.index(name) not in aligned]


def _dtypes(req: CompileRequest) -> str:
    ptrs = sorted({v[1:] for _, v in req.signature if isinstance(v, str) and v.startswith("*")
                   and v[1:] in ("bf16", "fp16", "fp32")})
    return "/".join(ptrs) + (f" {req.meta['PRECISION']}" if "PRECISION" in req.meta else "")


def _uses(row: Row) -> str:
    shapes = sorted({u[0] for u in row.uses})
    ops = sorted({u[2] for u in row.uses})
    return f"{','.join(shapes)}: {'; '.join(ops[:3])}{' ...' if len(ops) > 3 else ''}"


def table(rows: list[Row]) -> str:
    """One Markdown table: kernel, shapes and ops, dtypes, arch, tiles, shared, registers, spills, MMA."""
    head = ("| kernel | shapes: ops | dtypes (dot) | arch | tiles, warps, stages | shared B | regs | spills B | "
            "dots: MMA | 128-bit ld/st | CTAs/SM (floor) | waves (blocks) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in sorted(rows, key=lambda r: (r.kernel, -r.result.request.arch, _config(r.result.request), _uses(r))):
        r, req = row.result, row.result.request
        if r.error:
            lines.append(f"| {row.kernel} | {_uses(row)} | {_dtypes(req)} | sm_{req.arch} | {_config(req)} | "
                         f"FAILED: {r.error} |||||||")
            continue
        dots = f"{r.dots}: {r.mma}" + (f" ({r.wgmma_dots} wgmma)" if r.wgmma_dots and r.wgmma_dots < r.dots else "")
        lines.append(f"| {row.kernel} | {_uses(row)} | {_dtypes(req)} | sm_{req.arch} | {_config(req)} | {r.shared} | "
                     f"{r.registers} | {r.spill_stores}/{r.spill_loads} | {dots if r.dots else '-'} | "
                     f"{r.v4_loads}/{r.v4_stores} | {row.ctas_per_sm} ({min_ctas_per_sm(req)}) | "
                     f"{row.waves:.1f} ({row.programs}) |")
    return "\n".join(lines)


def _as_json(row: Row) -> dict:
    r, req = row.result, row.result.request
    return {"kernel": row.kernel, "arch": req.arch, "config": _config(req), "dtypes": _dtypes(req),
            "uses": [list(u) for u in row.uses], "error": r.error, "shared": r.shared, "registers": r.registers,
            "spill_stores": r.spill_stores, "spill_loads": r.spill_loads, "dots": r.dots, "wgmma_dots": r.wgmma_dots,
            "mma": r.mma, "v4_loads": r.v4_loads, "v4_stores": r.v4_stores, "ctas_per_sm": row.ctas_per_sm,
            "programs": row.programs, "waves": round(row.waves, 2), "seconds": round(r.seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blip2rt.kernels.compile_gate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(ARCHS),
                    help="compute capabilities to compile for (default: 90 80)")
    ap.add_argument("--shapes", nargs="+", default=["paper", "tiny", "mini"], choices=["paper", "tiny", "mini"])
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per CPU)")
    ap.add_argument("--markdown", help="also write the table to this file")
    ap.add_argument("--json", help="also write every compile and every failed check to this file")
    args = ap.parse_args(argv)
    import triton

    start = time.perf_counter()

    def progress(done, total):
        print(f"\rcompiling {done}/{total}", end="", file=sys.stderr, flush=True)

    rows = run_gate(args.arch, args.shapes, args.dtypes, args.jobs, progress)
    print(file=sys.stderr)
    text = table(rows)
    print(text)
    if args.markdown:
        bad_count = len(failures(rows))
        with open(args.markdown, "w") as f:
            f.write(f"# The compile gate's table\n\nGenerated by `make gpu-compile` (`python -m blip2rt.kernels.compile_gate "
                    f"--markdown ...`) on {time.strftime('%Y-%m-%d')}: Triton {triton.__version__}, sm_"
                    f"{' and sm_'.join(map(str, args.arch))}, shapes {', '.join(args.shapes)}, dtypes "
                    f"{', '.join(args.dtypes)}; {len(rows)} compiles, {bad_count} failed checks. Rewritten by each "
                    "run; not edited by hand.\n\n" + text + "\n")
    bad = failures(rows) + [f"grid: {g}" for g in check_grids_at_max_batch()]
    seconds = time.perf_counter() - start
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "seconds": round(seconds, 1), "failures": bad,
                       "compiles": [_as_json(row) for row in rows]}, f, indent=1)
    print(f"\n{len(rows)} compiles (triton {triton.__version__}) in {seconds:.0f} s; {len(bad)} failed checks")
    for line in bad:
        print(f"FAIL {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
