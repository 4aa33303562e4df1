"""Fused ITC (query-max similarity + contrastive loss) against the reference and the paper's formula."""

import pytest
import torch
import torch.nn.functional as F

from blip2rt.kernels.itc import query_max_similarity_triton
from blip2rt.kernels.itc_loss import itc_loss
from blip2rt.kernels.references import query_max_similarity_reference
from tolerances import assert_matches


def features(b, q, d, dtype, seed=0, bt=None):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, q, d, generator=g), dim=-1).to(dtype).requires_grad_()
    txt = F.normalize(torch.randn(bt or b, d, generator=g), dim=-1).to(dtype).requires_grad_()
    return img, txt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("b, q, d", [(1, 1, 16), (3, 32, 40), (17, 1, 24), (17, 32, 256)])
def test_query_max_similarity_forward_and_grads(b, q, d, dtype):
    img, txt = features(b, q, d, dtype, bt=b + 2)
    g = torch.randn(b, b + 2, generator=torch.Generator().manual_seed(3))
    s = query_max_similarity_triton(img, txt)
    grads = torch.autograd.grad(s, (img, txt), g)
    s_eager = query_max_similarity_reference(img, txt)
    grads_eager = torch.autograd.grad(s_eager, (img, txt), g)
    img64, txt64 = (t.detach().double().requires_grad_() for t in (img, txt))
    s64 = torch.einsum("iqd,td->itq", img64, txt64).max(dim=-1).values
    grads64 = torch.autograd.grad(s64, (img64, txt64), g.double())
    assert s.shape == (b, b + 2) and s.dtype == torch.float32
    assert_matches(s, s_eager, s64, dtype, "similarity")
    for name, a, e, r in zip(("dimg", "dtxt"), grads, grads_eager, grads64):
        assert a.dtype == dtype
        assert_matches(a, e, r, dtype, name)


def test_the_reference_similarity_stays_float64():
    img, txt = features(3, 4, 16, torch.float64)
    s = query_max_similarity_reference(img, txt)
    assert s.dtype == torch.float64
    want = torch.tensor([[max(float(img[i, q] @ txt[t]) for q in range(4)) for t in range(3)] for i in range(3)],
                        dtype=torch.float64)
    torch.testing.assert_close(s, want, atol=1e-14, rtol=1e-14)


def paper_itc64(img, txt, temp, targets, eps=0.1):
    """BLIP-2 ITC in float64, written from the formula: s = max_q <img_q, txt> / temp, CE both ways."""
    s = torch.einsum("iqd,td->itq", img.double(), txt.double()).max(-1).values / temp
    n = s.shape[1]
    soft = (1 - eps) * F.one_hot(targets, n).double() + eps / n
    return (-(soft * s.log_softmax(1)).sum(1).mean() - (soft * s.t().log_softmax(1)).sum(1).mean()) / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("b, q", [(1, 32), (3, 1), (17, 32)])
def test_itc_loss_single_process(b, q, dtype):
    img, txt = features(b, q, 32, dtype, seed=b)
    temp = torch.tensor(0.07, requires_grad=True)
    loss, s_i2t, s_t2i = itc_loss(img, txt, temp, backend="triton")
    grads = torch.autograd.grad(loss, (img, txt, temp))
    loss_e, *_ = itc_loss(img, txt, temp, backend="torch")
    grads_e = torch.autograd.grad(loss_e, (img, txt, temp))
    leaves = [t.detach().double().requires_grad_() for t in (img, txt, temp)]
    loss64 = paper_itc64(*leaves, torch.arange(b))
    grads64 = torch.autograd.grad(loss64, leaves)
    assert s_i2t.shape == s_t2i.shape == (b, b)
    torch.testing.assert_close(s_t2i, s_i2t.t())
    assert_matches(loss, loss_e, loss64, dtype, "loss")
    for name, a, e, r in zip(("dimg", "dtxt", "dtemp"), grads, grads_e, grads64):
        assert_matches(a, e, r, dtype, name, fp32_atol=2e-5)


