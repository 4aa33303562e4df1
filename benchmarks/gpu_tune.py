"""`make gpu-tune`: the fastest launch configuration of each fused kernel at the benchmark shapes, found
on the GPU in one device call, and written to the per-architecture table the launchers read
(kernels/tuned_configs.json, blip2rt.kernels.tuned).

For each case (a kernel's role at one shape class), it sweeps tiles, warps, stages and register
budgets: a few dozen candidates. Every candidate is planned by the launcher itself (the candidate
put ahead of its own choice), bound and compiled by the compile gate for this GPU's architecture;
one the gate fails (spills, shared memory, a 16-bit product off wgmma, fewer blocks per SM than the
kernel's floor) is never launched. The rest are timed with triton.testing.do_bench on the device, and
the fastest is kept. The whole run fits its budget (240 s by default): cases are taken in order, and
a case whose time is up keeps the best found so far, or the launcher's own choice.

OUT gets gpu_tune.md (a table per case: every candidate, its registers, blocks per SM, gate verdict
and median time), gpu_tune.json, and tuned_configs.json (the checked-in table plus this GPU's
entry, to commit as kernels/tuned_configs.json).

    python benchmarks/gpu_tune.py OUT [--budget 240] [--cases attention.backward cross ...]
    python benchmarks/gpu_tune.py OUT --compile-only --arch 90    # without a GPU: the gate's verdicts only
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 240
BATCH = 128  # the kernel benchmarks' large batch (test_attention_kernels.py)
HEADS, HEAD_DIM, QUERIES, IMAGE_TOKENS, TEXT = 12, 64, 32, 257, 32  # the paper's Q-Former, ViT-g's tokens
LN_ROWS, LN_DIM = 128 * 64, 768  # benchmarks/training_kernel_cases.py LAYER_NORM_PAPER
CE_TOKENS, CE_VOCAB = 854, 50272  # one chunk of OPT-2.7B's head at the benchmark's 2,560 tokens


def _grid(**axes) -> list[dict]:
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


@dataclass
class TuneCase:
    """One kernel role at one shape class: the key the launcher looks up, the candidates, how to plan the
    launcher's call on meta tensors, and how to build a timed call on the device."""

    name: str
    key: str
    kernels: tuple[str, ...]  # module._kernel: the launches of this case that the gate must pass
    candidates: list[dict]
    plan: Callable[[torch.device], None]  # the launcher's call, on tensors of `device` (meta to plan)
    timed: Callable[[torch.device], Callable[[], None]]  # inputs made once; the call to time


@dataclass
class Outcome:
    config: dict
    verdict: str = "not compiled"  # "ok", the gate's failures, or why it was not reached
    registers: int = 0
    ctas_per_sm: int = 0
    seconds: float | None = None


@dataclass
class CaseResult:
    case: TuneCase
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def best(self) -> Outcome | None:
        timed = [o for o in self.outcomes if o.seconds is not None]
        return min(timed, key=lambda o: o.seconds) if timed else None


def _attention_inputs(device, lq: int, lk: int, dtype=torch.bfloat16, batch: int = BATCH):
    g = torch.Generator(device="cpu").manual_seed(0)

    def make(n):
        if device.type == "meta":
            return torch.empty(batch, n, HEADS, HEAD_DIM, dtype=dtype, device=device)
        return torch.randn(batch, n, HEADS, HEAD_DIM, generator=g).to(device, dtype)

    return make(lq), make(lk), make(lk)


