"""Fused residual + dropout + LayerNorm against the plain-PyTorch reference (Triton interpreter on CPU)."""

import pytest
import torch

from blip2rt.kernels.post_ln_residual import dropout_keep_mask, residual_layer_norm_triton
from blip2rt.kernels.references import residual_layer_norm_reference
from formulas import residual_layer_norm64
from tolerances import assert_matches

SHAPES = [(1, 1, 7), (3, 5, 37), (17, 768), (2, 3, 1023)]


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


def test_eager_path_equals_the_custom_op_that_torch_compile_traces():
    """Eager calls go through an autograd.Function (less host time); torch.compile sees the custom
    op. Both run the same launches: the same output and grads, bit for bit, dropout included."""
    from blip2rt.kernels import dropout_rng, launch
    from blip2rt.kernels.post_ln_residual import residual_layer_norm_forward_op

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
    assert torch.equal(y, y_op)
    for a, c in zip(grads, grads_op):
        assert torch.equal(a, c)
