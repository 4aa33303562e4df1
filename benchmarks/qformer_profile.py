"""The Q-Former alone, profiled per path and batch size: what `make gpu-check ARGS="--only profile"` runs.

For the fused (Triton) and the torch path at B = 1, 32 and 128 (paper shapes: ViT-g tokens, BERT-base
Q-Former, bf16), the forward:
- eager wall time: the median of synchronised calls;
- graph-replay time: the same forward captured as one CUDA graph and replayed, timed by CUDA events
  (device time only: what is left once the host is off the path);
- a per-kernel torch.profiler table (self device time, calls), written to DIR/<case>.txt;
- a Perfetto / Chrome trace, DIR/<case>.json (open it in https://ui.perfetto.dev).
It prints one `RESULT {json}` line: per case, eager ms, replay ms, kernels a call and the top kernels.
On a CPU (a smoke run, `--device cpu --preset tiny`) there is no graph replay.

    python benchmarks/qformer_profile.py DIR [--device cuda] [--preset blip2-itm-vit-g] [--batches 1 32 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention_cases import qformer_forward_case  # noqa: E402
from host_device_split import kernel_times, wall_ms  # noqa: E402


def replay_ms(step, rounds: int) -> float:
    """The step captured as one CUDA graph (warmed up on a side stream first), replays timed by events."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(rounds):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def profile(step, device: torch.device, out: Path, name: str, calls: int = 3) -> dict:
    """torch.profiler over `calls` steps: the table and the trace to files; kernels a call and the top 5."""
    prof, device_events, per_kernel = kernel_times(step, device, calls)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    (out / f"{name}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=30))
    prof.export_chrome_trace(str(out / f"{name}.json"))
    return {"kernels_per_call": len(device_events) / calls,
            "top_kernels": [(k[:90], round(us / calls, 1)) for k, us in per_kernel.most_common(5)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder for the tables and traces")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="blip2-itm-vit-g")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)
    impls = ["fused", "torch"] if device.type == "cuda" else ["torch"]
    results = {}
    for batch in args.batches:
        for impl in impls:
            name = f"qformer-fwd-B{batch}-{impl}"
            step = qformer_forward_case(impl, device, dtype, args.preset, batch=batch)
            r = {"eager_ms": round(wall_ms(step, device, args.rounds), 3)}
            if device.type == "cuda":
                try:
                    r["replay_ms"] = round(replay_ms(step, args.rounds), 3)
                except RuntimeError as e:  # a path that cannot be captured: say so, and go on
                    r["replay_error"] = str(e).splitlines()[0][:200]
            r.update(profile(step, device, args.out, name))
            results[name] = r
            print(name, json.dumps(r), flush=True)
    print("RESULT " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