def test_itc_loss_two_ranks():
    """Rank 1 of 2: its own features carry the gradient; the gathered ones do not; targets offset by B."""
    b, q, d = 3, 4, 24
    img, txt = features(2 * b, q, d, torch.float32, seed=7)
    temp = torch.tensor(0.05, requires_grad=True)
    rank = 1
    img_local = img.detach()[rank * b:(rank + 1) * b].clone().requires_grad_()
    txt_local = txt.detach()[rank * b:(rank + 1) * b].clone().requires_grad_()
    loss, s_i2t, s_t2i = itc_loss(img_local, txt_local, temp, img_all=img.detach(), txt_all=txt.detach(), offset=rank * b,
                                  backend="triton")
    assert s_i2t.shape == s_t2i.shape == (b, 2 * b)
    grads = torch.autograd.grad(loss, (img_local, txt_local, temp))

    # float64, by the formula: rank-local rows against all columns, targets rank*B + i
    leaves = [t.double().requires_grad_() for t in (img_local.detach(), txt_local.detach(), temp.detach())]
    s1 = torch.einsum("iqd,td->itq", leaves[0], txt.detach().double()).max(-1).values / leaves[2]
    s2 = torch.einsum("iqd,td->tiq", img.detach().double(), leaves[1]).max(-1).values / leaves[2]
    targets = torch.arange(rank * b, rank * b + b)
    loss64 = (F.cross_entropy(s1, targets, label_smoothing=0.1) + F.cross_entropy(s2, targets, label_smoothing=0.1)) / 2
    grads64 = torch.autograd.grad(loss64, leaves)
    torch.testing.assert_close(loss.double(), loss64, atol=1e-5, rtol=1e-5)
    for a, r in zip(grads, grads64):
        torch.testing.assert_close(a.double(), r, atol=2e-5, rtol=1e-5)


def test_itc_soft_targets_from_image_ids():
    """Several captions of one image: 0.9 spread over the positives + 0.1 uniform."""
    img, txt = features(5, 4, 16, torch.float32, seed=2)
    ids = torch.tensor([7, 7, 3, 9, 3])
    temp = torch.tensor(0.1)
    loss, s_i2t, s_t2i = itc_loss(img, txt, temp, image_ids=ids, backend="triton")
    pos = (ids[:, None] == ids[None, :]).double()
    soft = 0.9 * pos / pos.sum(1, keepdim=True) + 0.1 / 5
    s = torch.einsum("iqd,td->itq", img.double(), txt.double()).max(-1).values / 0.1
    want = (-(soft * s.log_softmax(1)).sum(1).mean() - (soft * s.t().log_softmax(1)).sum(1).mean()) / 2
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    # with distinct ids it is exactly the label-smoothed diagonal loss
    distinct, *_ = itc_loss(img, txt, temp, image_ids=torch.arange(5), backend="triton")
    plain, *_ = itc_loss(img, txt, temp, backend="triton")
    torch.testing.assert_close(distinct, plain, atol=1e-6, rtol=1e-6)


def test_itc_large_logits_stay_finite():
    img, txt = features(17, 32, 16, torch.float32, seed=4)
    loss, *_ = itc_loss(img, txt, torch.tensor(1e-3), backend="triton")  # similarities up to 1000
    want = paper_itc64(img.detach(), txt.detach(), 1e-3, torch.arange(17))
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), want, atol=1e-3, rtol=1e-5)


def test_itc_nan_feature_gives_nan_loss():
    img, txt = features(3, 32, 16, torch.float32)
    img = img.detach().clone()
    img[1, 30, 2] = float("nan")  # one query of one image: the max must not skip it
    s = query_max_similarity_triton(img, txt.detach())
    assert torch.isnan(s[1]).all() and torch.isfinite(s[[0, 2]]).all()
    loss, *_ = itc_loss(img, txt.detach(), torch.tensor(0.07), backend="triton")
    assert torch.isnan(loss)
