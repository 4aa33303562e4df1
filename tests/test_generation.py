"""Generation behaviour: batching with padding, text in and out through the checkpoint's tokenizer."""

import shutil

import pytest
import torch

import blip2rt
from blip2rt.tokenization import tiny_llm_tokenizer
from hf_reference import IMAGE_TOKEN, NUM_QUERIES
from test_parity_transformers import left_padded_prompts, pixels


@pytest.mark.parametrize("ref_name", ["hf_opt", "hf_llama"])
def test_batched_prompts_equal_each_prompt_alone(ref_name, request):
    """Left padding between the soft prompt and the text must not change any row's tokens."""
    ref = request.getfixturevalue(ref_name)
    m = blip2rt.from_pretrained(ref.folder, device="cpu")
    cfg = ref.model.config.text_config
    ids, mask = left_padded_prompts([3, 8, 5], cfg.pad_token_id, cfg.bos_token_id, seed=4)
    px = pixels(3, seed=9)
    batched = m.generate(px, ids, mask, max_new_tokens=10, min_new_tokens=10)
    for i in range(3):
        n = int(mask[i].sum())
        alone = m.generate(px[i: i + 1], ids[i: i + 1, -n:], max_new_tokens=10, min_new_tokens=10)
        assert torch.equal(alone[0], batched[i]), i


def test_sampling_is_reproducible_with_a_seed(hf_opt):
    m = blip2rt.from_pretrained(hf_opt.folder, device="cpu")
    px = pixels(2)
    torch.manual_seed(7)
    a = m.generate(px, do_sample=True, top_p=0.9, temperature=1.5, max_new_tokens=10)
    torch.manual_seed(7)
    b = m.generate(px, do_sample=True, top_p=0.9, temperature=1.5, max_new_tokens=10)
    greedy = m.generate(px, max_new_tokens=10)
    assert torch.equal(a, b) and not torch.equal(a, greedy)


def test_repetition_penalty_matches_transformers(hf_opt):
    """Both penalise the prompt and the new tokens, not the soft prompt (transformers' placeholder
    id there is one the LLM does not produce here)."""
    m = blip2rt.from_pretrained(hf_opt.folder, device="cpu")
    px = pixels(1, seed=3)
    ids = torch.tensor([[2, 11, 12, 13]])
    gen = dict(max_new_tokens=12, min_new_tokens=12, repetition_penalty=1.8)
    got = m.generate(px, ids, **gen)
    hf_ids = torch.cat([torch.full((1, NUM_QUERIES), IMAGE_TOKEN), ids], 1)
    with torch.no_grad():
        want = hf_opt.model.generate(pixel_values=px, input_ids=hf_ids, **gen)[:, hf_ids.shape[1]:]
    assert torch.equal(got, want)
    assert not torch.equal(got, m.generate(px, ids, max_new_tokens=12, min_new_tokens=12))


@pytest.fixture(scope="module")
def opt_with_tokenizer(hf_opt, tmp_path_factory):
    d = tmp_path_factory.mktemp("opt_tok")
    shutil.copytree(hf_opt.folder, d, dirs_exist_ok=True)
    tok = tiny_llm_tokenizer()  # 50 ids, inside the reference LLM's 99-token vocabulary
    tok.save_pretrained(d)
    return d, tok


def test_caption_and_answer_match_transformers_text(hf_opt, opt_with_tokenizer):
    folder, tok = opt_with_tokenizer
    m = blip2rt.from_pretrained(folder, device="cpu")
    px = pixels(2, seed=6)
    prompts = ["a photo of", "question: what? answer:"]
    gen = dict(num_beams=3, max_new_tokens=9, min_new_tokens=9)
    got = m.caption(px, prompt=prompts, **gen)

    enc = tok(prompts, padding="longest", padding_side="left", return_tensors="pt")
    hf_ids = torch.cat([torch.full((2, NUM_QUERIES), IMAGE_TOKEN), enc["input_ids"]], 1)
    hf_mask = torch.cat([torch.ones(2, NUM_QUERIES, dtype=torch.long), enc["attention_mask"]], 1)
    with torch.no_grad():
        out = hf_opt.model.generate(pixel_values=px, input_ids=hf_ids, attention_mask=hf_mask, **gen)
    want = [t.strip() for t in tok.batch_decode(out[:, hf_ids.shape[1]:], skip_special_tokens=True)]
    assert got == want and all(got)

    answers = m.answer(px, "what?", num_beams=1, max_new_tokens=5)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_prompt_count_must_match_images(opt_with_tokenizer):
    m = blip2rt.from_pretrained(opt_with_tokenizer[0], device="cpu")
    with pytest.raises(blip2rt.InputError, match="2 images but 3 prompts"):
        m.caption(pixels(2), prompt=["a", "b", "c"])


def test_caption_without_tokenizer_says_so(hf_opt):
    m = blip2rt.from_pretrained(hf_opt.folder, device="cpu")
    with pytest.raises(blip2rt.InputError, match="no LLM tokenizer"):
        m.caption(pixels(1))


def test_tiny_preset_runs_every_api_method():
    m = blip2rt.from_pretrained("tiny", device="cpu")
    px = pixels(2, size=56)
    assert m.image_features(px).shape == (2, 8, 48)
    assert len(m.caption(px, max_new_tokens=5, num_beams=1)) == 2
    assert len(m.answer(px, "what colour?", max_new_tokens=3, num_beams=1)) == 2
    assert m.itm(px, ["a", "b"]).shape == (2,)
    assert m.itc(px, ["a", "b", "c"]).shape == (2, 3)
    scores = m.rank_texts(px, ["a", "b", "c"], k=2)
    assert scores.shape == (2, 3) and (torch.isinf(scores).sum(dim=1) == 1).all()
