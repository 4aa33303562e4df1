"""training.stages: one record per training stage, what the trainer, the loader and the CLI read; and
the stage a checkpoint records, with checkpoints from before it still loading."""

import json

import pytest
import torch
from safetensors.torch import save_file

import blip2rt
from blip2rt import parts
from blip2rt.checkpoint import QUESTION_IN_QFORMER_KEY, STAGE_KEY, checkpoint_stage, tensor_file_metadata
from blip2rt.errors import Blip2rtError
from blip2rt.training.config import TrainConfig
from blip2rt.training.data import Stage1Collate, Stage2Collate, VqaCollate
from blip2rt.training.stage1 import Stage1Objective
from blip2rt.training.stage2 import Stage2Objective
from blip2rt.training.stages import STAGES, stage, stage_named
from blip2rt.training.trainer import Trainer, set_trainable
from toy_data import make_toy_set

# (number, name, objective, collate, question in the Q-Former, annotation fields, trains through the LLM)
RECORDS = [
    (1, "stage1", Stage1Objective, Stage1Collate, False, ("image", "caption"), False),
    (2, "stage2", Stage2Objective, Stage2Collate, False, ("image", "caption"), True),
    (3, "vqa", Stage2Objective, VqaCollate, True, ("image", "question", "answer"), True),
]


@pytest.mark.parametrize("number,name,objective,collate,question,fields,uses_llm", RECORDS)
def test_each_record_says_what_its_stage_is(number, name, objective, collate, question, fields, uses_llm):
    s = stage(number)
    assert stage_named(name) is s and s.name == name and s.number == number
    assert s.trains == parts.STAGE_PARTS[number] and s.question_in_qformer == question
    assert s.fields == fields and s.vqa == (fields[1] == "question") and s.uses_llm == uses_llm
    m = blip2rt.from_pretrained("tiny", device="cpu", kernels="torch")
    assert isinstance(s.objective(m), objective)
    assert m.config.question_in_qformer == question  # the record sets it, once, where it builds the objective
    assert isinstance(s.collate(m, TrainConfig(annotations=["a.json"], stage=number)), collate)
    trained = set(set_trainable(m, number))
    assert trained == {n for n, p in m.named_parameters() if p.requires_grad}
    assert {parts.part_of(n) for n in trained} <= s.trains


