"""Stage-1 losses against BLIP-2's formulas written a second time, one sample at a time."""

import pytest
import torch
import torch.nn.functional as F

import blip2rt
from blip2rt.kernels import AttentionMode
from blip2rt.training.stage1 import Stage1Batch, Stage1Objective, sample_hard_negatives
from blip2rt.training.trainer import set_trainable
from sampling_stats import FALSE_ALARM, chi_square_p

CAPTIONS = ["a red circle", "a small blue square on white", "green", "two yellow triangles", "a big black star"]


def smoothed_ce(logits: torch.Tensor, target: int, eps: float) -> torch.Tensor:
    """(1 - eps) * NLL + eps * mean over classes of -log p, for one row."""
    logp = logits.double().log_softmax(-1)
    return (1 - eps) * -logp[target] + eps * -logp.mean()


def reference_losses(m, px, ids, mask, neg_image, neg_text, dec_id):
    b, nq = px.shape[0], m.config.num_query_tokens
    embeds = m.image_embeds(px)
    lengths = [int(n) for n in mask.sum(1)]
    text = [ids[i, :lengths[i]] for i in range(b)]  # unpadded: no mask needed
    img_feats, txt_feats = [], []
    for i in range(b):
        q_out, _ = m.qformer(m.query_tokens, num_queries=nq, image_embeds=embeds[i:i + 1])
        img_feats.append(F.normalize(m.vision_projection(q_out[0]), dim=-1))  # (Q, E)
        t_out, _ = m.qformer(m.embeddings(text[i][None]), num_queries=0)
        txt_feats.append(F.normalize(m.text_projection(t_out[0, 0]), dim=-1))  # (E,)
    temp = m.temp.double()
    s = torch.stack([torch.stack([(img_feats[i] @ txt_feats[t]).max().double() / temp for t in range(b)])
                     for i in range(b)])  # s[i, t]
    itc = sum(smoothed_ce(s[i], i, 0.1) + smoothed_ce(s[:, i], i, 0.1) for i in range(b)) / (2 * b)

    pairs = [(i, i, 1) for i in range(b)] + [(int(neg_image[t]), t, 0) for t in range(b)] + \
            [(i, int(neg_text[i]), 0) for i in range(b)]
    itm = 0.0
    for img, txt, label in pairs:
        x = torch.cat([m.query_tokens, m.embeddings(text[txt][None])], dim=1)
        out, _ = m.qformer(x, num_queries=nq, mode=AttentionMode.BIDIRECTIONAL, image_embeds=embeds[img:img + 1])
        logits = m.itm_head(out[0, :nq]).mean(0)
        itm = itm + smoothed_ce(logits, label, 0.0)
    itm = itm / len(pairs)

    total, count = 0.0, 0
    for i in range(b):
        dec = text[i].clone()
        dec[0] = dec_id
        x = torch.cat([m.query_tokens, m.embeddings(dec[None])], dim=1)
        out, _ = m.qformer(x, num_queries=nq, mode=AttentionMode.MULTIMODAL_CAUSAL, image_embeds=embeds[i:i + 1])
        logits = m.itg_head(out[0, nq:])  # position j predicts token j + 1
        for j in range(len(dec) - 1):
            total = total + smoothed_ce(logits[j], int(dec[j + 1]), 0.1)
            count += 1
    return {"itc": itc, "itm": itm, "itg": total / count}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stage1_losses_and_grads_match_the_paper_formulas(backend):
    """The batched objective (packed K/V, masks in the kernels, gathered ITC, one ITM pass over 3B)
    against the formulas one sample at a time: the three losses and the full gradient of their sum
    over every trainable parameter."""
    torch.manual_seed(0)
    m = blip2rt.from_pretrained("tiny", device="cpu", kernels=backend)
    with torch.no_grad():  # spread the weights so every term matters
        for name, p in m.named_parameters():
            if p.requires_grad and "LayerNorm" not in name and "layernorm" not in name:
                p.add_(0.05 * torch.randn_like(p))
    set_trainable(m, 1)
    params = [p for p in m.parameters() if p.requires_grad]
    tok = m.qformer_tokenizer
    enc = tok(CAPTIONS, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    px = torch.randn(5, 3, 56, 56)
    neg_image = torch.tensor([3, 0, 4, 1, 2])  # for each text, an image that is not its own
    neg_text = torch.tensor([2, 4, 0, 0, 1])
    objective = Stage1Objective(m, dec_token_id=tok.convert_tokens_to_ids("[DEC]"), pad_token_id=tok.pad_token_id)
    got = objective(Stage1Batch(enc["input_ids"], enc["attention_mask"], pixel_values=px), (neg_image, neg_text))
    got_grads = torch.autograd.grad(got["loss"], params)
    m.set_kernel_backend("torch")  # the reference never runs the kernels under test
    want = reference_losses(m, px, enc["input_ids"], enc["attention_mask"], neg_image, neg_text,
                            tok.convert_tokens_to_ids("[DEC]"))
    want_grads = torch.autograd.grad(want["itc"] + want["itm"] + want["itg"], params)
    for k in ("itc", "itm", "itg"):
        torch.testing.assert_close(got[k].double(), want[k].double(), atol=2e-5, rtol=1e-5, msg=k)
    torch.testing.assert_close(got["loss"], got["itc"] + got["itm"] + got["itg"])
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert len(names) > 30
    for name, a, b in zip(names, got_grads, want_grads):
        torch.testing.assert_close(a.double(), b.double(), atol=2e-5, rtol=1e-4, msg=lambda s: f"{name}: {s}")


def test_hard_negatives_never_draw_a_positive_and_follow_similarity():
    """Both directions follow softmax(similarity) over the non-positives, to a chi-square test tight
    enough that a temperature off by 1.5x fails (z near 0 here; that plant gave z in the hundreds)."""
    g = torch.Generator().manual_seed(0)
    b, n = 6, 3000
    sim_i2t = torch.randn(b, b, generator=g) * 3
    sim_t2i = torch.randn(b, b, generator=g) * 3  # unrelated to sim_i2t: the directions cannot be swapped
    positives = torch.eye(b, dtype=torch.bool)
    positives[0, 3] = True  # a second caption of image 0 (and so a second image of text 0)
    counts_img, counts_txt = torch.zeros(b, b), torch.zeros(b, b)
    for _ in range(n):
        neg_img, neg_txt = sample_hard_negatives(sim_i2t, sim_t2i, positives, generator=g)
        assert not positives[torch.arange(b), neg_img].any() and not positives[torch.arange(b), neg_txt].any()
        counts_img[torch.arange(b), neg_img] += 1  # for each text: an image
        counts_txt[torch.arange(b), neg_txt] += 1  # for each image: a text
    for counts, sim in ((counts_img, sim_t2i), (counts_txt, sim_i2t)):
        weights = sim.masked_fill(positives, float("-inf")).softmax(1)
        assert chi_square_p(counts, weights) > FALSE_ALARM
        assert chi_square_p(counts, (1.5 * sim).masked_fill(positives, float("-inf")).softmax(1)) < FALSE_ALARM


def test_hard_negatives_survive_bf16_masked_rows_and_nan():
    sim = torch.full((3, 3), 60.0, dtype=torch.bfloat16)  # huge, equal logits in bf16
    positives = torch.eye(3, dtype=torch.bool)
    positives[2] = True  # row 2: every column is a positive (several captions of one image)
    sim[1, 0] = float("nan")
    neg_img, neg_txt = sample_hard_negatives(sim, sim.t(), positives)
    assert neg_txt[0] != 0 and neg_txt[1] != 1
    assert neg_img.shape == neg_txt.shape == (3,)
