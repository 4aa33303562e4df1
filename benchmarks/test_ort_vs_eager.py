"""Layers 4-5: the visual prefix, one decode step, and captioning; ONNX Runtime vs eager
PyTorch (and transformers' Blip2ForConditionalGeneration where it can load the weights) in
one run. CPU: `tiny` (random weights) and `blip2-mini` (the embedded default's real weights),
latency at batch 1 and throughput at batch 8, with the CPU provider.

ORT's decode step and captions also with the LLM's weights in int8 and int4 (MatMulNBits).
Decoding, both runtimes two ways: ORT's static graph (in-place KV buffers, the token chosen in the
graph) against its prefill/decode graphs; blip2rt's static-cache step, eager and torch.compile'd,
against transformers' forward over a growing cache. extra_info holds the memory-bandwidth floor
(floors.py) of the decode step and the caption, and each case's multiple of it.

Run: blip2rt bench -k ort_vs_eager
"""

import pytest

from floors import caption_floor_seconds, cpu_copy_bandwidth, decode_floor_seconds, record_floor
from ort_cases import caption, decode_step, model_and_export, visual_prefix
from timing import measure, per_second, quick_mode

PRESETS = ["tiny", "blip2-mini"]


def _skip_unsupported(preset, impl):
    if impl == "static-compiled" and quick_mode():
        pytest.skip("inductor compiles for minutes on the CPU: the quick run checks the eager static step")
    if impl in ("ort-int8", "ort-int4") and preset != "tiny" and quick_mode():
        pytest.skip("two more blip2-mini exports take minutes: the quick run checks the quantised ones on tiny")
    if impl == "ort-opt" and preset != "tiny":
        pytest.skip("the optimizer export is measured on tiny only (a second mini export costs minutes)")
    if impl == "transformers" and preset == "blip2-mini":
        pytest.skip("transformers' Blip2 has no DINOv2 layer scale nor the BOS before the soft prompt")


@pytest.mark.parametrize("impl", ["ort", "ort-opt", "eager"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("preset", PRESETS)
def test_visual_prefix(benchmark, preset, batch, impl):
    _skip_unsupported(preset, impl)
    benchmark.group = f"visual prefix {preset} B={batch} (cpu)"
    measure(benchmark, visual_prefix(impl, preset, batch), rounds=30, warmup=3)
    per_second(benchmark, "images_per_s", batch)


@pytest.mark.parametrize("impl", ["ort", "ort-static", "ort-int8", "ort-int4", "eager", "static-eager",
                                  "static-compiled"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("preset", PRESETS)
def test_decode_step(benchmark, preset, batch, impl):
    _skip_unsupported(preset, impl)
    benchmark.group = f"decode step {preset} B={batch} (cpu)"
    measure(benchmark, decode_step(impl, preset, batch), rounds=50, warmup=5)
    per_second(benchmark, "tokens_per_s", batch)
    bw = cpu_copy_bandwidth()
    model, rt = model_and_export(preset, impl)
    record_floor(benchmark, decode_floor_seconds(model, bw, rt if impl.startswith("ort") else None), bw)


@pytest.mark.parametrize("impl", ["ort", "ort-static", "ort-int8", "ort-int4", "eager", "static-eager",
                                  "static-compiled", "transformers-static", "transformers"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("preset", PRESETS)
def test_caption(benchmark, preset, batch, impl):
    _skip_unsupported(preset, impl)
    benchmark.group = f"caption {preset} B={batch} 20 tokens greedy (cpu)"
    measure(benchmark, caption(impl, preset, batch), rounds=10, warmup=2)
    per_second(benchmark, "captions_per_s", batch)
    per_second(benchmark, "tokens_per_s", 20 * batch)
    bw = cpu_copy_bandwidth()
    model, rt = model_and_export(preset, impl)
    record_floor(benchmark, caption_floor_seconds(model, 20, bw, rt if impl.startswith("ort") else None), bw)