def _attention_case(name: str, backward: bool, lq: int, lk: int, mode: int, num_queries: int, text: bool,
                    dropout: float) -> TuneCase:
    from blip2rt.kernels import dropout_rng, fused_attention as fa, tuned
    from blip2rt.kernels.qformer_attention import MODE_CAUSAL

    key = tuned.attention_key(backward, lq, lk, HEAD_DIM, "bfloat16", dropout > 0, mode == MODE_CAUSAL)
    q_offset = lk - lq if mode else 0

    def inputs(device):
        q, k, v = _attention_inputs(device, lq, lk)
        mask = None
        if text:
            mask = torch.ones(BATCH, lk - num_queries, dtype=torch.int8, device=device)
        seed = dropout_rng.call_seed(7, device) if device.type != "meta" else torch.empty(1, dtype=torch.int64,
                                                                                           device=device)
        return q, k, v, mask, seed

    def plan(device):
        q, k, v, mask, seed = inputs(device)
        o, lse, keep = fa.launch_forward(q, k, v, mode, num_queries, q_offset, mask, 1, dropout, seed)
        if backward:
            fa.launch_backward(torch.empty_like(o), q, k, v, o, lse, keep, mask, mode, num_queries, q_offset, dropout)

    def timed(device):
        q, k, v, mask, seed = inputs(device)
        if not backward:
            return lambda: fa.launch_forward(q, k, v, mode, num_queries, q_offset, mask, 1, dropout, seed)
        o, lse, keep = fa.launch_forward(q, k, v, mode, num_queries, q_offset, mask, 1, dropout, seed)
        do = torch.randn_like(o)
        return lambda: fa.launch_backward(do, q, k, v, o, lse, keep, mask, mode, num_queries, q_offset, dropout)

    if backward:  # keys are the rows of every product: 64 or 128 keep them wgmma on sm_90
        # rows: 32 a tile, and for longer rows also one tile of them all (ITM's 64: the 64-row tile the
        # launcher chose before it walked 32-row tiles); keys: 128 only where there are more than 64 (else
        # half of each block would be padding)
        rows, keys = sorted({32, lq}), (64, 128) if lk > 64 else (64,)
        candidates = [dict(block_m=m, block_n=n, block_d=HEAD_DIM, warps=w, stages=s, maxnreg=r)
                      for m, n, w, s, r in itertools.product(rows, keys, (4, 8), (1, 2, 3), (None, 128))]
        # and a persistent grid (1 or 2 programs an SM walking the pairs) at the launcher's own tiles
        candidates += [dict(block_m=32, block_n=64, block_d=HEAD_DIM, warps=w, stages=2, maxnreg=r, persistent=p)
                       for w, r, p in itertools.product((4, 8), (None, 128), (1, 2))]
    elif lq > 32:  # ITM's 64 rows: one 64-row tile (wgmma on sm_90) or two 32-row ones (mma.sync, more programs)
        candidates = [dict(block_m=m, block_n=n, block_d=HEAD_DIM, warps=w, stages=s, maxnreg=r)
                      for m, n, w, s, r in itertools.product((32, lq), (32, lk), (4, 8), (1, 2), (None, 128))]
    else:
        candidates = [dict(block_m=lq, block_n=n, block_d=HEAD_DIM, warps=w, stages=s)
                      for n, w, s in itertools.product((32, 64, 128), (4, 8), (1, 2, 3))]
    kernel = "fused_attention._bwd_kernel" if backward else "fused_attention._fwd_kernel"
    return TuneCase(name, key, (kernel,), candidates, plan, timed)


def _layer_norm_case() -> TuneCase:
    from blip2rt.kernels import dropout_rng, post_ln_residual as ln, tuned

    def inputs(device):
        def make(*shape):
            return (torch.empty(*shape, dtype=torch.bfloat16, device=device) if device.type == "meta"
                    else torch.randn(*shape).to(device, torch.bfloat16))
        h, r, w, b = make(LN_ROWS, LN_DIM), make(LN_ROWS, LN_DIM), make(LN_DIM), make(LN_DIM)
        seed = dropout_rng.call_seed(7, device) if device.type != "meta" else torch.empty(1, dtype=torch.int64,
                                                                                           device=device)
        return h, r, w, b, seed

    def plan(device):
        h, r, w, b, seed = inputs(device)
        y, stats, bits = ln.launch_forward(h, r, w, b, 1e-12, 0.1, seed)
        ln.launch_backward(torch.empty_like(y), h, r, w, stats, bits, 0.1, seed)

    def timed(device):  # forward and backward: a saved mask costs the forward its store
        h, r, w, b, seed = inputs(device)
        dy = torch.randn_like(h)

        def call():
            y, stats, bits = ln.launch_forward(h, r, w, b, 1e-12, 0.1, seed)
            ln.launch_backward(dy, h, r, w, stats, bits, 0.1, seed)
        return call

    # saved_mask: the backward reads the forward's mask bits instead of drawing them again
    candidates = _grid(block_r=[1, 2, 4, 8], warps=[4, 8], blocks_per_sm=[2, 4], saved_mask=[False, True])
    return TuneCase("residual LayerNorm forward+backward", tuned.layer_norm_key(LN_DIM, "bfloat16", True),
                    ("post_ln_residual._fwd_kernel", "post_ln_residual._bwd_kernel"), candidates, plan, timed)


