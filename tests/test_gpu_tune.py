"""`make gpu-tune` without a GPU: every candidate goes through the compile gate for sm_90 first, only those
it passes are timed (a stand-in timer here), the fastest is written to the per-architecture table, and the
launcher then plans with it. Runs in a subprocess, as the compile gate does: this process imported the kernels
under Triton's interpreter."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_gpu_compile import compiler_env

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys, time
sys.path.insert(0, "benchmarks")
import gpu_tune
from blip2rt.kernels import fused_attention as fa, launch, tuned

case = next(c for c in gpu_tune.cases() if c.name == "attention.backward cross")
base = dict(block_m=32, block_d=64)
case.candidates = [dict(base, block_n=64, warps=8, stages=3, maxnreg=128),    # the launcher's own: passes
                   dict(base, block_n=64, warps=8, stages=2, maxnreg=128),    # spills (dropout at 128 registers)
                   dict(base, block_n=64, warps=8, stages=2, maxnreg=None),   # one block an SM: under the floor
                   dict(base, block_n=128, warps=4, stages=2, maxnreg=128),   # spills: 128-key tiles on 4 warps
                   dict(base, block_n=64, warps=4, stages=1, maxnreg=None)]   # passes
timed = []
def timer(c, config):
    timed.append(config)
    return 1e-4 / len(timed)  # each later candidate "faster": the last timed must win
results = gpu_tune.tune([case], launch.H100, time.monotonic() + 600, timer, jobs=2)
r = results[0]
table = sys.argv[1]
tuned.write(table, 90, "a stand-in", {case.key: r.best.config})
tuned.TABLE_PATH = __import__("pathlib").Path(table)
tuned._TABLE = None
with launch.plan_for(launch.H100) as launches:
    case.plan(__import__("torch").device("meta"))
bwd = next(one for one in launches if one.name in case.kernels)
print(json.dumps(dict(verdicts=[o.verdict for o in r.outcomes], timed=timed, best=r.best.config,
                      planned=dict(warps=bwd.kwargs["num_warps"], stages=bwd.kwargs["num_stages"],
                                   block_n=bwd.kwargs["BLOCK_N"]),
                      markdown=gpu_tune.markdown(results, "a stand-in", 90))))
"""


def test_only_what_the_gate_passes_is_launched_and_the_fastest_is_what_the_launcher_plans(tmp_path):
    table = tmp_path / "tuned_configs.json"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(table)], cwd=ROOT, env=compiler_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    verdicts = out["verdicts"]
    assert verdicts[0] == "ok" and verdicts[4] == "ok", verdicts
    assert "spills" in verdicts[1] and "spills" in verdicts[3], verdicts
    assert "1 blocks per SM" in verdicts[2] and "want at least 2" in verdicts[2], verdicts
    assert [c["maxnreg"] for c in out["timed"]] == [128, None] and [c["warps"] for c in out["timed"]] == [8, 4]
    assert out["best"]["warps"] == 4 and out["best"]["stages"] == 1
    assert out["planned"] == dict(warps=4, stages=1, block_n=64)  # the table's choice, not the launcher's own
    assert "| ok |" in out["markdown"] and "spills" in out["markdown"]
    written = json.loads(table.read_text())
    assert written["archs"]["90"]["machine"] == "a stand-in" and written["archs"]["90"]["date"]


def test_the_tuned_table_checked_in_loads():
    from blip2rt.kernels import tuned

    table = tuned.load(tuned.TABLE_PATH)
    assert table["version"] == tuned.VERSION


LAYER_NORM_SCRIPT = """
import json, sys, time
sys.path.insert(0, "benchmarks")
import gpu_tune
from blip2rt.kernels import launch, compile_gate as gate

case = next(c for c in gpu_tune.cases() if c.name.startswith("residual LayerNorm"))
case.candidates = [dict(block_r=2, warps=8, blocks_per_sm=2, saved_mask=False),   # the launcher's own
                   dict(block_r=2, warps=8, blocks_per_sm=2, saved_mask=True),    # the same, the mask saved
                   dict(block_r=8, warps=4, blocks_per_sm=2, saved_mask=True)]    # spills
compiled = []
compile_all = gate.compile_all
def spy(requests, jobs=None):
    compiled.extend((r.kernel, dict(r.constexprs)) for r in requests)
    return compile_all(requests, jobs)
gate.compile_all = spy
outcomes = gpu_tune.gate_verdicts(case, launch.H100, jobs=2)
print(json.dumps(dict(verdicts=[o.verdict for o in outcomes],
                      saving=sorted({k for k, c in compiled if c.get("SAVE_MASK") or c.get("SAVED_MASK")}))))
"""


def test_a_saved_layer_norm_mask_is_gated_in_both_kernels_before_it_is_timed():
    """The LayerNorm case times forward and backward together (a saved mask moves work into the forward),
    so the gate compiles both kernels of every candidate: the forward that stores the bits too."""
    proc = subprocess.run([sys.executable, "-c", LAYER_NORM_SCRIPT], cwd=ROOT, env=compiler_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["verdicts"][:2] == ["ok", "ok"] and "spills" in out["verdicts"][2], out["verdicts"]
    assert out["saving"] == ["_bwd_kernel", "_fwd_kernel"], out["saving"]
