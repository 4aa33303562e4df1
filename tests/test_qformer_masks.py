"""The Q-Former's three attention modes, against the paper's rules and by perturbation."""

import pytest
import torch

import blip2rt
from blip2rt.kernels import AttentionMode, qformer_attention_bias

Q = 8  # queries of the tiny preset


def paper_mask(num_q, text_mask, mode):
    """Allowed[b, i, j] written out one element at a time from BLIP-2 §3.1 / Fig. 2."""
    b, t = text_mask.shape
    n = num_q + t
    allowed = torch.zeros(b, n, n, dtype=torch.bool)
    for bi in range(b):
        for i in range(n):
            for j in range(n):
                if j >= num_q and not text_mask[bi, j - num_q]:
                    continue  # padding is never attended
                iq, jq = i < num_q, j < num_q
                if mode == AttentionMode.BIDIRECTIONAL:
                    ok = True
                elif mode == AttentionMode.UNIMODAL:
                    ok = iq == jq
                else:  # multimodal causal: queries see queries; text sees queries and earlier text
                    ok = jq if iq else (jq or j <= i)
                allowed[bi, i, j] = ok
    return allowed


@pytest.mark.parametrize("mode", list(AttentionMode))
def test_bias_follows_the_paper(mode):
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    bias = qformer_attention_bias(3, text_mask, mode, 8, torch.float32, 3, torch.device("cpu"))
    assert bias.shape == (3, 1, 8, 8)
    torch.testing.assert_close(bias[:, 0] == 0, paper_mask(3, text_mask, mode), rtol=0, atol=0)


def test_bias_for_a_suffix_with_cached_queries():
    """ITG: the current rows are the text only; keys are [cached queries ; text]."""
    text_mask = torch.tensor([[1, 1, 1, 0]])
    bias = qformer_attention_bias(3, text_mask, AttentionMode.MULTIMODAL_CAUSAL, 4, torch.float32, 1,
                                  torch.device("cpu"))
    full = paper_mask(3, text_mask, AttentionMode.MULTIMODAL_CAUSAL)
    torch.testing.assert_close(bias[:, 0] == 0, full[:, 3:], rtol=0, atol=0)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = blip2rt.from_pretrained("tiny", device="cpu")
    with torch.no_grad():  # spread the weights so dependencies show up clearly
        for p in m.qformer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def run(m, ids, mask, mode, image_embeds):
    queries = m.query_tokens.expand(ids.shape[0], -1, -1)
    x = torch.cat([queries, m.embeddings(ids)], dim=1)
    with torch.no_grad():
        out, past = m.qformer(x, num_queries=Q, text_mask=mask, mode=mode, image_embeds=image_embeds)
    return out, past


def inputs(m, t=6):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 40, (2, t), generator=g)
    mask = torch.ones(2, t, dtype=torch.long)
    mask[1, -2:] = 0
    with torch.no_grad():
        img = m.image_embeds(torch.randn(2, 3, 56, 56, generator=g))
    return ids, mask, img


def changed(a, b):
    return (a - b).abs().amax(dim=-1) > 1e-6  # (B, L)


def test_multimodal_causal_dependencies(tiny):
    ids, mask, img = inputs(tiny)
    base, _ = run(tiny, ids, mask, AttentionMode.MULTIMODAL_CAUSAL, img)
    ids2 = ids.clone()
    ids2[:, 3] = 41  # change text token 3
    out, _ = run(tiny, ids2, mask, AttentionMode.MULTIMODAL_CAUSAL, img)
    c = changed(base, out)
    assert not c[:, :Q].any()  # queries never see text
    assert not c[:, Q: Q + 3].any()  # earlier text does not see later text
    assert c[0, Q + 3:].all()  # token 3 and everything after it does


def test_unimodal_isolates_queries_and_text(tiny):
    ids, mask, img = inputs(tiny)
    base, _ = run(tiny, ids, mask, AttentionMode.UNIMODAL, img)
    ids2 = ids.clone()
    ids2[:, 0] = 41
    out, _ = run(tiny, ids2, mask, AttentionMode.UNIMODAL, img)
    assert not changed(base, out)[:, :Q].any()
    out_img, _ = run(tiny, ids, mask, AttentionMode.UNIMODAL, img.flip(0))
    assert not changed(base, out_img)[:, Q:].any()  # text never sees the image


def test_bidirectional_lets_queries_see_text(tiny):
    ids, mask, img = inputs(tiny)
    base, _ = run(tiny, ids, mask, AttentionMode.BIDIRECTIONAL, img)
    ids2 = ids.clone()
    ids2[:, 2] = 41
    out, _ = run(tiny, ids2, mask, AttentionMode.BIDIRECTIONAL, img)
    assert changed(base, out)[:, :Q].all()


def test_padding_is_invisible(tiny):
    ids, mask, img = inputs(tiny)
    base, _ = run(tiny, ids, mask, AttentionMode.BIDIRECTIONAL, img)
    ids2 = ids.clone()
    ids2[1, -2:] = 41  # change only padded positions of row 1
    out, _ = run(tiny, ids2, mask, AttentionMode.BIDIRECTIONAL, img)
    assert not changed(base, out)[1, : Q + 4].any()


def test_itg_with_cached_query_keys_equals_one_joint_pass(tiny):
    """ITG reuses the image pass's self-attention keys/values instead of re-running the queries."""
    ids, mask, img = inputs(tiny)
    joint, _ = run(tiny, ids, mask, AttentionMode.MULTIMODAL_CAUSAL, img)
    with torch.no_grad():
        queries = tiny.query_tokens.expand(2, -1, -1)
        q_out, past = tiny.qformer(queries, num_queries=Q, image_embeds=img)
        text_out, _ = tiny.qformer(tiny.embeddings(ids), num_queries=Q, text_mask=mask,
                                   mode=AttentionMode.MULTIMODAL_CAUSAL, past=past)
    # fp32 tolerance: the same math over differently shaped matmuls (a wrong mask is off by ~0.1)
    torch.testing.assert_close(q_out, joint[:, :Q], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_out, joint[:, Q:], atol=1e-5, rtol=1e-5)
