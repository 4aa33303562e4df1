"""The per-architecture tuned-config table (blip2rt.kernels.tuned): each launcher plans with the table's
configuration for its key on that architecture, and with its own choice where the table has none."""

import pytest
import torch

from blip2rt.kernels import chunked_cross_entropy as ce
from blip2rt.kernels import fused_attention as fa
from blip2rt.kernels import launch, tuned
from blip2rt.kernels import post_ln_residual as ln


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def plan_layer_norm():
    h, w = meta(8192, 768), meta(768)
    seed = meta(1, dtype=torch.int64)
    with launch.plan_for(launch.H100) as launches:
        y, stats = ln.launch_forward(h, h, w, w, 1e-12, 0.1, seed)
        ln.launch_backward(y, h, h, w, stats, 0.1, seed)
    return next(one for one in launches if one.name == "post_ln_residual._bwd_kernel")


def test_layer_norm_backward_takes_the_tuned_rows_warps_and_grid():
    default = plan_layer_norm()
    assert default.grid[0] == ln.BLOCKS_PER_SM * launch.H100.sm_count
    with tuned.trying(tuned.layer_norm_key(768, "bfloat16", True), dict(block_r=4, warps=4, blocks_per_sm=3)):
        bwd = plan_layer_norm()
    assert (bwd.kwargs["BLOCK_R"], bwd.kwargs["num_warps"], bwd.grid[0]) == (4, 4, 3 * launch.H100.sm_count)
    assert plan_layer_norm().kwargs == default.kwargs  # the trial is over: the launcher's own choice again


def test_attention_and_ce_rows_take_the_tuned_configuration_on_its_architecture_only():
    key = tuned.attention_key(True, 32, 257, 64, "bfloat16", True, False)
    config = dict(block_m=32, block_n=128, block_d=64, warps=4, stages=3, maxnreg=None)
    with tuned.trying(key, config):
        with launch.plan_for(launch.H100):
            got = fa.attention_config(32, 257, 64, torch.bfloat16, torch.device("meta"), backward=True, dropout=True)
        assert (got.block_n, got.warps, got.stages) == (128, 4, 3)
        with launch.plan_for(launch.H100):  # another key: untouched
            other = fa.attention_config(32, 257, 64, torch.bfloat16, torch.device("meta"), backward=True, dropout=False)
        assert other.block_n == 64 and other.warps == 8
    with tuned.trying(tuned.ce_rows_key(50272, "bfloat16"), dict(BLOCK_V=8192, num_warps=16)):
        with launch.plan_for(launch.H100):
            assert ce.ce_rows_config(50272, torch.device("meta"), torch.bfloat16) == dict(BLOCK_V=8192, num_warps=16)


def test_a_table_entry_applies_to_its_architecture(monkeypatch, tmp_path):
    path = tmp_path / "tuned_configs.json"
    key = tuned.ce_rows_key(50272, "bfloat16")
    tuned.write(path, 90, "NVIDIA H200", {key: dict(BLOCK_V=2048, num_warps=4)})
    monkeypatch.setattr(tuned, "TABLE_PATH", path)
    monkeypatch.setattr(tuned, "_TABLE", None)
    with launch.plan_for(launch.H100):
        assert ce.ce_rows_config(50272, torch.device("meta"), torch.bfloat16) == dict(BLOCK_V=2048, num_warps=4)
    with launch.plan_for(launch.A100):
        assert ce.ce_rows_config(50272, torch.device("meta"), torch.bfloat16)["BLOCK_V"] == 4096
    path.write_text('{"version": 1, "archs": {"90": {"configs": {}}}}')
    with pytest.raises(ValueError, match="needs machine, date and configs"):
        tuned.load(path)
