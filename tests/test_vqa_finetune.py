"""VQA fine-tuning with the question in the Q-Former (BLIP-2 §4.2): the conditioned queries against
transformers' Q-Former, the training batch, the trainer's checkpoint, and the export in ONNX Runtime."""

import json

import numpy as np
import pytest
import torch

import blip2rt
from blip2rt.training.checkpoint import load_checkpoint
from blip2rt.training.config import TrainConfig
from blip2rt.training.data import CaptionDataset, VqaCollate, training_answer
from blip2rt.training.trainer import VQA_STAGE, Trainer, set_trainable
from hf_reference import NUM_QUERIES
from test_parity_transformers import ATOL, pixels, qformer_batch
from toy_data import make_toy_set

QUESTIONS = ["what color is the shape?", "is there a circle?", "is the shape not red?", "which shape is it?"]


def test_question_conditioned_queries_match_transformers(hf_retrieval):
    """The question's tokens meet the queries in self-attention; only the queries cross-attend.
    Oracle: transformers' Blip2 Q-Former over (query_embeds, input_ids), as its ITM head runs it."""
    m = blip2rt.from_pretrained(hf_retrieval.folder, device="cpu", dtype="fp32")
    px = pixels(3, seed=11)
    ids, mask = qformer_batch(3, 7, seed=2)  # rows padded differently
    ref = hf_retrieval.model
    with torch.no_grad():
        image_embeds = ref.vision_model(pixel_values=px)[0]
        queries = ref.query_tokens.expand(3, -1, -1)
        full_mask = torch.cat([torch.ones(3, NUM_QUERIES, dtype=mask.dtype), mask], dim=1)
        want = ref.qformer(query_embeds=ref.embeddings(input_ids=ids, query_embeds=queries), query_length=NUM_QUERIES,
                           attention_mask=full_mask, encoder_hidden_states=image_embeds,
                           encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long))[0][:, :NUM_QUERIES]
        got = m.query_output(m.image_embeds(px), ids, mask)
        plain = m.query_output(m.image_embeds(px))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # the question changes what the queries carry


@pytest.fixture(scope="module")
def vqa_toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa_toy")
    captions = json.loads(make_toy_set(root, repeats=1).read_text())
    records = []
    for r in captions:
        colour, shape = r["caption"].rstrip(".").split()[1:]
        records += [{"image": r["image"], "question": "what color is the shape?", "answer": colour},
                    {"image": r["image"], "question": f"is there a {shape}?", "answer": ["yes", "yes", "no"]}]
    (root / "vqa.json").write_text(json.dumps(records))
    return root, root / "vqa.json", records


def tiny_vqa_model(seed=0):
    m = blip2rt.from_pretrained("tiny", device="cpu", kernels="torch", seed=seed)
    m.config.question_in_qformer = True
    return m


def test_vqa_batch_learns_only_the_answer(vqa_toy):
    root, ann, _ = vqa_toy
    m = tiny_vqa_model()
    ds = CaptionDataset([ann], root, 56, augment=False, vqa=True)
    collate = VqaCollate(m.tokenizer, m.qformer_tokenizer, False, "Question: {} Answer:", bos_token_id=1)
    samples = [ds[0], ds[1], ds[3]]
    b = collate(samples).objective_inputs
    # the prompt is tokenised as generation tokenises it; the answer follows, then the suffix
    prompt_ids, prompt_mask = m.encode_prompts([f"Question: {s.question} Answer:" for s in samples])
    for i, s in enumerate(samples):
        n = int(b.attention_mask[i].sum())
        prompt = prompt_ids[i][prompt_mask[i] == 1].tolist()
        assert b.input_ids[i, : len(prompt)].tolist() == prompt
        learned = b.labels[i][b.labels[i] != -100].tolist()
        assert m.tokenizer.decode(learned) == " " + s.caption + "</s>"  # the suffix: the LLM's EOS
        assert b.labels[i, : len(prompt)].eq(-100).all() and b.labels[i, n:].eq(-100).all()
    q = m.qformer_tokenizer([s.question for s in samples], padding="longest", return_tensors="pt")
    assert torch.equal(b.qformer_input_ids, q["input_ids"]) and torch.equal(b.qformer_attention_mask, q["attention_mask"])
    assert [s.caption for s in samples] == ["red", "yes", "yes"]  # the majority of several answers
    assert training_answer(["no", "yes", "no", "yes"]) == "no"  # equals: the first


