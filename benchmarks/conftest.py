"""Benchmarks: GPU cases skip cleanly without CUDA; every saved run carries the machine it ran on."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

# `python -m pytest` puts the repository root first on sys.path, where the source folder blip2rt/
# (without its kernels/, training/ and export/ subpackages) would shadow the installed package
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402

from blip2rt.precision import training_precision  # noqa: E402


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(*cmd: str) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def blip2rt_machine_info() -> dict:
    """What a comparison across runs must agree on (blip2rt bench report warns when it does not)."""
    info = {
        "blip2rt_commit": _run("git", "rev-parse", "--short", "HEAD"),
        "blip2rt_dirty": bool(_run("git", "status", "--porcelain", "--untracked-files=no")),
        "torch": torch.__version__, "triton": _version("triton"), "onnxruntime": _version("onnxruntime"),
        "transformers": _version("transformers"), "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "quick_mode": os.environ.get("BLIP2RT_BENCH_QUICK", "") == "1",
        "gpu": None, "gpu_driver": None, "cuda": torch.version.cuda,
        # what the CPU step cases' "auto" precision means here, and why
        "cpu_precision": training_precision("cpu").describe(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_driver"] = _run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["blip2rt"] = blip2rt_machine_info()
