"""InstructBLIP: blip2rt against transformers' own InstructBlipForConditionalGeneration on the same
saved weights (fp32), for a LLaMA (Vicuna's family) and a T5 (Flan-T5's) LLM, with instructions of
unequal length in the Q-Former and prompts of unequal length in the LLM."""

import pytest
import torch

import blip2rt
from hf_reference import INSTRUCT_QUERIES, TEXT_VOCAB, hf_instruct_prompt_inputs
from test_parity_transformers import ATOL, left_padded_prompts, pixels, qformer_batch

REFS = ["hf_instruct_llama", "hf_instruct_t5"]
SIZE = 42  # the references' image size


def load(ref, **kw):
    return blip2rt.from_pretrained(ref.folder, device="cpu", dtype="fp32", kernels="torch", **kw)


def prompts(ref, lengths, seed=3):
    """The LLM's prompts: left-padded with BOS first for LLaMA; right-padded, no BOS, for T5."""
    cfg = ref.model.config.text_config
    if ref.kind == "t5":
        ids, mask = left_padded_prompts(lengths, cfg.pad_token_id, 5, seed=seed)
        return ids.flip(1), mask.flip(1)
    return left_padded_prompts(lengths, cfg.pad_token_id, cfg.bos_token_id, seed=seed)


@pytest.mark.parametrize("ref_name", REFS)
def test_an_instructblip_folder_loads_as_an_instruction_aware_model(ref_name, request):
    ref = request.getfixturevalue(ref_name)
    m = load(ref)
    assert m.config.question_in_qformer and m.config.is_instructblip and not m.config.with_text_heads
    assert m.config.is_encoder_decoder == (ref.kind == "t5")
    assert m.config.num_query_tokens == INSTRUCT_QUERIES and m.config.image_token_index == 98
    # every tensor of the transformers model is in blip2rt's, and equal
    ours = m.state_dict()
    theirs = {k: v for k, v in ref.model.state_dict().items() if not k.endswith("position_ids")}
    renamed = blip2rt.instructblip.to_blip2rt_names(theirs)
    assert set(renamed) <= set(ours), sorted(set(renamed) - set(ours))[:3]
    assert all(torch.equal(ours[k], v) for k, v in renamed.items())
    assert not hasattr(m, "itm_head") and hasattr(m, "embeddings")


@pytest.mark.parametrize("ref_name", REFS)
def test_instruction_conditioned_image_features_match_transformers(ref_name, request):
    ref = request.getfixturevalue(ref_name)
    m = load(ref)
    px = pixels(3, SIZE, seed=21)
    qids, qmask = qformer_batch(3, 8, seed=4)  # three instructions, padded differently
    with torch.no_grad():
        want = ref.model.get_image_features(px, qformer_input_ids=qids, qformer_attention_mask=qmask).pooler_output
        got = m.image_features(px, qformer_input_ids=qids, qformer_attention_mask=qmask)  # transformers' names
        other = m.image_features(px, *qformer_batch(3, 8, seed=5))
    assert want.std() > 0.1
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    assert (other - got).abs().max() > 1e-2  # the instruction changes the soft prompt


@pytest.mark.parametrize("ref_name", REFS)
def test_lm_logits_and_loss_match_transformers(ref_name, request):
    ref = request.getfixturevalue(ref_name)
    m = load(ref)
    px = pixels(3, SIZE, seed=22)
    qids, qmask = qformer_batch(3, 6, seed=6)
    ids, mask = prompts(ref, [7, 4, 9])
    hf_ids, hf_mask = hf_instruct_prompt_inputs(ids, mask)
    q = dict(qformer_input_ids=qids, qformer_attention_mask=qmask)
    with torch.no_grad():
        if ref.kind == "t5":
            g = torch.Generator().manual_seed(8)
            labels = torch.randint(3, TEXT_VOCAB - 2, (3, 5), generator=g)
            labels[1, 3:] = -100
            want = ref.model(pixel_values=px, input_ids=hf_ids, attention_mask=hf_mask, labels=labels, **q)
        else:
            labels = ids.masked_fill(mask == 0, -100)
            hf_labels = torch.cat([torch.full((3, INSTRUCT_QUERIES), -100), labels], dim=1)
            want = ref.model(pixel_values=px, input_ids=hf_ids, attention_mask=hf_mask, labels=hf_labels, **q)
        got = m(px, ids, mask, labels=labels, **q)
    assert want.logits.std() > 0.5
    torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("ref_name", REFS)
@pytest.mark.parametrize("lengths", [[5], [3, 8, 5]], ids=["batch1", "batch3"])
@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
def test_generate_matches_transformers(ref_name, lengths, num_beams, request):
    ref = request.getfixturevalue(ref_name)
    m = load(ref)
    b = len(lengths)
    px = pixels(b, SIZE, seed=30 + b)
    qids, qmask = qformer_batch(b, 7, seed=b)
    ids, mask = prompts(ref, lengths)
    gen = dict(max_new_tokens=10, min_new_tokens=10, num_beams=num_beams, do_sample=False)
    hf_ids, hf_mask = hf_instruct_prompt_inputs(ids, mask)
    with torch.no_grad():
        want = ref.model.generate(pixel_values=px, qformer_input_ids=qids, qformer_attention_mask=qmask,
                                  input_ids=hf_ids, attention_mask=hf_mask, **gen)
    want = want[:, 1:] if ref.kind == "t5" else want[:, hf_ids.shape[1]:]
    got = m.generate(px, ids, mask, qformer_input_ids=qids, qformer_attention_mask=qmask, **gen)
    assert got.shape == (b, 10)
    assert len(set(got.flatten().tolist())) > 2  # not one repeated token
    assert torch.equal(got, want)


