"""`blip2rt bench`: the regression workflow (save, compare with a fail threshold, report, plot,
profile) and the CPU suite in its reduced mode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from blip2rt import bench

# One cheap, steady CPU case: the tiny Q-Former forward, blip2rt's torch path.
CASE = "test_qformer_cpu and tiny and torch and not bwd"
CASE_NAME = "test_qformer_cpu[tiny-fwd-torch]"


def _bench(*args, env=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "blip2rt", "bench", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _run(medians: dict[tuple[str, str], float], commit="abc", gpu=None) -> dict:
    """A pytest-benchmark JSON with the given (group, impl) -> median seconds."""
    return {"datetime": "2026-11-22T00:00:00", "machine_info": {"blip2rt": {"blip2rt_commit": commit, "gpu": gpu}},
            "benchmarks": [{"fullname": f"benchmarks/t.py::t[{g}-{i}]", "name": f"t[{g}-{i}]", "group": g,
                            "params": {"impl": i}, "stats": {"median": m}, "extra_info": {}}
                           for (g, i), m in medians.items()]}


def test_table_gives_speedups_over_eager_and_changes_against_the_baseline(tmp_path):
    base = _run({("caption B=1", "eager"): 0.100, ("caption B=1", "ort"): 0.050, ("qformer", "torch"): 0.020,
                 ("qformer", "transformers"): 0.030})
    new = _run({("caption B=1", "eager"): 0.100, ("caption B=1", "ort"): 0.040, ("qformer", "torch"): 0.030,
                ("qformer", "transformers"): 0.030, ("decode", "ort"): 0.001}, gpu="H100")
    up = bench.speedups(bench.cases(new))
    assert up["benchmarks/t.py::t[caption B=1-ort]"] == pytest.approx(2.5)  # 0.100 / 0.040
    assert up["benchmarks/t.py::t[qformer-transformers]"] == pytest.approx(1.0)  # 0.030 / 0.030 (torch is eager)
    assert up["benchmarks/t.py::t[decode-ort]"] is None  # no eager case in its group
    table = bench.render_table(new, base)
    assert "WARNING" in table and "gpu: None -> 'H100'" in table
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in table.splitlines() if line.startswith("| ")}
    assert "2.50x" in rows[("caption B=1", "ort")] and "-20.0%" in rows[("caption B=1", "ort")]
    assert "+50.0%" in rows[("qformer", "torch")]
    assert "new" in rows[("decode", "ort")]
    assert "x floor" not in table  # no case recorded a floor
    new["benchmarks"][1]["extra_info"]["x_floor"] = 2.36  # (kernel_floors.record_kernel_floor on a GPU)
    floored = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in bench.render_table(new).splitlines()
               if line.startswith("| ")}
    assert "| x floor |" in bench.render_table(new) and "| 2.36 |" in floored[("caption B=1", "ort")]
    assert floored[("caption B=1", "eager")].rstrip().endswith("| - |")
    (tmp_path / "new.json").write_text(json.dumps(new))
    (tmp_path / "base.json").write_text(json.dumps(base))
    text = bench.report(str(tmp_path / "new.json"), str(tmp_path / "base.json"), png=str(tmp_path / "cmp.png"),
                        md=str(tmp_path / "cmp.md"))
    assert (tmp_path / "cmp.md").read_text().strip() == text
    with Image.open(tmp_path / "cmp.png") as im:
        assert im.format == "PNG" and im.width > 400


def test_bad_runs_give_clear_errors(tmp_path):
    from blip2rt.errors import Blip2rtError

    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(Blip2rtError, match="not a pytest-benchmark"):
        bench.load_run(tmp_path / "x.json")
    with pytest.raises(Blip2rtError, match="no saved benchmark run 'nope'"):
        bench.resolve_run("nope", tmp_path)
    out = _bench("--fail-over", "10")
    assert out.returncode == 2 and "--fail-over needs --compare" in out.stderr


@pytest.mark.slow
def test_a_planted_regression_fails_the_compare_step(tmp_path):
    runs = str(tmp_path / "runs")
    saved = _bench("-k", CASE, "--save", "base", "--storage", runs)
    assert saved.returncode == 0, saved.stdout[-2000:] + saved.stderr[-2000:]
    data = json.loads((tmp_path / "runs" / "base.json").read_text())
    assert [b["name"] for b in data["benchmarks"]] == [CASE_NAME]
    info = data["machine_info"]["blip2rt"]
    assert info["torch"] and info["blip2rt_commit"] and "onnxruntime" in info  # saved with every run
    # 0.2 s of sleep on a case of a few ms: far over a 100% threshold
    slowed = _bench("-k", CASE, "--compare", "base", "--fail-over", "100", "--storage", runs,
                    env={"BLIP2RT_BENCH_DELAY": f"{CASE_NAME}:0.2"})
    assert slowed.returncode != 0, slowed.stdout[-3000:]
    assert "Performance has regressed" in slowed.stdout + slowed.stderr
    assert "| qformer tiny B=8 fwd (cpu) | torch |" in slowed.stdout  # the comparison table
    steady = _bench("-k", CASE, "--compare", "base", "--fail-over", "100", "--storage", runs)
    assert steady.returncode == 0, steady.stdout[-3000:]


@pytest.mark.slow
def test_profile_writes_a_chrome_trace(tmp_path):
    out = _bench("--profile", CASE, "--profile-dir", str(tmp_path / "prof"), "--storage", str(tmp_path / "runs"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    traces = list((tmp_path / "prof").glob("*.json"))
    assert [t.name for t in traces] == ["test_qformer_cpu_tiny-fwd-torch_.json"]  # brackets made file-safe
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any(str(e.get("name", "")).startswith("aten::") for e in events)  # the ops that ran


@pytest.mark.slow
def test_cpu_suite_runs_every_cpu_case_once(tmp_path):
    """CI's reduced mode: each CPU case once (GPU cases skip), well under 5 minutes."""
    out = _bench("--quick", "--json", str(tmp_path / "quick.json"), timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    names = {b["name"] for b in json.loads((tmp_path / "quick.json").read_text())["benchmarks"]}
    for case in ("test_qformer_cpu[blip2-mini-fwd+bwd-transformers]", "test_stage1_step_cpu[blip2-mini-8-lavis-fp32]",
                 "test_stage2_step_cpu[tiny-8-torch-fp32]", "test_visual_prefix[blip2-mini-8-ort]",
                 "test_decode_step[blip2-mini-1-eager]", "test_caption[tiny-8-transformers]",
                 "test_caption[blip2-mini-1-ort]"):
        assert case in names, sorted(names)
    assert "skipped" in out.stdout  # the GPU cases, cleanly
    cases = json.loads((tmp_path / "quick.json").read_text())["benchmarks"]
    assert all(b["stats"]["rounds"] == 1 for b in cases)
    # every case checked and recorded what it ran: no Triton kernel runs on the CPU; the fused
    # host-time cases plan their launches for an H100 and stop at the launcher
    host = [b for b in cases if b["name"].startswith("test_host_overhead[") and "autograd-floor" not in b["name"]]
    assert len(host) == 6 and all(b["extra_info"]["path"].startswith("triton: ") for b in host)
    assert sum(b["name"].startswith("test_triton_launch_python[") for b in cases) == 3
    assert not any("compiled]" in b["name"] or "-compiled-" in b["name"] for b in cases)  # skipped when quick
    assert all(b["extra_info"]["path"].startswith("no Triton kernel") for b in cases if b not in host)
    assert Path(tmp_path / "quick.json").stat().st_size > 0
