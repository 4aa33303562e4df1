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

1. kernel correctness: every GPU test (`pytest -m gpu tests/`, in parallel workers where the
   machine has pytest-xdist), pass/fail per test;
2. the Q-Former forward at B = 1, 32 and 128: graphed, fused, transformers, torch; then fwd+bwd;
3. caption latency: ViT-g + OPT-2.7B, B = 1 then 8, graphed against transformers and the
   bandwidth floor, then the other paths;
4. the training steps: stage 1 at B = 64 (fused, LAVIS-style, torch), then stage 2;
5. host vs device: wall time against summed CUDA kernel time per step, fused and torch;
6. the kernel ratios: each fused kernel vs eager at the paper's shapes;
7. the LLM's attention kernels by name, from a profile (FlashAttention or not);
8. ONNX Runtime on CUDA, when onnxruntime-gpu is importable (see `make ort-gpu-parts`);
9. the torch.compile peers (Q-Former, training kernels, training steps), in the time the other
   steps left: inductor compiles each case for tens of seconds.
The caps add up to the budget (400 s). Each benchmark step runs its cases in the order that
answers the targets first; one cut off at its cap is interrupted (SIGINT), so pytest-benchmark
still writes the cases that finished. `--only profile` runs the Q-Former alone instead
(qformer_profile.py: eager and CUDA-graph replay times, per-kernel tables, Perfetto traces) in 4
minutes; `--only compiled` the torch.compile peers in full, in 4 minutes; `--only instructblip`
InstructBLIP's answer latency at Vicuna-7B's size (test_instructblip_gpu.py), in 4 minutes;
`--only onnxruntime` the ONNX Runtime CUDA step.

OUT gets summary.md (ready to paste into RESULTS.md), summary.json, details.tar.gz (one log
per step and the benchmark JSON files) and auto_table.json (kernels="auto"'s table with this GPU's
measured choices, to commit as kernels/auto_table.json). Exit status: 0 when every step ran and every test passed.
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
OUTCOMES = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
TEST_WORKERS = 6  # pytest-xdist workers for the GPU tests, where the machine has xdist
GRACE_S = 10  # a step cut off at its cap is interrupted this long before it is killed
ORT_GPU_DIR = "/tmp/blip2rt-ort-gpu"  # where the ort-gpu-parts commands install onnxruntime-gpu
# (name, seconds cap): the order is the priority; the caps add up to BUDGET_S, so every step gets its
# time (the first H200 run's whole check took 328 s with its kernel benchmarks cut off)
STEPS = [("install", 15), ("gpu tests", 95), ("qformer", 70), ("caption latency", 60), ("train steps", 45),
         ("host vs device", 20), ("kernel benchmarks", 40), ("auto table", 5), ("llm attention kernels", 10), ("onnxruntime cuda", 20),
         ("compiled peers", 20)]
# the last step also gets whatever the others left unspent
# `--only profile`: the Q-Former alone (qformer_profile.py), in 4 minutes with the install
PROFILE_BUDGET_S = 240
PROFILE_STEPS = [("install", 40), ("qformer profile", 190)]
# `--only compiled`: the torch.compile peers in full (inductor compiles each case for tens of seconds,
# more than the full check's last step holds)
COMPILED_BUDGET_S = 240
COMPILED_STEPS = [("install", 40), ("compiled peers in full", 195)]
# what the compiled peers are: the torch.compile cases of the GPU benchmarks (the full check's other
# steps leave them out)
COMPILED = "compiled and not static and not cpu"

# `--only instructblip`: InstructBLIP Vicuna-7B's answer latency, blip2rt against transformers
INSTRUCT_BUDGET_S = 240
INSTRUCT_STEPS = [("install", 40), ("instructblip latency", 195)]

CAPS = dict(STEPS + PROFILE_STEPS + COMPILED_STEPS + INSTRUCT_STEPS)
BENCHMARK_FILES = ["benchmarks/test_attention_kernels.py", "benchmarks/test_training_kernels.py",
                   "benchmarks/test_train_step.py"]


