"""Every benchmark case runs once at tiny shapes on CPU (fused in the interpreter), so the GPU
benchmarks do not fail on their first real run. No timing here."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from timing import check_path  # noqa: E402
from training_kernel_cases import CASES, FUSED_KERNEL, TINY_SHAPES  # noqa: E402

from blip2rt.kernels import launch  # noqa: E402


class Labelled:
    """What check_path reads of pytest-benchmark's fixture: the case's params, name and extra_info."""

    def __init__(self, impl):
        self.params, self.name, self.extra_info = {"impl": impl}, f"case[{impl}]", {}


def runs_as_labelled(step, impl, expect=()):
    """Runs step once, recording its launches, and applies the benchmarks' path check."""
    with launch.record() as ran:
        step()
    bench = Labelled(impl)
    check_path(bench, ran, expect)
    return bench, ran


def test_the_path_check_fails_on_a_mislabelled_case():
    with pytest.raises(AssertionError, match="no Triton kernel ran"):
        check_path(Labelled("fused"), [])
    from blip2rt import kernels

    h = torch.randn(3, 8)
    layer_norm = lambda: kernels.residual_layer_norm(h, h, torch.ones(8), torch.zeros(8), 1e-12,  # noqa: E731
                                                     backend="triton")
    with pytest.raises(AssertionError, match="did not run"):
        runs_as_labelled(layer_norm, "fused", ("fused_attention._fwd_kernel",))
    q = torch.randn(1, 4, 2, 16)

    with pytest.raises(AssertionError, match="yet Triton kernels ran"):
        runs_as_labelled(lambda: kernels.qformer_cross_attention(q, q, q, backend="triton"), "torch")


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("op", list(CASES))
def test_case_runs(op, impl):
    case = CASES[op](impl, torch.device("cpu"), torch.float32, **TINY_SHAPES[op])
    bench, _ = runs_as_labelled(case.step, impl, (FUSED_KERNEL[op],))
    assert bench.extra_info["path"].startswith("triton: " if impl == "fused" else "no Triton kernel")
    case.step()  # twice: grads are cleared between steps


@pytest.mark.parametrize("impl", ["fused", "eager", "sdpa"])
@pytest.mark.parametrize("kind", ["cross", "self"])
def test_attention_case_runs(kind, impl):
    from attention_cases import attention_case

    step = attention_case(kind, impl, torch.device("cpu"), torch.float32, batch=2, heads=2, head_dim=16,
                          queries=4, image_tokens=9, text=5, backward=True)
    runs_as_labelled(step, impl, ("fused_attention._fwd_kernel", "fused_attention._bwd_kernel"))
    step()


@pytest.mark.parametrize("impl", ["fused", "torch", "transformers"])
def test_qformer_forward_case_runs(impl):
    from attention_cases import qformer_forward_case

    runs_as_labelled(qformer_forward_case(impl, torch.device("cpu"), torch.float32, "tiny", batch=1), impl,
                     ("fused_attention._fwd_kernel",))


@pytest.mark.parametrize("impl", ["triton", "torch", "lavis"])
def test_stage1_step_case_runs(impl):
    from train_step_cases import stage1_step

    from train_step_cases import FUSED_STAGE1, check_attention_dropout

    step, flops = stage1_step(impl, torch.device("cpu"), "tiny", batch=3, text_len=6)
    bench, ran = runs_as_labelled(step, impl, FUSED_STAGE1)
    if impl == "triton":  # the paper's attention dropout, inside the fused attention
        check_attention_dropout(bench, ran)
    assert flops > 0


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_stage2_step_case_runs(impl):
    from train_step_cases import FUSED_STAGE2, check_attention_dropout, stage2_step

    step, _ = stage2_step(impl, torch.device("cpu"), "tiny", batch=2, text_len=5)
    bench, ran = runs_as_labelled(step, impl, FUSED_STAGE2)
    if impl == "triton":
        check_attention_dropout(bench, ran)


@pytest.mark.parametrize("weights", ["fp32", "fp32-int4"])
def test_llm_weights_caption_case_runs(weights):
    """test_ort_gpu's case over an export in each LLM precision, on the CPU provider at tiny size
    (the GPU run adds fp16 and fp16 + int8 / int4: the same steps with the export's dtype)."""
    from ort_cases import weights_caption, weights_export

    step = weights_caption(weights, "tiny", 2, ("CPUExecutionProvider",), new_tokens=3)
    step()
    _, rt = weights_export("tiny", weights, ("CPUExecutionProvider",))
    assert rt.llm_weights["format"] == weights.split("-")[-1]


def test_kernel_floors_count_the_bytes_of_the_fused_plan():
    """The floor's bytes come from the fused launch plan (kernel_floors.plan_bytes): cross-attention at the
    paper's shapes, B = 128, moves q, K, V and O in inference (114 MB), and in training the forward also
    writes the log-sum-exp, which the backward reads with q, K, V, dO and O, writing dQ, dK, dV (341 MB)."""
    from attention_cases import PAPER, attention_case
    from kernel_floors import attention_flops, plan_bytes
    from training_kernel_cases import PAPER_SHAPES

    b, h, d, nq, nk = 128, PAPER["heads"], PAPER["head_dim"], PAPER["queries"], PAPER["image_tokens"]
    q, kv, lse = b * nq * h * d * 2, b * nk * h * d * 2, b * h * nq * 4
    inference = q + 2 * kv + q  # read q, k, v; write o
    backward = (q + 2 * kv + q + lse + q) + (q + 2 * kv)  # read q, k, v, dO, lse, o; write dq, dk, dv
    for bw, want in ((False, inference), (True, inference + lse + backward)):
        got = plan_bytes(lambda dev: attention_case("cross", "fused", dev, torch.bfloat16, batch=b, backward=bw, **PAPER))
        assert got == want, (bw, got, want)
    assert attention_flops("cross", b, True, **PAPER) == 7 * 2 * b * h * nq * nk * d
    rows, dim = PAPER_SHAPES["layer_norm"]["rows"], PAPER_SHAPES["layer_norm"]["dim"]
    ln = plan_bytes(lambda dev: CASES["layer_norm"]("fused", dev, torch.bfloat16, rows=rows, dim=dim).step)
    assert ln >= 7 * rows * dim * 2  # at least h, r, y forward; dy, h, r, dh, dres backward (h, r read twice)
