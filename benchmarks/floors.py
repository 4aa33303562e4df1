"""The memory-bandwidth floor of decoding: each new token reads every LLM weight once, so a decode
step costs at least (LLM weight bytes) / (copy bandwidth), and a caption (tokens x LLM bytes +
the vision tower's bytes once) / (copy bandwidth). The bandwidth is measured on the machine: a
large copy, its bytes read plus written over the median time."""

from __future__ import annotations

import functools
import statistics
import time

import numpy as np
import torch


@functools.lru_cache(maxsize=1)
def cpu_copy_bandwidth(mib: int = 512, repeats: int = 7) -> float:
    """Bytes/s of a host memory copy (read + write counted), the median of `repeats`."""
    a = np.ones(mib * 2**20 // 4, np.float32)
    b = np.empty_like(a)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t0)
    return 2 * a.nbytes / statistics.median(times[1:])


def cuda_copy_bandwidth(device, gib: float = 2.0, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), the median of `repeats`."""
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * a.numel() * a.element_size() / statistics.median(times[1:])


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters, a tied weight counted once."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def llm_bytes(model, rt=None) -> int:
    """The LLM's weight bytes one token reads: the PyTorch model's parameters, or, given an
    OrtBlip2 (whose weights may be quantised), its static_lm.onnx's initializers (the prefill/decode
    graphs hold the same weights; the decode graph adds the embedding table, read a row a token)."""
    import onnx

    from blip2rt.export.graph_files import weight_bytes as graph_bytes

    if rt is None:
        return weight_bytes(model.language_model)
    return graph_bytes(onnx.load(str(rt.dir / rt.cfg.graphs["static_lm"]), load_external_data=False))


def decode_floor_seconds(model, bandwidth: float, rt=None) -> float:
    return llm_bytes(model, rt) / bandwidth


def caption_floor_seconds(model, new_tokens: int, bandwidth: float, rt=None) -> float:
    return (new_tokens * llm_bytes(model, rt) + weight_bytes(model.vision_model)) / bandwidth


def record_floor(benchmark, floor_s: float, bandwidth: float) -> None:
    """extra_info: the measured bandwidth, the floor, and the median's multiple of it."""
    benchmark.extra_info.update(copy_bandwidth_gb_s=round(bandwidth / 1e9, 1), floor_ms=round(1e3 * floor_s, 2),
                                x_floor=round(benchmark.stats.stats.median / floor_s, 2))
