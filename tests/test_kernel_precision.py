"""Precision under autocast: the fused ops return the dtypes their torch references return, and
compute in the training precision (Triton's interpreter on CPU, with CPU autocast in bf16)."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import blip2rt
from blip2rt.kernels import AttentionMode, launch
from blip2rt.kernels.chunked_cross_entropy import linear_cross_entropy_triton
from blip2rt.kernels.itc import query_max_similarity_triton
from blip2rt.kernels.post_ln_residual import residual_layer_norm_triton
from blip2rt.kernels.references import (linear_cross_entropy_reference, query_max_similarity_reference,
                                        residual_layer_norm_reference)
from tolerances import assert_matches

BF16 = torch.bfloat16


def autocast():
    return torch.autocast("cpu", dtype=BF16)


def qformer_pass(m, packed_kv, ids, mask, weights):
    """ITM's pass (queries + text, bidirectional, cross-attention to the image) and a weighted sum."""
    queries = m.query_tokens.expand(ids.shape[0], -1, -1)
    x = torch.cat([queries, m.embeddings(ids).to(queries.dtype)], dim=1)
    out, _ = m.qformer(x, num_queries=queries.shape[1], text_mask=mask, mode=AttentionMode.BIDIRECTIONAL,
                       image_kv=m.qformer.image_kv(packed_kv))
    return out, (out.float() * weights).sum()


def test_qformer_under_bf16_autocast_gives_torchs_dtypes_and_values():
    """The residual stream stays fp32 under autocast with either backend (the fused LayerNorm once
    returned bf16 here), and outputs and every parameter grad agree within bf16 error."""
    m = blip2rt.from_pretrained("tiny", device="cpu", kernels="triton").eval()
    g = torch.Generator().manual_seed(3)
    image = torch.randn(3, 17, m.config.vision_config.hidden_size, generator=g)
    ids = torch.randint(5, 40, (3, 30), generator=g)  # 8 queries + 30 text: rows past one 32-row tile
    mask = torch.tensor([[1] * 30, [1] * 5 + [0] * 25, [1] * 2 + [0] * 28])
    weights = torch.randn(3, m.config.num_query_tokens + 30, m.config.qformer_config.hidden_size, generator=g)
    names = [n for n, p in m.named_parameters() if n.startswith(("qformer.", "query_tokens", "embeddings."))
             and p.requires_grad]

    def run(model, backend, dtype, amp):
        model.set_kernel_backend(backend)
        params = dict(model.named_parameters())
        with launch.record() as launches:
            with autocast() if amp else contextlib.nullcontext():
                out, loss = qformer_pass(model, image.to(dtype), ids, mask, weights.to(dtype))
            grads = torch.autograd.grad(loss, [params[n] for n in names])
        return out, grads, launches

    out_t, grads_t, ran = run(m, "triton", torch.float32, amp=True)
    assert {one.name for one in ran} >= {"fused_attention._fwd_kernel", "fused_attention._bwd_kernel",
                                         "post_ln_residual._bwd_kernel"}
    backward = [one for one in ran if one.name == "fused_attention._bwd_kernel"]
    # cross-attention's 17 image tokens fit one key block (one program a pair); ITM's 38 rows and 38 keys do
    # not, and get a program per key block and per query tile
    assert {(one.kwargs["ONE_TILE"], one.kwargs["ALL_KEYS"]) for one in backward} == {(False, True), (False, False)}
    attention = [one for one in ran if one.name == "fused_attention._fwd_kernel"]
    assert all(one.arg_dtypes()[0] == BF16 for one in attention)  # q, k, v from bf16 Linears
    out_e, grads_e, ran_e = run(m, "torch", torch.float32, amp=True)
    assert ran_e == []
    assert out_t.dtype == out_e.dtype == torch.float32
    out_64, grads_64, _ = run(copy.deepcopy(m).double(), "torch", torch.float64, amp=False)
    assert_matches(out_t, out_e, out_64, BF16, "Q-Former output")
    assert len(names) > 20
    for name, a, e, r in zip(names, grads_t, grads_e, grads_64):
        assert a.dtype == e.dtype, name
        assert_matches(a, e, r, BF16, name)


