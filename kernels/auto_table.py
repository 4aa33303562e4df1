"""`kernels="auto"`: per op and shape class, the path measured faster on this GPU's architecture.

The table (`auto_table.json` beside this file) holds, per architecture ("90" for sm_90), the
machine and date it was measured on, and per op and shape class "triton" or "torch". It is written
from the kernel benchmarks' pytest-benchmark JSON by this module's command (gpu-check runs it and
leaves the table in its output folder, to be committed), never by hand. An architecture it does not
hold, an op or a shape class it does not name, runs the torch path.

Shape classes: attention by pass and batch ("fwd, B<=8", "fwd, B>8", "fwd+bwd, B<=8",
"fwd+bwd, B>8"); the other ops one class ("all"), as they are benchmarked at the paper's sizes only.
A class goes to Triton only if the fused case beat the torch path in every benchmark of the class.

    python -m blip2rt.kernels.auto_table kernels.json --machine "NVIDIA H200" --write OUT/auto_table.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("auto_table.json")
VERSION = 1
SMALL_BATCH = 8
# the benchmarks (benchmarks/test_attention_kernels.py, test_training_kernels.py) that decide each op:
# op -> (test name, the op's name in its params or None, the impl that is blip2rt's torch path)
SOURCES = {
    "attention": ("test_attention", None, "sdpa"),
    "residual_layer_norm": ("test_training_kernel", "layer_norm", "eager"),
    "query_max_similarity": ("test_training_kernel", "itc", "eager"),
    "linear_cross_entropy": ("test_training_kernel", "linear_ce", "eager"),
}


def attention_class(backward: bool, batch: int) -> str:
    return f"{'fwd+bwd' if backward else 'fwd'}, B{'<=' if batch <= SMALL_BATCH else '>'}{SMALL_BATCH}"


def shape_class(op: str, args: tuple, needs_grad: bool) -> str:
    """The class of one call: attention's (q first among the args) by pass and batch, the others one class."""
    if op == "attention":
        return attention_class(needs_grad, args[0].shape[0])
    return "all"


def decide(benchmarks: list[dict]) -> dict[str, dict[str, str]]:
    """op -> shape class -> "triton" | "torch", from pytest-benchmark's "benchmarks" list. A class with a
    fused median and a torch-path median for the same case, in every case of the class, is decided;
    Triton only where it was faster in all of them."""
    medians: dict[tuple, dict[str, float]] = {}
    for b in benchmarks:
        test = b["name"].split("[")[0]
        params = b.get("params") or {}
        for op, (source, name, torch_impl) in SOURCES.items():
            if test != source or (name is not None and params.get("op") != name):
                continue
            cls = attention_class(bool(params["backward"]), int(params["batch"])) if op == "attention" else "all"
            case = (op, cls, params.get("kind"), params.get("batch"), params.get("backward"))
            impl = params.get("impl")
            if impl in ("fused", torch_impl):
                medians.setdefault(case, {})["fused" if impl == "fused" else "torch"] = b["stats"]["median"]
    table: dict[str, dict[str, str]] = {}
    wins: dict[tuple, list[bool]] = {}
    for (op, cls, *_), pair in medians.items():
        if len(pair) == 2:
            wins.setdefault((op, cls), []).append(pair["fused"] < pair["torch"])
    for (op, cls), won in sorted(wins.items()):
        table.setdefault(op, {})[cls] = "triton" if all(won) else "torch"
    return table


def write(path: Path, arch: int, machine: str, ops: dict, source: str) -> dict:
    """Adds (or replaces) one architecture's entry in the table at `path`, atomically; the others stay."""
    table = load(path) if path.is_file() else {"version": VERSION, "archs": {}}
    table["archs"][str(arch)] = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "source": source, "ops": ops}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(f.name, path)
    return table


def load(path: Path = TABLE_PATH) -> dict:
    """The table, checked: a malformed one is an error that names the file, not a silent fallback."""
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable kernels auto table: {e}") from e
    if table.get("version") != VERSION or not isinstance(table.get("archs"), dict):
        raise ValueError(f"{path}: a kernels auto table has version {VERSION} and 'archs'; got {sorted(table)}")
    for arch, entry in table["archs"].items():
        for op, classes in entry.get("ops", {}).items():
            bad = {c: v for c, v in classes.items() if v not in ("triton", "torch")}
            if op not in SOURCES or bad:
                raise ValueError(f"{path}: arch {arch}: {op!r} {bad or 'is not an op'}")
    return table


_LOADED: dict[str, dict] = {}


def table() -> dict:
    """The checked-in table, read once."""
    key = str(TABLE_PATH)
    if key not in _LOADED:
        _LOADED[key] = load(TABLE_PATH) if TABLE_PATH.is_file() else {"version": VERSION, "archs": {}}
    return _LOADED[key]


def measured(arch: int, given: dict | None = None) -> bool:
    """Whether the table holds this architecture."""
    return str(arch) in (given or table())["archs"]


def choose(op: str, arch: int, cls: str, given: dict | None = None) -> str:
    """"triton" or "torch" for one call's op, architecture and shape class."""
    entry = (given or table())["archs"].get(str(arch))
    if entry is None:
        return "torch"
    return entry["ops"].get(op, {}).get(cls, "torch")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blip2rt.kernels.auto_table", description=__doc__.split("\n\n")[0])
    ap.add_argument("benchmark_json", help="pytest-benchmark JSON of the kernel benchmarks, run on the GPU")
    ap.add_argument("--write", required=True, help="the table to add this GPU's entry to")
    ap.add_argument("--arch", type=int, help="compute capability, e.g. 90 (default: this machine's GPU)")
    ap.add_argument("--machine", help="the GPU's name (default: from the JSON's machine_info or this GPU)")
    args = ap.parse_args(argv)
    data = json.loads(Path(args.benchmark_json).read_text())
    arch, machine = args.arch, args.machine
    if arch is None or machine is None:
        import torch

        if not torch.cuda.is_available():
            print("auto_table: give --arch and --machine without a GPU", file=sys.stderr)
            return 2
        major, minor = torch.cuda.get_device_capability()
        arch = arch or major * 10 + minor
        machine = machine or torch.cuda.get_device_name()
    ops = decide(data["benchmarks"])
    if not ops:
        print(f"auto_table: {args.benchmark_json} holds no fused/torch pair of the kernel benchmarks", file=sys.stderr)
        return 1
    write(Path(args.write), arch, machine, ops, Path(args.benchmark_json).name)
    print(json.dumps({"arch": arch, "machine": machine, "ops": ops}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
