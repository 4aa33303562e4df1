"""The one timing helper every benchmark uses.

- warm-up rounds outside the statistics; on CUDA, synchronisation inside the timed call;
- peak CUDA memory of one step;
- BLIP2RT_BENCH_QUICK=1: every case runs once (one round, no warm-up): CI's reduced mode,
  which checks that each case still works, not how fast it is;
- BLIP2RT_BENCH_DELAY="SUBSTRING:SECONDS": cases whose name holds SUBSTRING sleep that long
  inside the timed call. It plants a regression, so tests can check that the compare step
  catches one;
- BLIP2RT_BENCH_PROFILE=DIR: after timing, one more call runs under torch.profiler and its
  trace goes to DIR/<case>.json (Chrome / Perfetto format);
- the path check: a case labelled fused/triton fails unless Triton kernels ran in its first call,
  and any other case fails if one did; extra_info["path"] lists the kernels.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from blip2rt.kernels import launch


def quick_mode() -> bool:
    return os.environ.get("BLIP2RT_BENCH_QUICK", "") == "1"


def planted_delay(name: str) -> float:
    spec = os.environ.get("BLIP2RT_BENCH_DELAY", "")
    if not spec:
        return 0.0
    pattern, _, seconds = spec.rpartition(":")
    return float(seconds) if pattern and pattern in name else 0.0


FUSED_IMPLS = ("fused", "triton", "fused-op", "graphed")
# torch.compile of the torch path: inductor writes (and launches) Triton kernels of its own
COMPILED_IMPLS = ("static-compiled", "compiled")


def skip_compiled_in_quick_mode(impl: str) -> None:
    """CI's quick run skips the torch.compile cases: inductor compiles for minutes on a 2-core CPU
    (tests/test_compiled_training.py checks compiled training against eager there)."""
    if impl == "compiled" and quick_mode():
        import pytest

        pytest.skip("inductor compiles for minutes on the CPU: the quick run checks the eager cases")


def check_path(benchmark, launches: list, expect: tuple[str, ...] = ()) -> None:
    """The case ran what its label says: a fused/triton case launched Triton kernels (every name in
    `expect` among them), any other case launched none. The path goes into extra_info["path"]."""
    impl = (getattr(benchmark, "params", None) or {}).get("impl")
    counts = Counter(one.name for one in launches)
    if impl in COMPILED_IMPLS:
        benchmark.extra_info["path"] = f"torch.compile ({len(counts)} Triton kernels of inductor's)"
        return
    if impl in FUSED_IMPLS:
        assert counts, f"{benchmark.name}: labelled {impl!r}, but no Triton kernel ran"
        missing = sorted(set(expect) - set(counts))
        assert not missing, f"{benchmark.name}: labelled {impl!r}, but {missing} did not run (ran: {sorted(counts)})"
    else:
        assert not counts, f"{benchmark.name}: labelled {impl!r}, yet Triton kernels ran: {sorted(counts)}"
    benchmark.extra_info["path"] = ("triton: " + ", ".join(f"{n} x{c}" for n, c in sorted(counts.items()))
                                    if counts else f"no Triton kernel ({impl or 'torch'})")


def measure(benchmark, step: Callable[[], object], rounds: int = 20, warmup: int = 3,
            device: torch.device | str | None = None, expect: tuple[str, ...] = ()) -> list:
    """Times `step` with benchmark.pedantic; writes peak_mib (CUDA), the device and the path to
    extra_info. The first call (before any timed round, except in quick mode, where the one round is
    it) records its kernel launches and checks them against the case's impl (`check_path`); they
    are returned, for checks of their own."""
    cuda = device is not None and torch.device(device).type == "cuda"
    delay = planted_delay(benchmark.name)
    first: list = []

    def timed():
        if not first:
            with launch.record() as ran:
                step()
            check_path(benchmark, ran, expect)
            first.append(ran)
        else:
            step()
        if cuda:
            torch.cuda.synchronize()
        if delay:
            time.sleep(delay)

    if quick_mode():
        rounds, warmup = 1, 0
    elif cuda:  # compile and autotune outside the measurement, then one step for the peak memory
        timed()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        timed()
        benchmark.extra_info["peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if cuda else "cpu"
    folder = os.environ.get("BLIP2RT_BENCH_PROFILE")
    if folder:
        profile(step, Path(folder) / (re.sub(r"[^\w.=-]+", "_", benchmark.name) + ".json"), cuda)
    return first[0]


def profile(step: Callable[[], object], path: Path, cuda: bool) -> Path:
    """One call of `step` under torch.profiler, saved as a Chrome trace (open it in Perfetto)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch_profile(activities=activities, record_shapes=True) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    prof.export_chrome_trace(str(path))
    return path


def per_second(benchmark, key: str, count: float) -> None:
    """Throughput from the median (e.g. images_per_s, tokens_per_s) into extra_info."""
    benchmark.extra_info[key] = round(count / benchmark.stats.stats.median, 2)
