"""The fused training ops and their eager baselines as runnable cases: inputs + one fwd+bwd step.
impl: "fused" (Triton) | "eager" (the torch path) | "compiled" (the torch path under torch.compile,
inductor's default mode: the peer performance engineers compare with first).

Shared by the GPU benchmarks (paper shapes) and a CPU smoke test (tiny shapes), so the harness
itself is exercised on every CI run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blip2rt import kernels

# Paper shapes (issue: fused training kernels)
ITC_PAPER = dict(batch=1024, queries=32, dim=256)  # global batch 1024 x 32 queries x 256
LAYER_NORM_PAPER = dict(rows=128 * 64, dim=768)  # Q-Former tokens of a 128-image batch, width 768
LINEAR_CE_PAPER = dict(tokens=64 * 40, hidden=2560, vocab=50272)  # OPT-2.7B head, 64 captions x 40 tokens


@dataclass
class Case:
    step: Callable[[], None]  # one forward + backward, grads cleared
    flops: float  # forward + backward, for throughput


def _backend(impl: str) -> str:
    return "triton" if impl == "fused" else "torch"


def _compiled_if(impl: str, fn: Callable) -> Callable:
    return torch.compile(fn) if impl == "compiled" else fn


def itc_case(impl: str, device, dtype, batch: int, queries: int, dim: int) -> Case:
    g = torch.Generator(device="cpu").manual_seed(0)
    img = F.normalize(torch.randn(batch, queries, dim, generator=g), dim=-1).to(device, dtype).requires_grad_()
    txt = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(device, dtype).requires_grad_()
    temp = torch.tensor(0.07, device=device, requires_grad=True)
    loss_fn = _compiled_if(impl, lambda i, t, tt: kernels.itc_loss(i, t, tt, backend=_backend(impl))[0])

    def step():
        img.grad = txt.grad = temp.grad = None
        loss_fn(img, txt, temp).backward()

    return Case(step, flops=3 * 2 * batch * batch * queries * dim)


def layer_norm_case(impl: str, device, dtype, rows: int, dim: int, dropout: float = 0.1) -> Case:
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(rows, dim, generator=g).to(device, dtype).requires_grad_()
    r = torch.randn(rows, dim, generator=g).to(device, dtype).requires_grad_()
    w = torch.ones(dim, device=device, dtype=dtype, requires_grad=True)
    b = torch.zeros(dim, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(rows, dim, generator=g).to(device, dtype)
    layer_norm = _compiled_if(impl, lambda *a: kernels.residual_layer_norm(*a, 1e-12, dropout, backend=_backend(impl)))

    def step():
        h.grad = r.grad = w.grad = b.grad = None
        layer_norm(h, r, w, b).backward(dy)

    return Case(step, flops=0.0)  # memory-bound: report bytes/s from the timing instead


def linear_ce_case(impl: str, device, dtype, tokens: int, hidden: int, vocab: int) -> Case:
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device, dtype)  # frozen LLM head (stage 2)
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    labels[::7] = -100
    loss_fn = _compiled_if(impl, lambda *a: kernels.linear_cross_entropy(*a, label_smoothing=0.0,
                                                                         backend=_backend(impl)))

    def step():
        h.grad = None
        loss_fn(h, w, labels).backward()

    return Case(step, flops=2 * 2 * tokens * hidden * vocab)  # logits + grad of h


CASES = {"itc": itc_case, "layer_norm": layer_norm_case, "linear_ce": linear_ce_case}
FUSED_KERNEL = {"itc": "itc._qmax_fwd_kernel", "layer_norm": "post_ln_residual._fwd_kernel",
                "linear_ce": "chunked_cross_entropy._ce_rows_kernel"}  # what the fused case must launch
PAPER_SHAPES = {"itc": ITC_PAPER, "layer_norm": LAYER_NORM_PAPER, "linear_ce": LINEAR_CE_PAPER}
TINY_SHAPES = {"itc": dict(batch=5, queries=4, dim=16), "layer_norm": dict(rows=7, dim=37),
               "linear_ce": dict(tokens=9, hidden=16, vocab=101)}
