"""The training loop: exact resume, kill-safety, non-finite steps, skipped images, both stage-2 paths."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import blip2rt
from blip2rt.tokenization import tiny_llm_tokenizer
from blip2rt.training.checkpoint import latest_checkpoint, trainable_state
from blip2rt.training.config import TrainConfig
from blip2rt.training.stage2 import split_for_prefix_lm
from blip2rt.training.trainer import NonFiniteLossError, Trainer
from toy_data import make_toy_set


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return root, make_toy_set(root, repeats=1, corrupt=1)


def config(toy, out, **kw) -> TrainConfig:
    root, ann = toy
    base = dict(stage=1, model="tiny", annotations=[str(ann)], image_root=str(root), out_dir=str(out), batch_size=5,
                max_steps=8, warmup_steps=2, lr=1e-3, num_workers=0, log_every=1, save_every=100, kernels="torch",
                amp="none")  # fp32 on every CPU: the same arithmetic wherever CI runs
    base.update(kw)
    return TrainConfig(**base)


def weights(trainer):
    return {k: v.clone() for k, v in trainable_state(trainer.model).items()}  # .cpu() on CPU is no copy


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_after_a_stop_is_bit_exact(toy, tmp_path, stage):
    full = Trainer(config(toy, tmp_path / "full", stage=stage), show_progress=False)
    full_last = full.run()
    part = Trainer(config(toy, tmp_path / "part", stage=stage), show_progress=False)
    part.run(until=3)
    del part
    resumed = Trainer(config(toy, tmp_path / "part", stage=stage), show_progress=False)
    assert resumed.step == 3
    resumed_last = resumed.run()
    assert_same_weights(weights(full), weights(resumed))
    assert resumed_last["loss"] == full_last["loss"]


def test_resume_is_bit_exact_with_the_fused_attentions_dropout(toy, tmp_path):
    """kernels="triton" (the interpreter) with the paper's attention dropout: the kernels draw their
    dropout seeds from torch's CPU generator, whose state the checkpoint saves."""
    from blip2rt.kernels import launch

    kw = dict(kernels="triton", max_steps=2, warmup_steps=1, batch_size=3, max_text_len=8)  # the interpreter is slow
    full = Trainer(config(toy, tmp_path / "full", **kw), show_progress=False)
    full_last = full.run()
    part = Trainer(config(toy, tmp_path / "part", **kw), show_progress=False)
    part.run(until=1)
    del part
    resumed = Trainer(config(toy, tmp_path / "part", **kw), show_progress=False)
    assert resumed.step == 1
    with launch.record() as ran:
        resumed_last = resumed.run()
    attention = [one for one in ran if one.name.startswith("fused_attention.")]
    assert attention and all(one.kwargs["DROPOUT"] for one in attention)
    assert_same_weights(weights(full), weights(resumed))
    assert resumed_last["loss"] == full_last["loss"]


