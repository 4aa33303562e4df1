"""`blip2rt train vqa` from an InstructBLIP checkpoint: the instruction in the Q-Former, the parts VQA
fine-tuning trains, bit-exact resume, and the checkpoint back through from_pretrained and `blip2rt eval`."""

import json

import pytest
import torch

import blip2rt
from blip2rt.training.checkpoint import latest_checkpoint, trainable_state
from blip2rt.training.config import TrainConfig
from blip2rt.training.trainer import VQA_STAGE, Trainer
from hf_reference import with_tiny_tokenizers
from test_vqa_finetune import vqa_toy  # noqa: F401  (a fixture)


@pytest.fixture(scope="module")
def instruct_folder(hf_instruct_llama, tmp_path_factory):
    return with_tiny_tokenizers(hf_instruct_llama, tmp_path_factory.mktemp("instruct_ft_base"))


def config(folder, toy, out, **kw) -> TrainConfig:
    root, ann, _ = toy
    base = dict(stage=VQA_STAGE, model=str(folder), annotations=[str(ann)], image_root=str(root), out_dir=str(out),
                batch_size=6, max_steps=6, warmup_steps=1, lr=1e-3, num_workers=0, log_every=1, save_every=100,
                kernels="torch", augment=False, amp="none")
    base.update(kw)
    return TrainConfig(**base)


def test_vqa_fine_tuning_starts_from_instructblip_and_resumes_bit_exact(instruct_folder, vqa_toy, tmp_path):
    full = Trainer(config(instruct_folder, vqa_toy, tmp_path / "full"), show_progress=False)
    m = full.model
    assert m.config.is_instructblip
    before = {k: v.clone() for k, v in m.state_dict().items()}
    last = full.run()
    assert last["step"] == 6 and torch.isfinite(torch.tensor(last["loss"]))
    after = m.state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved == set(full.trainable) - {k for k in full.trainable if k.startswith("qformer.encoder.layer.1.output.")
                                           or k.startswith("qformer.encoder.layer.1.intermediate.")}
    assert "embeddings.word_embeddings.weight" in moved and "language_projection.weight" in moved
    assert not any(k.startswith(("vision_model.encoder.", "language_model.")) for k in moved)

    part = Trainer(config(instruct_folder, vqa_toy, tmp_path / "part"), show_progress=False)
    part.run(until=3)
    del part
    resumed = Trainer(config(instruct_folder, vqa_toy, tmp_path / "part"), show_progress=False)
    assert resumed.step == 3
    assert resumed.run()["loss"] == last["loss"]
    a, b = trainable_state(full.model), trainable_state(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_checkpoint_loads_over_its_instructblip_base_and_evaluates(instruct_folder, vqa_toy, tmp_path, capsys):
    from blip2rt.cli import main

    trainer = Trainer(config(instruct_folder, vqa_toy, tmp_path / "run", max_steps=2, save_every=2), show_progress=False)
    trainer.run()
    weights = latest_checkpoint(tmp_path / "run") / "trainable.safetensors"
    m = blip2rt.from_pretrained(weights, config=instruct_folder, device="cpu", kernels="torch")
    assert m.config.question_in_qformer
    root, ann, records = vqa_toy
    images = [root / r["image"] for r in records[:4]]
    questions = [r["question"] for r in records[:4]]
    trainer.model.eval()
    assert m.answer(images, questions, num_beams=1) == trainer.model.answer(images, questions, num_beams=1)
    assert main(["eval", "vqa", "--model", str(weights), "--config", str(instruct_folder), "--annotations", str(ann),
                 "--image-root", str(root), "--num-beams", "1", "--json", "--kernels", "torch"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.0 <= result["accuracy"] <= 1.0 and len(result["answers"]) == len(records)
    assert result["answers"][:4] == m.answer(images, questions, num_beams=1)  # the fine-tuned model evaluated
