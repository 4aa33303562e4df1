"""Timing for GPU benchmarks: synchronised inside the timed call, peak memory of one step."""

import torch


def run_timed(benchmark, step, rounds: int = 20, warmup: int = 3) -> float:
    """Times `step` (synchronised), returns the peak CUDA memory of one step in MiB."""

    def synced():
        step()
        torch.cuda.synchronize()

    synced()  # compile and autotune outside the measurement
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    synced()
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    benchmark.pedantic(synced, rounds=rounds, warmup_rounds=warmup, iterations=1)
    return peak_mib
