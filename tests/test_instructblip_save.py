"""Saving as transformers' InstructBLIP: the folder loads into InstructBlipForConditionalGeneration
and InstructBlipProcessor and answers token for token as the blip2rt model that wrote it; a DINOv2
vision tower (layer scale, positions for another grid) is written in EVA's form and computes the same."""

import numpy as np
import pytest
import torch
from PIL import Image

import blip2rt
from blip2rt.config import Blip2Config
from blip2rt.model import Blip2
from test_instructblip_parity import SIZE, load
from test_parity_transformers import pixels, qformer_batch

QUESTIONS = ["what color is it?", "is there a circle?", "which shape?"]


def instruction_model(seed=0):
    """The tiny preset (EVA ViT, OPT, stage-1 heads, tokenizers), its LLM widened so that greedy
    decoding does not collapse, with the question in its Q-Former, as `blip2rt train vqa` leaves it."""
    from test_vqa_finetune import steerable_tiny_model

    m = steerable_tiny_model(seed)
    m.config.question_in_qformer = True
    with torch.no_grad():
        m.query_tokens.normal_(0, 1.0, generator=torch.Generator().manual_seed(seed))
    return m.eval()


def images(n=3, size=56, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    m = instruction_model()
    folder = tmp_path_factory.mktemp("saved_instructblip")
    m.save_instructblip(folder)
    return m, folder


def test_the_folder_is_a_transformers_instructblip_folder(saved):
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    m, folder = saved
    hf, info = InstructBlipForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    proc = InstructBlipProcessor.from_pretrained(folder)
    assert hf.config.num_query_tokens == m.config.num_query_tokens
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == hf.config.image_token_index
    assert "<image>" not in m.tokenizer.get_vocab()  # the model's own tokenizer is left as it was
    ours = m.state_dict()
    theirs = hf.state_dict()
    assert torch.equal(theirs["qformer.embeddings.layernorm.weight"], ours["qformer.layernorm.weight"])
    assert torch.equal(theirs["qformer.embeddings.word_embeddings.weight"], ours["embeddings.word_embeddings.weight"])
    assert torch.equal(theirs["language_projection.weight"], ours["language_projection.weight"])
    assert not any(k.startswith(("itm_head", "vision_proj", "text_proj", "itg_head", "temp")) for k in theirs)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_transformers_captions_with_the_instruction_as_blip2rt(saved, num_beams):
    """The processor's own inputs: the prompt goes to the Q-Former and the LLM, as caption(prompt=) does."""
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    m, folder = saved
    hf = InstructBlipForConditionalGeneration.from_pretrained(folder).eval()
    proc = InstructBlipProcessor.from_pretrained(folder)
    proc.tokenizer.padding_side = "left"
    imgs, prompt = images(), "a photo of"
    gen = dict(num_beams=num_beams, max_new_tokens=6, min_new_tokens=6)
    inputs = proc(images=imgs, text=[prompt] * len(imgs), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = hf.generate(**inputs, **gen)
    want = [t.strip() for t in proc.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]
    got = m.caption(imgs, prompt=prompt, **gen)
    assert got == want
    assert len(set(got)) > 1  # the images are told apart


@pytest.mark.parametrize("num_beams", [1, 3])
def test_transformers_answers_questions_as_blip2rt(saved, num_beams):
    """VQA as blip2rt's answer() lays it out: the bare question in the Q-Former, the template in the LLM."""
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    m, folder = saved
    hf = InstructBlipForConditionalGeneration.from_pretrained(folder).eval()
    proc = InstructBlipProcessor.from_pretrained(folder)
    proc.tokenizer.padding_side = "left"
    imgs = images(seed=1)
    gen = dict(num_beams=num_beams, max_new_tokens=5, min_new_tokens=5)
    llm = proc(images=imgs, text=[f"Question: {q} Answer:" for q in QUESTIONS], return_tensors="pt", padding=True)
    q = proc.qformer_tokenizer(QUESTIONS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = hf.generate(pixel_values=llm["pixel_values"], input_ids=llm["input_ids"],
                          attention_mask=llm["attention_mask"], qformer_input_ids=q["input_ids"],
                          qformer_attention_mask=q["attention_mask"], **gen)
    want = [t.strip() for t in proc.tokenizer.batch_decode(out[:, llm["input_ids"].shape[1]:], skip_special_tokens=True)]
    assert m.answer(imgs, QUESTIONS, **gen) == want


def test_the_saved_folder_loads_back_into_blip2rt_with_the_same_answers(saved):
    m, folder = saved
    back = blip2rt.from_pretrained(folder, device="cpu", kernels="torch")
    assert back.config.is_instructblip and back.config.image_token_index is not None
    imgs = images(seed=2)
    gen = dict(num_beams=3, max_new_tokens=5, min_new_tokens=5)
    assert back.answer(imgs, QUESTIONS, **gen) == m.answer(imgs, QUESTIONS, **gen)


@pytest.mark.parametrize("ref_name", ["hf_instruct_llama", "hf_instruct_t5"])
def test_a_loaded_instructblip_saves_back_to_the_same_tensors(ref_name, request, tmp_path):
    from safetensors.torch import load_file

    ref = request.getfixturevalue(ref_name)
    load(ref).save_instructblip(tmp_path / "again")
    got = load_file(tmp_path / "again" / "model.safetensors")
    want = {k: v for k, v in ref.model.state_dict().items() if not k.endswith("position_ids")}
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def dinov2_like_instruction_model() -> Blip2:
    """A DINOv2-style vision tower (layer scale, positions stored for a 5x5 grid, a k bias) at a
    3x3 grid, with the question in the Q-Former: what blip2-mini fine-tuned for VQA is, in small."""
    from hf_reference import INSTRUCT_QFORMER, INSTRUCT_VISION, instruct_text_config, randomize_

    cfg = Blip2Config(vision_config={**INSTRUCT_VISION, "layer_scale": True, "position_grid": 5},
                      qformer_config=INSTRUCT_QFORMER, text_config=instruct_text_config("llama").to_dict(),
                      num_query_tokens=4, question_in_qformer=True, image_token_index=98)
    torch.manual_seed(5)
    m = Blip2(cfg)
    randomize_(m)
    with torch.no_grad():
        for layer in m.vision_model.encoder.layers:  # a k bias, as DINOv2 has
            layer.self_attn.qkv.bias.normal_(0, 0.2)
            layer.layer_scale1.uniform_(0.05, 2.0)
            layer.layer_scale2.uniform_(0.05, 2.0)
    return m.eval()


def test_layer_scale_and_stored_positions_are_written_in_evas_form(tmp_path):
    from transformers import InstructBlipForConditionalGeneration

    m = dinov2_like_instruction_model()
    m.save_instructblip(tmp_path / "dinov2")
    hf = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "dinov2").eval()
    px = pixels(2, SIZE, seed=3)
    qids, qmask = qformer_batch(2, 6, seed=3)
    with torch.no_grad():
        want = hf.get_image_features(px, qformer_input_ids=qids, qformer_attention_mask=qmask).pooler_output
        got = m.image_features(px, qids, qmask)
        no_scale = hf.vision_model(px).last_hidden_state
        m.vision_model.encoder.layers[0].layer_scale1.fill_(1.0)
        assert (m.vision_model(px) - no_scale).abs().max() > 1e-3  # the scale matters at these values
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_model_without_the_question_in_its_qformer_does_not_save_as_instructblip(hf_opt, tmp_path):
    m = blip2rt.from_pretrained(hf_opt.folder, device="cpu")
    with pytest.raises(blip2rt.InputError, match="question in its Q-Former"):
        m.save_instructblip(tmp_path / "no")


def test_a_lavis_ln_vision_eps_is_refused_rather_than_changed(hf_instruct_llama, tmp_path):
    m = load(hf_instruct_llama)
    m.config.vision_config.ln_vision_eps = 1e-5
    with pytest.raises(blip2rt.InputError, match="eps"):
        m.save_instructblip(tmp_path / "eps")



def test_blip2rt_convert_writes_the_folder_from_a_vqa_checkpoint(tmp_path, capsys):
    """The CLI over a saved model folder: the same tensors as save_instructblip writes."""
    from safetensors.torch import load_file

    from blip2rt.cli import main

    m = instruction_model(seed=1)
    m.save_pretrained(tmp_path / "vqa_model")  # blip2rt's own folder, the question flag in its config
    assert main(["convert", "--model", str(tmp_path / "vqa_model"), "--out", str(tmp_path / "hf")]) == 0
    assert "InstructBLIP" in capsys.readouterr().out
    m.save_instructblip(tmp_path / "direct")
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "direct" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["convert", "--model", "tiny", "--out", str(tmp_path / "no")]) == 2  # no question in its Q-Former