def test_every_stage_has_a_record_and_the_cli_offers_them():
    assert sorted(STAGES) == sorted(parts.STAGE_NAMES) == [1, 2, 3]
    with pytest.raises(Blip2rtError, match=r"stage must be one of 1 \(stage1\), 2 \(stage2\), 3 \(vqa\), got 4"):
        TrainConfig(annotations=["a.json"], stage=4).validate()
    with pytest.raises(Blip2rtError, match="not shards"):  # a rule of the VQA stage alone
        TrainConfig(shards=["a.tar"], stage=3).validate()
    TrainConfig(shards=["a.tar"], stage=2).validate()
    from blip2rt.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    positional = next(a for a in train._actions if a.dest == "stage")
    assert positional.choices == ["stage1", "stage2", "vqa"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy data set, and the tiny model saved as a folder: a base whose frozen parts a trainer's
    checkpoint (the trainable parts alone) loads over."""
    root = tmp_path_factory.mktemp("stages_toy")
    ann = make_toy_set(root, repeats=1)
    rows = json.loads(ann.read_text())
    vqa = [{"image": r["image"], "question": "what colour?", "answer": r["caption"].split()[1]} for r in rows]
    (root / "vqa.json").write_text(json.dumps(vqa))
    blip2rt.from_pretrained("tiny", device="cpu", seed=0).save_pretrained(root / "base")
    return root, ann


@pytest.mark.parametrize("number", [1, 2, 3])
def test_a_checkpoint_records_its_stage(toy, tmp_path, number):
    root, ann = toy
    annotations = root / "vqa.json" if number == 3 else ann
    cfg = TrainConfig(stage=number, model=str(root / "base"), annotations=[str(annotations)], image_root=str(root),
                      out_dir=str(tmp_path), batch_size=4, max_steps=1, warmup_steps=1, num_workers=0, save_every=1,
                      kernels="torch", augment=False, amp="none")
    Trainer(cfg, show_progress=False).run()
    weights = tmp_path / "checkpoints" / "step_00000001" / "trainable.safetensors"
    assert tensor_file_metadata(weights)[STAGE_KEY] == parts.STAGE_NAMES[number]
    assert checkpoint_stage(weights) == number
    loaded = blip2rt.from_pretrained(str(weights), config=str(root / "base"), kernels="torch")
    assert loaded.config.question_in_qformer == (number == parts.VQA)


def test_checkpoints_from_before_stages_were_recorded_still_load(toy, tmp_path):
    """A VQA checkpoint marked the old way, and a stage-1 one known by its keys, load over a base."""
    base = str(toy[0] / "base")
    m = blip2rt.from_pretrained("tiny", device="cpu", kernels="torch", seed=3)
    state = {n: p.detach().clone() for n, p in m.named_parameters() if n in set(m.trainable_names(parts.VQA))}
    save_file(state, str(tmp_path / "vqa.safetensors"), metadata={QUESTION_IN_QFORMER_KEY: "true"})
    assert checkpoint_stage(tmp_path / "vqa.safetensors") == parts.VQA
    vqa = blip2rt.from_pretrained(str(tmp_path / "vqa.safetensors"), config=base, kernels="torch")
    assert vqa.config.question_in_qformer
    stage1 = {n: p.detach().clone() for n, p in m.named_parameters() if n in set(m.trainable_names(parts.STAGE1))}
    save_file(stage1, str(tmp_path / "stage1.safetensors"))
    assert checkpoint_stage(tmp_path / "stage1.safetensors", stage1) == parts.STAGE1
    loaded = blip2rt.from_pretrained(str(tmp_path / "stage1.safetensors"), config=base, kernels="torch")
    assert torch.equal(loaded.query_tokens, m.query_tokens) and not loaded.config.question_in_qformer
    save_file(stage1, str(tmp_path / "odd.safetensors"), metadata={STAGE_KEY: "stage9"})
    with pytest.raises(blip2rt.CheckpointError, match="no training stage is named 'stage9'"):
        checkpoint_stage(tmp_path / "odd.safetensors")


@pytest.mark.parametrize("number,lr,min_lr,warmup", [(1, 1e-4, 1e-5, 2000), (2, 1e-4, 1e-5, 2000),
                                                      (3, 1e-5, 0.0, 1000)])
def test_a_stage_supplies_its_recipe_where_the_config_leaves_it_unset(number, lr, min_lr, warmup, tmp_path):
    """Pre-training and VQA fine-tuning train at different rates (the fine-tuning rate is ten times
    lower, from a trained model); a config that leaves the schedule unset gets its stage's, from the
    record, in code and from the command line alike. What a config sets wins."""
    assert stage(number).recipe == (stage(number).recipe.__class__(lr, min_lr, warmup))
    cfg = TrainConfig(annotations=["a.json"], stage=number)
    assert (cfg.lr, cfg.min_lr, cfg.warmup_steps) == (lr, min_lr, warmup)
    given = TrainConfig(annotations=["a.json"], stage=number, lr=3e-4, warmup_steps=7)
    assert (given.lr, given.min_lr, given.warmup_steps) == (3e-4, min_lr, 7)
    from blip2rt.training.config import load_config

    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"stage": number, "annotations": ["a.json"]}))
    loaded = load_config(path, ["--min-lr", "0"])
    assert (loaded.lr, loaded.min_lr, loaded.warmup_steps) == (lr, 0.0, warmup)
    with pytest.raises(Blip2rtError, match="min_lr in"):
        TrainConfig(annotations=["a.json"], stage=number, lr=1e-5, min_lr=1e-4).validate()
