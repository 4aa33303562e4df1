"""Host time against device time per step, for the fused and the torch Q-Former paths.

On an H200 the fused path was slower than the torch one at the paper's sizes, and slower at
B = 1 than at B = 32, which points at host time (benchmarks/RESULTS.md). This settles it: for each
case, the wall time of a step (median, synchronised), the summed time of the CUDA kernels it
launched (from torch.profiler) and their count. A step whose kernels fill a small part of its wall
time is host-bound. `make gpu-check` runs it as one step; it prints one `RESULT {json}` line.

    python benchmarks/host_device_split.py [--device cuda] [--preset blip2-itm-vit-g]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention_cases import qformer_forward_case  # noqa: E402
from training_kernel_cases import CASES, PAPER_SHAPES, TINY_SHAPES  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def wall_ms(step, device: torch.device, rounds: int) -> float:
    """Median wall ms of one step, the device synchronised after each, after 3 warm-up steps."""
    for _ in range(3):
        step()
    sync(device)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def kernel_times(step, device: torch.device, calls: int):
    """torch.profiler over `calls` steps: (the profile, its CUDA kernel events, microseconds by kernel name)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            step()
        sync(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_name = Counter()
    for e in kernels:
        per_name[e.name] += e.time_range.elapsed_us()
    return prof, kernels, per_name


def split(step, device: torch.device, rounds: int = 10, profiled: int = 3) -> dict:
    """Wall ms per step (median of `rounds`), CUDA kernel ms per step and kernels per step."""
    wall = wall_ms(step, device, rounds)
    _, kernels, per_name = kernel_times(step, device, profiled)
    if device.type == "cuda" and not kernels:  # a profiler that gave no kernel events: say so, guess nothing
        return dict(wall_ms=round(wall, 3), kernel_ms=None, note="no CUDA kernel events in the profile")
    kernel_ms = sum(per_name.values()) / profiled / 1e3
    return dict(wall_ms=round(wall, 3), kernel_ms=round(kernel_ms, 3), kernels_per_step=len(kernels) / profiled,
                device_busy=round(kernel_ms / wall, 3) if wall else None,
                top_kernels=[(name[:90], round(us / profiled, 1)) for name, us in per_name.most_common(5)])


def cases(device: torch.device, preset: str, fused: bool) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    impls = ["fused", "torch"] if fused else ["torch"]
    out = {}
    for batch, backward in ((1, False), (32, True)):
        for impl in impls:
            name = f"qformer B={batch} {'fwd+bwd' if backward else 'fwd'} {impl}"
            out[name] = qformer_forward_case(impl, device, dtype, preset, batch=batch, backward=backward)
    shapes = PAPER_SHAPES if device.type == "cuda" else TINY_SHAPES
    for impl in (["fused", "eager"] if fused else ["eager"]):
        out[f"layer_norm fwd+bwd {impl}"] = CASES["layer_norm"](impl, device, dtype, **shapes["layer_norm"]).step
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="blip2-itm-vit-g", help="the Q-Former's preset (tiny for a CPU smoke run)")
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    results = {}
    for name, step in cases(device, args.preset, fused=device.type == "cuda").items():
        results[name] = split(step, device, rounds=args.rounds)
        print(name, json.dumps(results[name]), flush=True)
    print("RESULT " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
