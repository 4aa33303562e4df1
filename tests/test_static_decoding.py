"""generate(static_cache=True): decoding over a preallocated KV cache with the token chosen on the
device. Oracle: transformers' Blip2ForConditionalGeneration.generate on the same weights (greedy),
its own sampling warpers (sampling), and blip2rt's transformers path on the embedded blip2-mini."""

import shutil

import pytest
import torch

import blip2rt
from blip2rt.errors import InputError
from blip2rt.front_end import LENGTH_BUCKET
from blip2rt.static_decoding import Sampling, choose
from hf_reference import IMAGE_TOKEN, NUM_QUERIES
from sampling_stats import FALSE_ALARM, chi_square_p
from test_bos_before_soft_prompt import bos_first_folder, hf_layout, text_batch
from test_parity_transformers import left_padded_prompts, pixels

LENGTHS = [3, 8, 5]  # prompts of different lengths, left-padded into one batch


def _hf_generate(ref, px, ids, mask, **gen):
    """transformers' tokens for [soft prompt ; ids] (B, T new)."""
    b = ids.shape[0]
    hf_ids = torch.cat([torch.full((b, NUM_QUERIES), IMAGE_TOKEN, device=ids.device), ids], 1)
    hf_mask = torch.cat([torch.ones(b, NUM_QUERIES, dtype=mask.dtype, device=ids.device), mask], 1)
    with torch.no_grad():
        return ref.model.generate(pixel_values=px, input_ids=hf_ids, attention_mask=hf_mask, **gen)[:, hf_ids.shape[1]:]


def _eos_mid_way(m, px, ids, mask, gen):
    """A token the unconstrained greedy search emits at steps 3 to 6: used as EOS, some row ends there."""
    never = m.language_model.config.vocab_size + 5
    free = m.generate(px, ids, mask, eos_token_id=never, **gen)
    return int(torch.bincount(free[:, 2:6].reshape(-1)).argmax())


@pytest.mark.parametrize("ref_name", ["hf_opt", "hf_llama"])
def test_greedy_tokens_equal_transformers(ref_name, request):
    """Batched left-padded prompts of different lengths; with and without min_new_tokens; an EOS
    that ends some rows mid-way (padded after it, and the output cut when every row has ended)."""
    ref = request.getfixturevalue(ref_name)
    m = blip2rt.from_pretrained(ref.folder, device="cpu")
    cfg = ref.model.config.text_config
    ids, mask = left_padded_prompts(LENGTHS, cfg.pad_token_id, cfg.bos_token_id, seed=5)
    px = pixels(3, seed=11)
    for gen in (dict(max_new_tokens=12), dict(max_new_tokens=12, min_new_tokens=7)):
        gen = dict(gen, num_beams=1, do_sample=False)
        want = _hf_generate(ref, px, ids, mask, **gen)
        got = m.generate(px, ids, mask, static_cache=True, **gen)
        assert torch.equal(got, want), (gen, got, want)
        assert len(torch.unique(got)) > 1
    gen = dict(max_new_tokens=10, num_beams=1, do_sample=False)
    eos = _eos_mid_way(m, px, ids, mask, gen)
    for extra in (dict(), dict(min_new_tokens=5)):
        want = _hf_generate(ref, px, ids, mask, eos_token_id=eos, **gen, **extra)
        got = m.generate(px, ids, mask, static_cache=True, eos_token_id=eos, **gen, **extra)
        assert torch.equal(got, want), (extra, got, want)
    stopped = m.generate(px, ids, mask, static_cache=True, eos_token_id=eos, **gen)
    assert any((row == eos).any() and (row == eos).nonzero()[0, 0] < gen["max_new_tokens"] - 1 for row in stopped)


def test_every_row_ending_early_cuts_the_output(hf_opt):
    """One row alone, its EOS at step 2: the output stops there, well before max_new_tokens, and
    past a multiple of the steps between device reads (the loop only looks every few steps)."""
    m = blip2rt.from_pretrained(hf_opt.folder, device="cpu")
    px = pixels(1, seed=2)
    ids = torch.tensor([[2, 11, 12]])
    gen = dict(max_new_tokens=25, num_beams=1)
    free = m.generate(px, ids, eos_token_id=10_000, **gen)
    eos = int(free[0, 1])
    first = int((free[0] == eos).nonzero()[0, 0])
    want = _hf_generate(hf_opt, px, ids, torch.ones_like(ids), eos_token_id=eos, **gen)
    got = m.generate(px, ids, static_cache=True, eos_token_id=eos, **gen)
    assert torch.equal(got, want) and got.shape[1] == first + 1 < gen["max_new_tokens"]