def test_killed_while_checkpointing_resumes_from_the_previous_checkpoint(toy, tmp_path):
    root, ann = toy
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "blip2rt", "train", "stage1", "--model", "tiny", "--annotations", str(ann),
           "--image-root", str(root), "--out-dir", str(out), "--batch-size", "5", "--max-steps", "8",
           "--warmup-steps", "2", "--lr", "1e-3", "--num-workers", "0", "--save-every", "2", "--kernels", "torch",
           "--amp", "none"]
    env = {**os.environ, "BLIP2RT_TEST_SLOW_CHECKPOINT": "2"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = out / "checkpoints" / "step_00000004.tmp"
    deadline = time.time() + 120
    while not target.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert target.exists(), "the second checkpoint never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(out).name == "step_00000002"  # the half-written one is ignored (and removed)
    assert not target.exists()
    resumed = Trainer(config(toy, out, save_every=2), show_progress=False)
    assert resumed.step == 2
    resumed.run()
    full = Trainer(config(toy, tmp_path / "full", save_every=2), show_progress=False)
    full.run()
    assert_same_weights(weights(full), weights(resumed))


class WritesAFile:
    """A pickle payload: unpickling it would create `path` (open(path, "w"))."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_corrupt_trainer_state_falls_back_to_the_checkpoint_before(toy, tmp_path, caplog):
    """The newest state.pt garbled, then replaced by a pickle that would run code: each time the
    resume reports it and continues from the checkpoint before, ending where an uninterrupted run
    ends. The payload never runs. With no readable checkpoint left: one clear error."""
    full = Trainer(config(toy, tmp_path / "full", max_steps=4), show_progress=False)
    full.run()
    out = tmp_path / "part"
    Trainer(config(toy, out, max_steps=4, save_every=1), show_progress=False).run(until=3)
    newest = out / "checkpoints" / "step_00000003" / "state.pt"
    marker = tmp_path / "payload-ran"
    for corrupt in (lambda: newest.write_bytes(b"\x80\x04garbage"),
                    lambda: torch.save({"step": 3, "payload": WritesAFile(marker)}, newest)):
        corrupt()
        with caplog.at_level("WARNING", logger="blip2rt.training.trainer"):
            resumed = Trainer(config(toy, out, max_steps=4, save_every=1), show_progress=False)
        assert resumed.step == 2  # from step_00000002
        assert "cannot resume from" in caplog.text and "step_00000003" in caplog.text
        assert not marker.exists()  # the pickle payload never ran
        caplog.clear()
    resumed.run()
    assert_same_weights(weights(full), weights(resumed))
    kept = sorted((out / "checkpoints").glob("step_*/state.pt"))
    assert len(kept) == 2  # keep_checkpoints
    for state in kept:  # every checkpoint unreadable now
        state.write_bytes(b"not a pickle")
    with pytest.raises(blip2rt.CheckpointError, match="no checkpoint in .* could be read"):
        Trainer(config(toy, out, max_steps=4), show_progress=False)


def test_non_finite_steps_are_skipped_then_training_stops(toy, tmp_path, monkeypatch):
    t = Trainer(config(toy, tmp_path / "nan", max_nonfinite=3), show_progress=False)
    original = t.module.forward
    calls = {"n": 0}

    def sometimes_nan(batch):
        calls["n"] += 1
        out = original(batch)
        if calls["n"] in (2, 4, 5, 6):
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(t.module, "forward", sometimes_nan)
    t.run(until=1)
    before = weights(t)
    t.run(until=2)  # call 2: NaN, the step is skipped
    assert_same_weights(before, weights(t))
    assert t.nonfinite_total == 1
    t.run(until=3)  # a good step applies
    assert not torch.equal(before["query_tokens"], weights(t)["query_tokens"])
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        t.run()


def test_corrupt_images_are_skipped_and_counted(toy, tmp_path):
    t = Trainer(config(toy, tmp_path / "corrupt", max_steps=6), show_progress=False)
    last = t.run()
    assert last["skipped_images"] >= 1 and t.epoch >= 1  # a full epoch passed the broken file
    lines = (tmp_path / "corrupt" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6


def test_prefix_lm_split():
    rng = random.Random(0)
    for caption in ["a red circle on white", "two words", "single"]:
        for _ in range(20):
            prefix, suffix = split_for_prefix_lm(caption, rng)
            assert suffix and (prefix + " " + suffix).strip() == caption
            if len(caption.split()) > 1:
                assert prefix
    splits = {split_for_prefix_lm("a b c d e", rng)[0] for _ in range(200)}
    assert splits == {"a", "a b", "a b c", "a b c d"}  # every split point is drawn


def test_stage2_encoder_decoder_trains(toy, tmp_path, hf_t5):
    model_dir = tmp_path / "t5"
    shutil.copytree(hf_t5.folder, model_dir)
    tiny_llm_tokenizer().save_pretrained(model_dir)
    t = Trainer(config(toy, tmp_path / "t5run", stage=2, model=str(model_dir), max_steps=6), show_progress=False)
    assert t.model.config.is_encoder_decoder
    first = t.run(until=1)["loss"]
    last = t.run()["loss"]
    assert torch.isfinite(torch.tensor(last)) and last != first


def test_stage2_initialised_from_stage1(toy, tmp_path):
    s1 = Trainer(config(toy, tmp_path / "s1", max_steps=3), show_progress=False)
    s1.run()
    ckpt = latest_checkpoint(tmp_path / "s1")
    s2 = Trainer(config(toy, tmp_path / "s2", stage=2, init=str(ckpt)), show_progress=False)
    torch.testing.assert_close(s2.model.query_tokens, s1.model.query_tokens, rtol=0, atol=0)
    q = "qformer.encoder.layer.0.attention.attention.query.weight"
    torch.testing.assert_close(s2.model.get_parameter(q), s1.model.get_parameter(q), rtol=0, atol=0)
    assert not s2.model.itm_head.weight.requires_grad  # stage 2 trains no text head


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_trains_exactly_what_its_loss_reaches(stage):
    """Oracle: autograd. With everything unfrozen, the parameters of the stage's modules that get
    a gradient from its loss are the trainable set (stage 2: no Q-Former text FFN, but the
    cross-attention output projection and the query FFN; VQA: the question's text path too)."""
    from blip2rt.model import Blip2
    from blip2rt.presets import preset_config
    from blip2rt.training.stage1 import Stage1Batch, Stage1Objective
    from blip2rt.training.stage2 import Stage2Batch, Stage2Objective
    from blip2rt.parts import STAGE_PARTS
    from blip2rt.training.trainer import set_trainable

    torch.manual_seed(0)
    m = Blip2(preset_config("tiny"))
    m.train()
    size = m.config.vision_config.image_size
    ids = torch.randint(5, 40, (3, 7))
    if stage == 1:
        batch = Stage1Batch(ids, torch.ones_like(ids), image_ids=torch.arange(3), pixel_values=torch.randn(3, 3, size, size))
        loss = Stage1Objective(m, dec_token_id=2, pad_token_id=0)(batch)["loss"]
    else:
        question = {}
        if stage == 3:
            m.config.question_in_qformer = True
            question = dict(qformer_input_ids=torch.randint(5, 40, (3, 6)), qformer_attention_mask=torch.ones(3, 6))
        batch = Stage2Batch(ids, torch.ones_like(ids), ids.clone(), pixel_values=torch.randn(3, 3, size, size),
                            **question)
        loss = Stage2Objective(m)(batch)["loss"]
    loss.backward()
    reached = {n for n, p in m.named_parameters()  # among the parts the stage owns
               if m.part_of(n) in STAGE_PARTS[stage] and p.grad is not None and p.grad.abs().sum() > 0}
    trainable = set(set_trainable(m, stage))
    assert trainable == reached, (sorted(trainable - reached)[:5], sorted(reached - trainable)[:5])
    if stage == 2:
        assert "qformer.encoder.layer.0.crossattention.output.dense.weight" in trainable
        assert "qformer.encoder.layer.0.output.dense.weight" not in trainable
    if stage == 3:  # the question reaches the text FFN and the word embeddings; no retrieval head trains
        assert {"qformer.encoder.layer.0.output.dense.weight", "embeddings.word_embeddings.weight"} <= trainable
        assert not any(n.startswith(("itm_head.", "text_projection.", "itg_head.")) for n in trainable)


def test_webdataset_shards_train_and_skip_a_corrupt_member(toy, tmp_path):
    import io
    import json
    import tarfile

    root, ann = toy
    records = [r for r in json.loads(ann.read_text()) if "broken" not in r["image"]]
    shards = []
    for s in range(2):
        path = tmp_path / f"shard-{s:04d}.tar"
        with tarfile.open(path, "w") as tar:
            def add(name, data):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

            for i, r in enumerate(records[s::2]):
                add(f"{s}_{i:04d}.png", (root / r["image"]).read_bytes())
                add(f"{s}_{i:04d}.txt", r["caption"].encode())
            add(f"{s}_bad.png", b"not a png")
            add(f"{s}_bad.txt", b"a broken sample")
        shards.append(str(path))
    t = Trainer(config(toy, tmp_path / "wds", annotations=[], shards=shards, max_steps=4), show_progress=False)
    last = t.run()
    assert last["skipped_images"] >= 2 and last["loss"] == last["loss"]
    # every sample pairs its own image with its own caption (the toy captions are distinct)
    from blip2rt.training.data import ShardDataset, clean_caption, train_transform
    from blip2rt.images import open_image

    by_caption = {clean_caption(r["caption"]): r["image"] for r in records}
    size = t.model.config.vision_config.image_size
    seen = 0
    for sample in ShardDataset(shards, size, augment=False):
        if sample.error is not None:
            assert sample.caption == "a broken sample"
            continue
        want = train_transform(open_image(root / by_caption[sample.caption]), size, None, False)
        assert torch.equal(sample.pixel_values, want), sample.caption
        seen += 1
    assert seen == len(records)


def test_feature_cache_is_built_once_and_matches_pixels(toy, tmp_path):
    """Element by element: each cached row is its own image's frozen ViT output, and the batches the
    objective sees go through ln_vision once, in the same order as pixels would."""
    plain = Trainer(config(toy, tmp_path / "plain", augment=False, max_steps=1), show_progress=False)
    cached = Trainer(config(toy, tmp_path / "cached", augment=False, cache_features=True, max_steps=1),
                     show_progress=False)
    cache = tmp_path / "cached" / "feature_cache" / "features.npy"
    assert cache.is_file()
    vit = plain.model.vision_model
    compared = 0
    with torch.no_grad():
        for i in range(len(plain.dataset)):  # every record, by index: its own image's features
            pixel_sample, cached_sample = plain.dataset[i], cached.dataset[i]
            if pixel_sample.error is not None:
                assert cached_sample.error is not None  # the corrupt image has no row
                continue
            want = vit.encode(pixel_sample.pixel_values[None])[0]
            got = cached_sample.frozen_features
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=2e-3 * want.abs().max().item(), rtol=1e-3)  # stored as fp16
            compared += 1
        assert compared == len(plain.dataset) - 1
        # the same first batch through each path: ln_vision applied once, rows in the same order. A
        # trained-looking ln_vision (at init it is nearly idempotent, so applying it twice would pass)
        g = torch.Generator().manual_seed(0)
        scale, shift = 1 + 0.5 * torch.randn(vit.post_layernorm.weight.shape, generator=g), torch.randn(
            vit.post_layernorm.bias.shape, generator=g)
        for trainer in (plain, cached):
            trainer.model.vision_model.post_layernorm.weight.copy_(scale)
            trainer.model.vision_model.post_layernorm.bias.copy_(shift)
        from_pixels, from_cache = next(iter(plain.loader)), next(iter(cached.loader))
        assert torch.equal(from_pixels.objective_inputs.input_ids, from_cache.objective_inputs.input_ids)
        want = plain.model.image_embeds(from_pixels.objective_inputs.pixel_values)
        got = cached.model.image_embeds(frozen_features=from_cache.objective_inputs.frozen_features)
        torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)  # after LayerNorm: about unit scale
    assert torch.isfinite(torch.tensor(cached.run()["loss"]))
    stamp = cache.stat().st_mtime_ns
    Trainer(config(toy, tmp_path / "cached", augment=False, cache_features=True, max_steps=2), show_progress=False).run()
    assert cache.stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_activation_checkpointing_gives_the_same_grads(toy, tmp_path):
    grads = []
    for ckpt in (False, True):
        t = Trainer(config(toy, tmp_path / f"ac{ckpt}", activation_checkpointing=ckpt), show_progress=False)
        assert t.model.training  # checkpointing only acts in training mode
        for mod in t.model.modules():  # no dropout: both runs compute the same function
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
            if hasattr(mod, "dropout_p"):
                mod.dropout_p = 0.0
        calls = []
        if ckpt:
            import torch.utils.checkpoint as tuc

            original = tuc.checkpoint
            tuc.checkpoint = lambda *a, **k: calls.append(1) or original(*a, **k)
        batch = next(t._batches())
        t.module(batch.objective_inputs)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None})
        if ckpt:
            tuc.checkpoint = original
            assert calls  # the layers really were checkpointed
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def test_warmup_then_cosine_schedule():
    from blip2rt.training.trainer import warmup_cosine

    lrs = [warmup_cosine(s, 10, 110, 0.1) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup over 10 steps
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then never rises
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert lrs[110] == pytest.approx(0.1)  # ends at min_lr / lr


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch notices the patched optimizer.step
def test_gradient_accumulation_runs_micro_batches_per_step(toy, tmp_path, monkeypatch):
    t = Trainer(config(toy, tmp_path / "accum", grad_accum=3, max_steps=2), show_progress=False)
    calls = []
    original = t.module.forward
    monkeypatch.setattr(t.module, "forward", lambda batch: calls.append(1) or original(batch))
    steps = []
    original_step = t.optimizer.step
    monkeypatch.setattr(t.optimizer, "step", lambda *a, **k: steps.append(1) or original_step(*a, **k))
    last = t.run()
    assert len(calls) == 6 and len(steps) == 2  # 3 forward/backward passes per optimiser step
    assert last["loss"] == last["loss"]


def no_dropout(trainer) -> None:
    """Both runs must compute the same function."""
    for mod in trainer.model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
        if hasattr(mod, "dropout_p"):
            mod.dropout_p = 0.0


def grads_at_the_first_step(trainer, monkeypatch) -> dict:
    """The grads the optimiser's first step is given (the step itself then runs)."""
    seen = {}
    original = trainer.optimizer.step

    def step(*a, **k):
        if not seen:
            seen.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return original(*a, **k)

    monkeypatch.setattr(trainer.optimizer, "step", step)
    trainer.run()
    return seen


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch notices the patched optimizer.step
def test_accumulated_grads_equal_one_big_batchs(toy, tmp_path, monkeypatch):
    """Stage 2's loss is a mean over caption tokens; with captions of one length, two micro-batches of 3
    give the grads of one batch of 6 (stage 1's in-batch contrastive terms differ by construction)."""
    import json

    root, ann = toy
    records = [r for r in json.loads(ann.read_text()) if "broken" not in r["image"]][:6]
    same_length = tmp_path / "same_length.json"
    same_length.write_text(json.dumps([{**r, "caption": f"shape number {i}"} for i, r in enumerate(records)]))
    grads = []
    for batch, accum in ((6, 1), (3, 2)):
        t = Trainer(config(toy, tmp_path / f"b{batch}", stage=2, annotations=[str(same_length)], batch_size=batch,
                           grad_accum=accum, max_steps=1, grad_clip=0.0, augment=False), show_progress=False)
        no_dropout(t)
        grads.append(grads_at_the_first_step(t, monkeypatch))
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch notices the patched optimizer.step
def test_fp16_amp_scales_the_loss_and_unscales_the_grads(toy, tmp_path, monkeypatch):
    """The backward sees loss x scale; the optimiser sees the grads divided by it again, equal to the
    grads of the same fp16-autocast loss without scaling. A step whose scaled grads overflow is skipped
    and the scale halves."""
    # stage 2: no random draws in the loss (stage 1's hard negatives would differ between the runs)
    t = Trainer(config(toy, tmp_path / "fp16", stage=2, amp="fp16", max_steps=1, grad_clip=0.0), show_progress=False)
    assert t.scaler.is_enabled()
    no_dropout(t)
    t.scaler = torch.amp.GradScaler("cpu", init_scale=256.0)  # no fp16 overflow at this scale
    params = {n: p for n, p in t.model.named_parameters() if p.requires_grad}
    batch = next(t._batches())
    t.position = 0  # the run starts from this same first batch
    with torch.autocast("cpu", dtype=torch.float16):
        loss = t.module(batch.objective_inputs)["loss"]
    plain = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
    scaled = {}
    original_unscale = t.scaler.unscale_

    def unscale(opt):  # the grads as backward left them
        scaled.update({n: p.grad.clone() for n, p in params.items() if p.grad is not None})
        return original_unscale(opt)

    monkeypatch.setattr(t.scaler, "unscale_", unscale)
    unscaled = grads_at_the_first_step(t, monkeypatch)
    assert scaled.keys() == unscaled.keys() and len(scaled) > 10
    for name, g in unscaled.items():
        torch.testing.assert_close(scaled[name], g * 256.0, atol=1e-4, rtol=1e-5)
        # fp16 rounds the scaled and the unscaled backward differently: within 1% of the grad's range
        torch.testing.assert_close(g, plain[name], atol=1e-2 * plain[name].abs().max().item() + 1e-6, rtol=0,
                                   msg=lambda m: f"{name}: {m}")

    t2 = Trainer(config(toy, tmp_path / "fp16_overflow", amp="fp16", max_steps=1), show_progress=False)
    t2.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # the scaled grads overflow fp16
    before = {n: p.detach().clone() for n, p in t2.model.named_parameters() if p.requires_grad}
    t2.run()
    assert t2.scaler.get_scale() == 2.0**39  # halved
    assert all(torch.equal(p, before[n]) for n, p in t2.model.named_parameters() if p.requires_grad)  # skipped


def test_caption_and_vqa_evaluation(toy):
    import json

    import blip2rt
    from blip2rt.training import evaluate

    root, ann = toy
    records = [r for r in json.loads(ann.read_text()) if "broken" not in r["image"]][:3]
    m = blip2rt.from_pretrained("tiny", device="cpu")
    out = evaluate.captioning(m, records, root, num_beams=1, max_new_tokens=4, min_new_tokens=1)
    assert set(out["captions"]) == {r["image"] for r in records}
    assert "bleu4" in out or "pycocoevalcap" in out["note"]
    vqa_records = [{"image": r["image"], "question": "what colour?", "answer": ["red", "red", "blue"]} for r in records]
    res = evaluate.vqa(m, vqa_records, root, num_beams=1, max_new_tokens=3)
    assert 0.0 <= res["accuracy"] <= 1.0 and len(res["answers"]) == 3
    assert evaluate.normalize_answer("The Red!") == evaluate.normalize_answer("red")


def test_vqa_accuracy_equals_the_hand_computed_score(toy):
    """VQA accuracy: min(1, matching references / 3) with several references, exact with one;
    answers normalised (case, punctuation, articles)."""
    from blip2rt.training import evaluate

    class Answers:  # a model that gives these answers, in order
        def __init__(self, outs):
            self.outs = list(outs)

        def answer(self, images, questions, **gen):
            assert len(images) == len(questions)
            return [self.outs.pop(0) for _ in images]

    root, _ = toy
    records = [{"image": "images/red_circle_0.png", "question": "q", "answer": ["red", "red", "blue"]},  # 2 of 3
               {"image": "images/red_circle_0.png", "question": "q", "answer": ["red", "red", "blue"]},  # 1 of 3
               {"image": "images/red_circle_0.png", "question": "q", "answer": ["red", "red", "red", "red"]},  # 4: 1
               {"image": "images/red_circle_0.png", "question": "q", "answer": ["red", "red", "blue"]},  # none
               {"image": "images/red_circle_0.png", "question": "q", "answer": "yes"}]  # one reference: exact
    outs = ["Red.", "the blue", "red", "green", "Yes!"]
    res = evaluate.vqa(Answers(outs), records, root, batch_size=2)
    assert res["answers"] == outs
    assert res["accuracy"] == pytest.approx((2 / 3 + 1 / 3 + 1 + 0 + 1) / 5)


def test_evaluation_reads_cached_features_as_it_reads_pixels(toy, tmp_path):
    """Captions, answers and retrieval scores from an fp32 feature cache of the images equal those
    computed through the ViT from their pixels."""
    import json

    import numpy as np

    import blip2rt
    from blip2rt.training import evaluate
    from blip2rt.training.feature_cache import FeatureCache

    root, ann = toy
    records = [r for r in json.loads(ann.read_text()) if "broken" not in r["image"]][:6]
    m = blip2rt.from_pretrained("tiny", device="cpu", kernels="torch")
    cache = FeatureCache.build(m, [r["image"] for r in records], root, tmp_path / "cache", show_progress=False,
                               dtype=np.float32)
    gen = dict(num_beams=1, max_new_tokens=4, min_new_tokens=2)
    assert (evaluate.captioning(m, records, root, batch_size=4, features=cache, **gen)["captions"]
            == evaluate.captioning(m, records, root, batch_size=4, **gen)["captions"])
    questions = [{"image": r["image"], "question": "what colour?", "answer": "red"} for r in records]
    assert (evaluate.vqa(m, questions, root, features=cache, **gen)["answers"]
            == evaluate.vqa(m, questions, root, **gen)["answers"])
    cached = evaluate.retrieval_scores(m, records, root, k=3, features=cache)
    plain = evaluate.retrieval_scores(m, records, root, k=3)
    torch.testing.assert_close(cached.i2t, plain.i2t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached.t2i, plain.t2i, atol=1e-5, rtol=1e-5)
    with pytest.raises(blip2rt.Blip2rtError, match="no row in the feature cache"):
        evaluate.captioning(m, [{"image": "images/elsewhere.png", "caption": "x"}], root, features=cache, **gen)


@pytest.mark.parametrize("preset", ["tiny", "blip2-opt-2.7b", "blip2-flan-t5-xl", "blip2-itm-vit-g"])
def test_every_parameter_belongs_to_one_part_and_frozen_parts_never_train(preset):
    from blip2rt import parts
    from blip2rt.model import Blip2
    from blip2rt.presets import preset_config

    with torch.device("meta"):
        m = Blip2(preset_config(preset))
    names = [n for n, _ in m.named_parameters()]
    by_part = {n: m.part_of(n) for n in names}
    assert by_part["query_tokens"] == "query_tokens"
    assert by_part["vision_model.post_layernorm.weight"] == "ln_vision"
    assert all(by_part[n] == "llm" for n in names if n.startswith("language_model."))
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {n for n in names if by_part[n] in parts.FROZEN}
    for stage in (1, 2, 3):
        assert not frozen & set(m.trainable_names(stage))


def test_inference_between_training_steps_sees_the_new_weights(toy, tmp_path):
    """The Q-Former keeps stacked copies of its Q/K/V and image K/V weights for inference, rebuilt when
    a weight's version changes. torch's fused AdamW writes the weights without bumping it, so the
    trainer bumps it: an evaluation between steps (the demo's, between its stages) must not read the
    weights of the step before."""
    t = Trainer(config(toy, tmp_path, max_steps=3), show_progress=False)
    t.run(until=1)
    x = torch.randn(2, t.model.config.vision_config.num_patches + 1, t.model.config.vision_config.hidden_size,
                    generator=torch.Generator().manual_seed(0))
    t.model.eval()
    with torch.no_grad():
        t.model.query_output(x)  # builds the stacked copies from step 1's weights
    t.model.train()
    t.run(until=2)
    t.model.eval()
    with torch.no_grad():
        cached = t.model.query_output(x)
    fresh = t.model.query_output(x)  # under autograd: stacked afresh from the parameters
    assert torch.equal(cached, fresh.detach())
