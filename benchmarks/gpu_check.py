"""`make gpu-check OUT=dir`: the one prepared check for a CUDA machine, in at most 7 minutes.

It assumes a machine that already has torch, triton and transformers (the device image: torch
2.11, triton 3.6, transformers 5.17, pytest, pytest-benchmark), and changes none of them:
blip2rt goes into a throwaway virtual environment that sees the machine's packages
(`--system-site-packages`, `pip install --no-deps --no-build-isolation -e .`); if that venv cannot
be used, blip2rt is installed into a folder on PYTHONPATH instead, and the summary says which. What
runs inside that python (the machine probe, rendering a benchmark run, the LLM's attention
kernels) is `gpu_probes.py`.

Steps, most important first; each has a time cap and the whole a deadline, and each writes its
results into OUT as soon as it ends, so a call cut off by its limit still returns what finished:

1. kernel correctness: every GPU test (`pytest -m gpu tests/`), pass/fail per test;
2. kernel ratios: the fused kernels vs eager at the paper's shapes (benchmarks, saved);
3. host vs device: wall time against summed CUDA kernel time per step, fused and torch;
4. the training steps (stage 1 and 2) at the paper's shapes;
5. caption latency: ViT-g + OPT-2.7B, B = 1 and 8, against transformers and the bandwidth floor,
   and the LLM's attention kernels by name, from a profile (FlashAttention or not);
6. ONNX Runtime on CUDA, when onnxruntime-gpu is importable (see `make ort-gpu-parts`).

OUT gets summary.md (ready to paste into RESULTS.md), summary.json and details.tar.gz (one log
per step and the benchmark JSON files). Exit status: 0 when every step ran and every test passed.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 400  # of the 7 minutes; the rest is the summary and a margin
ORT_GPU_DIR = "/tmp/blip2rt-ort-gpu"  # where the ort-gpu-parts commands install onnxruntime-gpu
# (name, seconds cap): the order is the priority
STEPS = [("install", 60), ("gpu tests", 170), ("kernel benchmarks", 130), ("host vs device", 60),
         ("train steps", 90), ("caption latency", 80), ("llm attention kernels", 40), ("onnxruntime cuda", 60)]


def no_cuda_reason() -> str | None:
    """Why this machine cannot run the check, or None. Answers at once where there is no driver."""
    if shutil.which("nvidia-smi") is None and not Path("/proc/driver/nvidia").exists():
        return "no NVIDIA driver on this machine (no nvidia-smi)"
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"torch does not import here ({probe.stderr.strip().splitlines()[-1] if probe.stderr else '?'})"
    if probe.stdout.strip() != "True":
        return "torch.cuda.is_available() is False"
    return None


class Check:
    def __init__(self, out: Path, budget: float):
        self.out = out
        # logs and benchmark JSON: packed into OUT/details.tar.gz after every step (the device tool
        # brings back 8 files at most, so OUT holds three)
        self.details = Path(tempfile.mkdtemp(prefix="blip2rt-gpu-check-"))
        atexit.register(shutil.rmtree, self.details, True)  # packed into OUT after every step
        self.start = time.monotonic()
        self.deadline = self.start + budget
        self.summary: dict = {"steps": {}, "machine": {}, "tests": {}, "benchmarks": {}}
        self.python = sys.executable
        self.env = dict(os.environ)

    # ---- bookkeeping ----

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, step: str, **fields) -> None:
        self.summary["steps"].setdefault(step, {}).update(fields)
        self.write()

    def write(self) -> None:
        """summary.json, summary.md and details.tar.gz, replaced atomically after every step."""
        for name, text in (("summary.json", json.dumps(self.summary, indent=1)), ("summary.md", self.markdown())):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(self.out / name)
        tmp = self.out / ".details.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(self.details, arcname="details")
        tmp.replace(self.out / "details.tar.gz")

    def run(self, step: str, cmd: list[str], cap: float, env: dict | None = None,
            on_line=None) -> tuple[int | None, str]:
        """Runs cmd with its output in OUT/<step>.log; None as the code when it was cut off."""
        timeout = min(cap, self.left())
        log_path = self.details / (re.sub(r"\W+", "-", step) + ".log")
        if self.left() < 5:
            self.record(step, status="skipped: no time left", seconds=0)
            return None, ""
        started = time.monotonic()
        lines = []
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
            cut = threading.Event()

            def cut_off():  # the watchdog: a step that hangs without output is still stopped on time
                cut.set()
                os.killpg(proc.pid, signal.SIGKILL)

            timer = threading.Timer(timeout, cut_off)
            timer.start()
            try:
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    lines.append(line)
                    if on_line:
                        on_line(line)
                code = proc.wait()
            finally:
                timer.cancel()
            if cut.is_set():
                code = None
                log.write(f"\n[gpu-check] cut off after {timeout:.0f} s\n")
        seconds = round(time.monotonic() - started, 1)
        status = "cut off at its time cap" if code is None else ("ok" if code == 0 else f"exit {code}")
        self.record(step, status=status, seconds=seconds, log=log_path.name)
        return code, "".join(lines)

    # ---- steps ----

    def probe(self, name: str, *args: str, timeout: float = 120) -> tuple[dict | None, str]:
        """One probe of gpu_probes.py in the installed python: its RESULT, or None and what it printed."""
        got = subprocess.run([self.python, str(ROOT / "benchmarks" / "gpu_probes.py"), name, *args], capture_output=True,
                             text=True, timeout=timeout, env=self.env, cwd=ROOT)
        found = [line for line in got.stdout.splitlines() if line.startswith("RESULT ")]
        return (json.loads(found[-1][len("RESULT "):]) if found else None), got.stdout[-1000:] + got.stderr[-1000:]

    def machine(self) -> None:
        info, output = self.probe("machine")
        info = info or {"error": output[-500:]}
        smi = shutil.which("nvidia-smi")
        if smi:
            info["driver"] = subprocess.run([smi, "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                             "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip() or None
        self.summary["machine"] = info
        self.write()

    def install(self) -> None:
        """A venv over the machine's packages with blip2rt editable, no deps. Else (pip fails, or the venv
        does not see the machine's packages): blip2rt installed into a folder put on PYTHONPATH."""
        import venv

        env_dir = Path(tempfile.gettempdir()) / "blip2rt-gpu-check-venv"
        shutil.rmtree(env_dir, ignore_errors=True)
        venv.create(env_dir, system_site_packages=True, with_pip=True)
        python = env_dir / "bin" / "python"
        # where the machine's python is itself a venv, --system-site-packages reaches only the base
        # interpreter's packages: a .pth file adds the machine's own site-packages
        own_site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                                  capture_output=True, text=True).stdout.strip()
        Path(own_site, "machine-packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
        code, _ = self.run("install", [str(python), "-m", "pip", "install", "--quiet", "--no-deps",
                                       "--no-build-isolation", "--no-index", "-e", str(ROOT)],
                           cap=dict(STEPS)["install"])
        imports = ["-c", "import torch, triton, transformers, pytest, pytest_benchmark, blip2rt.kernels"]
        if code == 0 and subprocess.run([str(python), *imports], capture_output=True).returncode == 0:
            self.python = str(python)
            self.record("install", method="pip install --no-deps --no-build-isolation -e . (venv over the "
                                          "machine's site-packages)")
            return
        target = Path(tempfile.gettempdir()) / "blip2rt-gpu-check-site"
        shutil.rmtree(target, ignore_errors=True)
        code, _ = self.run("install (fallback)", [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                                                  "--no-build-isolation", "--no-index", "--target", str(target),
                                                  str(ROOT)], cap=dict(STEPS)["install"])
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), self.env.get("PYTHONPATH")]))
        self.record("install", status="ok (fallback)" if code == 0 else "failed",
                    method=f"the venv could not be used (see install.log); blip2rt installed into {target}, "
                           "on PYTHONPATH")

    def gpu_tests(self, files: list[str] | None = None) -> int | None:
        results = self.summary["tests"]

        def on_line(line: str) -> None:
            m = re.match(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", line)
            if m:
                results[m.group(1)] = m.group(2)
                self.write()

        # only the files with GPU tests: collecting the rest would import what the GPU image may lack
        files = files or sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                                if "pytest.mark.gpu" in p.read_text())
        code, _ = self.run("gpu tests", [self.python, "-m", "pytest", "-m", "gpu", *files, "-v", "-rfE",
                                         "-p", "no:cacheprovider", "-o", "addopts="],
                           cap=dict(STEPS)["gpu tests"], on_line=on_line)
        return code

    def benchmark(self, step: str, select: list[str], keyword: str | None = None) -> None:
        out = self.details / (re.sub(r"\W+", "-", step) + ".json")
        cmd = [self.python, "-m", "pytest", *select, "-p", "no:cacheprovider", "-q", "-rs", "-o",
               "testpaths=benchmarks", "--benchmark-columns=median,iqr,rounds", "--benchmark-group-by=group",
               f"--benchmark-json={out}"] + (["-k", keyword] if keyword else [])
        self.run(step, cmd, cap=dict(STEPS)[step])
        if not out.is_file():
            return
        result, output = self.probe("render", str(out))
        if result is not None:
            self.summary["benchmarks"][step] = result
            self.write()
        else:
            self.record(step, render_error=output[-500:])

    def host_vs_device(self) -> None:
        """Wall time against summed CUDA kernel time per step, fused and torch (host_device_split.py)."""
        code, text = self.run("host vs device", [self.python, "benchmarks/host_device_split.py"],
                              cap=dict(STEPS)["host vs device"])
        found = [line for line in text.splitlines() if line.startswith("RESULT ")]
        if found:
            self.summary["host_vs_device"] = json.loads(found[-1][len("RESULT "):])
            self.write()

    def llm_attention_kernels(self) -> None:
        """Which CUDA kernels run the LLM's attention (OPT-2.7B's shapes, bf16, 64 tokens)."""
        started = time.monotonic()
        result, output = self.probe("llm-attention", timeout=min(dict(STEPS)["llm attention kernels"], self.left()))
        self.record("llm attention kernels", status="ok" if result else "failed",
                    seconds=round(time.monotonic() - started, 1), **(result or {"output": output[-500:]}))

    def onnxruntime_cuda(self) -> None:
        probe = subprocess.run([self.python, "-c", "import onnxruntime as o; print(o.__version__, "
                                                   "'CUDAExecutionProvider' in o.get_available_providers())"],
                               capture_output=True, text=True, env=self.env)
        if "True" not in probe.stdout:
            self.record("onnxruntime cuda", status=f"skipped: no CUDA provider in onnxruntime ({probe.stdout.strip() or probe.stderr.strip()[-200:]}); "
                                                   "see make ort-gpu-parts")
            return
        self.benchmark("onnxruntime cuda", ["benchmarks/test_ort_gpu.py"])

    # ---- the summary ----

    def markdown(self) -> str:
        m = self.summary["machine"]
        lines = ["# blip2rt gpu-check", "",
                 f"Machine: {m.get('gpu')} (sm_{m.get('sm')}, {m.get('sms')} SMs, {m.get('memory_gib')} GiB), driver "
                 f"{m.get('driver')}; Python {m.get('python')}, torch {m.get('torch')} (CUDA {m.get('cuda')}), triton "
                 f"{m.get('triton')}, transformers {m.get('transformers')}, onnxruntime {m.get('onnxruntime')}, "
                 f"pytest-benchmark {m.get('pytest_benchmark')}. Commit {m.get('commit')}. Command: `make gpu-check`.",
                 f"Elapsed: {time.monotonic() - self.start:.0f} s.", "", "## Steps", "",
                 "| step | status | seconds | notes |", "|---|---|---|---|"]
        for name, s in self.summary["steps"].items():
            notes = {k: v for k, v in s.items() if k not in ("status", "seconds", "log")}
            lines.append(f"| {name} | {s.get('status')} | {s.get('seconds', '')} | "
                         f"{json.dumps(notes) if notes else ''} |")
        tests = self.summary["tests"]
        if tests:
            counts = {}
            for v in tests.values():
                counts[v] = counts.get(v, 0) + 1
            lines += ["", f"## GPU tests: {', '.join(f'{n} {k.lower()}' for k, n in sorted(counts.items()))}", ""]
            lines += [f"- {k}: {v}" for k, v in tests.items() if v != "PASSED"] or ["- every test passed"]
            lines += ["", "<details><summary>every test</summary>", ""]
            lines += [f"- {k}: {v}" for k, v in tests.items()] + ["", "</details>"]
        for step, b in self.summary["benchmarks"].items():
            lines += ["", f"## {step}", "", b["table"]]
            extras = {n: c["extra"] for n, c in b["cases"].items()
                      if any(k in c["extra"] for k in ("x_floor", "floor_ms", "mfu", "peak_mib"))}
            if extras:
                lines += ["", "extra_info: " + "; ".join(f"{n} {json.dumps(e)}" for n, e in extras.items())]
        split = self.summary.get("host_vs_device")
        if split:
            lines += ["", "## host vs device (per step: wall time, summed CUDA kernel time)", "",
                      "| case | wall ms | kernel ms | kernels | device busy | top kernel |", "|---|---|---|---|---|---|"]
            for name, r in split.items():
                top = r.get("top_kernels") or [["-", ""]]
                lines.append(f"| {name} | {r['wall_ms']} | {r.get('kernel_ms')} | {r.get('kernels_per_step', '')} | "
                             f"{r.get('device_busy', r.get('note', ''))} | {top[0][0]} |")
        return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder for summary.md, summary.json, logs and benchmark JSON")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for all steps (default {BUDGET_S})")
    ap.add_argument("--only", choices=["all", "onnxruntime"], default="all",
                    help="onnxruntime: only the ONNX Runtime CUDA tests and benchmarks (after make ort-gpu-parts)")
    ap.add_argument("--ort-gpu", default=ORT_GPU_DIR,
                    help=f"where make ort-gpu-parts installed onnxruntime-gpu (default {ORT_GPU_DIR}; used if present)")
    args = ap.parse_args(argv)
    reason = no_cuda_reason()
    if reason:
        print(f"gpu-check: needs a CUDA GPU: {reason}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.budget)
    if Path(args.ort_gpu, "onnxruntime").is_dir():  # ahead of the machine's CPU-only onnxruntime
        check.env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.ort_gpu, check.env.get("PYTHONPATH")]))
    check.machine()
    check.install()
    if args.only == "onnxruntime":
        tests_code = check.gpu_tests(["tests/test_export_gpu.py"])
        check.onnxruntime_cuda()
        check.write()
        print((out / "summary.md").read_text())
        return 0 if tests_code == 0 else 1
    tests_code = check.gpu_tests()
    check.benchmark("kernel benchmarks", ["benchmarks/test_training_kernels.py", "benchmarks/test_attention_kernels.py"],
                    keyword="not cpu")
    check.host_vs_device()
    check.benchmark("train steps", ["benchmarks/test_train_step.py"], keyword="gpu")
    check.benchmark("caption latency", ["benchmarks/test_caption_gpu.py"])
    check.llm_attention_kernels()
    check.onnxruntime_cuda()
    check.write()
    print((out / "summary.md").read_text())
    steps_ok = all(s.get("status", "").startswith("ok") or s.get("status", "").startswith("skipped: no CUDA provider")
                   for s in check.summary["steps"].values())
    return 0 if tests_code == 0 and steps_ok else 1


if __name__ == "__main__":
    sys.exit(main())
