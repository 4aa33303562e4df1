"""The compile gate: every Triton kernel, configured by its own launcher, compiled for sm_90 and
sm_80 without a GPU (blip2rt.kernels.compile_gate), against this environment's Triton and the GPU image's.

The gate runs in a subprocess: this test process imported the kernels under Triton's
interpreter (TRITON_INTERPRET=1), where @triton.jit makes interpreted functions, not compilable
ones.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blip2rt.kernels import compile_gate as gate
from blip2rt.kernels.compile_gate import CompileRequest, CompileResult, Row
from blip2rt.kernels import launch

pytestmark = pytest.mark.slow
# Where `make test` installs the GPU image's Triton (3.6): inside the environment running these tests,
# beside its own Triton (3.8), wherever that environment lives; BLIP2RT_GPU_IMAGE_TRITON names another.
GPU_IMAGE_TRITON = Path(os.environ.get("BLIP2RT_GPU_IMAGE_TRITON") or Path(sys.prefix) / "triton-gpu-image")


def gpu_image_triton() -> Path:
    """The GPU image's Triton, or a failure that says how to install it: the gate must run against the
    Triton the GPU machine compiles with, and a missing install is not a pass."""
    if not (GPU_IMAGE_TRITON / "triton").is_dir():
        pytest.fail(f"the GPU image's Triton is not installed at {GPU_IMAGE_TRITON}: `make test` installs it "
                    f"(pip install --no-deps --target {GPU_IMAGE_TRITON} triton==3.6.0), or set "
                    "BLIP2RT_GPU_IMAGE_TRITON to a folder holding it")
    return GPU_IMAGE_TRITON


def compiler_env(pythonpath: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_gate(tmp_path: Path, pythonpath: Path | None = None, *args: str) -> tuple[int, str, dict]:
    out = tmp_path / "gate.json"
    proc = subprocess.run([sys.executable, "-m", "blip2rt.kernels.compile_gate", "--json", str(out), *args], cwd=tmp_path,
                          env=compiler_env(pythonpath), capture_output=True, text=True, timeout=900)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.returncode, proc.stdout, json.loads(out.read_text())


def jit_kernels() -> set[str]:
    """module.name of every @triton.jit entry point (named *_kernel) in blip2rt.kernels."""
    import importlib
    import pkgutil

    import blip2rt.kernels as pkg

    names = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"blip2rt.kernels.{info.name}")
        for attr in dir(module):
            obj = getattr(module, attr)
            if attr.endswith("_kernel") and hasattr(obj, "fn"):
                names.add(f"{info.name}.{attr}")
    return names


@pytest.fixture(scope="module")
def gate_run(tmp_path_factory):
    return run_gate(tmp_path_factory.mktemp("gate"))


def test_every_kernel_compiles_for_hopper_and_ampere_without_spills(gate_run):
    code, stdout, report = gate_run
    assert report["failures"] == [], "\n".join(report["failures"])
    assert code == 0, stdout[-3000:]
    compiled = {c["kernel"] for c in report["compiles"]}
    assert compiled == jit_kernels(), "every @triton.jit kernel must be in the gate's workloads"
    assert {c["arch"] for c in report["compiles"]} == {80, 90}
    uses = {(u[0], u[1]) for c in report["compiles"] for u in c["uses"]}
    assert uses == {(s, d) for s in ("paper", "tiny", "mini") for d in ("bf16", "fp16", "fp32")}
    assert all(c["spill_stores"] == 0 == c["spill_loads"] for c in report["compiles"])
    print(stdout)  # the table (-s shows it)


def test_the_gpu_images_triton_compiles_them_too(tmp_path):
    """The GPU image has Triton 3.6; `make test` installs it beside this environment's 3.8. The paper's
    shapes here (what the GPU check runs), to keep the gate's CI time near 5 minutes from a cold
    cache; `make gpu-compile` with PYTHONPATH=.venv/triton-gpu-image runs every shape."""
    code, stdout, report = run_gate(tmp_path, gpu_image_triton(), "--shapes", "paper")
    assert report["triton"].startswith("3.6"), report["triton"]
    assert {u[0] for c in report["compiles"] for u in c["uses"]} == {"paper"}
    assert report["failures"] == [], "\n".join(report["failures"])
    assert code == 0
    assert all(c["registers"] > 0 for c in report["compiles"])


@pytest.mark.parametrize("triton_build", ["this environment's", "the GPU image's"])
def test_the_gate_reads_spills_and_mma_kind_off_a_real_compile(tmp_path, triton_build):
    """The checks can fail, under both Tritons: the attention forward as it was (fp32 dots in full IEEE
    precision, 64x64 tiles on 4 warps) spills, runs on the FMA units and is caught; the same tile in
    bf16 is wgmma."""
    script = """
