"""The fused training kernels on a real GPU: fp32, fp16 and bf16 at paper-like shapes.

The interpreter is lax (tile shapes, out-of-bounds reads), so passing on CPU is necessary, not
sufficient: these run wherever CUDA is available and skip elsewhere.
"""

import pytest
import torch
import torch.nn.functional as F

from blip2rt.kernels.chunked_cross_entropy import linear_cross_entropy_triton
from blip2rt.kernels.itc import query_max_similarity_triton
from blip2rt.kernels.post_ln_residual import dropout_keep_mask, residual_layer_norm_triton
from blip2rt.kernels.references import (linear_cross_entropy_reference, query_max_similarity_reference,
                                        residual_layer_norm_reference)
from tolerances import assert_matches

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]


def grads_of(fn, leaves, g):
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, g)


def leaves_like(ts, dtype):
    return [t.detach().to(dtype).requires_grad_() for t in ts]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("rows, dim, p", [(128 * 64, 768, 0.1), (17, 1023, 0.0), (5, 3000, 0.1)])
def test_post_ln_residual_on_gpu(rows, dim, p, dtype):
    dev = "cuda"
    base = [torch.randn(rows, dim, device=dev), 3 * torch.randn(rows, dim, device=dev) + 1,
            1 + 0.2 * torch.randn(dim, device=dev), 0.2 * torch.randn(dim, device=dev)]
    mask = dropout_keep_mask((rows, dim), p, 5, dev) if p else None
    g = torch.randn(rows, dim, device=dev)
    y, gr = grads_of(lambda *t: residual_layer_norm_triton(*t, 1e-12, p, seed=5), leaves_like(base, dtype), g.to(dtype))
    ye, ge = grads_of(lambda *t: residual_layer_norm_reference(*t, 1e-12, p, keep_mask=mask), leaves_like(base, dtype),
                      g.to(dtype))
    y64, g64 = grads_of(lambda *t: residual_layer_norm_reference(*t, 1e-12, p, keep_mask=mask),
                        leaves_like(base, torch.float64), g.double())
    assert_matches(y, ye, y64, dtype, "y")
    for name, a, e, r in zip(("dh", "dres", "dw", "db"), gr, ge, g64):
        assert_matches(a, e, r, dtype, name, fp32_atol=1e-5 * (rows**0.5 if name in ("dw", "db") else 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("bi, bt, q, d", [(256, 256, 32, 256), (17, 33, 32, 256), (1, 1, 1, 16)])
def test_query_max_similarity_on_gpu(bi, bt, q, d, dtype):
    base = [F.normalize(torch.randn(bi, q, d, device="cuda"), dim=-1), F.normalize(torch.randn(bt, d, device="cuda"), dim=-1)]
    g = torch.randn(bi, bt, device="cuda")
    s, gr = grads_of(query_max_similarity_triton, leaves_like(base, dtype), g)
    se, ge = grads_of(query_max_similarity_reference, leaves_like(base, dtype), g)
    s64, g64 = grads_of(lambda a, b: torch.einsum("iqd,td->itq", a, b).max(-1).values, leaves_like(base, torch.float64),
                        g.double())
    assert_matches(s, se, s64, dtype, "s")
    for name, a, e, r in zip(("dimg", "dtxt"), gr, ge, g64):
        assert_matches(a, e, r, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("tokens, hidden, vocab, frozen", [(300, 512, 50272, True), (257, 768, 30523, False)])
def test_chunked_cross_entropy_on_gpu(tokens, hidden, vocab, frozen, dtype):
    h0 = torch.randn(tokens, hidden, device="cuda")
    w0 = torch.randn(vocab, hidden, device="cuda") / hidden**0.5
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    labels[::5] = -100

    def run(fn, dt):
        h = h0.to(dt).requires_grad_()
        w = w0.to(dt).requires_grad_(not frozen)
        leaves = [h] if frozen else [h, w]
        loss = fn(h, w, labels, None, 0.1)
        return loss, torch.autograd.grad(loss, leaves)

    loss, gr = run(linear_cross_entropy_triton, dtype)
    loss_e, ge = run(linear_cross_entropy_reference, dtype)
    loss64, g64 = run(linear_cross_entropy_reference, torch.float64)
    assert_matches(loss, loss_e, loss64, dtype, "loss")
    for a, e, r in zip(gr, ge, g64):
        assert_matches(a, e, r, dtype, "grad")


def _attention_check(fused, ref, shapes, dtype):
    base = [torch.randn(*s, device="cuda") for s in shapes]
    g = torch.randn(*shapes[0], device="cuda")
    o, gr = grads_of(fused, leaves_like(base, dtype), g.to(dtype))
    oe, ge = grads_of(ref, leaves_like(base, dtype), g.to(dtype))
    o64, g64 = grads_of(ref, leaves_like(base, torch.float64), g.double())
    assert_matches(o, oe, o64, dtype, "out")
    for name, a, e, r in zip(("dq", "dk", "dv"), gr, ge, g64):
        assert_matches(a, e, r, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("b, n", [(3, 257), (1, 677), (32, 257)])
def test_cross_attention_on_gpu(b, n, dtype):
    from blip2rt import kernels

    _attention_check(lambda q, k, v: kernels.qformer_cross_attention(q, k, v, backend="triton"),
                     lambda q, k, v: kernels.qformer_cross_attention(q, k, v, backend="torch"),
                     [(b, 32, 12, 64), (b, n, 12, 64), (b, n, 12, 64)], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["plain", "dropout"])
@pytest.mark.parametrize("form", ["one tile", "all keys"])
def test_descriptor_backward_and_its_pointer_fallback_on_gpu(form, dropout_p, dtype):
    """B*H past the SM count: one program a (batch, head), through tensor descriptors on sm_90. One tile:
    cross-attention, 32 rows walking 257 keys, whose K/V rows off 16-byte steps (a padded buffer's view)
    take the pointer launch. All keys: ITM's self-attention (32 queries + 32 padded text), 64 keys
    walking two 32-row tiles, whose q off 16-byte steps takes the pointer launch. One seed, so one
    dropout mask: both give the same grads, within the dtype's tolerance of each other and, without
    dropout, of float64 (the reference)."""
    from blip2rt import kernels
    from blip2rt.kernels import AttentionMode, launch
    from blip2rt.kernels.fused_attention import fused_attention

    b, lq, lk = (32, 32, 257) if form == "one tile" else (32, 64, 64)
    text = None
    if form == "all keys":
        lengths = torch.arange(b, device="cuda") % 32 + 1
        text = (torch.arange(32, device="cuda")[None] < lengths[:, None]).long()
    args = {} if text is None else dict(mode=AttentionMode.BIDIRECTIONAL, num_queries=32, text_mask=text)

    def padded(t):  # the same values in rows 68 elements apart
        return F.pad(t, (0, 4))[..., :64]

    def fused(pad):
        def call(q, k, v):
            if pad and form == "one tile":
                k, v = padded(k), padded(v)
            elif pad:
                q = padded(q)
            return fused_attention(q, k, v, dropout_p=dropout_p, seed=11, **args)
        return call

    base = [torch.randn(b, n, 12, 64, device="cuda") for n in (lq, lk, lk)]
    g = torch.randn(b, lq, 12, 64, device="cuda").to(dtype)
    hopper = torch.cuda.get_device_capability()[0] >= 9
    got = []
    for pad in (False, True):
        with launch.record() as launches:
            got.append(grads_of(fused(pad), leaves_like(base, dtype), g))
        backward = [one for one in launches if one.name == "fused_attention._bwd_kernel"]
        assert backward and backward[0].kwargs["TMA"] == (hopper and not pad)
        if hopper:
            assert backward[0].kwargs["ONE_TILE" if form == "one tile" else "ALL_KEYS"]
    (o, gr), (o_pad, gr_pad) = got
    if dropout_p == 0:
        if text is None:
            ref = lambda q, k, v: kernels.qformer_cross_attention(q, k, v, backend="torch")
        else:
            ref = lambda q, k, v: kernels.qformer_self_attention(q, k, v, backend="torch", **args)
        oe, ge = grads_of(ref, leaves_like(base, dtype), g)
        o64, g64 = grads_of(ref, leaves_like(base, torch.float64), g.double())
        for a, e, r, name in zip((o, *gr), (oe, *ge), (o64, *g64), ("out", "dq", "dk", "dv")):
            assert_matches(a, e, r, dtype, name)
    for a, e, name in zip((o, *gr), (o_pad, *gr_pad), ("out", "dq", "dk", "dv")):
        torch.testing.assert_close(a, e, msg=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("mode", ["bidirectional", "multimodal_causal", "unimodal"])
def test_self_attention_on_gpu(mode, dtype):
    from blip2rt import kernels
    from blip2rt.kernels import AttentionMode

    b, nq, t = 5, 32, 35
    lengths = torch.tensor([35, 20, 1, 33, 7], device="cuda")
    mask = (torch.arange(t, device="cuda")[None] < lengths[:, None]).long()

    def call(backend):
        return lambda q, k, v: kernels.qformer_self_attention(q, k, v, num_queries=nq, text_mask=mask,
                                                              mode=AttentionMode(mode), backend=backend)

    _attention_check(call("triton"), call("torch"), [(b, nq + t, 12, 64)] * 3, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_split_kv_inference_on_gpu(dtype):
    """B = 1 over 1,025 keys: 12 programs without splitting, so the keys are split; the split path
    must give the reference's output."""
    from blip2rt import kernels
    from blip2rt.kernels import launch

    q, k, v = (torch.randn(1, n, 12, 64, device="cuda", dtype=dtype) for n in (32, 1025, 1025))
    with torch.no_grad(), launch.record() as launches:
        out = kernels.qformer_cross_attention(q, k, v, backend="triton")  # split chosen from the SM count
    assert [one.grid[2] > 1 for one in launches] == [True]
    ref = kernels.qformer_cross_attention(q.double(), k.double(), v.double(), backend="torch")
    eager = kernels.qformer_cross_attention(q, k, v, backend="torch")
    assert_matches(out, eager, ref, dtype, "split-kv out")


def test_dw_gemm_runs_in_the_input_dtype_with_fp32_accumulation():
    """The linear+CE weight grad: bf16 operands on the tensor cores into an fp32 sum, not an fp32 GEMM."""
    from blip2rt.kernels.chunked_cross_entropy import _accumulate, _fp32_accumulate_mode

    assert _fp32_accumulate_mode(torch.device("cuda")) in ("addmm", "mm")
    a = torch.randn(300, 50, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(300, 70, device="cuda", dtype=torch.bfloat16)
    acc = torch.randn(50, 70, device="cuda")
    want = acc.double() + a.double().t() @ b.double()
    _accumulate(acc, a.t(), b)
    assert acc.dtype == torch.float32
    torch.testing.assert_close(acc.double(), want, atol=1e-3, rtol=1e-4)


def test_layer_norm_under_cuda_autocast_returns_fp32_like_the_reference():
    """CUDA's autocast runs F.layer_norm in fp32; the fused residual LayerNorm returns fp32 there too."""
    h = torch.randn(64, 768, device="cuda")
    r = torch.randn(64, 768, device="cuda")
    w, b = torch.ones(768, device="cuda"), torch.zeros(768, device="cuda")
    lin = torch.nn.Linear(768, 768, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        sub = lin(h)  # bf16
        y = residual_layer_norm_triton(sub, r, w, b, 1e-12)
        ye = residual_layer_norm_reference(sub, r, w, b, 1e-12)
    assert sub.dtype == torch.bfloat16 and y.dtype == ye.dtype == torch.float32
    torch.testing.assert_close(y, ye, atol=1e-4, rtol=1e-4)


def test_itc_under_cuda_autocast_runs_in_bf16():
    from blip2rt.kernels import launch

    img = F.normalize(torch.randn(64, 32, 256, device="cuda"), dim=-1)
    txt = F.normalize(torch.randn(64, 256, device="cuda"), dim=-1)
    with torch.autocast("cuda", dtype=torch.bfloat16), launch.record() as ran:
        s = query_max_similarity_triton(img, txt)
    assert ran[0].arg_dtypes()[:2] == [torch.bfloat16, torch.bfloat16] and s.dtype == torch.float32
    exact = torch.einsum("iqd,td->itq", img.bfloat16().double(), txt.bfloat16().double()).amax(-1)
    torch.testing.assert_close(s.double(), exact, atol=1e-5, rtol=1e-5)


def test_qformer_under_cuda_bf16_autocast_matches_the_torch_backend():
    """The CPU test's pass (tests/test_kernel_precision.py) on the GPU: dtypes, values and grads."""
    import copy

    import blip2rt
    from blip2rt.kernels import launch
    from test_kernel_precision import qformer_pass

    m = blip2rt.from_pretrained("tiny", device="cuda", kernels="triton").eval()
    image = torch.randn(3, 17, m.config.vision_config.hidden_size, device="cuda")
    ids = torch.randint(5, 40, (3, 9), device="cuda")
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 2 + [0] * 7], device="cuda")
    weights = torch.randn(3, m.config.num_query_tokens + 9, m.config.qformer_config.hidden_size, device="cuda")
    names = [n for n, p in m.named_parameters() if n.startswith(("qformer.", "query_tokens")) and p.requires_grad]

    def run(model, backend, dtype, amp):
        model.set_kernel_backend(backend)
        params = dict(model.named_parameters())
        with launch.record() as ran:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                out, loss = qformer_pass(model, image.to(dtype), ids, mask, weights.to(dtype))
            grads = torch.autograd.grad(loss, [params[n] for n in names])
        return out, grads, ran

    out_t, grads_t, ran = run(m, "triton", torch.float32, True)
    assert ran, "the fused kernels did not run"
    out_e, grads_e, _ = run(m, "torch", torch.float32, True)
    out_64, grads_64, _ = run(copy.deepcopy(m).double(), "torch", torch.float64, False)
    assert out_t.dtype == out_e.dtype == torch.float32
    assert_matches(out_t, out_e, out_64, torch.bfloat16, "Q-Former output")
    for name, a, e, r in zip(names, grads_t, grads_e, grads_64):
        assert_matches(a, e, r, torch.bfloat16, name)


def test_attention_with_more_than_65535_batch_heads():
    """B*H on the grid's x axis: 6000 samples x 12 heads = 72,000 programs (axis y stops at 65,535)."""
    from blip2rt import kernels

    b = 6000
    q = torch.randn(b, 32, 12, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, 65, 12, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out = kernels.qformer_cross_attention(q, k, k, backend="triton")
    idx = torch.tensor([0, 4321, b - 1], device="cuda")
    ref = kernels.qformer_cross_attention(q[idx].double(), k[idx].double(), k[idx].double(), backend="torch")
    torch.testing.assert_close(out[idx].double(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("kind", ["cross", "itm", "itg"])
def test_attention_dropout_on_gpu(kind, dtype):
    """The paper's attention dropout inside the kernels: forward and grads equal the reference's under
    the kernel's own mask (materialised by attention_keep_mask), at paper shapes."""
    from blip2rt.kernels import AttentionMode
    from blip2rt.kernels.fused_attention import attention_keep_mask, fused_attention
    from blip2rt.kernels.qformer_attention import attention_with_keep_mask, qformer_attention_bias

    b, nq, t, p, seed = 6, 32, 32, 0.1, 1234
    lengths = torch.tensor([32, 20, 1, 31, 7, 16], device="cuda")
    mask = (torch.arange(t, device="cuda")[None] < lengths[:, None]).long()
    lq, lk, mode = {"cross": (nq, 257, None), "itm": (nq + t, nq + t, AttentionMode.BIDIRECTIONAL),
                    "itg": (t, nq + t, AttentionMode.MULTIMODAL_CAUSAL)}[kind]
    keep = attention_keep_mask(b, 12, lq, lk, p, seed, "cuda")

    def fused(q, k, v):
        if kind == "cross":
            return fused_attention(q, k, v, dropout_p=p, seed=seed)
        return fused_attention(q, k, v, mode=mode, num_queries=nq, text_mask=mask, dropout_p=p, seed=seed)

    def reference(q, k, v):
        bias = None if kind == "cross" else qformer_attention_bias(nq, mask, mode, lq, q.dtype, b, q.device)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        return attention_with_keep_mask(q, k, v, bias, keep, p).transpose(1, 2)

    _attention_check(fused, reference, [(b, lq, 12, 64), (b, lk, 12, 64), (b, lk, 12, 64)], dtype)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
