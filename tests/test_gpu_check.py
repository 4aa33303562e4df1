"""The prepared device check (`make gpu-check`) and the onnxruntime-gpu carrier (`make ort-gpu-parts`),
as far as they run without a GPU: the refusal, the watchdog, the summary, the parts."""

import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
import ort_gpu_parts  # noqa: E402


@pytest.mark.skipif(gpu_check.no_cuda_reason() is None, reason="this machine has a CUDA GPU")
def test_gpu_check_refuses_at_once_without_cuda(tmp_path):
    start = time.monotonic()
    proc = subprocess.run(["make", "-s", "gpu-check", f"OUT={tmp_path / 'out'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("gpu-check:")]
    assert len(ours) == 1 and "needs a CUDA GPU" in ours[0], proc.stderr
    assert proc.stdout == "" and not (tmp_path / "out").exists()
    assert time.monotonic() - start < 30


def test_a_step_past_its_cap_is_cut_off_and_recorded(tmp_path):
    """A step that hangs, even silently, is stopped at its cap; what it printed and its status stay."""
    check = gpu_check.Check(tmp_path, budget=60)
    start = time.monotonic()
    code, text = check.run("slow step", [sys.executable, "-c", "import time; print('partial', flush=True); "
                                                              "time.sleep(60)"], cap=2)
    assert code is None and text.startswith("partial\n") and time.monotonic() - start < 10
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"]["slow step"]["status"] == "cut off at its time cap"
    with tarfile.open(tmp_path / "details.tar.gz") as tar:  # every log, packed: OUT stays at three files
        assert "partial" in tar.extractfile("details/slow-step.log").read().decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["details.tar.gz", "summary.json", "summary.md"]
    assert "| slow step | cut off at its time cap |" in (tmp_path / "summary.md").read_text()
    code, _ = check.run("quick step", [sys.executable, "-c", "print('ok')"], cap=10)
    assert code == 0 and json.loads((tmp_path / "summary.json").read_text())["steps"]["quick step"]["status"] == "ok"


def test_a_step_cut_off_is_interrupted_first_so_it_can_save_what_finished(tmp_path):
    """pytest-benchmark writes its JSON when pytest is interrupted; a kill would lose every case that
    ran. A child that ignores the interrupt is still killed at the cap."""
    saved = tmp_path / "saved.json"
    keeps = ("import signal, sys, time\n"
             "def save(*_):\n"
             f"    open({str(saved)!r}, 'w').write('[1]'); sys.exit(2)\n"
             "signal.signal(signal.SIGINT, save)\n"
             "print('running', flush=True); time.sleep(60)\n")
    check = gpu_check.Check(tmp_path / "out", budget=60)
    start = time.monotonic()
    code, text = check.run("interrupted", [sys.executable, "-c", keeps], cap=4)
    assert code is None and text == "running\n" and saved.read_text() == "[1]"
    assert time.monotonic() - start < 4.5
    deaf = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('deaf', flush=True); time.sleep(60)"
    start = time.monotonic()
    code, _ = check.run("deaf", [sys.executable, "-c", deaf], cap=4)
    assert code is None and 3.5 < time.monotonic() - start < 6


def test_a_probe_past_its_time_is_an_answer_not_a_crash(tmp_path):
    """The full check once crashed here: the LLM-attention probe got the last 0.3 s of the budget."""
    check = gpu_check.Check(tmp_path / "out", budget=60)
    assert check.probe("machine", timeout=0.3) == (None, "no time left")
    slow = tmp_path / "slow-python"
    slow.write_text("#!/bin/sh\necho started\nsleep 30\n")
    slow.chmod(0o755)
    check.python = str(slow)
    start = time.monotonic()
    result, output = check.probe("machine", timeout=1.5)
    assert result is None and output.startswith("cut off after 2 s") and time.monotonic() - start < 10


def test_no_time_left_skips_the_remaining_steps(tmp_path):
    check = gpu_check.Check(tmp_path, budget=1)
    time.sleep(1.1)
    code, _ = check.run("late step", [sys.executable, "-c", "print(1)"], cap=100)
    assert code is None
    assert json.loads((tmp_path / "summary.json").read_text())["steps"]["late step"]["status"].startswith("skipped")


def test_summary_lists_failed_tests_and_benchmark_tables(tmp_path):
    check = gpu_check.Check(tmp_path, budget=60)
    check.summary["tests"] = {"tests/test_kernels_gpu.py::test_a[bf16]": "PASSED",
                              "tests/test_kernels_gpu.py::test_b[fp32]": "FAILED"}
    check.summary["benchmarks"]["kernel benchmarks"] = {
        "table": "| group | impl | median | vs eager |\n|---|---|---|---|\n| itc | fused | 1 ms | 2.00x |",
        "cases": {"test_itc[fused]": {"extra": {"peak_mib": 12}}}}
    check.write()
    text = (tmp_path / "summary.md").read_text()
    assert "GPU tests: 1 failed, 1 passed" in text
    assert "- tests/test_kernels_gpu.py::test_b[fp32]: FAILED" in text
    assert "| itc | fused | 1 ms | 2.00x |" in text and "peak_mib" in text


def test_ort_parts_are_under_the_carry_limit_and_join_to_the_wheel(tmp_path):
    wheel = tmp_path / "onnxruntime_gpu-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl"
    data = bytes(range(256)) * 9000  # 2.3 MB
    wheel.write_bytes(data)
    parts = ort_gpu_parts.split(wheel, 1_000_000)
    assert [p.stat().st_size for p in parts] == [1_000_000, 1_000_000, 304_000]
    assert b"".join(p.read_bytes() for p in parts) == data
    assert len(ort_gpu_parts.split(wheel, 3_000_000)) == 1  # a rerun replaces the old parts
    assert sorted(tmp_path.glob("*.part-*")) == [tmp_path / f"{wheel.name}.part-00"]


def test_ort_device_calls_carry_one_part_each_and_verify_the_join(tmp_path):
    wheel = tmp_path / "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(b"x" * 2500)
    parts = ort_gpu_parts.split(wheel, 1000)
    calls = ort_gpu_parts.device_calls(wheel, parts, "3.12")
    assert [c["carry"] for c in calls[:-1]] == [[str(p)] for p in parts]
    assert "(3, 12)" in calls[0]["command"] and all("(3, 12)" not in c["command"] for c in calls[1:])
    assert ort_gpu_parts.sha256(wheel) in calls[-1]["command"] and "sha256sum -c" in calls[-1]["command"]
    assert f"--target {ort_gpu_parts.INSTALL_ON_DEVICE}" in calls[-1]["command"]
    assert ort_gpu_parts.INSTALL_ON_DEVICE == gpu_check.ORT_GPU_DIR  # where gpu-check looks for it
    assert "carry" not in calls[-1] and all(c["timeout_s"] <= 600 for c in calls)


def test_host_vs_device_split_runs_and_lands_in_the_summary(tmp_path):
    """The profile step's script on the CPU (torch path, tiny): every case timed; its RESULT line
    renders as a table in summary.md."""
    proc = subprocess.run([sys.executable, "benchmarks/host_device_split.py", "--device", "cpu", "--preset", "tiny",
                           "--rounds", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    assert sorted(result) == ["layer_norm fwd+bwd eager", "qformer B=1 fwd torch", "qformer B=32 fwd+bwd torch"]
    assert all(r["wall_ms"] > 0 and r["kernel_ms"] == 0 for r in result.values())  # no CUDA kernels on a CPU
    check = gpu_check.Check(tmp_path, budget=60)
    check.summary["host_vs_device"] = result
    check.write()
    assert "| qformer B=32 fwd+bwd torch | " in (tmp_path / "summary.md").read_text()


def test_the_step_caps_fit_the_budget():
    assert sum(cap for _, cap in gpu_check.STEPS) <= gpu_check.BUDGET_S
    assert sum(cap for _, cap in gpu_check.PROFILE_STEPS) <= gpu_check.PROFILE_BUDGET_S <= 240
    assert sum(cap for _, cap in gpu_check.COMPILED_STEPS) <= gpu_check.COMPILED_BUDGET_S <= 240
    assert sum(cap for _, cap in gpu_check.INSTRUCT_STEPS) <= gpu_check.INSTRUCT_BUDGET_S <= 240


def _collected(files: list[str], keyword: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-o",
                           "testpaths=benchmarks", *files, "-k", keyword], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    return [line for line in proc.stdout.splitlines() if "::" in line]


def test_the_compiled_peers_are_selected_once_and_only_on_the_gpu():
    """The torch.compile cases run in their own step (inductor's compile would eat the kernel and
    train-step caps): its keyword picks every GPU compiled case and nothing else, and the other
    steps' keywords leave them out."""
    compiled = _collected(gpu_check.BENCHMARK_FILES, gpu_check.COMPILED)
    assert len(compiled) >= 10 and all("compiled" in c and "cpu" not in c for c in compiled), compiled
    assert any("test_qformer_gpu" in c for c in compiled) and any("test_stage1_step_gpu" in c for c in compiled)
    assert any("test_training_kernel[layer_norm-compiled]" in c for c in compiled)
    kernels = _collected(gpu_check.KERNEL_FILES, gpu_check.KERNELS)
    assert kernels and not any("compiled" in c or "qformer" in c or "cpu" in c for c in kernels)


def test_the_ordered_benchmark_cases_exist_and_lead_with_the_targets():
    """The Q-Former, caption and train-step steps name their cases one by one, the target cases first:
    a renamed case would otherwise vanish from the check without a word."""
    named = gpu_check.QFORMER_CASES + gpu_check.CAPTION_CASES + gpu_check.TRAIN_STEP_CASES + gpu_check.INSTRUCT_CASES
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-o",
                           "testpaths=benchmarks", *named], cwd=ROOT, capture_output=True, text=True, timeout=300)
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert proc.returncode == 0 and collected == named, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(set(named)) == len(named)
    assert gpu_check.QFORMER_CASES[:3] == [f"{gpu_check.QFORMER}[1-fwd-{i}]" for i in ("graphed", "fused", "transformers")]
    assert gpu_check.CAPTION_CASES[:2] == [f"{gpu_check.CAPTION}[1-graphed]", f"{gpu_check.CAPTION}[1-transformers]"]
    assert gpu_check.TRAIN_STEP_CASES[:2] == ["benchmarks/test_train_step.py::test_stage1_step_gpu[triton]",
                                              "benchmarks/test_train_step.py::test_stage1_step_gpu[lavis]"]
    assert [c for c in named if "compiled" in c] == gpu_check.CAPTION_CASES[-2:]  # the static decode's, last
    assert gpu_check.INSTRUCT_CASES[:2] == [f"{gpu_check.INSTRUCT}[1-graphed]", f"{gpu_check.INSTRUCT}[1-transformers]"]


def test_test_outcomes_are_read_with_and_without_xdist():
    name = "tests/test_kernels_gpu.py::test_x[17-1023-0.0-fp32]"
    assert gpu_check.test_outcome(f"{name} PASSED [ 12%]") == (name, "PASSED")
    assert gpu_check.test_outcome(f"[gw3] [ 12%] FAILED {name} ") == (name, "FAILED")
    assert gpu_check.test_outcome(f"[gw0] [100%] SKIPPED {name}") == (name, "SKIPPED")
    assert gpu_check.test_outcome("collecting ... collected 84 items") is None


def test_the_qformer_profile_runs_on_the_cpu_and_lands_in_the_summary(tmp_path):
    """The profile step's script at tiny size on the CPU (eager times, tables and traces; no graph
    replay without CUDA), and its RESULT rendered in summary.md."""
    proc = subprocess.run([sys.executable, "benchmarks/qformer_profile.py", str(tmp_path / "profile"), "--device",
                           "cpu", "--preset", "tiny", "--batches", "1", "2", "--rounds", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    assert sorted(result) == ["qformer-fwd-B1-torch", "qformer-fwd-B2-torch"]
    assert all(r["eager_ms"] > 0 and "replay_ms" not in r for r in result.values())
    for name in result:
        assert "Self CPU" in (tmp_path / "profile" / f"{name}.txt").read_text()
        assert json.loads((tmp_path / "profile" / f"{name}.json").read_text())["traceEvents"]
    check = gpu_check.Check(tmp_path / "out", budget=60)
    check.summary["profile"] = result
    check.write()
    assert "| qformer-fwd-B2-torch | " in (tmp_path / "out" / "summary.md").read_text()