def test_bos_before_the_soft_prompt(hf_llama, tmp_path):
    """[BOS ; soft prompt ; text]: the layout transformers gives with a BOS before the placeholders."""
    folder = bos_first_folder(hf_llama, tmp_path)
    m = blip2rt.from_pretrained(folder, device="cpu")
    cfg = hf_llama.model.config.text_config
    ids, mask = text_batch(cfg.pad_token_id, seed=6)
    hf_ids, hf_mask = hf_layout(ids, mask, cfg.bos_token_id)
    px = pixels(3, seed=12)
    gen = dict(max_new_tokens=9, min_new_tokens=4, num_beams=1, do_sample=False)
    with torch.no_grad():
        want = hf_llama.model.generate(pixel_values=px, input_ids=hf_ids, attention_mask=hf_mask, **gen)
    got = m.generate(px, ids, mask, static_cache=True, **gen)
    assert torch.equal(got, want[:, hf_ids.shape[1]:])


def test_buffers_are_reused_across_calls_and_lengths(hf_opt):
    """The KV buffers are kept (fixed addresses) per batch and bucketed length: a second call, and a
    shorter one in the same bucket, reuse them and still give transformers' tokens."""
    m = blip2rt.from_pretrained(hf_opt.folder, device="cpu")
    cfg = hf_opt.model.config.text_config
    ids, mask = left_padded_prompts([4, 2], cfg.pad_token_id, cfg.bos_token_id, seed=1)
    px = pixels(2, seed=3)
    for n in (10, 10, 7):
        want = _hf_generate(hf_opt, px, ids, mask, max_new_tokens=n, num_beams=1)
        assert torch.equal(m.generate(px, ids, mask, static_cache=True, max_new_tokens=n, num_beams=1), want)
    (key, kv), = m._static_decoder._buffers.items()
    assert key[:2] == (2, LENGTH_BUCKET) and kv[0].shape[2] == LENGTH_BUCKET


def test_sampling_filters_as_transformers_warpers():
    """temperature, top-k and top-p: the same surviving tokens and scores as transformers' warpers."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 40, generator=g) * 3
    for t, k, p in [(0.7, None, None), (None, 5, None), (None, None, 0.8), (1.5, 12, 0.9), (None, 1, None)]:
        want = scores.clone()
        if t:
            want = TemperatureLogitsWarper(t)(None, want)
        if k:
            want = TopKLogitsWarper(k)(None, want)
        if p:
            want = TopPLogitsWarper(p)(None, want)
        got = Sampling(t, k, p).filtered(scores.clone())
        assert torch.equal(torch.isinf(got), torch.isinf(want)), (t, k, p)
        torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)], rtol=0, atol=0)


def test_sampled_tokens_follow_the_filtered_softmax():
    """Draws on the device, per row, against the softmax of transformers' filtered scores."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    torch.manual_seed(3)
    logits = torch.randn(3, 12) * 2
    rows = logits.repeat_interleave(4000, 0)
    sampling = Sampling(temperature=1.3, top_p=0.85)
    draws = choose(rows, torch.zeros(1, 12), sampling).view(3, 4000)
    counts = torch.stack([torch.bincount(d, minlength=12) for d in draws])
    weights = TopPLogitsWarper(0.85)(None, TemperatureLogitsWarper(1.3)(None, logits.clone())).softmax(-1)
    assert chi_square_p(counts, weights) > FALSE_ALARM


def test_sampling_with_a_seed_and_top_k_1(hf_opt):
    m = blip2rt.from_pretrained(hf_opt.folder, device="cpu")
    px = pixels(2, seed=5)
    gen = dict(max_new_tokens=10, num_beams=1, static_cache=True)
    torch.manual_seed(7)
    a = m.generate(px, do_sample=True, top_p=0.9, temperature=1.5, **gen)
    torch.manual_seed(7)
    b = m.generate(px, do_sample=True, top_p=0.9, temperature=1.5, **gen)
    greedy = m.generate(px, **gen)
    assert torch.equal(a, b) and not torch.equal(a, greedy)
    assert torch.equal(m.generate(px, do_sample=True, top_k=1, **gen), greedy)


def test_what_the_static_path_cannot_do_is_refused(hf_opt, hf_t5):
    m = blip2rt.from_pretrained(hf_opt.folder, device="cpu")
    px = pixels(1)
    with pytest.raises(InputError, match="num_beams=3 needs static_cache=False"):
        m.generate(px, static_cache=True, num_beams=3)
    with pytest.raises(InputError, match="repetition_penalty needs static_cache=False"):
        m.generate(px, static_cache=True, num_beams=1, repetition_penalty=1.3)
    t5 = blip2rt.from_pretrained(hf_t5.folder, device="cpu")
    with pytest.raises(InputError, match="decoder-only"):
        t5.generate(px, static_cache=True, num_beams=1)