def _cases(test: str, *params: str) -> list[str]:
    return [f"{test}[{p}]" for p in params]


# Each benchmark step runs its cases in this order, so a step cut off at its cap has done the ones that
# answer the targets (on the first H200 run of this check every step was cut off, and the order of the
# files decided what ran). A cut-off step keeps what finished: pytest is interrupted, not killed.
QFORMER = "benchmarks/test_attention_kernels.py::test_qformer_gpu"
QFORMER_CASES = _cases(QFORMER, *(f"{b}-fwd-{impl}" for b in (1, 32, 128)
                                  for impl in ("graphed", "fused", "transformers", "torch")),
                       *(f"{b}-fwd+bwd-{impl}" for b in (1, 32, 128) for impl in ("fused", "torch", "transformers")))
CAPTION = "benchmarks/test_caption_gpu.py::test_caption_gpu"
CAPTION_CASES = _cases(CAPTION, "1-graphed", "1-transformers", "1-fused", "8-graphed", "8-transformers", "8-fused",
                       "1-torch", "8-torch", "1-static-compiled", "8-static-compiled")
INSTRUCT = "benchmarks/test_instructblip_gpu.py::test_instructblip_gpu"
INSTRUCT_CASES = _cases(INSTRUCT, "1-graphed", "1-transformers", "1-fused", "8-graphed", "8-transformers", "8-fused")
TRAIN_STEP_CASES = (_cases("benchmarks/test_train_step.py::test_stage1_step_gpu", "triton", "lavis", "torch")
                    + _cases("benchmarks/test_train_step.py::test_stage2_step_gpu", "triton", "torch"))
