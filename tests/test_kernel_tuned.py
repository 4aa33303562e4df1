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


def plan_layer_norm_both(p=0.1):
    """The (forward, backward) launches of one residual LayerNorm step on an H100, planned on meta tensors."""
    h, w = meta(8192, 768), meta(768)
    seed = meta(1, dtype=torch.int64)
    with launch.plan_for(launch.H100) as launches:
        y, stats, bits = ln.launch_forward(h, h, w, w, 1e-12, p, seed)
        ln.launch_backward(y, h, h, w, stats, bits, p, seed)
    assert [one.name for one in launches] == ["post_ln_residual._fwd_kernel", "post_ln_residual._bwd_kernel"]
    return launches


def plan_layer_norm():
    return plan_layer_norm_both()[1]


def test_layer_norm_backward_takes_the_tuned_rows_warps_and_grid():
    default = plan_layer_norm()
    assert default.grid[0] == ln.BLOCKS_PER_SM * launch.H100.sm_count
    with tuned.trying(tuned.layer_norm_key(768, "bfloat16", True), dict(block_r=4, warps=4, blocks_per_sm=3)):
        bwd = plan_layer_norm()
    assert (bwd.kwargs["BLOCK_R"], bwd.kwargs["num_warps"], bwd.grid[0]) == (4, 4, 3 * launch.H100.sm_count)
    assert plan_layer_norm().kwargs == default.kwargs  # the trial is over: the launcher's own choice again


def test_a_tuned_saved_mask_makes_the_forward_store_it_and_the_backward_read_it():
    fwd, bwd = plan_layer_norm_both()
    assert not fwd.kwargs["SAVE_MASK"] and not bwd.kwargs["SAVED_MASK"]  # untuned: drawn again
    with tuned.trying(tuned.layer_norm_key(768, "bfloat16", True),
                      dict(block_r=2, warps=8, blocks_per_sm=2, saved_mask=True)):
        fwd, bwd = plan_layer_norm_both()
        assert fwd.kwargs["SAVE_MASK"] and bwd.kwargs["SAVED_MASK"]
        bits = fwd.args[6]  # BITS: (rows, ceil(768 / 8)) uint8, handed to the backward
        assert bits.shape == (8192, 96) and bits.dtype == torch.uint8 and bwd.args[5] is bits
    with tuned.trying(tuned.layer_norm_key(768, "bfloat16", False),
                      dict(block_r=2, warps=8, blocks_per_sm=2, saved_mask=True)):
        assert not plan_layer_norm_both(p=0.0)[0].kwargs["SAVE_MASK"]  # no dropout, no mask
    # a table entry written before saved_mask existed reads as drawing the mask again
    with tuned.trying(tuned.layer_norm_key(768, "bfloat16", True), dict(block_r=2, warps=8, blocks_per_sm=2)):
        assert not plan_layer_norm().kwargs["SAVED_MASK"]


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


def test_itm_forward_takes_a_tuned_row_tile():
    """gpu-tune's ITM forward offers two 32-row programs against the launcher's one 64-row tile: the launch
    plan follows the table."""
    from blip2rt.kernels.qformer_attention import MODE_BIDIRECTIONAL

    q = meta(128, 64, 12, 64)
    mask, seed = meta(128, 32, dtype=torch.int8), meta(1, dtype=torch.int64)

    def forward():
        with launch.plan_for(launch.H100) as launches:
            fa.launch_forward(q, q, q, MODE_BIDIRECTIONAL, 32, 0, mask, 1, 0.1, seed)
        (one,) = launches
        return one.grid, one.kwargs["BLOCK_M"], one.kwargs["num_warps"]

    assert forward() == ((128 * 12, 1, 1), 64, 8)
    key = tuned.attention_key(False, 64, 64, 64, "bfloat16", True, False)
    with tuned.trying(key, dict(block_m=32, block_n=32, block_d=64, warps=4, stages=1, maxnreg=None)):
        assert forward() == ((128 * 12, 2, 1), 32, 4)
