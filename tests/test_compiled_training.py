"""Training under torch.compile (the trainer's `compile` option) against eager, on the CPU: inductor
compiles each stage's loss, forward and backward, with the fused kernels as custom ops inside
(Triton's interpreter here). inductor's own random numbers are switched to eager's
(`fallback_random`), so dropout draws the same masks and the two can be compared closely."""

import shutil

import pytest
import torch

import blip2rt
from blip2rt.errors import Blip2rtError
from blip2rt.training.checkpoint import latest_checkpoint
from blip2rt.training.config import TrainConfig
from blip2rt.training.stage1 import Stage1Objective
from blip2rt.training.stage2 import Stage2Objective
from blip2rt.training.trainer import Trainer
from test_no_host_sync import stage1_batch, stage2_batch
from toy_data import make_toy_set

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                       reason="inductor needs a C++ compiler on the CPU"),
]


@pytest.fixture(autouse=True)
def eager_random_numbers():
    import torch._inductor.config as inductor

    torch._dynamo.reset()
    with inductor.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


def _grads(m) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _loss_and_grads(backend: str, stage: int, compiled: bool):
    torch.manual_seed(0)
    from blip2rt.kernels import dropout_rng

    dropout_rng.reset()
    m = blip2rt.from_pretrained("tiny", device="cpu", kernels=backend, seed=0).train()
    if stage == 1:
        tok = m.qformer_tokenizer
        objective, batch = Stage1Objective(m, tok.convert_tokens_to_ids("[DEC]"), tok.pad_token_id), stage1_batch(m)
    else:
        objective, batch = Stage2Objective(m), stage2_batch(m)
    run = torch.compile(objective) if compiled else objective
    out = run(batch)
    out["loss"].backward()
    return {k: v.detach() for k, v in out.items()}, _grads(m)


# Each stage's loss on the torch path: inductor over the Q-Former, ITC/ITM/ITG and OPT. The fused
# kernels inside a whole stage under Triton's interpreter make inductor run for many minutes and
# gigabytes on a 2-core CPU, so the custom ops are compiled alone below.
@pytest.mark.parametrize("stage", [1, 2])
def test_a_compiled_loss_and_its_grads_equal_eager(stage):
    eager, eager_grads = _loss_and_grads("torch", stage, compiled=False)
    compiled, compiled_grads = _loss_and_grads("torch", stage, compiled=True)
    assert eager.keys() == compiled.keys()
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-5, msg=f"{k}")
    assert eager_grads.keys() == compiled_grads.keys() and len(eager_grads) > 10
    for n in eager_grads:
        torch.testing.assert_close(compiled_grads[n], eager_grads[n], rtol=1e-3, atol=1e-5, msg=n)


def _attention_then_layer_norm(q, k, v, residual, weight, bias, seed):
    """The fused calls of a Q-Former layer, in miniature: attention with dropout, then the fused
    residual LayerNorm with dropout, each seeded from a device tensor."""
    from blip2rt.kernels.fused_attention import fused_attention
    from blip2rt.kernels.post_ln_residual import residual_layer_norm_triton

    b, n, h, d = q.shape
    o = fused_attention(q, k, v, dropout_p=0.1, seed=seed).reshape(b, n, h * d)
    return residual_layer_norm_triton(o, residual, weight, bias, 1e-12, p=0.1, seed=seed + 1)


def test_the_fused_kernels_compile_as_custom_ops_and_equal_eager():
    """fullgraph: the fused calls trace as blip2rt's custom ops (their fake implementations give the
    shapes), with no graph break; inductor's graph runs the same launches as eager, so forward and
    every grad are equal."""
    torch.manual_seed(0)
    q = torch.randn(2, 5, 2, 16, requires_grad=True)
    k, v = (torch.randn(2, 7, 2, 16, requires_grad=True) for _ in range(2))
    residual = torch.randn(2, 5, 32, requires_grad=True)
    weight, bias = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    seed = torch.tensor([123], dtype=torch.int64)
    inputs = (q, k, v, residual, weight, bias)

    def loss_and_grads(fn):
        y = fn(*inputs, seed)
        loss = (y * torch.linspace(-1, 1, 32)).square().sum()
        return y.detach(), torch.autograd.grad(loss, inputs)

    compiled_fn = torch.compile(_attention_then_layer_norm, fullgraph=True)
    eager, eager_grads = loss_and_grads(_attention_then_layer_norm)
    compiled, compiled_grads = loss_and_grads(compiled_fn)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(("q", "k", "v", "residual", "weight", "bias"), compiled_grads, eager_grads):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # the seed is an input of the graph, not a constant baked into it (what a CUDA graph replays)
    seed.fill_(124)
    reseeded, _ = loss_and_grads(compiled_fn)
    eager_reseeded, _ = loss_and_grads(_attention_then_layer_norm)
    assert not torch.equal(reseeded, compiled)
    torch.testing.assert_close(reseeded, eager_reseeded, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile_toy")
    return root, make_toy_set(root, repeats=1)


def _train(toy, out, compile_mode: str, steps: int = 2):
    root, ann = toy
    cfg = TrainConfig(stage=2, model="tiny", annotations=[str(ann)], image_root=str(root), out_dir=str(out),
                      batch_size=3, max_steps=steps, warmup_steps=1, num_workers=0, kernels="torch", augment=False,
                      amp="none", max_text_len=8, log_every=1, save_every=steps, compile=compile_mode)
    t = Trainer(cfg, show_progress=False)
    return t, t.run()


def test_the_trainer_compiled_trains_as_eager_and_saves_its_mode(toy, tmp_path):
    _, eager = _train(toy, tmp_path / "eager", "none")
    t, compiled = _train(toy, tmp_path / "compiled", "default")
    assert isinstance(t.module, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled["step"] == eager["step"] == 2
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-3)
    assert compiled["grad_norm"] == pytest.approx(eager["grad_norm"], rel=1e-3)
    saved = torch.load(latest_checkpoint(tmp_path / "compiled") / "state.pt", weights_only=True)
    assert saved["compile"] == "default"


def test_compile_modes_are_checked(toy, tmp_path):
    with pytest.raises(Blip2rtError, match="compile must be one of"):
        _train(toy, tmp_path / "bad", "max-speed")
    with pytest.raises(Blip2rtError, match="needs a CUDA device"):
        _train(toy, tmp_path / "graphs", "reduce-overhead")