KERNEL_FILES = ["benchmarks/test_attention_kernels.py", "benchmarks/test_training_kernels.py"]
KERNELS = "not cpu and not compiled and not qformer"


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # it ended meanwhile
        pass


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def test_outcome(line: str) -> tuple[str, str] | None:
    """(test id, outcome) from a line of pytest -v, with or without xdist's worker prefix."""
    m = re.match(rf"^(tests/\S+::\S+)\s+({OUTCOMES})", line) or re.match(
        rf"^\[gw\d+\]\s+\[\s*\d+%\]\s+({OUTCOMES})\s+(tests/\S+::\S+)", line)
    if not m:
        return None
    a, b = m.groups()
    return (a, b) if a.startswith("tests/") else (b, a)


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
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
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
            grace = min(GRACE_S, timeout / 4)

            def interrupt():  # pytest stops, and pytest-benchmark still writes what finished
                cut.set()
                _signal_group(proc, signal.SIGINT)

            def cut_off():  # the watchdog: a step that ignores the interrupt is still stopped on time
                cut.set()
                _signal_group(proc, signal.SIGKILL)

            timers = [threading.Timer(timeout - grace, interrupt), threading.Timer(timeout, cut_off)]
            for timer in timers:
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
                for timer in timers:
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
        if timeout < 1:
            return None, "no time left"
        try:
            got = subprocess.run([self.python, str(ROOT / "benchmarks" / "gpu_probes.py"), name, *args],
                                 capture_output=True, text=True, timeout=timeout, env=self.env, cwd=ROOT)
        except subprocess.TimeoutExpired as e:
            return None, f"cut off after {timeout:.0f} s: " + _text(e.stdout)[-1000:] + _text(e.stderr)[-1000:]
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
                           cap=CAPS["install"])
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
                                                  str(ROOT)], cap=CAPS["install"])
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), self.env.get("PYTHONPATH")]))
        self.record("install", status="ok (fallback)" if code == 0 else "failed",
                    method=f"the venv could not be used (see install.log); blip2rt installed into {target}, "
                           "on PYTHONPATH")

    def gpu_tests(self, files: list[str] | None = None) -> int | None:
        results = self.summary["tests"]

        def on_line(line: str) -> None:
            found = test_outcome(line)
            if found:
                results[found[0]] = found[1]
                self.write()

        # only the files with GPU tests: collecting the rest would import what the GPU image may lack
        files = files or sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                                if "pytest.mark.gpu" in p.read_text())
        # Triton's compiles, not the GPU, take most of a test's time: workers compile side by side
        workers = ["-n", str(TEST_WORKERS)] if self.has_module("xdist") else []
        code, _ = self.run("gpu tests", [self.python, "-m", "pytest", "-m", "gpu", *files, "-v", "-rfE", *workers,
                                         "-p", "no:cacheprovider", "-o", "addopts="],
                           cap=CAPS["gpu tests"], on_line=on_line)
        return code

    def has_module(self, name: str) -> bool:
        return subprocess.run([self.python, "-c", f"import {name}"], capture_output=True, env=self.env).returncode == 0

    def benchmark(self, step: str, select: list[str], keyword: str | None = None, cap: float | None = None) -> None:
        out = self.details / (re.sub(r"\W+", "-", step) + ".json")
        cmd = [self.python, "-m", "pytest", *select, "-p", "no:cacheprovider", "-q", "-rs", "-o",
               "testpaths=benchmarks", "--benchmark-columns=median,iqr,rounds", "--benchmark-group-by=group",
               f"--benchmark-json={out}"] + (["-k", keyword] if keyword else [])
        self.run(step, cmd, cap=cap or CAPS[step])
        if not out.is_file():
            return
        result, output = self.probe("render", str(out))
        if result is not None:
            self.summary["benchmarks"][step] = result
            self.write()
        else:
            self.record(step, render_error=output[-500:])

    def auto_table(self) -> None:
        """kernels="auto"'s table with this GPU's entry, decided from the kernel benchmarks just run:
        OUT/auto_table.json, the checked-in table plus this architecture, to commit as
        kernels/auto_table.json (blip2rt.kernels.auto_table)."""
        src = self.details / "kernel-benchmarks.json"
        if not src.is_file():
            self.record("auto table", status="skipped: the kernel benchmarks wrote no JSON")
            return
        table = self.out / "auto_table.json"
        shutil.copy(ROOT / "kernels" / "auto_table.json", table)
        self.run("auto table", [self.python, "-m", "blip2rt.kernels.auto_table", str(src), "--write", str(table)],
                 cap=CAPS["auto table"])

    def host_vs_device(self) -> None:
        """Wall time against summed CUDA kernel time per step, fused and torch (host_device_split.py)."""
        code, text = self.run("host vs device", [self.python, "benchmarks/host_device_split.py"],
                              cap=CAPS["host vs device"])
        found = [line for line in text.splitlines() if line.startswith("RESULT ")]
        if found:
            self.summary["host_vs_device"] = json.loads(found[-1][len("RESULT "):])
            self.write()

    def llm_attention_kernels(self) -> None:
        """Which CUDA kernels run the LLM's attention (OPT-2.7B's shapes, bf16, 64 tokens)."""
        started = time.monotonic()
        result, output = self.probe("llm-attention", timeout=min(CAPS["llm attention kernels"], self.left()))
        self.record("llm attention kernels", status="ok" if result else "failed",
                    seconds=round(time.monotonic() - started, 1), **(result or {"output": output[-500:]}))

    def qformer_profile(self) -> None:
        """qformer_profile.py: eager and graph-replay times, per-kernel tables and Perfetto traces (those
        go into details.tar.gz, under profile/)."""
        code, text = self.run("qformer profile", [self.python, "benchmarks/qformer_profile.py",
                                                  str(self.details / "profile")], cap=CAPS["qformer profile"])
        found = [line for line in text.splitlines() if line.startswith("RESULT ")]
        if found:
            self.summary["profile"] = json.loads(found[-1][len("RESULT "):])
            self.write()

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
        prof = self.summary.get("profile")
        if prof:
            lines += ["", "## Q-Former profile (forward; tables and traces in details.tar.gz, profile/)", "",
                      "| case | eager ms | graph replay ms | kernels a call | top kernel (us) |", "|---|---|---|---|---|"]
            for name, r in prof.items():
                top = (r.get("top_kernels") or [["-", ""]])[0]
                lines.append(f"| {name} | {r['eager_ms']} | {r.get('replay_ms', r.get('replay_error', '-'))} | "
                             f"{r.get('kernels_per_call')} | {top[0]} ({top[1]}) |")
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
    ap.add_argument("--only", choices=["all", "onnxruntime", "profile", "compiled", "instructblip"], default="all",
                    help="onnxruntime: only the ONNX Runtime CUDA tests and benchmarks (after make ort-gpu-parts); "
                         f"profile: the Q-Former alone, eager and graph-replay times, kernel tables and traces "
                         f"({PROFILE_BUDGET_S} s); compiled: the torch.compile peers in full ({COMPILED_BUDGET_S} s); "
                         f"instructblip: InstructBLIP Vicuna-7B's answer latency ({INSTRUCT_BUDGET_S} s)")
    ap.add_argument("--ort-gpu", default=ORT_GPU_DIR,
                    help=f"where make ort-gpu-parts installed onnxruntime-gpu (default {ORT_GPU_DIR}; used if present)")
    args = ap.parse_args(argv)
    reason = no_cuda_reason()
    if reason:
        print(f"gpu-check: needs a CUDA GPU: {reason}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = {"profile": PROFILE_BUDGET_S, "compiled": COMPILED_BUDGET_S,
              "instructblip": INSTRUCT_BUDGET_S}.get(args.only, args.budget)
    check = Check(out, min(args.budget, budget))
    if Path(args.ort_gpu, "onnxruntime").is_dir():  # ahead of the machine's CPU-only onnxruntime
        check.env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.ort_gpu, check.env.get("PYTHONPATH")]))
    check.machine()
    check.install()
    if args.only == "profile":
        check.qformer_profile()
        check.write()
        print((out / "summary.md").read_text())
        return 0 if check.summary["steps"]["qformer profile"].get("status") == "ok" else 1
    if args.only == "compiled":
        check.benchmark("compiled peers in full", BENCHMARK_FILES, keyword=COMPILED)
        check.write()
        print((out / "summary.md").read_text())
        return 0 if check.summary["steps"]["compiled peers in full"].get("status") == "ok" else 1
    if args.only == "instructblip":
        check.benchmark("instructblip latency", INSTRUCT_CASES)
        check.write()
        print((out / "summary.md").read_text())
        return 0 if check.summary["steps"]["instructblip latency"].get("status") == "ok" else 1
    if args.only == "onnxruntime":
        tests_code = check.gpu_tests(["tests/test_export_gpu.py"])
        check.onnxruntime_cuda()
        check.write()
        print((out / "summary.md").read_text())
        return 0 if tests_code == 0 else 1
    tests_code = check.gpu_tests()
    check.benchmark("qformer", QFORMER_CASES)
    check.benchmark("caption latency", CAPTION_CASES)
    check.benchmark("train steps", TRAIN_STEP_CASES)
    check.host_vs_device()
    check.benchmark("kernel benchmarks", KERNEL_FILES, keyword=KERNELS)
    check.auto_table()
    check.llm_attention_kernels()
    check.onnxruntime_cuda()
    check.benchmark("compiled peers", BENCHMARK_FILES, keyword=COMPILED, cap=max(CAPS["compiled peers"], check.left()))
    check.write()
    print((out / "summary.md").read_text())
    steps_ok = all(s.get("status", "").startswith("ok") or s.get("status", "").startswith("skipped: no CUDA provider")
                   for s in check.summary["steps"].values())
    return 0 if tests_code == 0 and steps_ok else 1


if __name__ == "__main__":
    sys.exit(main())
