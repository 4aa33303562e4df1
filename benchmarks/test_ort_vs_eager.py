"""ONNX Runtime (CPU provider) vs eager PyTorch in one run: latency at batch 1, throughput at batch 8.

Run: pytest benchmarks/test_ort_vs_eager.py --benchmark-columns=median,iqr,rounds --benchmark-group-by=group
"""

import pytest

from ort_cases import caption, decode_step, visual_prefix

PRESETS = ["tiny"]  # "mini" joins when the embedded default exists


@pytest.mark.parametrize("impl", ["ort", "ort-opt", "eager"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("preset", PRESETS)
def test_visual_prefix(benchmark, preset, batch, impl):
    benchmark.group = f"visual prefix {preset} B={batch}"
    fn = visual_prefix(impl, preset, batch)
    benchmark.pedantic(fn, rounds=30, warmup_rounds=3)
    benchmark.extra_info["images_per_s"] = round(batch / benchmark.stats.stats.median, 1)


@pytest.mark.parametrize("impl", ["ort", "eager"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("preset", PRESETS)
def test_decode_step(benchmark, preset, batch, impl):
    benchmark.group = f"decode step {preset} B={batch}"
    fn = decode_step(impl, preset, batch)
    benchmark.pedantic(fn, rounds=50, warmup_rounds=5)
    benchmark.extra_info["tokens_per_s"] = round(batch / benchmark.stats.stats.median, 1)


@pytest.mark.parametrize("impl", ["ort", "eager"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("preset", PRESETS)
def test_caption(benchmark, preset, batch, impl):
    benchmark.group = f"caption {preset} B={batch} (20 new tokens, greedy)"
    fn = caption(impl, preset, batch)
    benchmark.pedantic(fn, rounds=10, warmup_rounds=2)
    benchmark.extra_info["captions_per_s"] = round(batch / benchmark.stats.stats.median, 2)
