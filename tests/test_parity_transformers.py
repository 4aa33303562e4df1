"""blip2rt against transformers' own Blip2 classes, on the same saved weights (fp32)."""

import pytest
import torch

import blip2rt
from hf_reference import NUM_QUERIES, QFORMER_VOCAB, TEXT_VOCAB, hf_itm_logits, hf_prompt_inputs

ATOL = 1e-5  # fp32: same math, different kernels and op order


def pixels(b, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g)


def left_padded_prompts(lengths, pad_id, bos_id, seed=0):
    """Prompts of different lengths, BOS first, left-padded as the LLM tokenizer would."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.full((len(lengths), t), pad_id)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, t - n] = bos_id
        ids[i, t - n + 1:] = torch.randint(3, TEXT_VOCAB - 2, (n - 1,), generator=g)
        mask[i, t - n:] = 1
    return ids, mask


@pytest.mark.parametrize("ref_name", ["hf_opt", "hf_llama", "hf_t5"])
@pytest.mark.parametrize("size", [28, 56], ids=["native", "interpolated"])
def test_image_features_match_transformers(ref_name, size, request):
    ref = request.getfixturevalue(ref_name)
    m = blip2rt.from_pretrained(ref.folder, device="cpu", dtype="fp32")
    px = pixels(3, size)
    with torch.no_grad():
        want = ref.model.get_image_features(px, interpolate_pos_encoding=size != 28).pooler_output
        got = m.image_features(px)
    assert got.shape == (3, NUM_QUERIES, want.shape[-1])
    assert want.std() > 0.1  # the reference is not degenerate
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("ref_name", ["hf_opt", "hf_llama"])
def test_decoder_lm_loss_matches_transformers(ref_name, request):
    ref = request.getfixturevalue(ref_name)
    m = blip2rt.from_pretrained(ref.folder, device="cpu", dtype="fp32")
    cfg = ref.model.config.text_config
    ids, mask = left_padded_prompts([7, 4, 9], cfg.pad_token_id, cfg.bos_token_id)
    labels = ids.masked_fill(mask == 0, -100)
    px = pixels(3)
    hf_ids, hf_mask = hf_prompt_inputs(ids, mask)
    hf_labels = torch.cat([torch.full((3, NUM_QUERIES), -100), labels], dim=1)
    with torch.no_grad():
        want = ref.model(pixel_values=px, input_ids=hf_ids, attention_mask=hf_mask, labels=hf_labels)
        got = m(px, ids, mask, labels=labels)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.loss, want.loss, atol=ATOL, rtol=1e-5)


def test_t5_lm_loss_matches_transformers(hf_t5):
    m = blip2rt.from_pretrained(hf_t5.folder, device="cpu", dtype="fp32")
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, TEXT_VOCAB - 2, (3, 6), generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]])
    labels = torch.randint(3, TEXT_VOCAB - 2, (3, 5), generator=g)
    labels[1, 3:] = -100
    px = pixels(3)
    hf_ids, hf_mask = hf_prompt_inputs(ids, mask)
    with torch.no_grad():
        want = hf_t5.model(pixel_values=px, input_ids=hf_ids, attention_mask=hf_mask, labels=labels)
        got = m(px, ids, mask, labels=labels)
    torch.testing.assert_close(got.loss, want.loss, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("ref_name", ["hf_opt", "hf_llama", "hf_t5"])
@pytest.mark.parametrize("lengths", [[5], [3, 8, 5]], ids=["batch1", "batch3"])
@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
def test_generate_matches_transformers(ref_name, lengths, num_beams, request):
    ref = request.getfixturevalue(ref_name)
    m = blip2rt.from_pretrained(ref.folder, device="cpu", dtype="fp32")
    cfg = ref.model.config.text_config
    px = pixels(len(lengths), seed=len(lengths))
    if ref.kind == "t5":  # right padding, no BOS
        ids, mask = left_padded_prompts(lengths, cfg.pad_token_id, 5, seed=3)
        ids, mask = ids.flip(1), mask.flip(1)
    else:
        ids, mask = left_padded_prompts(lengths, cfg.pad_token_id, cfg.bos_token_id, seed=3)
    gen = dict(max_new_tokens=12, min_new_tokens=12, num_beams=num_beams, do_sample=False)
    hf_ids, hf_mask = hf_prompt_inputs(ids, mask)
    with torch.no_grad():
        want = ref.model.generate(pixel_values=px, input_ids=hf_ids, attention_mask=hf_mask, **gen)
    want = want[:, 1:] if ref.kind == "t5" else want[:, hf_ids.shape[1]:]
    got = m.generate(px, ids, mask, **gen)
    assert got.shape == (len(lengths), 12)
    assert len(set(got.flatten().tolist())) > 1  # not one repeated token (which any model would match)
    assert torch.equal(got, want)


def test_generate_without_prompt_matches_transformers(hf_opt):
    """No prompt: both start from BOS behind the soft prompt."""
    m = blip2rt.from_pretrained(hf_opt.folder, device="cpu", dtype="fp32")
    px = pixels(2)
    with torch.no_grad():
        want = hf_opt.model.generate(pixel_values=px, max_new_tokens=8, min_new_tokens=8)
    got = m.generate(px, max_new_tokens=8, min_new_tokens=8)
    torch.testing.assert_close(got, want[:, -8:], rtol=0, atol=0)


def qformer_batch(b, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, QFORMER_VOCAB, (b, t), generator=g)
    ids[:, 0] = 1  # [CLS]
    mask = torch.ones(b, t, dtype=torch.long)
    for i in range(1, b):
        mask[i, t - i:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_itm_matches_transformers(hf_retrieval):
    m = blip2rt.from_pretrained(hf_retrieval.folder, device="cpu", dtype="fp32")
    px = pixels(3, seed=7)
    ids, mask = qformer_batch(3, 9)
    want = hf_itm_logits(hf_retrieval, px, ids, mask)
    with torch.no_grad():
        got_logits = m.itm_logits(m.image_embeds(px), ids, mask)
    torch.testing.assert_close(got_logits, want, atol=ATOL, rtol=1e-5)
    prob = m.itm(px, {"input_ids": ids, "attention_mask": mask})
    torch.testing.assert_close(prob, want.softmax(-1)[:, 1], atol=ATOL, rtol=1e-5)


def test_itc_matches_transformers(hf_retrieval):
    m = blip2rt.from_pretrained(hf_retrieval.folder, device="cpu", dtype="fp32")
    px = pixels(2, seed=8)
    ids, mask = qformer_batch(5, 7, seed=1)
    with torch.no_grad():
        out = hf_retrieval.model(pixel_values=px, input_ids=ids, attention_mask=mask,
                                 use_image_text_matching_head=False)
    got = m.itc(px, {"input_ids": ids, "attention_mask": mask})
    assert got.shape == (2, 5)
    torch.testing.assert_close(got, out.logits_per_image, atol=ATOL, rtol=1e-5)
    # and by the formula: max over queries of the cosine similarity
    img, txt = out.image_embeds, out.text_embeds  # (2, Q, E), (5, E), normalised by transformers
    torch.testing.assert_close(got, (img @ txt.T).amax(dim=1), atol=ATOL, rtol=1e-5)


def test_retrieval_model_refuses_generation(hf_retrieval):
    m = blip2rt.from_pretrained(hf_retrieval.folder, device="cpu")
    with pytest.raises(blip2rt.InputError, match="needs an LLM"):
        m.generate(pixels(1))


def test_generation_model_refuses_itm(hf_opt):
    m = blip2rt.from_pretrained(hf_opt.folder, device="cpu")
    with pytest.raises(blip2rt.InputError, match="retrieval heads"):
        m.itm(pixels(1), {"input_ids": torch.ones(1, 3, dtype=torch.long)})


def test_qformer_grads_through_the_lm_loss_match_transformers(hf_opt):
    """The cross-attention K/V come from one packed GEMM and reach each layer as views; their
    weight grads (and the query tokens') must equal transformers' per-layer projections'."""
    ref = hf_opt
    m = blip2rt.from_pretrained(ref.folder, device="cpu", dtype="fp32").eval()
    cfg = ref.model.config.text_config
    ids, mask = left_padded_prompts([5, 8], cfg.pad_token_id, cfg.bos_token_id, seed=1)
    labels = ids.masked_fill(mask == 0, -100)
    px = pixels(2, seed=1)
    hf_ids, hf_mask = hf_prompt_inputs(ids, mask)
    hf_labels = torch.cat([torch.full((2, NUM_QUERIES), -100), labels], dim=1)
    ref.model.eval().zero_grad()
    ref.model(pixel_values=px, input_ids=hf_ids, attention_mask=hf_mask, labels=hf_labels).loss.backward()
    m(px, ids, mask, labels=labels).loss.backward()
    ours, theirs = dict(m.named_parameters()), dict(ref.model.named_parameters())
    names = [n for n in theirs if ".crossattention.attention." in n or n == "query_tokens"]
    assert len(names) >= 5 and all(n in ours for n in names), [n for n in names if n not in ours]
    for name in names:
        want = theirs[name].grad
        assert want.abs().max() > 0, name
        torch.testing.assert_close(ours[name].grad, want, atol=1e-5, rtol=1e-4, msg=name)
