"""The whole model with kernels="triton" (fused post-LN residuals, fused LM head) still matches
transformers, and its Q-Former grads match the torch backend's."""

import pytest
import torch

import blip2rt
from hf_reference import NUM_QUERIES, hf_itm_logits, hf_prompt_inputs
from test_parity_transformers import left_padded_prompts, pixels, qformer_batch


@pytest.mark.parametrize("ref_name", ["hf_opt", "hf_llama"])
def test_image_features_and_fused_lm_loss(ref_name, request):
    ref = request.getfixturevalue(ref_name)
    m = blip2rt.from_pretrained(ref.folder, device="cpu", kernels="triton")
    assert m.kernel_backend == "triton"
    cfg = ref.model.config.text_config
    ids, mask = left_padded_prompts([6, 3], cfg.pad_token_id, cfg.bos_token_id)
    labels = ids.masked_fill(mask == 0, -100)
    px = pixels(2)
    hf_ids, hf_mask = hf_prompt_inputs(ids, mask)
    hf_labels = torch.cat([torch.full((2, NUM_QUERIES), -100), labels], 1)
    with torch.no_grad():
        want = ref.model(pixel_values=px, input_ids=hf_ids, attention_mask=hf_mask, labels=hf_labels)
        torch.testing.assert_close(m.image_features(px), ref.model.get_image_features(px).pooler_output,
                                   atol=1e-5, rtol=1e-5)
    out = m(px, ids, mask, labels=labels)
    assert out.logits is None  # the fused head never builds the (B, L, V) logits
    torch.testing.assert_close(out.loss, want.loss, atol=1e-5, rtol=1e-5)


def test_itm_with_triton(hf_retrieval):
    m = blip2rt.from_pretrained(hf_retrieval.folder, device="cpu", kernels="triton")
    px = pixels(2, seed=3)
    ids, mask = qformer_batch(2, 5)
    want = hf_itm_logits(hf_retrieval, px, ids, mask)
    with torch.no_grad():
        torch.testing.assert_close(m.itm_logits(m.image_embeds(px), ids, mask), want, atol=1e-5, rtol=1e-5)


def test_qformer_grads_match_torch_backend(hf_opt):
    """Training signal: the loss grads of every trainable parameter agree between backends (no dropout)."""
    grads = {}
    for backend in ("torch", "triton"):
        m = blip2rt.from_pretrained(hf_opt.folder, device="cpu", kernels=backend)
        ids = torch.tensor([[2, 14, 15, 16, 17]])
        loss = m(pixels(1), ids, labels=ids).loss
        loss.backward()
        grads[backend] = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert grads["torch"].keys() == grads["triton"].keys() and len(grads["torch"]) > 20
    for name, g in grads["torch"].items():
        # fp32 through the whole LLM backward, with the head and LayerNorms reduced in another order
        torch.testing.assert_close(grads["triton"][name], g, atol=2e-5, rtol=1e-4, msg=lambda s: f"{name}: {s}")


def test_chunked_ce_serves_the_itg_head():
    """ITG: BERT's prediction head with its decoder tied to the word embeddings, smoothing 0.1."""
    import torch.nn.functional as F

    from blip2rt import kernels

    m = blip2rt.from_pretrained("tiny", device="cpu")
    head, emb = m.itg_head, m.embeddings.word_embeddings.weight
    x = torch.randn(3, 6, 32, requires_grad=True)
    labels = torch.randint(0, emb.shape[0], (3, 6))
    labels[1, 3:] = -100
    eager = F.cross_entropy(head(x).flatten(0, 1), labels.flatten(), ignore_index=-100, label_smoothing=0.1)
    want = torch.autograd.grad(eager, (x, emb, head.bias))
    fused = kernels.linear_cross_entropy(head.hidden(x), head.decoder.weight, labels, head.bias, 0.1, backend="triton")
    got = torch.autograd.grad(fused, (x, emb, head.bias))
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ref_name", ["hf_opt", "hf_t5"])
def test_generate_with_triton_matches_transformers(ref_name, request):
    ref = request.getfixturevalue(ref_name)
    m = blip2rt.from_pretrained(ref.folder, device="cpu", kernels="triton")
    cfg = ref.model.config.text_config
    px = pixels(3, seed=3)
    ids, mask = left_padded_prompts([3, 8, 5], cfg.pad_token_id, 5 if ref.kind == "t5" else cfg.bos_token_id, seed=3)
    if ref.kind == "t5":
        ids, mask = ids.flip(1), mask.flip(1)
    gen = dict(max_new_tokens=10, min_new_tokens=10)
    hf_ids, hf_mask = hf_prompt_inputs(ids, mask)
    with torch.no_grad():
        want = ref.model.generate(pixel_values=px, input_ids=hf_ids, attention_mask=hf_mask, **gen)
    want = want[:, 1:] if ref.kind == "t5" else want[:, hf_ids.shape[1]:]
    assert torch.equal(m.generate(px, ids, mask, **gen), want)


def test_itc_with_triton(hf_retrieval):
    m = blip2rt.from_pretrained(hf_retrieval.folder, device="cpu", kernels="triton")
    px = pixels(2, seed=8)
    ids, mask = qformer_batch(5, 7, seed=1)
    with torch.no_grad():
        want = hf_retrieval.model(pixel_values=px, input_ids=ids, attention_mask=mask,
                                  use_image_text_matching_head=False).logits_per_image
    torch.testing.assert_close(m.itc(px, {"input_ids": ids, "attention_mask": mask}), want, atol=1e-5, rtol=1e-5)


def test_itg_cached_past_with_triton_equals_joint_pass():
    from blip2rt.kernels import AttentionMode

    m = blip2rt.from_pretrained("tiny", device="cpu", kernels="triton")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 40, (2, 6), generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad():
        img = m.image_embeds(torch.randn(2, 3, 56, 56, generator=g))
        queries = m.query_tokens.expand(2, -1, -1)
        joint, _ = m.qformer(torch.cat([queries, m.embeddings(ids)], 1), num_queries=8, text_mask=mask,
                             mode=AttentionMode.MULTIMODAL_CAUSAL, image_embeds=img)
        _, past = m.qformer(queries, num_queries=8, image_embeds=img)
        text, _ = m.qformer(m.embeddings(ids), num_queries=8, text_mask=mask, mode=AttentionMode.MULTIMODAL_CAUSAL,
                            past=past)
    torch.testing.assert_close(text, joint[:, 8:], atol=1e-5, rtol=1e-5)