def test_a_model_without_the_question_in_its_qformer_refuses_question_ids():
    m = blip2rt.from_pretrained("tiny", device="cpu")
    assert m.question_ids(["what?"]) == (None, None)
    with pytest.raises(blip2rt.InputError, match="takes no question"):
        m.generate(torch.randn(1, 3, 56, 56), qformer_input_ids=torch.ones(1, 3, dtype=torch.long))


def test_answer_uses_the_question_in_the_qformer(vqa_toy):
    """The same LLM prompt with two different Q-Former questions gives different soft prompts, and
    answer() passes exactly the question: its output equals generate() given the question's ids."""
    root, _, records = vqa_toy
    m = tiny_vqa_model()
    px = m._pixels([root / records[0]["image"]] * 2)
    qids, qmask = m.question_ids(QUESTIONS[:2])
    soft = m.soft_prompt(px, qids, qmask)
    assert (soft[0] - soft[1]).abs().max() > 1e-3
    ids, mask = m.encode_prompts([f"Question: {q} Answer:" for q in QUESTIONS[:2]])
    want = m.tokenizer.batch_decode(m.generate(px, ids, mask, qformer_input_ids=qids, qformer_attention_mask=qmask,
                                               num_beams=1, max_new_tokens=5), skip_special_tokens=True)
    got = m.answer(px, QUESTIONS[:2], num_beams=1, max_new_tokens=5)
    assert got == [w.strip() for w in want]


