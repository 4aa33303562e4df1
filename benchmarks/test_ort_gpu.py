"""ONNX Runtime's CUDA provider vs eager PyTorch on the GPU: the tiny preset's visual prefix and
greedy captioning (needs onnxruntime-gpu: `make ort-gpu-parts`; skipped without its CUDA provider).
Greedy captions through static_lm.onnx (its decode step a CUDA graph) beside the prefill/decode
graphs, and PyTorch eager beside its static cache with the step compiled.

blip2-mini's captions with the LLM graphs in each deployment precision: fp32, fp16, and fp16 with
int8 / int4 weights (MatMulNBits in GGUF's block formats), with BLIP2RT_BENCH_LLM_WEIGHTS=1:
`BLIP2RT_BENCH_LLM_WEIGHTS=1 blip2rt bench -k llm_weights`.

At ViT-g + OPT-2.7B (fp16 graphs: about 16 GB written, minutes of export) with
BLIP2RT_BENCH_LARGE=1; compare with test_caption_gpu's static-compiled PyTorch case.

Run: blip2rt bench -k ort_gpu
"""

import os

import pytest

from floors import caption_floor_seconds, cuda_copy_bandwidth, record_floor
from ort_cases import (fp16_cuda_export, ort_cuda_caption, ort_cuda_fp16_caption, ort_cuda_visual_prefix,
                       weights_caption, weights_export)
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


@pytest.mark.parametrize("impl", ["ort", "ort-dynamic", "eager", "static-compiled"])
@pytest.mark.parametrize("batch", [1, 8])
def test_ort_gpu_caption(benchmark, ort_cuda, batch, impl):
    benchmark.group = f"caption tiny B={batch} 20 tokens greedy (gpu)"
    measure(benchmark, ort_cuda_caption(impl, "tiny", batch), rounds=10, warmup=2, device=ort_cuda)
    per_second(benchmark, "tokens_per_s", 20 * batch)


@pytest.mark.skipif(os.environ.get("BLIP2RT_BENCH_LARGE") != "1",
                    reason="exports ViT-g + OPT-2.7B in fp16 (about 16 GB, minutes): set BLIP2RT_BENCH_LARGE=1")
@pytest.mark.parametrize("impl", ["ort", "ort-dynamic"])
def test_ort_gpu_caption_opt27b(benchmark, ort_cuda, impl):
    benchmark.group = "caption blip2-opt-2.7b B=1 30 tokens greedy (gpu, ORT fp16)"
    measure(benchmark, ort_cuda_fp16_caption(impl, "blip2-opt-2.7b", 1, 30), rounds=10, warmup=2, device=ort_cuda)
    per_second(benchmark, "tokens_per_s", 30)
    bw = cuda_copy_bandwidth(ort_cuda)
    model = fp16_cuda_export("blip2-opt-2.7b")[0].half()
    record_floor(benchmark, caption_floor_seconds(model, 30, bw), bw)


@pytest.mark.skipif(os.environ.get("BLIP2RT_BENCH_LLM_WEIGHTS") != "1",
                    reason="exports blip2-mini twice and quantises it twice (minutes, past make gpu-check's cap for "
                           "this step): set BLIP2RT_BENCH_LLM_WEIGHTS=1")
@pytest.mark.parametrize("weights", ["fp32", "fp16", "fp16-int8", "fp16-int4"])
@pytest.mark.parametrize("batch", [1, 8])
def test_ort_gpu_caption_llm_weights(benchmark, ort_cuda, batch, weights):
    benchmark.group = f"caption blip2-mini B={batch} 20 tokens greedy (gpu, ORT, LLM weights)"
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider")
    measure(benchmark, weights_caption(weights, "blip2-mini", batch, providers), rounds=10, warmup=2,
            device=ort_cuda)
    per_second(benchmark, "tokens_per_s", 20 * batch)
    bw = cuda_copy_bandwidth(ort_cuda)
    model, rt = weights_export("blip2-mini", weights, providers)
    benchmark.extra_info["search"] = rt.last_search
    record_floor(benchmark, caption_floor_seconds(model, 20, bw, rt), bw)