def _ce_rows_case() -> TuneCase:
    from blip2rt.kernels import chunked_cross_entropy as ce, tuned

    def inputs(device):
        if device.type == "meta":
            logits = torch.empty(CE_TOKENS, CE_VOCAB, dtype=torch.bfloat16, device=device)
            labels = torch.empty(CE_TOKENS, dtype=torch.int64, device=device)
        else:
            logits = torch.randn(CE_TOKENS, CE_VOCAB).to(device, torch.bfloat16)
            labels = torch.randint(0, CE_VOCAB, (CE_TOKENS,)).to(device)
        loss_rows = torch.empty(CE_TOKENS, dtype=torch.float32, device=device)
        scale = torch.ones((), dtype=torch.float32, device=device)
        return logits, labels, loss_rows, scale

    def plan(device):
        ce.launch_rows(*inputs(device), 0.1, -100)

    def timed(device):
        args = inputs(device)
        return lambda: ce.launch_rows(*args, 0.1, -100)

    candidates = _grid(BLOCK_V=[2048, 4096, 8192], num_warps=[4, 8, 16])
    return TuneCase("linear+CE rows", tuned.ce_rows_key(CE_VOCAB, "bfloat16"), ("chunked_cross_entropy._ce_rows_kernel",),
                    candidates, plan, timed)


def cases() -> list[TuneCase]:
    """In priority order: the training backward kernels first (the issue's largest gaps to their floors)."""
    from blip2rt.kernels.qformer_attention import MODE_BIDIRECTIONAL, MODE_NONE

    return [
        _attention_case("attention.backward cross", True, QUERIES, IMAGE_TOKENS, MODE_NONE, 0, False, 0.1),
        _attention_case("attention.backward ITM", True, QUERIES + TEXT, QUERIES + TEXT, MODE_BIDIRECTIONAL, QUERIES,
                        True, 0.1),
        _layer_norm_case(),
        _attention_case("attention.forward cross", False, QUERIES, IMAGE_TOKENS, MODE_NONE, 0, False, 0.1),
        _attention_case("attention.forward cross, inference", False, QUERIES, IMAGE_TOKENS, MODE_NONE, 0, False, 0.0),
        _ce_rows_case(),
        _attention_case("attention.forward ITM", False, QUERIES + TEXT, QUERIES + TEXT, MODE_BIDIRECTIONAL, QUERIES,
                        True, 0.1),
    ]


def gate_verdicts(case: TuneCase, target, jobs: int | None = None) -> list[Outcome]:
    """Every candidate planned by the launcher and compiled by the gate for `target`; a candidate is "ok"
    only if every compile of its kernel passes every check."""
    from blip2rt.kernels import compile_gate as gate, launch, tuned

    planned: list[tuple[Outcome, list]] = []
    for config in case.candidates:
        outcome = Outcome(config)
        try:
            with tuned.trying(case.key, config), launch.plan_for(target) as launches:
                case.plan(torch.device("meta"))
        except Exception as e:  # a candidate the launcher cannot plan (a grid, a tile) is a verdict, not a crash
            outcome.verdict = f"not planned: {type(e).__name__}: {str(e)[:200]}"
            planned.append((outcome, []))
            continue
        ours = [one for one in launches if one.name in case.kernels]
        planned.append((outcome, [(gate.bind(one, target.arch), one) for one in ours]))
    requests = list({req for _, reqs in planned for req, _ in reqs})
    results = {r.request: r for r in gate.compile_all(requests, jobs)}
    for outcome, reqs in planned:
        if not reqs:
            if outcome.verdict == "not compiled":
                outcome.verdict = "the launcher made no launch of this kernel"
            continue
        rows = [gate.Row(results[req], [("paper", "bf16", case.name)], math.prod(one.grid)) for req, one in reqs]
        bad = gate.failures(rows)
        outcome.registers = max(r.result.registers for r in rows)
        outcome.ctas_per_sm = min(r.ctas_per_sm for r in rows)
        outcome.verdict = "ok" if not bad else "; ".join(line.rsplit("): ", 1)[-1] for line in bad)
    return [o for o, _ in planned]