import json, sys
from blip2rt.kernels import compile_gate as gate
from blip2rt.kernels import launch
from blip2rt.kernels import fused_attention as fa
out = {}
for name, dtype, precision in (("fp32-ieee", "fp32", "ieee"), ("bf16", "bf16", "tf32")):
    s = gate.shapes_of("paper")
    run = dict(gate._workloads(s, gate.DTYPES[dtype]))["self-attention, ITM"]
    with launch.plan_for(launch.H100) as launches:
        run()
    fwd = next(one for one in launches if one.kernel is fa._fwd_kernel)
    fwd.kwargs.update(PRECISION=precision, BLOCK_M=64, BLOCK_N=64, num_warps=4)
    fwd.kwargs.pop("maxnreg", None)
    result = gate.compile_request(gate.bind(fwd, 90))
    out[name] = dict(spills=result.spill_stores, mma=result.mma, wgmma=result.wgmma_dots, dots=result.dots,
                     registers=result.registers,
                     failures=gate.failures([gate.Row(result, [("paper", dtype, "self-attention, ITM")])]))
import triton
out["triton"] = triton.__version__
print(json.dumps(out))
"""
    path = gpu_image_triton() if triton_build == "the GPU image's" else None
    proc = subprocess.run([sys.executable, "-c", script], env=compiler_env(path), capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("triton").startswith("3.6" if path else "3.8")
    # FMA tiles at 64x64 spill (13-32 KB per thread in one build of ptxas, 400 B in another): any
    # spill is what the gate must read and refuse
    assert out["fp32-ieee"]["spills"] > 0 and out["fp32-ieee"]["mma"] == "fma"
    assert any("spills" in f for f in out["fp32-ieee"]["failures"])
    assert out["bf16"].pop("registers") > 0 and out["fp32-ieee"]["registers"] > 0
    assert out["bf16"] == dict(spills=0, mma="wgmma", wgmma=2, dots=2, failures=[])


def _row(kernel="_fwd_kernel", arch=90, block_m=64, dtype="*bf16", precision="tf32", block_d=64, warps=4,
         descriptors=False, all_keys=False, **result) -> Row:
    meta = (("BLOCK_D", block_d), ("BLOCK_M", block_m), ("BLOCK_N", 64), ("PRECISION", precision))
    if kernel == "_bwd_kernel":
        meta += (("ONE_TILE", not all_keys), ("ALL_KEYS", all_keys), ("TMA", descriptors))
    req = CompileRequest("blip2rt.kernels.fused_attention", kernel, arch, (("Q", dtype), ("LSE", "*fp32")), meta, (),
                         (("num_warps", warps), ("num_stages", 2)))
    dots = gate.expected_dots(req)
    return Row(CompileResult(req, **{"registers": 128, "dots": dots, "wgmma_dots": dots, "mma": "wgmma", **result}),
               [("paper", "bf16", "op")])


def _ce_row(v4_loads, v4_stores, dtype="*bf16", block=4096, warps=8) -> Row:
    req = CompileRequest("blip2rt.kernels.chunked_cross_entropy", "_ce_rows_kernel", 90, (("LOGITS", dtype),),
                         (("BLOCK_V", block),), (), (("num_warps", warps), ("num_stages", 3)))
    return Row(CompileResult(req, registers=40, v4_loads=v4_loads, v4_stores=v4_stores), [("paper", "bf16", "linear+CE")])


def test_each_check_fails_on_what_it_guards():
    assert gate.failures([_row()]) == []
    assert "compile failed" in gate.failures([_row(error="PTXASError: boom")])[0]
    assert "shared memory" in gate.failures([_row(shared=232449)])[0]
    assert gate.failures([_row(arch=80, shared=166912)]) == []
    assert "over sm_80" in gate.failures([_row(arch=80, shared=166913)])[0]
    assert "spills 4 bytes" in gate.failures([_row(spill_stores=4, spill_loads=4)])[0]
    assert "1 of 2 dots are wgmma" in gate.failures([_row(wgmma_dots=1)])[0]
    assert gate.failures([_row(arch=80, wgmma_dots=0, mma="mma")]) == []  # sm_80 has no wgmma
    assert gate.failures([_row(dtype="*fp32", precision="tf32x3", wgmma_dots=0, mma="mma")]) == []  # fp32: not asked
    assert gate.failures([_row(block_m=32, wgmma_dots=0, mma="mma")]) == []  # listed in WGMMA_EXCEPTIONS
    # the key-major backward: every product wgmma at head dim 64, whatever its rows; below 64 the two dQ^T
    # products (head-dim rows) may not be
    assert gate.failures([_row(kernel="_bwd_kernel", block_m=32)]) == []
    assert "8 of 10 dots are wgmma, want 10" in gate.failures([_row(kernel="_bwd_kernel", block_m=32, wgmma_dots=8)])[0]
    assert gate.failures([_row(kernel="_bwd_kernel", block_d=16, wgmma_dots=8)]) == []
    # the backward planned with tensor descriptors: their copies must be in the PTX
    assert gate.failures([_row(kernel="_bwd_kernel", block_m=32, descriptors=True, tma=10)]) == []
    lowered = gate.failures([_row(kernel="_bwd_kernel", block_m=32, descriptors=True, tma=3)])
    assert len(lowered) == 1 and "3 tensor-memory copies in the PTX" in lowered[0]
    # the all-keys form: its five products once, all wgmma at head dim 64
    assert gate.failures([_row(kernel="_bwd_kernel", block_m=32, all_keys=True, descriptors=True, tma=8)]) == []
    assert "4 dots in the compiled kernel, want the source's 5" in gate.failures(
        [_row(kernel="_bwd_kernel", block_m=32, all_keys=True, descriptors=True, tma=8, dots=4, wgmma_dots=4)])[0]
    assert "7 of 10 dots are wgmma, want 8" in gate.failures([_row(kernel="_bwd_kernel", block_d=16, wgmma_dots=7)])[0]
    # occupancy: a kernel below its floor of blocks per SM fails (the CE rows kernel's floor is 2; the
    # attention backward's 1 through pointer tiles); registers, shared memory and warps each limit it
    assert gate.ctas_per_sm(90, 128, 53248, 8) == 2 and gate.ctas_per_sm(90, 129, 53248, 8) == 1
    assert gate.ctas_per_sm(90, 64, 120000, 4) == 1 and gate.ctas_per_sm(80, 32, 0, 32) == 2
    assert gate.ctas_per_sm(90, 16, 0, 1) == 32  # the 32-block limit
    assert gate.failures([_row(kernel="_bwd_kernel", warps=8, registers=255, shared=65536)]) == []
    # ... through tensor descriptors on sm_90, 2
    assert gate.failures([_row(kernel="_bwd_kernel", warps=8, registers=128, shared=65536, descriptors=True,
                               tma=10)]) == []
    one = gate.failures([_row(kernel="_bwd_kernel", warps=8, registers=129, shared=65536, descriptors=True, tma=10)])
    assert len(one) == 1 and "1 blocks per SM (129 registers, 65536 B shared, 8 warps), want at least 2" in one[0]
    ce = _ce_row(4, 4)
    assert gate.failures([Row(CompileResult(ce.result.request, registers=128, v4_loads=4, v4_stores=4), ce.uses)]) == []
    low = gate.failures([Row(CompileResult(ce.result.request, registers=200, v4_loads=4, v4_stores=4), ce.uses)])
    assert len(low) == 1 and "1 blocks per SM (200 registers, 0 B shared, 8 warps), want at least 2" in low[0]
    # a compile that could not be read, or that lost its products, fails instead of passing every check
    assert "0 registers" in gate.failures([_row(registers=0)])[0]
    no_dots = gate.failures([_row(dots=0, wgmma_dots=0, mma="")])
    assert len(no_dots) == 2 and "0 dots in the compiled kernel, want the source's 2" in no_dots[0] and "0 of 0 dots are wgmma, want 2" in no_dots[1]
    no_dots_fp32 = gate.failures([_row(dtype="*fp32", precision="tf32x3", dots=0, wgmma_dots=0, mma="")])
    assert len(no_dots_fp32) == 1 and "want the source's 2" in no_dots_fp32[0]  # not only a 16-bit check
    assert gate.failures([_row(arch=80, block_m=32, dots=1, wgmma_dots=0, mma="mma")])[0].endswith(
        "1 dots in the compiled kernel, want the source's 2")
    # the CE row kernel: two full passes of 128-bit loads, two of stores (4096 bf16 on 256 threads: 2 each)
    assert gate.failures([_ce_row(4, 4)]) == []
    assert "narrower than 128-bit" in gate.failures([_ce_row(3, 4)])[0]
    assert "narrower than 128-bit" in gate.failures([_ce_row(0, 0)])[0]
    assert gate.failures([_ce_row(0, 0, block=64, warps=1)]) == []  # 2 logits a thread: no 128-bit access exists


def test_the_plan_comes_from_the_launchers_own_choices(monkeypatch):
    """The gate compiles what the launchers choose: change a launcher's choice and the plan follows."""
    from blip2rt.kernels import fused_attention as fa

    def planned_blocks():
        rows = gate.plan(launch.H100, ["paper"], ["bf16"])
        return {(one.kwargs["BLOCK_M"], one.kwargs["BLOCK_N"]) for _, _, _, one in rows if one.kernel is fa._fwd_kernel}

    assert planned_blocks() == {(32, 64), (64, 64)}
    original = fa.attention_config
    monkeypatch.setattr(fa, "attention_config", lambda *a, **k: fa.AttentionConfig(
        **{**original(*a, **k).__dict__, "block_n": 16}))
    assert planned_blocks() == {(32, 16), (64, 16)}


