"""Fused residual + dropout + LayerNorm against the plain-PyTorch reference (Triton interpreter on CPU)."""

import pytest
import torch

from blip2rt.kernels.post_ln_residual import dropout_keep_mask, residual_layer_norm_triton
from blip2rt.kernels.references import residual_layer_norm_reference
from formulas import residual_layer_norm64
from tolerances import assert_matches

SHAPES = [(1, 1, 7), (5, 2), (3, 5, 37), (17, 768), (2, 3, 1023)]  # (5, 2): rows narrower than a Philox call


def make(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    h = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    r = (3 * torch.randn(shape, generator=g) + 1).to(dtype).requires_grad_()  # a shifted, wider residual
    w = (1 + 0.2 * torch.randn(d, generator=g)).to(dtype).requires_grad_()
    b = (0.2 * torch.randn(d, generator=g)).to(dtype).requires_grad_()
    return h, r, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_forward_and_all_grads_match_reference(shape, dtype, p):
    h, r, w, b = make(shape, dtype)
    mask = dropout_keep_mask(shape, p, seed=11, device="cpu") if p else None
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)

    y = residual_layer_norm_triton(h, r, w, b, 1e-12, p, seed=11)
    grads = torch.autograd.grad(y, (h, r, w, b), g)
    y_eager = residual_layer_norm_reference(h, r, w, b, 1e-12, p, keep_mask=mask)
    grads_eager = torch.autograd.grad(y_eager, (h, r, w, b), g)
    leaves64 = [t.detach().double().requires_grad_() for t in (h, r, w, b)]
    y64 = residual_layer_norm64(*leaves64, 1e-12, keep=mask, p=p)
    grads64 = torch.autograd.grad(y64, leaves64, g.double())

    assert y.dtype == dtype
    assert_matches(y, y_eager, y64, dtype, "y")
    rows = h.numel() // shape[-1]
    for name, a, e, r64 in zip(("dh", "dresidual", "dweight", "dbias"), grads, grads_eager, grads64):
        # dweight/dbias are sums over every row: fp32 rounding grows like sqrt(rows)
        atol = 1e-5 * rows**0.5 if name in ("dweight", "dbias") else 1e-5
        assert_matches(a, e, r64, dtype, name, fp32_atol=atol)


def test_dropout_drops_the_right_fraction_and_depends_on_the_seed():
    keep = dropout_keep_mask((100, 250), 0.1, seed=3, device="cpu")
    frac = keep.float().mean().item()
    assert abs(frac - 0.9) < 3 * (0.9 * 0.1 / keep.numel()) ** 0.5 + 1e-4
    assert not torch.equal(keep, dropout_keep_mask((100, 250), 0.1, seed=4, device="cpu"))
    # four neighbouring columns share one Philox call (kernels.philox): its outputs must be as independent
    # as separate calls' (5 sigma of a correlation estimated from n draws), at every lag within the four
    # and across rows; a layout that repeated one output would correlate fully
    wide = dropout_keep_mask((400, 768), 0.5, seed=5, device="cpu").float()
    centred = wide - wide.mean()
    for a, b_ in ((centred[:, 1:], centred[:, :-1]), (centred[:, 2:], centred[:, :-2]), (centred[:, 3:], centred[:, :-3]),
                  (centred[1:], centred[:-1])):
        assert abs(((a * b_).mean() / centred.pow(2).mean()).item()) < 5 / wide.numel() ** 0.5
    h, r, w, b = make((100, 250), torch.float32)
    y = residual_layer_norm_triton(h, r, w, b, 1e-12, 0.1, seed=3)
    torch.testing.assert_close(y, residual_layer_norm_reference(h, r, w, b, 1e-12, 0.1, keep_mask=keep),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy, on the planted inf
def test_non_finite_input_poisons_only_its_row():
    h, r, w, b = make((4, 33), torch.float32)
    h = h.detach().clone()
    h[2, 5] = float("nan")
    r = r.detach().clone()
    r[0, 1] = float("inf")
    y = residual_layer_norm_triton(h, r, w.detach(), b.detach(), 1e-12)
    assert torch.isnan(y[2]).all() and not torch.isfinite(y[0]).any()
    assert torch.isfinite(y[[1, 3]]).all()


@pytest.fixture
def saved_mask(monkeypatch):
    """The launchers planned as gpu-tune's table may have them on a GPU: the forward saves its dropout
    mask as bits, and the backward reads them instead of drawing the mask again."""
    from blip2rt.kernels import launch, post_ln_residual as ln

    choice = ln.backward_config
    monkeypatch.setattr(ln, "backward_config", lambda *args: dict(choice(*args), saved_mask=True))
    launch.forget_plans()
    yield
    monkeypatch.setattr(ln, "backward_config", choice)
    launch.forget_plans()


def _forward_backward(shape, dtype, p, seed):
    from blip2rt.kernels import launch

    h, r, w, b = make(shape, dtype)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    with launch.record() as launches:
        y = residual_layer_norm_triton(h, r, w, b, 1e-12, p, seed=seed)
        grads = torch.autograd.grad(y, (h, r, w, b), g)
    return y, grads, {one.name.rsplit(".", 1)[1]: one.kwargs for one in launches}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(5, 1), (3, 5, 37), (17, 768), (2, 3, 1023)], ids=lambda s: "x".join(map(str, s)))
