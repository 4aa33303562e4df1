"""What `gpu_check.py` runs in the python it installed blip2rt into: one probe per subcommand, each
printing one line `RESULT <json>` last.

    python benchmarks/gpu_probes.py machine            the GPU, its limits and the versions
    python benchmarks/gpu_probes.py render RUN.json    a saved benchmark run as a table and per-case figures
    python benchmarks/gpu_probes.py llm-attention      which CUDA kernels run the LLM's attention
"""

from __future__ import annotations

import importlib
import json
import platform
import sys


def machine() -> dict:
    import torch
    import triton

    p = torch.cuda.get_device_properties(0)
    info = dict(gpu=torch.cuda.get_device_name(), sm=f"{p.major}{p.minor}", sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1), python=platform.python_version(), torch=torch.__version__,
                cuda=torch.version.cuda, triton=triton.__version__)
    for package in ("transformers", "onnxruntime", "pytest_benchmark"):
        try:
            info[package] = importlib.import_module(package).__version__
        except ImportError:
            info[package] = None
    return info


def render(path: str) -> dict:
    from blip2rt.bench import cases, load_run, render_table, speedups

    data = load_run(path)
    now = cases(data)
    ups = speedups(now)
    return {"table": render_table(data),
            "cases": {c["name"]: {"group": c["group"], "impl": c["impl"], "median_ms": round(c["median"] * 1e3, 4),
                                  "vs_eager": None if ups[k] is None else round(ups[k], 3), "extra": c["extra"]}
                      for k, c in now.items()}}


def llm_attention() -> dict:
    """The CUDA kernels of one forward of OPT-2.7B's LLM at its shapes (bf16, 2 x 64 tokens) whose names
    say attention: FlashAttention, cuDNN's fused attention, or a plain softmax."""
    import torch

    from blip2rt.llm import attention_implementation, build_language_model
    from blip2rt.presets import preset_config

    cfg = preset_config("blip2-opt-2.7b").text_config
    with torch.device("cuda"):
        lm = build_language_model(cfg, torch.device("cuda"), torch.bfloat16).eval()
    ids = torch.randint(3, 1000, (2, 64), device="cuda")
    with torch.no_grad():
        lm(input_ids=ids)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            lm(input_ids=ids)
            torch.cuda.synchronize()
    names = sorted({e.key for e in prof.key_averages()})
    attention = [n for n in names if any(s in n.lower() for s in ("flash", "fmha", "attention", "softmax"))]
    return dict(attn_implementation=attention_implementation(lm), kernels=attention)


PROBES = {"machine": machine, "render": render, "llm-attention": llm_attention}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in PROBES:
        print(__doc__, file=sys.stderr)
        return 2
    print("RESULT " + json.dumps(PROBES[argv[0]](*argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