def test_fused_layer_norm_returns_the_references_dtype():
    """A bf16 sublayer output onto an fp32 residual: the sum is fp32, and so is the LayerNorm (as
    F.layer_norm gives on CPU autocast; CUDA's autocast makes it fp32 whatever the inputs)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 40, generator=g).to(BF16).requires_grad_()
    r = torch.randn(5, 40, generator=g).requires_grad_()
    w, b = (1 + 0.1 * torch.randn(40, generator=g)).requires_grad_(), (0.1 * torch.randn(40, generator=g)).requires_grad_()
    dy = torch.randn(5, 40, generator=g)
    y = residual_layer_norm_triton(h, r, w, b, 1e-12)
    ye = residual_layer_norm_reference(h, r, w, b, 1e-12)
    assert y.dtype == ye.dtype == torch.float32
    torch.testing.assert_close(y, ye, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(y, (h, r, w, b), dy)
    grads_e = torch.autograd.grad(ye, (h, r, w, b), dy)
    for a, e in zip(grads, grads_e):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a.float(), e.float(), atol=1e-2 if a.dtype == BF16 else 1e-5, rtol=1e-2)


def test_itc_computes_in_the_training_precision():
    """Under autocast the features reach ITC in fp32 (F.normalize runs in fp32 on CUDA); the query max
    runs in bf16 with fp32 accumulation, as the reference's einsum does, not in tf32x3 fp32."""
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(5, 4, 32, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(7, 32, generator=g), dim=-1).requires_grad_()
    gs = torch.randn(5, 7, generator=g)
    with autocast(), launch.record() as ran:
        s = query_max_similarity_triton(img, txt)
        s_ref = query_max_similarity_reference(img, txt)
    assert [one.name for one in ran] == ["itc._qmax_fwd_kernel"]
    assert ran[0].arg_dtypes()[:2] == [BF16, BF16] and ran[0].kwargs["PRECISION"] != "tf32x3"
    # the same maxima as fp32 arithmetic on the bf16-rounded features (fp32 accumulation)
    exact = torch.einsum("iqd,td->itq", img.detach().to(BF16).double(), txt.detach().to(BF16).double()).amax(-1)
    torch.testing.assert_close(s.double(), exact, atol=1e-6, rtol=1e-6)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, s_ref, atol=1e-2, rtol=0)  # the reference's bf16 einsum rounds its output
    d_img, d_txt = torch.autograd.grad(s, (img, txt), gs)
    assert d_img.dtype == d_txt.dtype == torch.float32  # grads flow back to the fp32 features


def test_linear_cross_entropy_under_autocast_runs_the_head_in_bf16():
    """Like F.linear under autocast: logits (and the grads written over them) in bf16; dW summed in fp32."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 9, 32, generator=g).requires_grad_()
    w = (torch.randn(1001, 32, generator=g) / 32**0.5).requires_grad_()
    labels = torch.randint(0, 1001, (2, 9), generator=g)
    with autocast(), launch.record() as ran:
        loss = linear_cross_entropy_triton(h, w, labels, None, 0.1, chunk=4)
        loss_ref = linear_cross_entropy_reference(h, w, labels, None, 0.1)
    assert {one.arg_dtypes()[0] for one in ran if one.name == "chunked_cross_entropy._ce_rows_kernel"} == {BF16}
    grads = torch.autograd.grad(loss, (h, w))
    grads_ref = torch.autograd.grad(loss_ref, (h, w))
    loss64 = linear_cross_entropy_reference(h.detach().double(), w.detach().double(), labels, None, 0.1)
    assert_matches(loss, loss_ref, loss64, BF16, "loss")
    for a, e in zip(grads, grads_ref):
        assert a.dtype == e.dtype == torch.float32
        torch.testing.assert_close(a, e, atol=2e-3, rtol=5e-2)


def test_linear_cross_entropy_reads_strided_labels():
    """Labels that are a strided 1-D view (a column of a batch) reshape to a strided view, not a copy."""
    g = torch.Generator().manual_seed(4)
    h = torch.randn(6, 16, generator=g).requires_grad_()
    w = torch.randn(101, 16, generator=g).requires_grad_()
    table = torch.randint(0, 101, (6, 5), generator=g)
    labels = table[:, 3]
    assert labels.stride() == (5,)
    loss = linear_cross_entropy_triton(h, w, labels, None, 0.0, chunk=3)  # several rows per launch
    loss_ref = linear_cross_entropy_reference(h, w, labels.contiguous(), None, 0.0)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)


def test_logit_rows_are_padded_to_sixteen_elements():
    """Odd vocabularies (BERT + [DEC]: 30,523) get rows padded to a multiple of 16 elements, so every
    row starts 16-byte aligned and the row kernel's main loop moves 128 bits at a time."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(3, 16, generator=g)
    w = torch.randn(30523, 16, generator=g)
    with launch.record() as ran:
        linear_cross_entropy_triton(h, w, torch.tensor([1, 30522, -100]), None, 0.1)
    rows = [one for one in ran if one.name == "chunked_cross_entropy._ce_rows_kernel"]
    logits, stride, v, v_main = rows[0].args[0], rows[0].args[6], rows[0].args[4], rows[0].args[5]
    assert (v, stride % 16, logits.stride(1)) == (30523, 0, 1) and stride >= v
    assert v_main % rows[0].kwargs["BLOCK_V"] == 0 and v - v_main < rows[0].kwargs["BLOCK_V"]


@pytest.mark.parametrize("mode", list(AttentionMode))
def test_bf16_attention_in_the_interpreter(mode):
    """bf16 tiles in Triton's interpreter (its bf16 dot multiplies bit patterns; the kernels widen the
    operands there, which is what a GPU's bf16 MMA computes): against float64, within bf16 error."""
    from blip2rt import kernels
    from formulas import qformer_allowed
    from test_kernel_fused_attention import compare, ragged_mask

    mask = ragged_mask(3, 7)

    def call(backend):
        return lambda q, k, v: kernels.qformer_self_attention(q, k, v, num_queries=8, text_mask=mask, mode=mode,
                                                              backend=backend)

    compare(call("triton"), call("torch"), 3, 15, 15, BF16, allowed=qformer_allowed(mode.value, 8, mask, 15, 15))
