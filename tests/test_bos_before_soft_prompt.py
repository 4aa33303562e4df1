"""Blip2Config.bos_before_soft_prompt: [BOS ; soft prompt ; text] for decoder-only LLMs.

Oracle: transformers' Blip2ForConditionalGeneration puts the image features wherever the image
placeholder ids are, so ids [BOS, IMG x Q, text] give it exactly this layout on the same weights.
"""

import json
import shutil

import numpy as np
import pytest
import torch

import blip2rt
from blip2rt.config import Blip2Config
from blip2rt.errors import CheckpointError
from blip2rt.tokenization import tiny_llm_tokenizer
from hf_reference import IMAGE_TOKEN, NUM_QUERIES, TEXT_VOCAB

LENGTHS = [4, 1, 6]


def pixels(b, seed=0):
    return torch.randn(b, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def bos_first_folder(ref, tmp_path):
    folder = tmp_path / "bos_first"
    shutil.copytree(ref.folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["blip2rt_bos_before_soft_prompt"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def text_batch(pad_id, seed=0):
    """Left-padded text without a BOS (the model puts it before the soft prompt)."""
    g = torch.Generator().manual_seed(seed)
    t = max(LENGTHS)
    ids = torch.full((len(LENGTHS), t), pad_id)
    mask = torch.zeros(len(LENGTHS), t, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        ids[i, t - n:] = torch.randint(3, TEXT_VOCAB - 2, (n,), generator=g)
        mask[i, t - n:] = 1
    return ids, mask


def hf_layout(ids, mask, bos_id):
    b = ids.shape[0]
    hf_ids = torch.cat([torch.full((b, 1), bos_id), torch.full((b, NUM_QUERIES), IMAGE_TOKEN), ids], 1)
    hf_mask = torch.cat([torch.ones(b, 1 + NUM_QUERIES, dtype=mask.dtype), mask], 1)
    return hf_ids, hf_mask


@pytest.fixture(scope="module")
def bos_first(hf_llama, tmp_path_factory):
    folder = bos_first_folder(hf_llama, tmp_path_factory.mktemp("llama"))
    tiny_llm_tokenizer().save_pretrained(folder)  # 50 tokens, inside the reference LLM's vocabulary
    m = blip2rt.from_pretrained(folder, device="cpu", dtype="fp32")
    assert m.config.bos_before_soft_prompt
    return m, hf_llama, folder


def test_loss_and_logits_match_transformers_with_the_bos_first(bos_first):
    m, ref, _ = bos_first
    cfg = ref.model.config.text_config
    ids, mask = text_batch(cfg.pad_token_id)
    labels = ids.masked_fill(mask == 0, -100)
    hf_ids, hf_mask = hf_layout(ids, mask, cfg.bos_token_id)
    hf_labels = torch.cat([torch.full((3, 1 + NUM_QUERIES), -100), labels], 1)
    px = pixels(3)
    with torch.no_grad():
        want = ref.model(pixel_values=px, input_ids=hf_ids, attention_mask=hf_mask, labels=hf_labels)
        got = m(px, ids, mask, labels=labels)
        lean = m(px, ids, mask, labels=labels, return_logits=False)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    assert lean.logits is None
    torch.testing.assert_close(lean.loss, want.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
def test_generate_matches_transformers_with_the_bos_first(bos_first, num_beams):
    m, ref, _ = bos_first
    cfg = ref.model.config.text_config
    px = pixels(3, seed=2)
    gen = dict(max_new_tokens=6, min_new_tokens=6, num_beams=num_beams, do_sample=False)
    # no prompt: only the BOS, before the soft prompt
    b = 3
    hf_ids = torch.cat([torch.full((b, 1), cfg.bos_token_id), torch.full((b, NUM_QUERIES), IMAGE_TOKEN)], 1)
    with torch.no_grad():
        want = ref.model.generate(pixel_values=px, input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), **gen)
    got = m.generate(px, **gen)
    torch.testing.assert_close(got, want[:, -got.shape[1]:], rtol=0, atol=0)
    # left-padded prompts of different lengths
    ids, mask = text_batch(cfg.pad_token_id, seed=3)
    hf_ids, hf_mask = hf_layout(ids, mask, cfg.bos_token_id)
    with torch.no_grad():
        want = ref.model.generate(pixel_values=px, input_ids=hf_ids, attention_mask=hf_mask, **gen)
    got = m.generate(px, ids, mask, **gen)
    torch.testing.assert_close(got, want[:, -got.shape[1]:], rtol=0, atol=0)
    assert len(torch.unique(got)) > 1


def test_onnx_runtime_puts_the_bos_first_too(bos_first, tmp_path):
    from blip2rt.export import OrtBlip2, export_model

    m, ref, _ = bos_first
    export_model(m, tmp_path / "onnx")
    rt = OrtBlip2(tmp_path / "onnx", providers=["CPUExecutionProvider"])
    assert rt.cfg["bos_before_soft_prompt"] is True
    px = pixels(3, seed=4)
    ids, mask = text_batch(ref.model.config.text_config.pad_token_id, seed=5)
    for num_beams in (1, 3):
        gen = dict(max_new_tokens=6, min_new_tokens=2, num_beams=num_beams)
        np.testing.assert_array_equal(rt.generate(px.numpy(), **gen), m.generate(px, **gen).numpy())
        np.testing.assert_array_equal(rt.generate(px.numpy(), ids.numpy(), mask.numpy(), **gen),
                                      m.generate(px, ids, mask, **gen).numpy())
    # text prompts: the tokenizer's own BOS is dropped by both (it already went first)
    prompts = ["a", "a photo of", "the red one is"]
    assert m.tokenizer("a")["input_ids"][0] == m.config.text_config["bos_token_id"]
    ort_ids, ort_mask = rt.encode(prompts)
    pt_ids, pt_mask = m.encode_prompts(prompts)
    np.testing.assert_array_equal(ort_ids, pt_ids.numpy())
    np.testing.assert_array_equal(ort_mask, pt_mask.numpy())
    assert not (pt_ids[pt_mask.bool()] == m.config.text_config["bos_token_id"]).any()
    gen = dict(max_new_tokens=5, min_new_tokens=2)
    assert rt.caption(px.numpy(), prompt=prompts, **gen) == m.caption(px, prompt=prompts, **gen)


def test_the_flag_is_saved_and_refused_where_it_cannot_apply(bos_first, tmp_path, hf_t5):
    m, _, _ = bos_first
    m.config.save(tmp_path)
    assert Blip2Config.from_json_file(tmp_path / "config.json").bos_before_soft_prompt
    t5 = blip2rt.from_pretrained(hf_t5.folder, device="cpu").config
    with pytest.raises(CheckpointError, match="decoder-only"):
        Blip2Config(vision_config=t5.vision_config, qformer_config=t5.qformer_config, text_config=t5.text_config,
                    bos_before_soft_prompt=True)


def test_stage2_training_text_has_no_second_bos(bos_first, tmp_path):
    """The trainer's collate leaves the BOS to the model when it goes before the soft prompt."""
    from blip2rt.training.config import TrainConfig
    from blip2rt.training.trainer import Trainer
    from toy_data import make_toy_set

    m, _, folder = bos_first
    root = tmp_path / "toy"
    ann = make_toy_set(root, repeats=1, corrupt=0)
    cfg = TrainConfig(stage=2, model=str(folder), annotations=[str(ann)], image_root=str(root),
                      out_dir=str(tmp_path / "run"), batch_size=4, max_steps=1, warmup_steps=1, num_workers=0,
                      kernels="torch", projection_lr=1e-2, amp="none")
    t = Trainer(cfg, show_progress=False)
    batch = next(iter(t.loader)).objective_inputs
    bos = t.model.config.text_config["bos_token_id"]
    assert not (batch.input_ids[:, 0] == bos).any()
    assert (batch.labels[:, 0] != -100).all()  # the first text token is predicted (from the soft prompt)
    proj = {id(p) for p in t.model.language_projection.parameters()}
    for g in t.optimizer.param_groups:  # the fresh projection alone gets projection_lr
        own = {id(p) in proj for p in g["params"]}
        assert len(own) == 1
        assert g["initial_lr"] == (1e-2 if own.pop() else cfg.lr)
