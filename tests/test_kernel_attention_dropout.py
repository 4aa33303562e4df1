"""Attention dropout inside the fused attention (Triton's interpreter): the kernel's mask, drawn from a
seed by the forward and kept as bits for the backward, gives the reference's forward and grads under
that same mask (materialised by `attention_keep_mask`); its keep fraction is 1 - p; one seed, one mask."""

import pytest
import torch

import blip2rt
from blip2rt import kernels
from blip2rt.kernels import AttentionMode, dropout_rng, launch
from blip2rt.kernels.fused_attention import attention_keep_mask, fused_attention
from blip2rt.kernels.qformer_attention import cross_attention_reference, self_attention_reference
from formulas import attention64, qformer_allowed
from test_kernel_fused_attention import backward_form, ragged_mask
from tolerances import assert_matches

H, D = 2, 16


def leaves(b, lq, lk, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, H, D, generator=g).to(dtype) for n in (lq, lk, lk)]


def grads(fn, tensors, g):
    ts = [t.detach().requires_grad_() for t in tensors]
    out = fn(*ts)
    return out, torch.autograd.grad(out, ts, g)


def check_against_reference(fused, reference, b, lq, lk, dtype, p, seed, allowed=None):
    """fused(q, k, v) vs the package's reference(q, k, v, keep_mask) with the kernel's own mask, in
    dtype, and vs attention written from its definition in float64 (tests/formulas.py)."""
    base = leaves(b, lq, lk, dtype, seed)
    g = torch.randn(b, lq, H, D, generator=torch.Generator().manual_seed(seed + 1))
    mask = attention_keep_mask(b, H, lq, lk, p, seed, "cpu")
    assert 0 < mask.sum() < mask.numel()
    o, gr = grads(fused, base, g.to(dtype))
    oe, ge = grads(lambda *t: reference(*t, mask), base, g.to(dtype))
    o64, g64 = grads(lambda *t: attention64(*t, allowed, keep=mask, p=p), [t.double() for t in base], g.double())
    assert_matches(o, oe, o64, dtype, "out")
    for name, a, e, r in zip(("dq", "dk", "dv"), gr, ge, g64):
        assert_matches(a, e, r, dtype, name)
    return o


