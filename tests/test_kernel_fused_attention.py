"""Fused Q-Former attention (Triton interpreter on CPU) against the reference and float64."""

import pytest
import torch

import blip2rt
from blip2rt import kernels
from blip2rt.kernels import AttentionMode
from blip2rt.kernels.fused_attention import launch_forward
from formulas import attention64, qformer_allowed
from tolerances import assert_matches

DTYPES = [torch.float32, torch.float16]
IDS = ["fp32", "fp16"]
H, D = 2, 32


def qkv(b, lq, lk, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, H, D, generator=g).to(dtype).requires_grad_() for n in (lq, lk, lk)]


def run(fn, leaves, g):
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, g)


def compare(fused_fn, ref_fn, b, lq, lk, dtype, seed=0, allowed=None):
    """fused vs the package's reference (eager, same dtype) vs attention written from its definition in
    float64 over the `allowed` (B, Lq, Lk) keys (tests/formulas.py)."""
    leaves = qkv(b, lq, lk, dtype, seed)
    g = torch.randn(b, lq, H, D, generator=torch.Generator().manual_seed(seed + 1))
    o, gr = run(fused_fn, leaves, g.to(dtype))
    oe, ge = run(ref_fn, [t.detach().requires_grad_() for t in leaves], g.to(dtype))
    o64, g64 = run(lambda q, k, v: attention64(q, k, v, allowed), [t.detach().double().requires_grad_() for t in leaves],
                   g.double())
    assert o.shape == (b, lq, H, D) and o.dtype == dtype
    assert_matches(o, oe, o64, dtype, "out")
    for name, a, e, r in zip(("dq", "dk", "dv"), gr, ge, g64):
        assert_matches(a, e, r, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("n", [1, 5, 257, 300])
def test_cross_attention(n, b, dtype):
    nq = 32 if n != 300 else 7  # queries against image tokens
    compare(lambda q, k, v: kernels.qformer_cross_attention(q, k, v, backend="triton"),
            lambda q, k, v: kernels.qformer_cross_attention(q, k, v, backend="torch"), b, nq, n, dtype, seed=n)


def backward_form(one) -> str:
    """How an attention backward launch (recorded, or planned) splits each (batch, head):
    fused_attention._pair_form's names."""
    from blip2rt.kernels.fused_attention import launch_form

    return launch_form(one.kwargs if hasattr(one, "kwargs") else one.meta)


def ragged_mask(b, t):
    """Right-padded text of lengths t, t-2, 1, ... (what a BERT tokenizer gives)."""
    lengths = [max(1, t - 2 * i) for i in range(b)]
    return torch.tensor([[1] * n + [0] * (t - n) for n in lengths])


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("mode", list(AttentionMode))
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("t", [1, 7, 32])
def test_self_attention_every_mode(t, b, mode, dtype):
    nq = 8
    mask = ragged_mask(b, t)

    def call(backend):
        return lambda q, k, v: kernels.qformer_self_attention(q, k, v, num_queries=nq, text_mask=mask, mode=mode,
                                                              backend=backend)

    compare(call("triton"), call("torch"), b, nq + t, nq + t, dtype, seed=t,
            allowed=qformer_allowed(mode.value, nq, mask, nq + t, nq + t))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_self_attention_with_cached_query_past(dtype):
    """ITG: rows are the text only, keys are [cached queries ; text]."""
    nq, t, b = 8, 7, 3
    mask = ragged_mask(b, t)

    def call(backend):
        return lambda q, k, v: kernels.qformer_self_attention(q, k, v, num_queries=nq, text_mask=mask,
                                                              mode=AttentionMode.MULTIMODAL_CAUSAL, backend=backend)

    compare(call("triton"), call("torch"), b, t, nq + t, dtype,
            allowed=qformer_allowed("multimodal_causal", nq, mask, t, nq + t))


def test_queries_only_and_text_only_passes():
    for nq, t in [(8, 0), (0, 9)]:
        mask = None if t == 0 else ragged_mask(2, t)

        def call(backend):
            return lambda q, k, v: kernels.qformer_self_attention(q, k, v, num_queries=nq, text_mask=mask,
                                                                  mode=AttentionMode.BIDIRECTIONAL, backend=backend)

        compare(call("triton"), call("torch"), 2, nq + t, nq + t, torch.float32,
                allowed=None if mask is None else qformer_allowed("bidirectional", nq, mask, nq + t, nq + t))


@pytest.mark.parametrize("splits", [2, 3, 7])
def test_split_kv_forward_equals_one_pass(splits):
    q, k, v = (t.detach() for t in qkv(1, 32, 257, torch.float32))
    whole, lse, _ = launch_forward(q, k, v, 0, 0, 0, None, splits=1)
    split, lse_split, _ = launch_forward(q, k, v, 0, 0, 0, None, splits=splits)
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse_split, lse, atol=1e-5, rtol=1e-5)