@pytest.mark.slow
def test_blip2_mini_captions_equal_the_transformers_path():
    """The embedded default's real weights, where captions end with a real EOS: greedy captions and
    answers of three images, batched with prompts of different lengths, token for token."""
    m = blip2rt.from_pretrained("blip2-mini", device="cpu")
    size = m.config.vision_config.image_size
    px = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    gen = dict(max_new_tokens=20, num_beams=1)
    for prompt in (None, ["a photo of", "a", "there is a picture of"]):
        want = m.caption(px, prompt=prompt, **gen)
        assert m.caption(px, prompt=prompt, static_cache=True, **gen) == want
    ids, mask = m.encode_prompts(["a photo of", "a", "there is a picture of"])
    want = m.generate(px, ids, mask, min_new_tokens=3, **gen)
    assert torch.equal(m.generate(px, ids, mask, min_new_tokens=3, static_cache=True, **gen), want)


def _inductor_can_compile() -> str | None:
    """None, or why torch.compile cannot run its CPU backend here."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        return "inductor needs a C++ compiler on the CPU"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_inductor_can_compile() is not None, reason=str(_inductor_can_compile()))
def test_compiled_step_gives_the_same_tokens(hf_llama):
    """The torch.compile'd decode step (inductor on the CPU) against the eager one and transformers."""
    m = blip2rt.from_pretrained(hf_llama.folder, device="cpu")
    cfg = hf_llama.model.config.text_config
    ids, mask = left_padded_prompts(LENGTHS, cfg.pad_token_id, cfg.bos_token_id, seed=8)
    px = pixels(3, seed=13)
    gen = dict(max_new_tokens=11, min_new_tokens=6, num_beams=1)
    want = _hf_generate(hf_llama, px, ids, mask, **gen)
    assert torch.equal(m.generate(px, ids, mask, static_cache=True, compile_step=True, **gen), want)


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_static_cache_on_cuda_gives_transformers_tokens(hf_llama, compiled):
    """On CUDA, fp32: the eager step, and the compiled one (mode="reduce-overhead": a CUDA graph),
    against transformers' generate on the same device; a second call replays the captured step."""
    m = blip2rt.from_pretrained(hf_llama.folder, device="cuda", dtype="fp32", kernels="torch")
    cfg = hf_llama.model.config.text_config
    ids, mask = left_padded_prompts(LENGTHS, cfg.pad_token_id, cfg.bos_token_id, seed=8)
    hf_llama.model.to("cuda")
    try:
        for seed in (13, 14):
            px = pixels(3, seed=seed).cuda()
            gen = dict(max_new_tokens=11, min_new_tokens=6, num_beams=1)
            want = _hf_generate(hf_llama, px, ids.cuda(), mask.cuda(), **gen)
            got = m.generate(px, ids, mask, static_cache=True, compile_step=compiled, **gen)
            assert torch.equal(got, want)
    finally:
        hf_llama.model.to("cpu")


@pytest.mark.parametrize("ref_name", ["hf_opt", "hf_llama"])
def test_sampled_tokens_equal_transformers_under_one_seed(ref_name, request):
    """Sampling draws one multinomial per step from torch's generator, as transformers' generate does:
    under the same seed and warpers (temperature, top-k, top-p), and an EOS that min_new_tokens holds
    back for the first steps, the tokens are transformers' own, token for token. A first token chosen
    greedily, or an EOS bias dropped under sampling, changes the draws."""
    ref = request.getfixturevalue(ref_name)
    m = blip2rt.from_pretrained(ref.folder, device="cpu")
    cfg = ref.model.config.text_config
    ids, mask = left_padded_prompts(LENGTHS, cfg.pad_token_id, cfg.bos_token_id, seed=6)
    px = pixels(3, seed=12)
    base = dict(max_new_tokens=12, num_beams=1, do_sample=False)
    eos = _eos_mid_way(m, px, ids, mask, base)  # a token greedy decoding emits: likely under sampling too
    ended = 0
    for seed, warpers in ((0, dict(temperature=1.3, top_k=20, top_p=0.9)), (1, dict(temperature=0.8)),
                          (2, dict(top_p=0.7)), (3, dict(top_k=5, min_new_tokens=8))):
        gen = {**base, "do_sample": True, "eos_token_id": eos, "min_new_tokens": 4, **warpers}
        torch.manual_seed(seed)
        want = _hf_generate(ref, px, ids, mask, **gen)
        torch.manual_seed(seed)
        got = m.generate(px, ids, mask, static_cache=True, **gen)
        assert torch.equal(got, want), (seed, warpers, got, want)
        ended += int((got == eos).any())
        assert not (got[:, : gen["min_new_tokens"]] == eos).any()
    assert ended > 0  # the EOS was drawn at some point: its bias mattered
