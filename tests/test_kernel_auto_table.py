"""kernels="auto": the measured table (blip2rt.kernels.auto_table) is decided from benchmark JSON, written and
read back, refused when malformed, and drives the choice per op, GPU architecture and shape class."""

import json

import pytest
import torch

from blip2rt.kernels import auto_table, dispatch, launch


def bench(name, median, **params):
    return {"name": f"{name}[x]", "params": params, "stats": {"median": median}}


def attention(kind, batch, backward, fused, sdpa):
    return [bench("test_attention", fused, kind=kind, batch=batch, backward=backward, impl="fused"),
            bench("test_attention", sdpa, kind=kind, batch=batch, backward=backward, impl="sdpa"),
            bench("test_attention", min(fused, sdpa) / 2, kind=kind, batch=batch, backward=backward, impl="eager")]


def test_a_class_goes_to_triton_only_if_fused_won_every_case_in_it():
    rows = (attention("cross", 1, False, 1.0, 2.0) + attention("self", 1, False, 1.0, 2.0)  # fwd, B<=8: both won
            + attention("cross", 32, False, 1.0, 2.0) + attention("self", 32, False, 3.0, 2.0)  # fwd, B>8: one lost
            + attention("cross", 128, True, 5.0, 2.0)  # fwd+bwd, B>8: lost
            + [bench("test_training_kernel", 1.0, op="layer_norm", impl="fused"),
               bench("test_training_kernel", 2.0, op="layer_norm", impl="eager"),
               bench("test_training_kernel", 0.1, op="layer_norm", impl="compiled"),  # not the torch path
               bench("test_training_kernel", 3.0, op="itc", impl="fused"),
               bench("test_training_kernel", 2.0, op="itc", impl="eager"),
               bench("test_training_kernel", 1.0, op="linear_ce", impl="fused")])  # no torch figure: undecided
    assert auto_table.decide(rows) == {
        "attention": {"fwd, B<=8": "triton", "fwd, B>8": "torch", "fwd+bwd, B>8": "torch"},
        "residual_layer_norm": {"all": "triton"},
        "query_max_similarity": {"all": "torch"},
    }


def test_written_table_reads_back_keeps_other_architectures_and_refuses_malformed(tmp_path):
    path = tmp_path / "auto_table.json"
    auto_table.write(path, 80, "NVIDIA A100", {"attention": {"fwd, B<=8": "torch"}}, "a.json")
    auto_table.write(path, 90, "NVIDIA H200", {"attention": {"fwd, B<=8": "triton"}}, "b.json")
    table = auto_table.load(path)
    assert set(table["archs"]) == {"80", "90"} and table["archs"]["90"]["machine"] == "NVIDIA H200"
    assert auto_table.choose("attention", 90, "fwd, B<=8", table) == "triton"
    assert auto_table.choose("attention", 80, "fwd, B<=8", table) == "torch"
    assert auto_table.choose("attention", 90, "fwd, B>8", table) == "torch"  # a class it does not name
    assert auto_table.choose("attention", 89, "fwd, B<=8", table) == "torch"  # an architecture it does not hold
    for bad in ('{"archs": {}}', "not json", json.dumps({"version": 1, "archs": {"90": {"ops": {"attention": {"all": "fast"}}}}}),
                json.dumps({"version": 1, "archs": {"90": {"ops": {"softmax": {"all": "triton"}}}}})):
        path.write_text(bad)
        with pytest.raises(ValueError, match="auto_table.json"):
            auto_table.load(path)


def test_the_checked_in_table_loads():
    table = auto_table.load(auto_table.TABLE_PATH)
    for arch, entry in table["archs"].items():
        assert {"machine", "date", "source", "ops"} <= set(entry), arch


def test_the_command_writes_the_table_from_benchmark_json(tmp_path):
    src = tmp_path / "kernels.json"
    src.write_text(json.dumps({"benchmarks": attention("cross", 1, False, 1.0, 2.0)}))
    out = tmp_path / "out" / "auto_table.json"
    assert auto_table.main([str(src), "--write", str(out), "--arch", "90", "--machine", "NVIDIA H200"]) == 0
    assert auto_table.load(out)["archs"]["90"]["ops"] == {"attention": {"fwd, B<=8": "triton"}}
    src.write_text(json.dumps({"benchmarks": []}))
    assert auto_table.main([str(src), "--write", str(out), "--arch", "90", "--machine", "x"]) == 1


def test_auto_dispatch_runs_the_measured_path_per_call():
    """Planned for an H100 on meta tensors: a call in a class the table gives Triton launches Triton kernels;
    one in a class it gives torch, or does not name, launches none."""
    table = {"version": 1, "archs": {"90": {"ops": {"attention": {"fwd, B<=8": "triton", "fwd, B>8": "torch"},
                                                      "residual_layer_norm": {"all": "triton"}}}}}
    run = dispatch._per_call("attention", table)

    def launched(batch):
        q, k, v = (torch.empty(batch, n, 12, 64, dtype=torch.bfloat16, device="meta") for n in (32, 257, 257))
        with launch.plan_for(launch.H100) as launches:
            out = run(q, k, v)
        assert out.shape == (batch, 32, 12, 64)
        return [one.name for one in launches]

    assert launched(2) == ["fused_attention._fwd_kernel"]
    assert launched(16) == []
    ln = dispatch._per_call("residual_layer_norm", table)
    h = torch.empty(64, 768, dtype=torch.bfloat16, device="meta")
    w = torch.empty(768, dtype=torch.bfloat16, device="meta")
    with launch.plan_for(launch.H100) as launches:
        ln(h, h, w, w, 1e-12, 0.0)
    assert [one.name for one in launches] == ["post_ln_residual._fwd_kernel"]
    with launch.plan_for(launch.A100) as launches:  # sm_80: not in the table
        ln(h, h, w, w, 1e-12, 0.0)
    assert launches == []