def steerable_tiny_model(seed=0):
    """The tiny preset with its frozen LLM's matrices re-drawn at N(0, 0.5): the preset's N(0, 0.02)
    LLM gives nearly uniform next-token distributions (a loss of log(vocab) whatever the soft prompt
    holds), which no training of the Q-Former can move."""
    m = blip2rt.from_pretrained("tiny", device="cpu", kernels="torch", seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.language_model.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def swapped_questions(records: list[dict]) -> list[dict]:
    """Each image's two questions exchanged, the answers kept: 'is there a circle?' -> 'red'."""
    out = []
    for a, b in zip(records[0::2], records[1::2]):
        assert a["image"] == b["image"]
        out += [{**a, "question": b["question"]}, {**b, "question": a["question"]}]
    return out


VQA_STEPS = 60


@pytest.fixture(scope="module")
def trained_vqa(vqa_toy, tmp_path_factory):
    """VQA fine-tuning of the steerable tiny model, 60 steps of 12 on the toy's 24 questions; the
    model's state before, and the losses of matched and swapped questions before and after."""
    root, ann, records = vqa_toy
    out = tmp_path_factory.mktemp("vqa_run")
    (root / "swapped.json").write_text(json.dumps(swapped_questions(records)))
    cfg = TrainConfig(stage=VQA_STAGE, model="tiny", annotations=[str(ann)], image_root=str(root), out_dir=str(out),
                      batch_size=12, max_steps=VQA_STEPS, warmup_steps=2, lr=1e-3, projection_lr=1e-2, num_workers=0,
                      log_every=10, save_every=VQA_STEPS, kernels="torch", augment=False, amp="none")
    trainer = Trainer(cfg, show_progress=False, model=steerable_tiny_model())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    def losses() -> dict[str, float]:
        trainer.model.eval()
        got = {}
        for name, path in (("matched", ann), ("swapped", root / "swapped.json")):
            ds = CaptionDataset([path], root, 56, augment=False, vqa=True)
            batch = trainer.loader.collate_fn([ds[i] for i in range(len(ds))]).objective_inputs
            with torch.no_grad():
                got[name] = float(trainer.objective(batch)["loss"])
        trainer.model.train()
        return got

    first = losses()
    last = trainer.run()
    return trainer, last, out, before, first, losses()


def test_vqa_training_updates_exactly_its_trainable_parts(trained_vqa):
    trainer, last, _, before, _, _ = trained_vqa
    assert trainer.model.config.question_in_qformer and np.isfinite(last["loss"]) and last["step"] == VQA_STEPS
    assert "embeddings.word_embeddings.weight" in trainer.trainable and "itm_head.weight" not in trainer.trainable
    after = trainer.model.state_dict()
    assert after.keys() == before.keys()
    unchanged = sorted(k for k in trainer.trainable if torch.equal(after[k], before[k]))
    assert unchanged == [], unchanged
    # a key that is another name of a trainable tensor (the ITG head's decoder is the word embeddings)
    trained = {after[k].data_ptr() for k in trainer.trainable}
    moved = sorted(k for k in after if after[k].data_ptr() not in trained and not torch.equal(after[k], before[k]))
    assert moved == [], moved  # the frozen ViT and LLM, the stage-1 heads, buffers


def test_vqa_training_learns_which_answer_a_question_asks_for(trained_vqa):
    """Each image's answers under its own questions against the same answers under its other question
    ('is there a circle?' -> 'red'). Measured: matched 9.14 -> 3.47 nats, swapped 9.84 -> 6.08."""
    *_, first, now = trained_vqa
    assert now["matched"] < 0.5 * first["matched"], (first, now)
    gap_before, gap_after = first["swapped"] - first["matched"], now["swapped"] - now["matched"]
    assert gap_after > 1.0 and gap_after > 2 * gap_before, (first, now)


def test_the_vqa_checkpoint_loads_as_the_trained_vqa_model(trained_vqa, vqa_toy):
    trainer, _, out, _, _, _ = trained_vqa
    loaded = steerable_tiny_model()  # the same frozen parts (seeded), fresh trainable ones
    set_trainable(loaded, VQA_STAGE)  # what the checkpoint holds: the rest comes from the base model
    assert not loaded.config.question_in_qformer
    load_checkpoint(out / "checkpoints" / f"step_{VQA_STEPS:08d}", loaded)
    assert loaded.config.question_in_qformer  # from the checkpoint's metadata
    want, got = trainer.model.state_dict(), loaded.state_dict()
    assert got.keys() == want.keys()
    differ = sorted(k for k in want if not torch.equal(got[k], want[k]))
    assert differ == [], differ
    root, _, records = vqa_toy
    images = [root / r["image"] for r in records[:3]]
    trainer.model.eval()
    assert loaded.answer(images, QUESTIONS[:3], num_beams=1) == trainer.model.answer(images, QUESTIONS[:3], num_beams=1)


def test_vqa_training_refuses_a_model_without_the_qformer_text_path(vqa_toy, tmp_path, hf_opt):
    root, ann, _ = vqa_toy
    cfg = TrainConfig(stage=VQA_STAGE, model=str(hf_opt.folder), annotations=[str(ann)], image_root=str(root),
                      out_dir=str(tmp_path), batch_size=2, max_steps=1, num_workers=0, kernels="torch", augment=False)
    with pytest.raises(blip2rt.Blip2rtError, match="text embeddings"):
        Trainer(cfg, show_progress=False)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_exported_vqa_model_answers_with_pytorchs_tokens(trained_vqa, vqa_toy, tmp_path, num_beams):
    """The visual prefix takes the question's Q-Former ids; ORT's tokens equal PyTorch's."""
    from blip2rt.export import OrtBlip2, export_model

    trainer = trained_vqa[0]
    m = trainer.model.eval()
    export_model(m, tmp_path / "export")
    rt = OrtBlip2(tmp_path / "export", providers=["CPUExecutionProvider"])
    assert rt.question_in_qformer
    root, _, records = vqa_toy
    images = [root / records[i]["image"] for i in (0, 2, 5, 7)]
    qids_pt, qmask_pt = m.question_ids(QUESTIONS)
    qids_rt, qmask_rt = rt.question_ids(QUESTIONS)
    np.testing.assert_array_equal(qids_rt, qids_pt.numpy())
    np.testing.assert_array_equal(qmask_rt, qmask_pt.numpy())
    px = m._pixels(images)
    np.testing.assert_allclose(rt.image_features(px.numpy(), qids_rt, qmask_rt),
                               m.image_features(px, qids_pt, qmask_pt).detach().numpy(), atol=1e-4, rtol=1e-4)
    gen = dict(num_beams=num_beams, max_new_tokens=6, min_new_tokens=2)
    ids, mask = m.encode_prompts([f"Question: {q} Answer:" for q in QUESTIONS])
    want = m.generate(px, ids, mask, qformer_input_ids=qids_pt, qformer_attention_mask=qmask_pt, **gen)
    got = rt.generate(px.numpy(), ids.numpy(), mask.numpy(), qformer_input_ids=qids_rt,
                      qformer_attention_mask=qmask_rt, **gen)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want.numpy())
    assert len(np.unique(want.numpy())) > 1  # not one repeated token
    assert rt.answer(images, QUESTIONS, **gen) == m.answer(images, QUESTIONS, **gen)
    assert rt.caption(images, num_beams=num_beams, max_new_tokens=5) == m.caption(images, num_beams=num_beams,
                                                                                   max_new_tokens=5)
    with pytest.raises(blip2rt.InputError, match="conditioned on a question"):
        rt.image_features(px.numpy())