def test_reads_strided_views_of_packed_kv():
    """K/V are read in place from a packed (B, N, layers, 2, H, d) buffer: no copies needed."""
    packed = torch.randn(2, 13, 3, 2, H, D)
    q = torch.randn(2, 32, H, D)
    k, v = packed[:, :, 1, 0], packed[:, :, 1, 1]
    assert not k.is_contiguous()
    out = kernels.qformer_cross_attention(q, k, v, backend="triton")
    ref = kernels.qformer_cross_attention(q, k.contiguous(), v.contiguous(), backend="torch")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_packed_image_kv_matches_per_layer_projections_and_follows_weight_updates():
    m = blip2rt.from_pretrained("tiny", device="cpu")
    img = torch.randn(3, 17, 48)
    kv = m.qformer.image_kv(img)
    assert len(kv.layers()) == len(m.qformer.cross_layers())
    for (k, v), layer in zip(kv.layers(), m.qformer.cross_layers()):
        ca = layer.crossattention.attention
        torch.testing.assert_close(k.reshape(3, 17, -1), ca.key(img), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(v.reshape(3, 17, -1), ca.value(img), atol=1e-6, rtol=1e-6)
    idx = torch.tensor([2, 0, 2])
    torch.testing.assert_close(kv.take(idx).packed, m.qformer.image_kv(img[idx]).packed, atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # an in-place update (an optimiser step) must invalidate the inference cache
        m.qformer.cross_layers()[0].crossattention.attention.value.weight.add_(1.0)
        after = m.qformer.image_kv(img)
    assert not torch.allclose(after.layers()[0][1], kv.layers()[0][1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_traces_the_qformer(backend):
    """fullgraph: the fused kernels are custom ops, so dynamo traces through without breaks."""
    m = blip2rt.from_pretrained("tiny", device="cpu", kernels=backend)
    px = torch.randn(2, 3, 56, 56)
    embeds = m.image_embeds(px).detach()
    compiled = torch.compile(m.query_output, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(embeds), m.query_output(embeds), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lq", [4, 40], ids=["one query tile", "several query tiles"])
def test_offsets_past_two_to_the_31_elements(lq):
    """The packed image K/V at paper size passes 2^31 elements from about 900 images (257 tokens x
    9216 per image), so batch offsets must be computed in int64. K/V here are views whose batch
    stride fits int32 (as it does at paper size) but whose third sample starts past 2^31 elements;
    the storage is reserved, and only the used slices are touched."""
    from blip2rt.kernels.fused_attention import launch_backward

    n, stride_b = 5, 2**30 + 64
    store = torch.empty(2 * stride_b + 2 * n * H * D, dtype=torch.float16)
    k = store.as_strided((3, n, H, D), (stride_b, H * D, D, 1))
    v = store.as_strided((3, n, H, D), (stride_b, H * D, D, 1), n * H * D)
    assert 2 * stride_b > 2**31 > stride_b
    g = torch.Generator().manual_seed(11)
    for t in (*k, *v):
        t.copy_(torch.randn(t.shape, generator=g))
    q = torch.randn(3, lq, H, D, generator=g).half()
    do = torch.randn(3, lq, H, D, generator=g).half()
    o, lse, keep = launch_forward(q, k, v, 0, 0, 0, None)
    dq, dk, dv = launch_backward(do, q, k, v, o, lse, keep, None, 0, 0, 0)
    leaves = [t.detach().double().requires_grad_() for t in (q, k.contiguous(), v.contiguous())]
    ref = kernels.qformer_cross_attention(*leaves, backend="torch")
    grads = torch.autograd.grad(ref, leaves, do.double())
    for name, got, want in zip(("out", "dq", "dk", "dv"), (o, dq, dk, dv), (ref, *grads)):
        torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode", [None, AttentionMode.UNIMODAL], ids=["cross", "unimodal"])
def test_eager_path_equals_the_custom_op_that_torch_compile_traces(mode):
    """Eager calls go through an autograd.Function (less host time); torch.compile sees the custom
    op. Both must run the same launches: the same output and grads, bit for bit, dropout included."""
    from blip2rt.kernels import fused_attention as fa
    from blip2rt.kernels import dropout_rng, launch

    nq, t, b = 4, 5, 2
    lq = lk = nq + t if mode else nq
    q, k, v = qkv(b, lq, lk if mode else 40, torch.float32)
    mask = torch.tensor([[1] * t, [1, 1, 0, 0, 0]]) if mode else None
    mode_id = fa.MODE_UNIMODAL if mode else fa.MODE_NONE  # the custom op's integer
    g = torch.randn(b, lq, H, D, generator=torch.Generator().manual_seed(3))
    with launch.record() as eager_launches:
        eager = fa.fused_attention(q, k, v, mode=mode, num_queries=nq if mode else 0, text_mask=mask,
                                   dropout_p=0.25, seed=9)
        eager_grads = torch.autograd.grad(eager, (q, k, v), g)
    with launch.record() as op_launches:
        op = fa.attention_forward_op(q, k, v, mask, mode_id, nq if mode else 0, 0, 1, 0.25, dropout_rng.fixed(9, "cpu"))[0]
        op_grads = torch.autograd.grad(op, (q, k, v), g)
    assert [one.name for one in eager_launches] == [one.name for one in op_launches] == \
        ["fused_attention._fwd_kernel", "fused_attention._bwd_kernel"]
    assert torch.equal(eager, op)
    for a, c in zip(eager_grads, op_grads):
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_inference_splits_keys_only_past_512(dtype):
    """Measured on an H200: splitting 257 keys at B = 1 cost more (its torch combine) than it saved."""
    from blip2rt.kernels import fused_attention as fa
    from blip2rt.kernels import launch

    q = torch.empty(1, 32, 12, 64, dtype=dtype, device="meta")
    keys = {n: torch.empty(1, n, 12, 64, dtype=dtype, device="meta") for n in (257, 512, 513, 1025)}
    with launch.plan_for(launch.H100):
        splits = {n: fa.forward_splits(q, k, needs_grad=False) for n, k in keys.items()}
        assert fa.forward_splits(q, keys[1025], needs_grad=True) == 1  # training never splits
    assert splits[257] == splits[512] == 1 and splits[513] > 1 and splits[1025] > 1
    cpu_q, cpu_k = torch.empty(1, 32, 12, 64, dtype=dtype), torch.empty(1, 1025, 12, 64, dtype=dtype)
    assert fa.forward_splits(cpu_q, cpu_k, needs_grad=False) == 1  # the interpreter


def planned_backward(batch: int):
    """The attention backward's launch for cross-attention at the paper's sizes and `batch`, planned for an
    H100 on meta tensors."""
    from blip2rt.kernels import launch
    from blip2rt.kernels.fused_attention import launch_backward

    q, k, v = (torch.empty(batch, n, 12, 64, dtype=torch.bfloat16, device="meta") for n in (32, 257, 257))
    with launch.plan_for(launch.H100) as launches:
        o, lse, keep = launch_forward(q, k, v, 0, 0, 0, None)
        launch_backward(torch.empty_like(o), q, k, v, o, lse, keep, None, 0, 0, 0)
    return next(one for one in launches if one.name == "fused_attention._bwd_kernel")


def test_backward_grid_is_one_program_per_batch_and_head_only_when_that_fills_the_gpu():
    """Planned for an H100 (132 SMs) on meta tensors: 12 heads x B = 128 fill it, one program each; at B = 1
    the 12 would leave 120 SMs idle, so keys and rows get programs of their own (5 key blocks + 1 row tile)."""
    big, small = planned_backward(128), planned_backward(1)
    assert big.kwargs["ONE_TILE"] and big.grid == (128 * 12, 1, 1)
    assert not small.kwargs["ONE_TILE"] and small.grid == (12, 5 + 1, 1)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["plain", "dropout"])
@pytest.mark.parametrize("programs", [2, 4], ids=["pairs divide evenly", "unevenly"])
def test_persistent_backward_walks_every_pair_as_one_program_each_would(programs, dropout_p, monkeypatch):
    """A persistent backward (a tuned choice: `persistent` programs an SM, here the interpreter's `persistent`
    programs in all) walks the 3 x 2 (batch, head) pairs: its grads are the one-program-per-pair grads bit for
    bit (the arithmetic of each pair is the same), which the tests above hold to float64. 70 keys: two full
    key blocks and a peeled tail."""
    from blip2rt.kernels import fused_attention as fa
    from blip2rt.kernels import launch

    q, k, v = qkv(3, 9, 70, torch.float32, seed=5)
    g = torch.randn(3, 9, H, D, generator=torch.Generator().manual_seed(6))

    def grads():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        with launch.record() as launches:
            out = fa.fused_attention(*leaves, dropout_p=dropout_p, seed=11)
            got = torch.autograd.grad(out, leaves, g)
        return got, next(one for one in launches if one.name == "fused_attention._bwd_kernel")

    launch.forget_plans()
    separate, one_each = grads()
    original = fa.attention_config
    monkeypatch.setattr(fa, "attention_config", lambda *a, **kw: fa.AttentionConfig(
        **{**original(*a, **kw).__dict__, "persistent": programs}))
    launch.forget_plans()
    walked, persistent = grads()
    launch.forget_plans()
    assert one_each.grid[:2] == (6, 1) and not one_each.kwargs["PERSISTENT"]
    assert persistent.grid[:2] == (programs, 1) and persistent.kwargs["PERSISTENT"]
    for a, b in zip(walked, separate):
        assert torch.equal(a, b)


def test_a_persistent_backward_only_where_the_pairs_outnumber_its_programs(monkeypatch):
    """Planned for an H100 (132 SMs) with 2 programs an SM: 264 programs walk B = 128's 1536 pairs; B = 16's
    192 pairs keep a program each (fewer than the 264 programs)."""
    from blip2rt.kernels import fused_attention as fa
    from blip2rt.kernels import launch

    original = fa.attention_config
    monkeypatch.setattr(fa, "attention_config", lambda *a, **kw: fa.AttentionConfig(
        **{**original(*a, **kw).__dict__, "persistent": 2}))
    try:
        big, small = planned_backward(128), planned_backward(16)
    finally:
        launch.forget_plans()
    assert big.kwargs["PERSISTENT"] and big.grid == (2 * 132, 1, 1)
    assert not small.kwargs["PERSISTENT"] and small.grid == (16 * 12, 1, 1)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["plain", "dropout"])
@pytest.mark.parametrize("form", ["one tile", "all keys"])
def test_tensor_descriptor_backward_equals_the_pointer_backward(form, dropout_p):
    """The one-program backward reads K and V and writes their grads through tensor descriptors where the
    pointers and strides allow (sm_90; the interpreter too), else through pointer tiles; the all-keys
    form moves q, dO, O and dQ through them too. Both give the same grads bit for bit (the tests above
    hold the default, descriptors, to float64), here with head dim 24 (columns past it zero-filled and
    clipped) and, one tile, 70 keys (a peeled tail); all keys, 40 rows (two query tiles, the second
    partial). A K (one tile) or q (all keys) whose rows are not on 16-byte steps takes the pointer launch."""
    from blip2rt.kernels import fused_attention as fa
    from blip2rt.kernels import launch

    g = torch.Generator().manual_seed(8)
    lq, lk = (9, 70) if form == "one tile" else (40, 20)
    q, k, v = (torch.randn(3, n, H, 24, generator=g, dtype=torch.float16) for n in (lq, lk, lk))
    do = torch.randn(3, lq, H, 24, generator=g, dtype=torch.float16)

    def off_steps(t):  # the same values with rows 26 elements (52 bytes) apart: no descriptor
        return torch.zeros(*t.shape[:3], 26, dtype=t.dtype)[..., :24].copy_(t)

    def grads(q, k, v):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        with launch.record() as launches:
            out = fa.fused_attention(*leaves, dropout_p=dropout_p, seed=3)
            got = torch.autograd.grad(out, leaves, do)
        return got, next(one for one in launches if one.name == "fused_attention._bwd_kernel")

    by_descriptor, one = grads(q, k, v)
    by_pointer, other = grads(*((q, off_steps(k), off_steps(v)) if form == "one tile" else (off_steps(q), k, v)))
    assert one.kwargs["TMA"] and not other.kwargs["TMA"]
    assert backward_form(one) == backward_form(other) == form
    for a, b in zip(by_descriptor, by_pointer):
        assert torch.equal(a, b)
    assert all(x.abs().sum() > 0 for x in by_descriptor)


def test_the_descriptor_launch_is_planned_where_hopper_and_the_strides_allow():
    """Planned on meta tensors: the H100 gets the descriptor launch first and the pointer launch as the
    fallback a misaligned call takes; the A100 (no tensor-memory unit) and a small batch (separate key
    and row programs) get pointers only."""
    from blip2rt.kernels import launch
    from blip2rt.kernels.fused_attention import _backward_plan, tma_ready

    def plan(target, batch, d=64):
        q, k, v = (torch.empty(batch, n, 12, d, dtype=torch.bfloat16, device="meta") for n in (32, 257, 257))
        with launch.plan_for(target):
            return _backward_plan(torch.empty_like(q), q, k, v, 0, 0, 0, None, 0.0)

    hopper = plan(launch.H100, 128).launches
    assert [one.meta["TMA"] for one in hopper] == [True, False]
    assert [one.meta["TMA"] for one in plan(launch.A100, 128).launches] == [False]
    assert [one.meta["TMA"] for one in plan(launch.H100, 1).launches] == [False]
    k = torch.empty(2, 257, 12, 64, dtype=torch.bfloat16)
    assert tma_ready(k, k, k, k)
    assert not tma_ready(k[:, :, :, 1:], k, k, k)  # 2 bytes off a 16-byte boundary
    assert not tma_ready(k, k, torch.empty(2, 257, 12, 63, dtype=torch.bfloat16), k)  # grad rows 126 bytes apart
    # the all-keys form's rows: q, dO, O and dQ
    assert tma_ready(k, k, k, k, (k, k, k, k))
    assert not tma_ready(k, k, k, k, (k, k[:, :, :, 1:], k, k))
    assert not tma_ready(k, k, k, k, (k, k, k, torch.empty(2, 257, 12, 63, dtype=torch.bfloat16)))


@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["plain", "dropout"])
@pytest.mark.parametrize("case", ["cross, 40 rows x 20 keys", "ITM, 8 queries + 12 text", "unimodal, 8 + 12"])
def test_all_keys_backward_equals_a_program_per_key_block_and_query_tile(case, dropout_p, monkeypatch):
    """Where every key fits one block, one program a (batch, head) holds K and V and walks the query
    tiles (16 rows here: two or three tiles), writing each tile's dQ whole. Its grads are those of a
    program per key block and per query tile bit for bit (the same products in the same order), which
    the tests above hold to float64, with text padding, a mode's mask and dropout."""
    from blip2rt.kernels import fused_attention as fa
    from blip2rt.kernels import launch

    nq, t = (0, 0) if case.startswith("cross") else (8, 12)
    mode = {"cross": None, "ITM": AttentionMode.BIDIRECTIONAL, "unimodal": AttentionMode.UNIMODAL}[case.split(",")[0]]
    lq, lk = (40, 20) if mode is None else (nq + t, nq + t)
    text = None if mode is None else ragged_mask(3, t)
    q, k, v = qkv(3, lq, lk, torch.float16, seed=2)
    g = torch.randn(3, lq, H, D, generator=torch.Generator().manual_seed(4), dtype=torch.float16)

    def grads(per_pair):
        monkeypatch.setattr(fa, "attention_config", lambda *a, **kw: fa.AttentionConfig(
            16, 32, 32, 4, 1, "ieee", per_pair=per_pair))
        launch.forget_plans()
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        with launch.record() as launches:
            out = fa.fused_attention(*leaves, mode=mode, num_queries=nq, text_mask=text, dropout_p=dropout_p, seed=9)
            got = torch.autograd.grad(out, leaves, g)
        launch.forget_plans()
        return got, [backward_form(one) for one in launches if one.name == "fused_attention._bwd_kernel"]

    walked, form = grads(True)
    separate, other = grads(False)
    assert form == ["all keys"] and other == ["split"]
    for a, b in zip(walked, separate):
        assert torch.equal(a, b)
    assert all(x.abs().sum() > 0 for x in walked)


def test_the_all_keys_backward_is_planned_for_itm_and_unimodal_on_hopper():
    """Planned on meta tensors for the paper's ITM self-attention (32 queries + 32 text, 64 keys): on the
    H100, one program a (batch, head) over 32-row tiles, through tensor descriptors (a pointer launch
    after it); on the A100, and at a batch under one wave, a program per key block and query tile."""
    from blip2rt.kernels import launch
    from blip2rt.kernels.fused_attention import _backward_plan

    def plan(target, batch):
        q = torch.empty(batch, 64, 12, 64, dtype=torch.bfloat16, device="meta")
        text = torch.empty(batch, 32, dtype=torch.int8, device="meta")
        with launch.plan_for(target):
            return _backward_plan(torch.empty_like(q), q, q, q, 1, 32, 0, text, 0.1).launches

    hopper = plan(launch.H100, 128)
    assert [(backward_form(one), one.meta["TMA"], one.grid[:2]) for one in hopper] == [
        ("all keys", True, (128 * 12, 1)), ("all keys", False, (128 * 12, 1))]
    assert hopper[0].meta["BLOCK_M"] == 32 and hopper[0].meta["BLOCK_N"] == 64
    assert [backward_form(one) for one in plan(launch.A100, 128)] == ["split"]
    assert [backward_form(one) for one in plan(launch.H100, 2)] == ["split"]
