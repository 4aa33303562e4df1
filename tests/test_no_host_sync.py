"""Nothing in a training step waits for the device: the Q-Former forward and backward, the stage-1 and
stage-2 losses and a whole trainer step run under a dispatch mode that fails on any host sync
(host_sync.NoHostSync), with the fused kernels (Triton's interpreter) and with the torch path. And
torch.compile traces the same without a graph break."""

import pytest
import torch

import blip2rt
from blip2rt.kernels import AttentionMode
from blip2rt.training.config import TrainConfig
from blip2rt.training.stage1 import Stage1Batch, Stage1Objective
from blip2rt.training.stage2 import Stage2Batch, Stage2Objective
from blip2rt.training.trainer import Trainer
from host_sync import HostSyncError, NoHostSync
from toy_data import make_toy_set

BACKENDS = ["torch", "triton"]


def model(backend: str):
    m = blip2rt.from_pretrained("tiny", device="cpu", kernels=backend, seed=0).train()
    assert m.config.qformer_config.attention_probs_dropout_prob > 0  # the fused kernels draw dropout masks
    return m


def stage1_batch(m, b=3, t=8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, m.config.qformer_config.vocab_size, (b, t), generator=g)
    ids[:, 0] = m.qformer_tokenizer.cls_token_id
    return Stage1Batch(ids, torch.ones_like(ids), pixel_values=torch.randn(b, 3, 56, 56, generator=g))


def stage2_batch(m, b=2, t=6):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, m.language_model.config.vocab_size, (b, t), generator=g)
    return Stage2Batch(ids, torch.ones_like(ids), ids.clone(), pixel_values=torch.randn(b, 3, 56, 56, generator=g))


def qformer_fwd_bwd(m):
    embeds = m.image_embeds(torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2)))
    q = m.query_tokens.expand(2, -1, -1)
    text = m.embeddings(torch.randint(5, 40, (2, 7)))
    out, _ = m.qformer(torch.cat([q, text], 1), num_queries=q.shape[1], text_mask=torch.ones(2, 7, dtype=torch.long),
                       mode=AttentionMode.BIDIRECTIONAL, image_embeds=embeds)
    out.sum().backward()


def stage1_loss(m):
    tok = m.qformer_tokenizer
    Stage1Objective(m, tok.convert_tokens_to_ids("[DEC]"), tok.pad_token_id)(stage1_batch(m))["loss"].backward()


def stage2_loss(m):
    Stage2Objective(m)(stage2_batch(m))["loss"].backward()


CASES = {"qformer fwd+bwd": qformer_fwd_bwd, "stage-1 loss": stage1_loss, "stage-2 loss": stage2_loss}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_no_host_sync(case, backend):
    m = model(backend)
    with NoHostSync() as guard:
        CASES[case](m)
    assert guard.ops > 100  # it watched the whole computation, the backward included
    assert m.query_tokens.grad is not None and torch.isfinite(m.query_tokens.grad).all()


def test_the_guard_catches_each_kind_of_sync():
    x = torch.ones(3)
    for sync in (lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: float(x[0]), lambda: x.nonzero(),
                 lambda: x[x > 0], lambda: torch.equal(x, x)):
        with pytest.raises(HostSyncError), NoHostSync():
            sync()
    with NoHostSync():
        (x * 2 + 1).softmax(0).cumsum(0)  # device work only


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("sync_toy")
    return root, make_toy_set(root, repeats=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stage", [1, 2])
def test_a_trainer_step_does_not_sync(toy, tmp_path, stage, backend):
    """One optimiser step over two micro-batches: forward, backward, clipping, the skip decision and
    the fused AdamW, with the losses and counters left on the device (read at log steps only)."""
    root, ann = toy
    cfg = TrainConfig(stage=stage, model="tiny", annotations=[str(ann)], image_root=str(root), out_dir=str(tmp_path),
                      batch_size=3, grad_accum=2, max_steps=1, warmup_steps=1, num_workers=0, kernels=backend,
                      augment=False, amp="none", max_text_len=8)
    t = Trainer(cfg, show_progress=False)
    batches = [next(t._batches()) for _ in range(2)]  # data loading is the loader's (its workers, on the CPU)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    with NoHostSync():
        losses, grad_norm, size = t._step(iter(batches))
        t.optimizer.zero_grad(set_to_none=True)
        t.scheduler.step()
    assert size == 6 and torch.isfinite(losses["loss"]) and torch.isfinite(grad_norm)
    assert any(not torch.equal(p, before[n]) for n, p in t.model.named_parameters() if p.requires_grad)
    t._read_counters()
    assert t.nonfinite_total == 0


def compiled_cases(m) -> dict:
    """What a compiled training step traces: the Q-Former forward and each stage's loss, inputs made
    outside."""
    px = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    text = torch.randint(5, 40, (2, 7), generator=torch.Generator().manual_seed(5))

    def qformer(px, text):
        embeds = m.image_embeds(px)
        q = m.query_tokens.expand(2, -1, -1)
        out, _ = m.qformer(torch.cat([q, m.embeddings(text)], 1), num_queries=q.shape[1],
                           text_mask=torch.ones(2, 7, dtype=torch.long), mode=AttentionMode.BIDIRECTIONAL,
                           image_embeds=embeds)
        return out.sum()

    tok = m.qformer_tokenizer
    stage1 = Stage1Objective(m, tok.convert_tokens_to_ids("[DEC]"), tok.pad_token_id)
    stage2 = Stage2Objective(m)
    return {"qformer": (qformer, (px, text)), "stage-1 loss": (lambda b: stage1(b)["loss"], (stage1_batch(m),)),
            "stage-2 loss": (lambda b: stage2(b)["loss"], (stage2_batch(m),))}


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_traces_without_a_graph_break(backend):
    """The fused kernels reach torch.compile as custom ops (opaque, differentiable): nothing in the
    Q-Former or the two losses breaks the graph."""
    m = model(backend)
    for name, (fn, args) in compiled_cases(m).items():
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fn)(*args)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, (name, explained.break_reasons)