# ---- the checkpoint forms: sharded, unknown keys, LAVIS -------------------------------------

def test_a_sharded_instructblip_folder_loads_the_same_model(hf_instruct_llama, tmp_path):
    hf_instruct_llama.model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    a, b = load(hf_instruct_llama).state_dict(), blip2rt.from_pretrained(tmp_path / "sharded", device="cpu").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_unknown_key_in_an_instructblip_folder_is_refused_not_dropped(hf_instruct_llama, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in hf_instruct_llama.model.state_dict().items()}
    state["qformer.embeddings.token_type_embeddings.weight"] = torch.zeros(2, 48)
    folder = tmp_path / "extra"
    folder.mkdir()
    (folder / "config.json").write_text((hf_instruct_llama.folder / "config.json").read_text())
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(blip2rt.CheckpointError, match="token_type_embeddings"):
        blip2rt.from_pretrained(folder, device="cpu")


def instruct_to_lavis(ref) -> dict:
    """LAVIS's blip2_vicuna_instruct / blip2_t5_instruct names for a transformers InstructBLIP, written
    here from the LAVIS naming (test_lavis_checkpoint.hf_to_lavis), not through blip2rt."""
    from test_lavis_checkpoint import hf_to_lavis

    blip2_names = {}
    for k, v in ref.model.state_dict().items():
        if k.endswith("position_ids"):
            continue
        k = k.replace("qformer.embeddings.layernorm.", "qformer.layernorm.")
        k = k.replace("qformer.embeddings.word_embeddings.", "embeddings.word_embeddings.")
        k = k.replace("qformer.embeddings.position_embeddings.", "embeddings.position_embeddings.")
        blip2_names[k] = v
    return hf_to_lavis(blip2_names, "t5" if ref.kind == "t5" else "llm")


@pytest.mark.parametrize("ref_name", REFS)
def test_a_lavis_instructblip_checkpoint_answers_as_transformers(ref_name, request, tmp_path):
    """A whole LAVIS state dict beside an InstructBLIP config: the instruction reaches the Q-Former
    (found from the weights), and ln_vision computes with LAVIS's eps, as in LAVIS."""
    import copy

    ref = request.getfixturevalue(ref_name)
    lavis = instruct_to_lavis(ref)
    assert "Qformer.bert.embeddings.word_embeddings.weight" in lavis and not any(k.startswith("Qformer.cls") for k in lavis)
    folder = tmp_path / "lavis"
    folder.mkdir()
    (folder / "config.json").write_text((ref.folder / "config.json").read_text())
    torch.save({"model": lavis}, folder / "instruct.pth")
    m = blip2rt.from_pretrained(folder, device="cpu", kernels="torch")
    assert m.config.question_in_qformer
    lavis_like = copy.deepcopy(ref.model)
    lavis_like.vision_model.post_layernorm.eps = 1e-5
    px = pixels(2, SIZE, seed=40)
    qids, qmask = qformer_batch(2, 6, seed=9)
    ids, mask = prompts(ref, [4, 6])
    hf_ids, hf_mask = hf_instruct_prompt_inputs(ids, mask)
    gen = dict(max_new_tokens=8, min_new_tokens=8, num_beams=1)
    with torch.no_grad():
        want = lavis_like.generate(pixel_values=px, qformer_input_ids=qids, qformer_attention_mask=qmask,
                                   input_ids=hf_ids, attention_mask=hf_mask, **gen)
    want = want[:, 1:] if ref.kind == "t5" else want[:, hf_ids.shape[1]:]
    assert torch.equal(m.generate(px, ids, mask, qformer_input_ids=qids, qformer_attention_mask=qmask, **gen), want)


def test_a_trimmed_lavis_instructblip_checkpoint_overlays_its_base(hf_instruct_llama, tmp_path):
    """LAVIS saves InstructBLIP without the frozen ViT and LLM: over config=<folder>, the file's
    Q-Former, queries and projection are used, the base's frozen parts kept."""
    lavis = {k: v.clone() for k, v in instruct_to_lavis(hf_instruct_llama).items()
             if not k.startswith(("visual_encoder.", "llm_model."))}
    lavis["query_tokens"] += 0.5
    lavis["Qformer.bert.embeddings.word_embeddings.weight"] *= -1
    path = tmp_path / "instruct_trimmed.pth"
    torch.save({"model": lavis}, path)
    m = blip2rt.from_pretrained(path, config=hf_instruct_llama.folder, device="cpu", kernels="torch")
    assert m.config.question_in_qformer
    torch.testing.assert_close(m.query_tokens, lavis["query_tokens"])
    torch.testing.assert_close(m.embeddings.word_embeddings.weight, lavis["Qformer.bert.embeddings.word_embeddings.weight"])
    base = load(hf_instruct_llama)
    assert torch.equal(m.language_model.lm_head.weight, base.language_model.lm_head.weight)
    assert m.vision_model.post_layernorm.eps == 1e-5  # LAVIS's ln_vision


def test_an_instructblip_checkpoint_into_a_model_without_text_embeddings_is_refused(hf_instruct_llama, hf_llama,
                                                                                     tmp_path):
    path = tmp_path / "instruct.pth"
    torch.save({"model": instruct_to_lavis(hf_instruct_llama)}, path)
    with pytest.raises(blip2rt.CheckpointError, match="text embeddings"):
        blip2rt.from_pretrained(path, config=hf_llama.folder, device="cpu")
