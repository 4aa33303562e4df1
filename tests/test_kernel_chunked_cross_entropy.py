"""Chunked linear + cross-entropy against the reference (full logits) and float64."""

import pytest
import torch

from blip2rt.kernels.chunked_cross_entropy import linear_cross_entropy_triton
from blip2rt.kernels.references import linear_cross_entropy_reference
from formulas import linear_cross_entropy64
from tolerances import assert_matches


def make(batch, tokens, hidden, vocab, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (scale * torch.randn(batch, tokens, hidden, generator=g)).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(vocab, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, tokens), generator=g)
    labels[0, :2] = -100
    if batch > 1:
        labels[1] = -100  # a whole sequence unlabelled
    return h, w, b, labels


def check(h, w, b, labels, dtype, eps, chunk=None, fp32_atol=1e-5):
    leaves = [t for t in (h, w, b) if t is not None and t.requires_grad]
    loss = linear_cross_entropy_triton(h, w, labels, b, eps, chunk=chunk)
    grads = torch.autograd.grad(loss, leaves)
    loss_e = linear_cross_entropy_reference(h, w, labels, b, eps)
    grads_e = torch.autograd.grad(loss_e, leaves)
    as64 = {id(t): t.detach().double().requires_grad_(t.requires_grad) for t in (h, w, b) if t is not None}
    leaves64 = [as64[id(t)] for t in leaves]
    loss64 = linear_cross_entropy64(as64[id(h)], as64[id(w)], labels, as64[id(b)] if b is not None else None, eps)
    grads64 = torch.autograd.grad(loss64, leaves64)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_matches(loss, loss_e, loss64, dtype, "loss", fp32_atol=fp32_atol)
    for a, e, r in zip(grads, grads_e, grads64):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert_matches(a, e, r, dtype, "grad", fp32_atol=fp32_atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch, vocab", [(1, 97), (3, 1000), (17, 3001)])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_loss_and_grads(batch, vocab, eps, dtype):
    h, w, b, labels = make(batch, 5, 40, vocab, dtype, seed=batch)
    check(h, w, b, labels, dtype, eps, chunk=4)


def test_itg_vocabulary_without_bias_and_default_chunks():
    """The Q-Former ITG head's vocabulary (BERT + [DEC]), tied weight, no separate bias."""
    h, w, _, labels = make(2, 7, 32, 30523, torch.float32, seed=5)
    check(h, w, None, labels, torch.float32, 0.1)


def test_frozen_weight_gets_no_grad():
    """Stage 2: the LLM head is frozen; only the hidden states need a grad."""
    h, w, b, labels = make(3, 4, 16, 257, torch.float32, seed=6)
    w = w.detach()
    loss = linear_cross_entropy_triton(h, w, labels, None, 0.0)
    (dh,) = torch.autograd.grad(loss, (h,))
    (dh_e,) = torch.autograd.grad(linear_cross_entropy_reference(h, w, labels, None, 0.0), (h,))
    torch.testing.assert_close(dh, dh_e, atol=1e-5, rtol=1e-5)


def test_large_logits():
    h, w, b, labels = make(3, 6, 16, 211, torch.float32, seed=7, scale=300.0)  # logits in the thousands
    # logits in the thousands keep ~1e-4 absolute in fp32, and dW's entries reach ~150: 1e-2 there
    check(h, w, b, labels, torch.float32, 0.1, chunk=5, fp32_atol=1e-2)


def test_all_labels_ignored_gives_zero_loss_and_grads():
    h, w, b, labels = make(2, 3, 16, 50, torch.float32)
    labels[:] = -100
    loss = linear_cross_entropy_triton(h, w, labels, b, 0.1)
    grads = torch.autograd.grad(loss, (h, w, b))
    assert loss.item() == 0.0 and all((g == 0).all() for g in grads)
    assert linear_cross_entropy_reference(h, w, labels, b, 0.1).item() == 0.0


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy, on the planted NaN
def test_non_finite_hidden_or_bad_label_gives_nan():
    h, w, b, labels = make(2, 3, 16, 50, torch.float32)
    h2 = h.detach().clone()
    h2[1, 2, 0] = float("nan")
    labels2 = labels.clone()
    labels2[1, 2] = 7
    assert torch.isnan(linear_cross_entropy_triton(h2, w.detach(), labels2, None))
    bad = labels.clone()
    bad[0, 2] = 50  # out of range, not ignore_index
    assert torch.isnan(linear_cross_entropy_triton(h.detach(), w.detach(), bad, None))


def test_the_reference_computes_in_float64_when_given_float64():
    """The eager reference once widened its logits to fp32 whatever the input: a float64 oracle built on it
    was an fp32 one. Now float64 in, float64 throughout (agreeing with the formula to 1e-12)."""
    h, w, b, labels = make(2, 5, 24, 301, torch.float64, seed=3, scale=30.0)
    loss = linear_cross_entropy_reference(h, w, labels, b, 0.1)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, linear_cross_entropy64(h, w, labels, b, 0.1), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("tokens", [64 * 40, 256 * 31, 1 << 16], ids=["benchmark", "gate", "many tokens"])
@pytest.mark.parametrize("hidden, vocab, dtype", [(2560, 50272, torch.bfloat16), (768, 30523, torch.bfloat16),
                                                  (2560, 50272, torch.float32)], ids=["OPT head", "ITG head", "fp32"])
def test_the_weight_is_streamed_at_most_three_times_within_the_logits_budget(tokens, hidden, vocab, dtype):
    """Planned on meta tensors for an H100, as the launcher would launch on one: each chunk is one row-kernel
    launch and one pass over the weight. At the paper's sizes in 16 bits, 3 passes or fewer; where a third
    of the tokens' logits would pass the memory budget, chunks as large as the budget allows."""
    from blip2rt.kernels import launch
    from blip2rt.kernels.chunked_cross_entropy import LOGITS_BUDGET_BYTES, ROW_ALIGN

    h = torch.empty(tokens, hidden, dtype=dtype, device="meta").requires_grad_()
    w = torch.empty(vocab, hidden, dtype=dtype, device="meta")
    labels = torch.empty(tokens, dtype=torch.int64, device="meta")
    with launch.plan_for(launch.H100) as launches:
        linear_cross_entropy_triton(h, w, labels, None, 0.0)
    rows = [one for one in launches if one.name == "chunked_cross_entropy._ce_rows_kernel"]
    chunk = max(one.args[0].shape[0] for one in rows)
    row_bytes = -(-vocab // ROW_ALIGN) * ROW_ALIGN * dtype.itemsize
    assert sum(one.args[0].shape[0] for one in rows) == tokens
    assert chunk * row_bytes <= LOGITS_BUDGET_BYTES
    if (-(-tokens // 3)) * row_bytes <= LOGITS_BUDGET_BYTES:
        assert len(rows) <= 3, len(rows)
    else:  # bounded by memory: every chunk but the last as large as the budget allows
        assert chunk == LOGITS_BUDGET_BYTES // row_bytes
    if tokens <= 256 * 31 and dtype == torch.bfloat16:
        assert len(rows) <= 3  # the paper's sizes
