"""`blip2rt bench`: runs the benchmark suite (benchmarks/, pytest-benchmark), saves and compares
runs, and renders a comparison as a Markdown table and a PNG plot.

    blip2rt bench --save base                 # a baseline: benchmarks/.runs/base.json
    blip2rt bench --compare base --fail-over 10
                                              # run again; fails if a case's median is >10% slower
    blip2rt bench --report new.json --baseline base.json --png cmp.png
    blip2rt bench --profile "caption and tiny and B=1 and eager"
                                              # torch.profiler traces (Chrome/Perfetto JSON)

The suite lives in a source checkout (benchmarks/ beside blip2rt/); GPU cases skip without CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .errors import Blip2rtError
from .json_files import read_json

# The impl that a group's speed-ups are measured against, first found wins: eager PyTorch
# (blip2rt's kernels="torch" path) is the baseline every fast path is compared with.
EAGER_IMPLS = ("eager", "torch")
# What a comparison across machines must agree on for its ratios to mean anything.
MACHINE_KEYS = ("gpu", "gpu_driver", "torch", "triton", "onnxruntime", "transformers", "cpu_count", "quick_mode",
                "cpu_precision")


def suite_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    if not (here / "conftest.py").is_file():
        raise Blip2rtError(f"the benchmark suite is not at {here}: run blip2rt bench from a source checkout "
                           "(git clone, then pip install -e .)")
    return here


def run(select: str | None = None, quick: bool = False, save: str | None = None, compare: str | None = None,
        fail_over: float | None = None, json_out: str | None = None, profile_dir: str | None = None,
        storage: str | None = None, extra: list[str] | None = None) -> int:
    """Runs pytest on the suite; returns its exit code (1 when a compared case regressed)."""
    suite = suite_dir()
    runs = Path(storage) if storage else suite / ".runs"
    runs.mkdir(parents=True, exist_ok=True)
    out = Path(json_out) if json_out else runs / (f"{save}.json" if save else "latest.json")
    cmd = [sys.executable, "-m", "pytest", str(suite), "-p", "no:cacheprovider", "-q", "-rs",
           "--benchmark-columns=median,iqr,rounds", "--benchmark-group-by=group", "--benchmark-sort=name",
           f"--benchmark-json={out}", "-o", "testpaths=benchmarks"]
    if select:
        cmd += ["-k", select]
    baseline = None
    if compare:
        baseline = resolve_run(compare, runs)
        cmd.append(f"--benchmark-compare={baseline}")
        if fail_over is not None:
            cmd.append(f"--benchmark-compare-fail=median:{fail_over:g}%")
    elif fail_over is not None:
        raise Blip2rtError("--fail-over needs --compare (the run to compare against)")
    cmd += extra or []
    env = dict(os.environ)
    if quick:
        env["BLIP2RT_BENCH_QUICK"] = "1"
    if profile_dir:
        env["BLIP2RT_BENCH_PROFILE"] = str(Path(profile_dir).resolve())
    code = subprocess.call(cmd, cwd=suite.parent, env=env)
    if out.is_file():
        print(f"\nsaved: {out}")
        if baseline is not None:
            print()
            print(render_table(load_run(out), load_run(baseline)))
    if profile_dir:
        traces = sorted(Path(profile_dir).glob("*.json"))
        print(f"profiles: {len(traces)} trace(s) in {profile_dir} (open in https://ui.perfetto.dev or chrome://tracing)")
    return code


def resolve_run(name: str, runs: Path) -> Path:
    for candidate in (Path(name), runs / name, runs / f"{name}.json"):
        if candidate.is_file():
            return candidate.resolve()
    saved = ", ".join(sorted(p.stem for p in runs.glob("*.json"))) or "none"
    raise Blip2rtError(f"no saved benchmark run {name!r} (a JSON file, or a name in {runs}: {saved})")


def load_run(path: str | Path) -> dict:
    path = Path(path)
    data = read_json(path, "benchmark run")
    if "benchmarks" not in data:
        raise Blip2rtError(f"{path} is not a pytest-benchmark JSON file (no 'benchmarks')")
    return data


def cases(run_data: dict) -> dict[str, dict]:
    """fullname -> {group, impl, median (s), extra}"""
    out = {}
    for b in run_data["benchmarks"]:
        impl = (b.get("params") or {}).get("impl", "")
        out[b["fullname"]] = {"group": b.get("group") or b["name"], "impl": str(impl), "median": b["stats"]["median"],
                              "name": b["name"], "extra": b.get("extra_info", {})}
    return out


def speedups(run_cases: dict[str, dict]) -> dict[str, float | None]:
    """fullname -> eager median / this median, within the case's group (None without an eager case)."""
    eager: dict[str, float] = {}
    for impl in reversed(EAGER_IMPLS):  # the first in EAGER_IMPLS wins
        for c in run_cases.values():
            if c["impl"] == impl:
                eager[c["group"]] = c["median"]
    return {k: (eager[c["group"]] / c["median"] if c["group"] in eager and c["median"] > 0 else None)
            for k, c in run_cases.items()}


