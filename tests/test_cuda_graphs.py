"""CUDA-graph inference (blip2rt.cuda_graphs): the bucketing, copying and slicing around a captured
graph, on the CPU with the capture replaced by a direct call that writes into a static output as a
replay would; and on a GPU, the real capture, token for token against eager."""

import pytest
import torch

import blip2rt
from blip2rt.cuda_graphs import BUCKETS, GraphedByBatch
from blip2rt.errors import InputError


class DirectCapture:
    """Stands in for CudaGraphCapture: 'replay' reruns fn into the static output buffer."""

    def __init__(self):
        self.captured = []

    def __call__(self, fn, static_input):
        self.captured.append(static_input.shape[0])
        static_output = fn(static_input)

        def replay():
            static_output.copy_(fn(static_input))

        return replay, static_output


def test_each_batch_replays_its_buckets_graph_and_gets_its_own_rows():
    seen = []

    def fn(x):  # rows independent; records the batch the graph runs at
        seen.append(x.shape[0])
        return x * 2 + x.sum(-1, keepdim=True)

    capture = DirectCapture()
    graphed = GraphedByBatch(fn, buckets=(1, 4, 8), capture=capture)
    g = torch.Generator().manual_seed(0)
    for b in (1, 3, 4, 2, 8, 5, 9):
        x = torch.randn(b, 6, generator=g)
        out = graphed(x)
        torch.testing.assert_close(out, fn(x))
        assert out.shape == (b, 6)
    assert capture.captured == [1, 4, 8]  # one capture per bucket, reused after
    assert graphed.bucket(3) == 4 and graphed.bucket(9) is None
    # the output is the caller's: a later replay does not change it
    x1, x2 = torch.ones(2, 6), torch.zeros(2, 6)
    first = graphed(x1)
    graphed(x2)
    torch.testing.assert_close(first, fn(x1))


def test_spare_rows_repeat_row_zero():
    inputs = []
    graphed = GraphedByBatch(lambda x: inputs.append(x.clone()) or x.clone(), buckets=(4,), capture=DirectCapture())
    x = torch.arange(12.0).view(2, 6)
    graphed(x)
    assert torch.equal(inputs[-1][:2], x) and torch.equal(inputs[-1][2:], x[:1].expand(2, 6))


def test_the_default_buckets_grow_by_powers_of_two():
    assert BUCKETS[0] == 1 and all(b == 2 * a for a, b in zip(BUCKETS, BUCKETS[1:]))


@pytest.fixture(scope="module")
def tiny():
    return blip2rt.from_pretrained("tiny", device="cpu", seed=0)


def test_the_graphed_visual_prefix_gives_eagers_soft_prompt_and_captions(tiny):
    px = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = tiny.soft_prompt(px)
    gen = dict(max_new_tokens=6, min_new_tokens=2)
    want_tokens = tiny.generate(px, static_cache=True, **gen)
    capture = DirectCapture()
    tiny.set_cuda_graphs(True, capture=capture)
    try:
        assert tiny.cuda_graphs
        with torch.no_grad():
            torch.testing.assert_close(tiny.soft_prompt(px), want)
        assert capture.captured == [4]
        # generate picks the static-cache path itself where the graphs are on
        assert torch.equal(tiny.generate(px, **gen), want_tokens)
        # the question-conditioned and the gradient paths stay eager
        with torch.enable_grad():
            tiny.soft_prompt(px)
        assert capture.captured == [4]
    finally:
        tiny.set_cuda_graphs(False)
    assert not tiny.cuda_graphs


def test_cuda_graphs_are_off_by_default_on_the_cpu(tiny):
    assert not tiny.cuda_graphs and not blip2rt.from_pretrained("tiny", device="cpu").cuda_graphs


@pytest.mark.gpu
def test_cuda_graphs_are_on_by_default_on_cuda_for_a_model_with_an_llm():
    assert blip2rt.from_pretrained("tiny", device="cuda").cuda_graphs
    assert not blip2rt.from_pretrained("tiny", device="cuda", cuda_graphs=False).cuda_graphs


def test_cuda_graphs_on_the_cpu_is_a_clear_error(tiny):
    with pytest.raises(InputError, match="CUDA device"):
        tiny.set_cuda_graphs(True)
    with pytest.raises(InputError, match="CUDA device"):
        blip2rt.from_pretrained("tiny", device="cpu", cuda_graphs=True)


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_graphed_captions_equal_eager_on_a_gpu(kernels):
    """The real capture: the visual prefix per bucket, the prefill and the decode steps as CUDA
    graphs; greedy captions token for token against the eager path, at batch sizes in and between
    buckets."""
    m = blip2rt.from_pretrained("tiny", device="cuda", kernels=kernels, seed=0, cuda_graphs=False)
    gen = dict(max_new_tokens=12, min_new_tokens=4)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(b, 3, 56, 56, generator=g).cuda() for b in (1, 3, 8)]
    want = [m.generate(px, static_cache=False, **gen) for px in batches]
    with torch.no_grad():
        prefixes = [m.soft_prompt(px) for px in batches]
    m.set_cuda_graphs(True)
    for px, w, prefix in zip(batches, want, prefixes):
        with torch.no_grad():
            torch.testing.assert_close(m.soft_prompt(px), prefix)
        assert torch.equal(m.generate(px, **gen), w)
        assert torch.equal(m.generate(px, **gen), w)  # a replay, not a capture