def test_every_grid_fits_cuda_at_the_largest_batch_the_trainer_accepts():
    assert gate.check_grids_at_max_batch() == []
    from blip2rt.training.config import TrainConfig

    with pytest.raises(Exception, match="at most 65536"):
        TrainConfig(annotations=["a.json"], batch_size=launch.MAX_BATCH + 1).validate()


def test_launch_refuses_a_grid_past_cudas_limits():
    """What a grid with B*H on axis y would do at B >= 5462 (12 heads); every launcher puts B*H on x."""
    with pytest.raises(ValueError, match="passes CUDA's limit of 65535 blocks on axis y"):
        launch.check_grid("_fwd_kernel", (1, 65536, 1))
    launch.check_grid("_fwd_kernel", (2**31 - 1, 65535, 65535))
    with launch.plan_for(launch.H100) as launches:
        from blip2rt.kernels import fused_attention as fa

        q = torch.empty(launch.MAX_BATCH * 3, 64, 12, 64, dtype=torch.bfloat16, device="meta")
        fa.launch_forward(q, q, q, fa.MODE_BIDIRECTIONAL, 32, 0, None)
    assert launches[0].grid == (launch.MAX_BATCH * 3 * 12, 1, 1)


PTXAS_REPORT = """ptxas info    : Compiling entry function '_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _fwd_kernel
    0 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 16384 bytes smem, 536 bytes cmem[0]
"""