def test_a_saved_mask_gives_what_drawing_it_again_gives_bit_for_bit(shape, dtype, request):
    """The same mask whether the backward reads the forward's bits or draws them again: every output
    equal, and the bits themselves are the mask `dropout_keep_mask` draws, 8 columns a byte, lowest first."""
    from blip2rt.kernels import dropout_rng, post_ln_residual as ln

    y, grads, kinds = _forward_backward(shape, dtype, 0.3, 11)
    assert not kinds["_fwd_kernel"]["SAVE_MASK"] and not kinds["_bwd_kernel"]["SAVED_MASK"]
    request.getfixturevalue("saved_mask")
    y_saved, grads_saved, kinds = _forward_backward(shape, dtype, 0.3, 11)
    assert kinds["_fwd_kernel"]["SAVE_MASK"] and kinds["_bwd_kernel"]["SAVED_MASK"]
    assert torch.equal(y, y_saved)
    for a, c in zip(grads, grads_saved):
        assert torch.equal(a, c)

    d = shape[-1]
    h, r, w, b = (t.detach() for t in make(shape, dtype))
    _, _, bits = ln.launch_forward(h, r, w, b, 1e-12, 0.3, dropout_rng.fixed(11, "cpu"))
    assert bits.shape == (h.numel() // d, -(-d // 8)) and bits.dtype == torch.uint8
    unpacked = (bits.int()[:, :, None] >> torch.arange(8)) & 1  # (rows, bytes, 8): bit i of byte j is column 8j + i
    keep = dropout_keep_mask(shape, 0.3, 11, "cpu").reshape(-1, d)
    assert torch.equal(unpacked.reshape(len(bits), -1)[:, :d].bool(), keep)


def test_without_dropout_nothing_is_saved(saved_mask):
    from blip2rt.kernels import post_ln_residual as ln

    h, r, w, b = (t.detach() for t in make((3, 37), torch.float32))
    assert ln.launch_forward(h, r, w, b, 1e-12, 0.0, None)[2] is None


@pytest.mark.parametrize("mode", ["drawn again", "saved"])
def test_eager_path_equals_the_custom_op_that_torch_compile_traces(mode, request):
    """Eager calls go through an autograd.Function (less host time); torch.compile sees the custom
    op. Both run the same launches: the same output and grads, bit for bit, dropout included, with the
    mask drawn again by the backward or saved by the forward."""
    from blip2rt.kernels import dropout_rng, launch
    from blip2rt.kernels.post_ln_residual import residual_layer_norm_forward_op

    if mode == "saved":
        request.getfixturevalue("saved_mask")
    h, r, w, b = make((3, 5, 37), torch.float32)
    g = torch.randn(3, 5, 37, generator=torch.Generator().manual_seed(1))
    with launch.record() as eager_launches:
        y = residual_layer_norm_triton(h, r, w, b, 1e-12, 0.2, seed=4)
        grads = torch.autograd.grad(y, (h, r, w, b), g)
    with launch.record() as op_launches:
        y_op = residual_layer_norm_forward_op(h, r, w, b, 1e-12, 0.2, dropout_rng.fixed(4, "cpu"))[0]
        grads_op = torch.autograd.grad(y_op, (h, r, w, b), g)
    assert [one.name for one in eager_launches] == [one.name for one in op_launches] == \
        ["post_ln_residual._fwd_kernel", "post_ln_residual._bwd_kernel"]
    assert op_launches[1].kwargs["SAVED_MASK"] is (mode == "saved")
    assert torch.equal(y, y_op)
    for a, c in zip(grads, grads_op):
        assert torch.equal(a, c)