def transposed(fn):
    """The references take (B, H, L, d); the kernels (B, L, H, d)."""
    return lambda q, k, v, mask: fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("lq, lk, form", [(9, 37, "one tile"), (40, 37, "split"), (40, 20, "all keys")],
                         ids=["one query tile", "several query tiles", "several query tiles, one key block"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cross_attention_under_the_kernels_mask(lq, lk, form, p, dtype):
    """In the interpreter's 32 x 32 tiles, each of the backward's forms: one program a (batch, head) walking
    the key blocks (9 rows) or the query tiles (20 keys), or a program per key block and per query tile."""
    seed = 1234 + lq + lk
    with launch.record() as launches:
        check_against_reference(lambda q, k, v: fused_attention(q, k, v, dropout_p=p, seed=seed),
                                transposed(lambda q, k, v, m: cross_attention_reference(q, k, v, p, keep_mask=m)),
                                3, lq, lk, dtype, p, seed)
    assert [backward_form(one) for one in launches if one.name == "fused_attention._bwd_kernel"] == [form]


@pytest.mark.parametrize("mode", list(AttentionMode))
@pytest.mark.parametrize("t", [5, 30])
def test_self_attention_every_mode_under_the_kernels_mask(mode, t):
    nq, b, p, seed = 8, 3, 0.25, 99 + t
    text = ragged_mask(b, t)
    check_against_reference(
        lambda q, k, v: fused_attention(q, k, v, mode=mode, num_queries=nq, text_mask=text, dropout_p=p,
                                        seed=seed),
        transposed(lambda q, k, v, m: self_attention_reference(q, k, v, nq, text, mode, p, keep_mask=m)),
        b, nq + t, nq + t, torch.float32, p, seed, qformer_allowed(mode.value, nq, text, nq + t, nq + t))


def test_itg_rows_behind_a_cached_query_past_under_the_kernels_mask():
    """Rows are the text only, keys [cached queries ; text]: the mask is indexed by this call's rows."""
    nq, t, b, p, seed = 8, 7, 3, 0.3, 5
    text = ragged_mask(b, t)
    mode = AttentionMode.MULTIMODAL_CAUSAL
    check_against_reference(
        lambda q, k, v: fused_attention(q, k, v, mode=mode, num_queries=nq, text_mask=text, dropout_p=p,
                                        seed=seed),
        transposed(lambda q, k, v, m: self_attention_reference(q, k, v, nq, text, mode, p, keep_mask=m)),
        b, t, nq + t, torch.float32, p, seed, qformer_allowed(mode.value, nq, text, t, nq + t))


def unpack_keep(bits: torch.Tensor, b: int, lq: int) -> torch.Tensor:
    """The forward's stored mask, (B*H, ceil(Lq / 4), Lk) uint8 with row 4j + i in bit i of byte j,
    as bool (B, H, Lq, Lk)."""
    planes = torch.stack([(bits >> i) & 1 for i in range(4)], dim=2)  # (B*H, groups, 4, Lk)
    return planes.flatten(1, 2)[:, :lq].bool().view(b, H, lq, bits.shape[-1])


@pytest.mark.parametrize("lq", [9, 40], ids=["partial byte", "several query tiles"])
def test_the_forward_stores_its_mask_and_the_backward_reads_that_one(lq):
    """The stored bits are the drawn mask (bit for bit); the backward draws nothing itself: given other
    bits, its grads are the reference's under those bits, not under the seed's mask."""
    from blip2rt.kernels.fused_attention import launch_backward, launch_forward

    b, lk, p, seed = 2, 37, 0.3, 8
    q, k, v = leaves(b, lq, lk, torch.float32, 3)
    o, lse, bits = launch_forward(q, k, v, 0, 0, 0, None, dropout_p=p, seed=dropout_rng.fixed(seed, "cpu"))
    assert bits.dtype == torch.uint8 and bits.shape == (b * H, -(-lq // 4), lk)
    drawn = attention_keep_mask(b, H, lq, lk, p, seed, "cpu")
    assert torch.equal(unpack_keep(bits, b, lq), drawn)
    other = torch.randint(0, 16, bits.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    mask = unpack_keep(other, b, lq)
    assert not torch.equal(mask, drawn)
    g = torch.randn(b, lq, H, D, generator=torch.Generator().manual_seed(6))
    got = launch_backward(g, q, k, v, o, lse, other, None, 0, 0, 0, p)
    # the reference's grads with this mask, at the forward's own output and log-sum-exp: the backward's
    # inputs are (o, lse) of the drawn mask, so its dV is P-dropped-by-`other` times g, and so on
    _, want = grads(lambda *t: transposed(lambda q, k, v, m: cross_attention_reference(q, k, v, p, keep_mask=m))(
        *t, mask), [q, k, v], g)
    torch.testing.assert_close(got[2], want[2], atol=1e-5, rtol=1e-5)  # dV: P and the mask only
    with pytest.raises(ValueError, match="keep mask"):
        launch_backward(g, q, k, v, o, lse, None, None, 0, 0, 0, p)


def test_p_zero_is_the_output_without_dropout():
    q, k, v = leaves(2, 20, 37, torch.float32, 0)
    plain = fused_attention(q, k, v)
    assert torch.equal(fused_attention(q, k, v, dropout_p=0.0, seed=77), plain)
    assert torch.equal(kernels.qformer_cross_attention(q, k, v, dropout_p=0.0, backend="triton"), plain)
    assert not torch.allclose(fused_attention(q, k, v, dropout_p=0.1, seed=77), plain)


def test_keep_fraction_is_one_minus_p_and_the_draws_are_independent():
    for p in (0.1, 0.5):
        mask = attention_keep_mask(4, 12, 64, 257, p, 2024, "cpu").float()  # 789,504 draws
        n = mask.numel()
        assert abs(mask.mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
        rows = mask.mean(-1).flatten()  # each row's keep fraction, over 257 keys
        assert abs(rows.std().item() - (p * (1 - p) / 257) ** 0.5) < 0.25 * (p * (1 - p) / 257) ** 0.5
        centred = mask - mask.mean()
        for a, b in ((centred[..., 1:], centred[..., :-1]), (centred[:, :, 1:], centred[:, :, :-1]),
                     (centred[:, 1:], centred[:, :-1]), (centred[1:], centred[:-1])):
            # next key, next row, next head, next sample: uncorrelated (5 sigma of a correlation
            # estimated from n draws)
            corr = (a * b).mean() / centred.pow(2).mean()
            assert abs(corr.item()) < 5 / n**0.5
        # every sample its own mask: an offset that forgets the sample (pid_bh % heads) repeats one
        for i in range(1, mask.shape[0]):
            assert not torch.equal(mask[i], mask[0]), i
            agree = (mask[i] == mask[0]).float().mean().item()  # p^2 + (1-p)^2 for independent masks
            assert abs(agree - (p * p + (1 - p) ** 2)) < 0.01, (i, agree)


def test_one_seed_one_mask_and_other_seeds_other_masks():
    q, k, v = leaves(2, 20, 37, torch.float32, 1)
    a = fused_attention(q, k, v, dropout_p=0.1, seed=11)
    assert torch.equal(fused_attention(q, k, v, dropout_p=0.1, seed=11), a)
    assert not torch.equal(fused_attention(q, k, v, dropout_p=0.1, seed=12), a)
    # drawn seeds: from a state on the device, seeded from torch's CPU generator on first use; each call
    # draws the next one there. Restarting it (manual_seed + reset) or restoring it (what a checkpoint
    # keeps) repeats the masks
    torch.manual_seed(0)
    dropout_rng.reset()
    drawn = kernels.qformer_cross_attention(q, k, v, dropout_p=0.1, backend="triton")
    saved = dropout_rng.state_dict()
    after = kernels.qformer_cross_attention(q, k, v, dropout_p=0.1, backend="triton")
    assert not torch.equal(after, drawn)
    torch.manual_seed(0)
    dropout_rng.reset()
    assert torch.equal(kernels.qformer_cross_attention(q, k, v, dropout_p=0.1, backend="triton"), drawn)
    dropout_rng.load_state_dict(saved)
    assert torch.equal(kernels.qformer_cross_attention(q, k, v, dropout_p=0.1, backend="triton"), after)
    assert int(dropout_rng.state("cpu")[1]) == 2  # two draws since the reset


def test_a_stage1_training_step_runs_the_fused_attention_with_the_papers_dropout():
    from blip2rt.training.stage1 import Stage1Batch, Stage1Objective

    m = blip2rt.from_pretrained("tiny", device="cpu", kernels="triton").train()
    assert m.config.qformer_config.attention_probs_dropout_prob == 0.1
    tok = m.qformer_tokenizer
    enc = tok(["a red circle", "two blue squares"], padding="max_length", max_length=10, truncation=True,
              return_tensors="pt")
    objective = Stage1Objective(m, dec_token_id=tok.convert_tokens_to_ids("[DEC]"), pad_token_id=tok.pad_token_id)
    with launch.record() as ran:
        loss = objective(Stage1Batch(enc["input_ids"], enc["attention_mask"], pixel_values=torch.randn(2, 3, 56, 56)))
        loss["loss"].backward()
    attention = [one for one in ran if one.name.startswith("fused_attention.")]
    forwards = [one for one in attention if one.name == "fused_attention._fwd_kernel"]
    # per layer: self-attention in the image pass, the text pass, ITM and ITG, and cross-attention in
    # every other layer for the image pass and ITM
    layers = m.config.qformer_config.num_hidden_layers
    assert len(forwards) == 4 * layers + 2 * len(m.qformer.cross_layers())
    assert all(one.kwargs["DROPOUT"] and one.args[17] == 0.1 for one in forwards)
    assert {one.name for one in attention} >= {"fused_attention._bwd_kernel"}
    assert all(one.kwargs["DROPOUT"] for one in attention)
    assert all(p.grad is not None for p in m.qformer.parameters() if p.requires_grad)
