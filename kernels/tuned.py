"""Launch configurations measured fastest on a GPU architecture: one table per architecture, with the
machine and date it was measured on (`tuned_configs.json` beside this file).

`make gpu-tune` (benchmarks/gpu_tune.py) writes it on the device: for each kernel at the benchmark
shapes it sweeps tiles, warps and stages, compiles every candidate through the compile gate first
(one that spills, or keeps fewer blocks per SM than its floor, is never launched), times the rest,
and keeps the fastest. The table is never edited by hand. A launcher asks `lookup` for its key; where
the table holds none (every architecture today, until gpu-tune has run there) it keeps its own choice,
which the compile gate checks.

Keys name the kernel's role and shape, e.g. "attention.backward:32x257x64:bfloat16:dropout".
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("tuned_configs.json")
VERSION = 1

_TABLE: dict | None = None
_TRYING: dict[str, dict] = {}  # gpu-tune's candidate under test, ahead of the table


def attention_key(backward: bool, lq: int, lk: int, d: int, dtype_name: str, dropout: bool, causal: bool) -> str:
    """Lq rows against Lk keys at head dim d: the benchmark shapes gpu-tune times, e.g. cross-attention's
    "attention.backward:32x257x64:bfloat16:dropout"."""
    role = "backward" if backward else "forward"
    return (f"attention.{role}:{lq}x{lk}x{d}:{dtype_name}:{'dropout' if dropout else 'plain'}"
            f"{':causal' if causal else ''}")


def layer_norm_key(d: int, dtype_name: str, dropout: bool) -> str:
    return f"layer_norm.backward:{d}:{dtype_name}:{'dropout' if dropout else 'plain'}"


def ce_rows_key(vocab: int, dtype_name: str) -> str:
    return f"ce_rows:{vocab}:{dtype_name}"


def load(path: Path = TABLE_PATH) -> dict:
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable tuned-config table: {e}") from e
    if table.get("version") != VERSION or not isinstance(table.get("archs"), dict):
        raise ValueError(f"{path}: a tuned-config table has version {VERSION} and 'archs'; got {sorted(table)}")
    for arch, entry in table["archs"].items():
        if not {"machine", "date", "configs"} <= set(entry):
            raise ValueError(f"{path}: arch {arch} needs machine, date and configs")
    return table


def table() -> dict:
    global _TABLE
    if _TABLE is None:
        _TABLE = load(TABLE_PATH) if TABLE_PATH.is_file() else {"version": VERSION, "archs": {}}
    return _TABLE


def lookup(arch: int, key: str) -> dict | None:
    """The tuned configuration of `key` on `arch` (a candidate under test first), or None."""
    if key in _TRYING:
        return _TRYING[key]
    entry = table()["archs"].get(str(arch))
    return None if entry is None else entry["configs"].get(key)


@contextlib.contextmanager
def trying(key: str, config: dict):
    """Within the block, `lookup(.., key)` gives `config` on any architecture (gpu-tune's sweep). The
    launchers' kept plans are dropped on entry and exit, so they plan with it, then without it."""
    from .launch import forget_plans

    forget_plans()
    _TRYING[key] = config
    try:
        yield
    finally:
        del _TRYING[key]
        forget_plans()


def write(path: Path, arch: int, machine: str, configs: dict[str, dict]) -> dict:
    """Adds (or replaces) one architecture's configurations in the table at `path`, atomically."""
    out = load(path) if Path(path).is_file() else {"version": VERSION, "archs": {}}
    out["archs"][str(arch)] = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "configs": configs}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(f.name, path)
    return out
