"""The kernel-backend switch: argument, environment variable, and clear refusals."""

import pytest

import blip2rt
from blip2rt.kernels import ENV_VAR, resolve_backend


def test_auto_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend(None, "cpu") == "torch"


def test_environment_variable_is_read_and_checked(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "torch")
    assert resolve_backend(None, "cpu") == "torch"
    monkeypatch.setenv(ENV_VAR, "cuda-magic")
    with pytest.raises(blip2rt.InputError, match=r"\$BLIP2RT_KERNELS='cuda-magic' is not a kernel backend"):
        resolve_backend(None, "cpu")


def test_unknown_backend_argument_is_refused():
    with pytest.raises(blip2rt.InputError, match="kernels='fast' is not a kernel backend"):
        blip2rt.from_pretrained("tiny", device="cpu", kernels="fast")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(blip2rt.InputError, match="set TRITON_INTERPRET=1"):
        blip2rt.from_pretrained("tiny", device="cpu", kernels="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", "cpu") == "triton"


def test_auto_picks_per_op_only_on_a_gpu_the_measured_table_holds(monkeypatch):
    """An H100 (sm_90) planned without a GPU: "auto" where the table holds sm_90, torch where it holds only
    another architecture, and torch on the CPU whatever it holds."""
    from blip2rt.kernels import auto_table, launch

    def with_archs(*archs):
        monkeypatch.setattr(auto_table, "table", lambda: {"version": 1, "archs": {str(a): {"ops": {}} for a in archs}})

    with launch.plan_for(launch.H100):
        with_archs(80)
        assert resolve_backend("auto", "cuda") == "torch"
        with_archs(80, 90)
        assert resolve_backend("auto", "cuda") == "auto"
    assert resolve_backend("auto", "cpu") == "torch"


def test_model_reports_backend_and_attention():
    m = blip2rt.from_pretrained("tiny", device="cpu", kernels="torch")
    assert m.kernel_backend == "torch" and m.qformer.kernel_backend == "torch"
    assert m.attn_implementation == "sdpa"  # no flash_attn on CPU


def test_llm_attention_choice(monkeypatch):
    """flash_attention_2 only where it can run: flash_attn installed, CUDA, fp16/bf16."""
    import torch

    from blip2rt import llm

    monkeypatch.setattr(llm, "flash_attn_installed", lambda: True)
    assert llm.preferred_attention(torch.device("cuda"), torch.bfloat16) == "flash_attention_2"
    assert llm.preferred_attention(torch.device("cuda"), torch.float32) == "sdpa"
    assert llm.preferred_attention(torch.device("cpu"), torch.bfloat16) == "sdpa"
    monkeypatch.setattr(llm, "flash_attn_installed", lambda: False)
    assert llm.preferred_attention(torch.device("cuda"), torch.float16) == "sdpa"
