"""ONNX Runtime's CUDA provider vs eager PyTorch on the GPU: the tiny preset's visual prefix and
greedy captioning (needs onnxruntime-gpu: `make ort-gpu-parts`; skipped without its CUDA provider).

Run: blip2rt bench -k ort_gpu
"""

import pytest

from ort_cases import ort_cuda_caption, ort_cuda_visual_prefix
from timing import measure, per_second


@pytest.fixture
def ort_cuda(cuda):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDA provider (make ort-gpu-parts)")
    return cuda


@pytest.mark.parametrize("impl", ["ort", "eager"])
@pytest.mark.parametrize("batch", [1, 8])
def test_ort_gpu_visual_prefix(benchmark, ort_cuda, batch, impl):
    benchmark.group = f"visual prefix tiny B={batch} (gpu)"
    measure(benchmark, ort_cuda_visual_prefix(impl, "tiny", batch), rounds=30, warmup=3, device=ort_cuda)
    per_second(benchmark, "images_per_s", batch)


@pytest.mark.parametrize("impl", ["ort", "eager"])
@pytest.mark.parametrize("batch", [1, 8])
def test_ort_gpu_caption(benchmark, ort_cuda, batch, impl):
    benchmark.group = f"caption tiny B={batch} 20 tokens greedy (gpu)"
    measure(benchmark, ort_cuda_caption(impl, "tiny", batch), rounds=10, warmup=2, device=ort_cuda)
    per_second(benchmark, "tokens_per_s", 20 * batch)
