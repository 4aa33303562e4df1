"""ONNX Runtime's CUDA provider (onnxruntime-gpu, see `make ort-gpu-parts`) against PyTorch: the
tiny OPT export's soft prompt and greedy tokens, with the KV cache on the device (IO binding)."""

import numpy as np
import pytest
import torch

import blip2rt

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_export(tmp_path_factory, hf_opt):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDA provider (install onnxruntime-gpu: make ort-gpu-parts)")
    from blip2rt.export import OrtBlip2, export_model

    out = tmp_path_factory.mktemp("onnx_cuda")
    model = blip2rt.from_pretrained(hf_opt.folder, device="cpu")
    export_model(model, out)
    return model, OrtBlip2(out, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_cuda_provider_runs_with_io_binding(cuda_export):
    _, rt = cuda_export
    assert rt.providers[0] == "CUDAExecutionProvider" and rt.graphs.on_cuda and rt.graphs.io_binding


def test_soft_prompt_and_greedy_tokens_match_pytorch(cuda_export):
    model, rt = cuda_export
    px = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.image_features(px).numpy()
        want_ids = model.generate(px, max_new_tokens=12, num_beams=1).numpy()
    got = rt.image_features(px.numpy())
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=2e-3)  # the CUDA EP may use TF32 in fp32 GEMMs
    got_ids = rt.generate(px.numpy(), max_new_tokens=12, num_beams=1)
    np.testing.assert_array_equal(np.asarray(got_ids), want_ids)


def test_static_graph_with_cuda_graphs_gives_the_same_tokens(cuda_export):
    """Greedy over static_lm.onnx on the CUDA provider: its decode step captured as a CUDA graph on the
    first call and replayed on the next ones (one graph per batch size and cache length), against
    PyTorch and the prefill/decode graphs."""
    from blip2rt.export import OrtBlip2

    model, rt = cuda_export
    dynamic = OrtBlip2(rt.dir, providers=rt.providers, static_cache=False)
    for b, seed in ((3, 1), (3, 2), (1, 3), (3, 4)):
        px = torch.randn(b, 3, 28, 28, generator=torch.Generator().manual_seed(seed))
        gen = dict(max_new_tokens=12, min_new_tokens=4, num_beams=1)
        want = model.generate(px, **gen).numpy()
        got = rt.generate(px.numpy(), **gen)
        assert rt.last_search == "static"
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(dynamic.generate(px.numpy(), **gen), want)
    print(f"cuda graphs: {rt.graphs.cuda_graph}; buffer sets {sorted(rt.graphs._static_buffers)}")
    assert sorted(rt.graphs._static_buffers) == [(1, 64), (3, 64)]