def test_a_ptxas_report_that_does_not_parse_is_an_error_and_is_not_cached(tmp_path, monkeypatch):
    from triton import knobs

    assert gate.parse_ptxas_report(PTXAS_REPORT) == (168, 8, 12)
    for bad in ("", "ptxas fatal   : Unresolved extern function 'foo'", PTXAS_REPORT.replace("Used 168", "Used 0"),
                PTXAS_REPORT.replace("Used 168 registers", "Using 168 regs")):
        with pytest.raises(ValueError, match="no register count"):
            gate.parse_ptxas_report(bad)
    monkeypatch.setattr(knobs.cache, "dir", str(tmp_path))
    monkeypatch.setattr(gate, "_run_ptxas", lambda ptx, arch: "ptxas printed something new")
    with pytest.raises(ValueError):
        gate._ptxas_report(".version 8.0 // an unread kernel", 90)
    assert not list((tmp_path / "blip2rt-gpu-compile").glob("*.json"))  # nothing cached
    monkeypatch.setattr(gate, "_run_ptxas", lambda ptx, arch: PTXAS_REPORT)
    assert gate._ptxas_report(".version 8.0 // an unread kernel", 90) == (168, 8, 12)  # read afresh, then cached
    assert len(list((tmp_path / "blip2rt-gpu-compile").glob("*.json"))) == 1


def test_the_layer_norm_backward_grid_is_one_wave_at_its_occupancy_floor():
    """The LayerNorm backward launches BLOCKS_PER_SM blocks an SM; the gate holds it to that many blocks per SM."""
    from blip2rt.kernels import post_ln_residual

    assert gate.MIN_CTAS_PER_SM["post_ln_residual._bwd_kernel"] == post_ln_residual.BLOCKS_PER_SM
    with launch.plan_for(launch.H100):
        assert launch.backward_programs(10**6, "cuda", post_ln_residual.BLOCKS_PER_SM) == 2 * launch.H100.sm_count


def test_the_table_names_pointers_off_a_16_byte_boundary():
    """Two compiles of one configuration can differ only in which pointers Triton's binder found on a 16-byte
    boundary (a strided view, e.g. ITG's shifted labels): the table's tiles column names those pointers, so
    its rows read apart."""
    row = _row()
    names = [name for name, _ in row.result.request.signature]
    assert gate._config(row.result.request) == f"64x64x64 w4 s2, {', '.join(names)} off 16 B"
    from blip2rt.kernels.fused_attention import _fwd_kernel

    aligned = tuple(((_fwd_kernel.arg_names.index(n),), (("tt.divisibility", 16),)) for n in names)
    req = row.result.request
    req = CompileRequest(req.module, req.kernel, req.arch, req.signature, req.constexprs, aligned, req.options)
    assert gate._config(req) == "64x64x64 w4 s2"