def device_timer(case: TuneCase, config: dict, device: torch.device) -> float:
    """Median seconds of the case's call with `config`, by triton.testing.do_bench."""
    import triton.testing

    from blip2rt.kernels import tuned

    with tuned.trying(case.key, config):
        call = case.timed(device)
        return triton.testing.do_bench(call, warmup=5, rep=25, return_mode="median") / 1e3


def tune(selected: list[TuneCase], target, deadline: float,
         timer: Callable[[TuneCase, dict], float] | None, jobs: int | None = None) -> list[CaseResult]:
    """Gate every candidate of each case, then time the ones it passed (`timer` None: compile only)."""
    results = []
    for case in selected:
        result = CaseResult(case)
        results.append(result)
        if time.monotonic() > deadline:
            result.outcomes = [Outcome(c, verdict="not reached: the budget ran out") for c in case.candidates]
            continue
        result.outcomes = gate_verdicts(case, target, jobs)
        if timer is None:
            continue
        for outcome in result.outcomes:
            if outcome.verdict != "ok":
                continue  # never launched
            if time.monotonic() > deadline:
                outcome.verdict = "ok, not timed: the budget ran out"
                continue
            try:
                outcome.seconds = timer(case, outcome.config)
            except Exception as e:
                outcome.verdict = f"failed on the device: {type(e).__name__}: {str(e)[:200]}"
    return results


def markdown(results: list[CaseResult], machine: str, arch: int) -> str:
    lines = [f"# gpu-tune on {machine} (sm_{arch}), {time.strftime('%Y-%m-%d')}", ""]
    for r in results:
        best = r.best
        lines += [f"## {r.case.name} (`{r.case.key}`)", "",
                  f"chosen: {json.dumps(best.config) if best else 'none timed: the launcher keeps its own choice'}"
                  + (f", {best.seconds * 1e6:.1f} us" if best else ""), "",
                  "| config | regs | blocks/SM | gate | median us |", "|---|---|---|---|---|"]
        for o in sorted(r.outcomes, key=lambda o: (o.seconds is None, o.seconds or 0)):
            us = f"{o.seconds * 1e6:.1f}" if o.seconds is not None else "-"
            lines.append(f"| {json.dumps(o.config)} | {o.registers or '-'} | {o.ctas_per_sm or '-'} | {o.verdict} | {us} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder for gpu_tune.md, gpu_tune.json and tuned_configs.json")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for the whole sweep (default {BUDGET_S})")
    ap.add_argument("--cases", nargs="+", help="case names to run (default: all, in priority order)")
    ap.add_argument("--compile-only", action="store_true", help="no GPU: only the gate's verdicts, for --arch")
    ap.add_argument("--arch", type=int, choices=[80, 90], help="with --compile-only: the architecture to compile for")
    ap.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per CPU)")
    args = ap.parse_args(argv)
    from blip2rt.kernels import launch, tuned
    from blip2rt.kernels.compile_gate import ARCHS

    deadline = time.monotonic() + args.budget
    if args.compile_only:
        if args.arch is None:
            ap.error("--compile-only needs --arch")
        target, machine, timer, device = ARCHS[args.arch], f"no GPU (compiled for sm_{args.arch})", None, None
    else:
        if not torch.cuda.is_available():
            print("gpu-tune: needs a CUDA GPU (or --compile-only --arch 90)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        target = launch.gpu_target(device)
        machine = torch.cuda.get_device_name()

        def timer(case, config):
            return device_timer(case, config, device)

    selected = cases()
    if args.cases:
        unknown = set(args.cases) - {c.name for c in selected}
        if unknown:
            ap.error(f"unknown cases {sorted(unknown)}; cases: {[c.name for c in selected]}")
        selected = [c for c in selected if c.name in args.cases]
    results = tune(selected, target, deadline, timer, args.jobs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_tune.md").write_text(markdown(results, machine, target.arch))
    (out / "gpu_tune.json").write_text(json.dumps(
        {"machine": machine, "arch": target.arch, "cases": [
            {"name": r.case.name, "key": r.case.key, "best": r.best.config if r.best else None,
             "outcomes": [o.__dict__ for o in r.outcomes]} for r in results]}, indent=1))
    if timer is not None:
        table = out / "tuned_configs.json"
        table.write_text(tuned.TABLE_PATH.read_text())  # the checked-in table, this GPU's entry added
        tuned.write(table, target.arch, machine, {r.case.key: r.best.config for r in results if r.best})
    print((out / "gpu_tune.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