def machine_warnings(new: dict, base: dict) -> list[str]:
    a = (new.get("machine_info") or {}).get("blip2rt", {})
    b = (base.get("machine_info") or {}).get("blip2rt", {})
    diffs = [f"{k}: {b.get(k)!r} -> {a.get(k)!r}" for k in MACHINE_KEYS if a.get(k) != b.get(k)]
    cpu_a = (new.get("machine_info") or {}).get("cpu", {}).get("brand_raw")
    cpu_b = (base.get("machine_info") or {}).get("cpu", {}).get("brand_raw")
    if cpu_a != cpu_b:
        diffs.append(f"cpu: {cpu_b!r} -> {cpu_a!r}")
    return diffs


def render_table(new: dict, base: dict | None = None) -> str:
    """Markdown: per case the median, the speed-up over eager in the same run, the median's multiple
    of its floor where the case recorded one (`x_floor`: bandwidth or FLOPs, benchmarks/kernel_floors.py
    and floors.py) and, with a baseline, the change of the median against it (+ is slower)."""
    now = cases(new)
    up = speedups(now)
    old = cases(base) if base else {}
    lines = []
    if base is not None:
        for w in machine_warnings(new, base):
            lines.append(f"WARNING: the runs come from different machines or versions ({w}); compare with care")
        commit = lambda d: (d.get("machine_info") or {}).get("blip2rt", {}).get("blip2rt_commit")  # noqa: E731
        lines.append(f"baseline {commit(base)} ({base.get('datetime', '?')}) -> now {commit(new)} "
                     f"({new.get('datetime', '?')})")
        lines.append("")
    floors = any("x_floor" in c["extra"] for c in now.values())
    head = "| group | impl | median | vs eager |" + (" x floor |" if floors else "") + (" baseline | change |" if base else "")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for k, c in sorted(now.items(), key=lambda kv: (kv[1]["group"], kv[1]["impl"])):
        row = f"| {c['group']} | {c['impl'] or c['name']} | {_ms(c['median'])} | " + (
            f"{up[k]:.2f}x |" if up[k] is not None else "- |")
        if floors:
            row += f" {c['extra']['x_floor']:.2f} |" if "x_floor" in c["extra"] else " - |"
        if base is not None:
            if k in old:
                change = c["median"] / old[k]["median"] - 1
                row += f" {_ms(old[k]['median'])} | {change:+.1%} |"
            else:
                row += " - | new |"
        lines.append(row)
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def render_png(new: dict, path: str | Path, base: dict | None = None) -> Path:
    """Bar charts: the speed-up over eager per case and, with a baseline, the change per case."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise Blip2rtError("the PNG plot needs matplotlib: pip install matplotlib (or blip2rt[bench])") from None
    now = cases(new)
    up = speedups(now)
    keys = sorted((k for k in now if up[k] is not None and now[k]["impl"] not in EAGER_IMPLS),
                  key=lambda k: (now[k]["group"], now[k]["impl"]))
    labels = [f"{now[k]['group']} [{now[k]['impl']}]" for k in keys]
    old = cases(base) if base else {}
    panels = 2 if base else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 0.35 * max(len(labels), 4) + 1.5), squeeze=False)
    ax = axes[0][0]
    ax.barh(range(len(keys)), [up[k] for k in keys], color=["tab:green" if up[k] >= 1 else "tab:red" for k in keys])
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(range(len(keys)), labels, fontsize=7)
    ax.set_xlabel("speed-up over eager PyTorch (same run, medians)")
    ax.invert_yaxis()
    if base:
        ax2 = axes[0][1]
        both = sorted((k for k in now if k in old), key=lambda k: (now[k]["group"], now[k]["impl"]))
        change = [100 * (now[k]["median"] / old[k]["median"] - 1) for k in both]
        ax2.barh(range(len(both)), change, color=["tab:red" if c > 0 else "tab:green" for c in change])
        ax2.axvline(0.0, color="black", lw=0.8)
        ax2.set_yticks(range(len(both)), [f"{now[k]['group']} [{now[k]['impl'] or now[k]['name']}]" for k in both],
                       fontsize=7)
        ax2.set_xlabel("median change vs baseline, % (+ is slower)")
        ax2.invert_yaxis()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(run_path: str, baseline: str | None = None, png: str | None = None, md: str | None = None) -> str:
    new = load_run(run_path)
    base = load_run(baseline) if baseline else None
    text = render_table(new, base)
    if md:
        Path(md).write_text(text + "\n")
    if png:
        render_png(new, png, base)
    return text

