"""The training-precision rule (blip2rt.precision) with each CPU and GPU capability mocked, and its
users: the trainer's `amp: auto` and the demo's report."""

import pytest
import torch

from blip2rt import precision
from blip2rt.precision import training_precision

# (AMX tiles, AVX512-BF16, AVX-512, AVX2) -> (amp, the reason's words)
CPUS = {
    "Sapphire Rapids (AMX, AVX512-BF16)": ((True, True, True, True), "bf16", "native bf16 (AMX and AVX512-BF16)"),
    "AMX alone": ((True, False, True, True), "bf16", "native bf16 (AMX)"),
    "Zen 4 / Cooper Lake (AVX512-BF16)": ((False, True, True, True), "bf16", "native bf16 (AVX512-BF16)"),
    "Ice Lake / Cascade Lake (AVX-512 without BF16)": ((False, False, True, True), "none",
                                                        "no native bf16 (AVX-512 without BF16)"),
    "Zen 2-3 / Haswell (AVX2)": ((False, False, False, True), "none", "no native bf16 (AVX2, no AVX-512)"),
    "older (no AVX2)": ((False, False, False, False), "none", "no native bf16 (no AVX2)"),
}


def mock_cpu(monkeypatch, amx, avx512_bf16, avx512, avx2):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: avx512)
    monkeypatch.setattr(torch.cpu, "_is_avx2_supported", lambda: avx2)
    # oneDNN says yes on every AVX-512 CPU, where it emulates bf16: the rule must not follow it
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: avx512, raising=False)


@pytest.mark.parametrize("cpu", list(CPUS))
def test_bf16_only_where_the_cpu_has_it_natively(monkeypatch, cpu):
    flags, amp, words = CPUS[cpu]
    mock_cpu(monkeypatch, *flags)
    p = training_precision("cpu")
    assert p.amp == amp and p.reason == f"this CPU has {words}", p
    assert p.dtype == (torch.bfloat16 if amp == "bf16" else None)
    assert p.describe().startswith("bf16 autocast: " if amp == "bf16" else "fp32: ")
    assert precision.native_bf16_cpu() == (amp == "bf16")
    assert training_precision("cpu", allow_bf16=False) == precision.Precision("none", "bf16 turned off")


@pytest.mark.parametrize("capability,amp", [((9, 0), "bf16"), ((8, 0), "bf16"), ((8, 6), "bf16"), ((7, 5), "none"),
                                            ((7, 0), "none")])
def test_cuda_takes_bf16_from_ampere_on(monkeypatch, capability, amp):
    mock_cpu(monkeypatch, False, False, False, True)  # the host CPU does not matter for a GPU
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    p = training_precision("cuda:0")
    assert p.amp == amp, p
    assert f"sm_{capability[0]}{capability[1]}" in p.reason
    assert ("has native bf16" if amp == "bf16" else "no native bf16") in p.reason
    assert training_precision(torch.device("cuda"), allow_bf16=False).amp == "none"


def test_no_device_means_cuda_if_there_is_one(monkeypatch):
    mock_cpu(monkeypatch, False, True, True, True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert training_precision().amp == "none"  # the GPU's answer, not the CPU's
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_precision().amp == "bf16"


def test_other_devices_stay_in_fp32():
    assert training_precision("meta").amp == "none"


@pytest.mark.parametrize("native", [True, False])
def test_the_trainers_auto_amp_follows_the_rule(monkeypatch, tmp_path, native):
    from blip2rt.training.config import TrainConfig
    from blip2rt.training.trainer import Trainer
    from toy_data import make_toy_set

    mock_cpu(monkeypatch, False, native, True, True)
    root = tmp_path / "toy"
    ann = make_toy_set(root, repeats=1, corrupt=0)
    base = dict(stage=1, model="tiny", annotations=[str(ann)], image_root=str(root), batch_size=2, max_steps=1,
                num_workers=0, kernels="torch", augment=False)
    auto = Trainer(TrainConfig(out_dir=str(tmp_path / "auto"), **base), show_progress=False)
    assert auto.amp_dtype == (torch.bfloat16 if native else None)
    fixed = Trainer(TrainConfig(out_dir=str(tmp_path / "fixed"), amp="none", **base), show_progress=False)
    assert fixed.amp_dtype is None  # an explicit choice is kept whatever the CPU


def test_the_demo_report_says_why(monkeypatch):
    from blip2rt.embedded.demo import format_report

    mock_cpu(monkeypatch, False, False, True, True)
    p = training_precision("cpu")
    report = {"plan": "full", "out_dir": "/tmp/x",
              "machine": {"device": "cpu", "torch": "2.13", "torch_threads": 2, "training": p.amp,
                          "training_reason": p.reason}}
    first = format_report_header(format_report, report)
    assert first.endswith("training in fp32: this CPU has no native bf16 (AVX-512 without BF16)"), first


def format_report_header(format_report, header: dict) -> str:
    """The report's first line, from a report whose other sections are filled with placeholders."""
    zero = {"color": 0.0, "shape": 0.0, "both": 0.0, "exact": 0.0}
    report = {**header,
              "data": {"train_images": 1, "test_images": 1, "distinct_captions": 1, "vqa_questions": 1,
                       "vqa_train_questions": 1},
              "stage1": {}, "stage2": {}, "retrieval": {"i2t_r1": 0.0, "itc_i2t_r1": 0.0, "t2i_r1": 0.0},
              "captions": {**zero, "examples": []}, "chance": {"retrieval_r1": 1.0, **zero},
              "vqa": {"accuracy": {}, "majority_answer": "yes", "majority_baseline": 0.0, "examples": []},
              "ort": {"latency_ms": {"eager": 1.0, "ort": 1.0}, "equal": 0, "compared": 0,
                      "providers": ["CPUExecutionProvider"], "photos": []},
              "int4": None, "times_s": {}, "paths": {"stage1": "", "stage2": "", "export": "", "export_log": ""}}
    return format_report(report).splitlines()[0]
