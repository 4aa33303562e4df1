"""ONNX Runtime's static decoder (`static_lm.onnx`): KV buffers of a fixed length bound as both the
graph's past and present (updated in place), the greedy choice made inside the graph. Oracles: the
prefill/decode graphs' search, the PyTorch model (transformers' generate), and the graph itself run
with separate output buffers."""


import numpy as np
import onnx
import pytest
import torch

import blip2rt
from blip2rt.export import OrtBlip2, export_model
from blip2rt.export.onnx_export import _kv_written_in_place
from blip2rt.front_end import LENGTH_BUCKET
from hf_reference import with_tiny_tokenizer

PROMPTS = ["a", "a photo of", "the red one is"]


@pytest.fixture(scope="module", params=["opt", "llama"])
def exported(request, tmp_path_factory):
    src = with_tiny_tokenizer(request.getfixturevalue(f"hf_{request.param}"), tmp_path_factory.mktemp("static_src"))
    out = tmp_path_factory.mktemp(f"static_onnx_{request.param}")
    model = blip2rt.from_pretrained(src, device="cpu")
    export_model(model, out)
    return request.param, model, out


def pixels(b, seed=0):
    return torch.randn(b, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def _torch(model, px, ids, mask, **gen):
    return model.generate(px, torch.from_numpy(ids), torch.from_numpy(mask), num_beams=1, **gen).numpy()


@pytest.mark.parametrize("io_binding", [False, True], ids=["numpy", "iobinding"])
def test_greedy_tokens_equal_the_dynamic_graphs_and_pytorch(exported, io_binding):
    """Prompts of different lengths, left-padded; min_new_tokens; an EOS that ends rows mid-way."""
    _, model, out = exported
    static = OrtBlip2(out, providers=["CPUExecutionProvider"], io_binding=io_binding, static_cache=True)
    dynamic = OrtBlip2(out, providers=["CPUExecutionProvider"], io_binding=io_binding, static_cache=False)
    px = pixels(3, seed=4)
    ids, mask = static.encode(PROMPTS)
    for gen in (dict(max_new_tokens=10), dict(max_new_tokens=10, min_new_tokens=6), dict(max_new_tokens=35)):
        got = static.generate(px.numpy(), ids, mask, **gen)
        assert static.last_search == "static"
        np.testing.assert_array_equal(got, dynamic.generate(px.numpy(), ids, mask, **gen))
        assert dynamic.last_search == "dynamic"
        np.testing.assert_array_equal(got, _torch(model, px, ids, mask, **gen))
        assert len(np.unique(got)) > 1
    gen = dict(max_new_tokens=10)
    free = _torch(model, px, ids, mask, eos_token_id=10_000, **gen)
    eos = int(np.bincount(free[:, 2:6].reshape(-1)).argmax())
    for rt in (static, dynamic):
        rt.graphs.eos = [eos]
    for extra in (dict(), dict(min_new_tokens=5)):
        want = _torch(model, px, ids, mask, eos_token_id=eos, **gen, **extra)
        got = static.generate(px.numpy(), ids, mask, **gen, **extra)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, dynamic.generate(px.numpy(), ids, mask, **gen, **extra))
    ended = [(row == eos).nonzero()[0] for row in static.generate(px.numpy(), ids, mask, **gen)]
    assert any(len(e) and e[0] < gen["max_new_tokens"] - 1 for e in ended)


def test_captions_pick_the_static_graph_for_greedy_only(exported):
    _, model, out = exported
    assert not OrtBlip2(out, providers=["CPUExecutionProvider"]).graphs.use_static  # the CPU's default: no faster there
    rt = OrtBlip2(out, providers=["CPUExecutionProvider"], static_cache=True)
    px = pixels(2, seed=1)
    greedy = dict(num_beams=1, max_new_tokens=8)
    assert rt.caption(px.numpy(), prompt="a photo of", **greedy) == model.caption(px, prompt="a photo of", **greedy)
    assert rt.last_search == "static"
    beam = dict(num_beams=3, max_new_tokens=6)
    assert rt.caption(px.numpy(), **beam) == model.caption(px, **beam)
    assert rt.last_search == "dynamic"


def test_buffers_are_kept_and_written_in_place(exported):
    """One buffer set per batch size and bucketed length, reused by the next call; after a call the
    prompt's and the new tokens' K/V sit in it, the positions past them untouched."""
    _, _, out = exported
    rt = OrtBlip2(out, providers=["CPUExecutionProvider"], static_cache=True)
    px = pixels(2, seed=2).numpy()
    ids, mask = rt.encode(PROMPTS[1:])
    rt.generate(px, ids, mask, max_new_tokens=6, min_new_tokens=6)
    (key, buf), = rt.graphs._static_buffers.items()
    p = rt.cfg["num_query_tokens"] + ids.shape[1]
    assert key == (2, LENGTH_BUCKET)
    k0 = buf.kv[0].numpy()
    assert (np.abs(k0[:, :, : p + 5]).sum(axis=(1, 3)) > 0).all()  # P prompt positions + 5 fed-back tokens
    assert not k0[:, :, p + 5:].any()
    first = [id(v) for v in buf.kv]
    rt.generate(px, ids, mask, max_new_tokens=4)
    assert list(rt.graphs._static_buffers) == [key] and [id(v) for v in rt.graphs._static_buffers[key].kv] == first


def test_aliased_buffers_equal_separate_outputs(exported):
    """One decode step of the graph with past.i and present.i bound to one buffer, against the same
    step writing into fresh buffers: the same ids, logits and caches."""
    import onnxruntime as ort

    _, _, out = exported
    rt = OrtBlip2(out, providers=["CPUExecutionProvider"])
    c = rt.cfg
    rng = np.random.default_rng(0)
    b, length, at = 2, 12, 7
    kv = [rng.standard_normal((b, c["num_kv_heads"], length, c["head_dim"])).astype(np.float32)
          for _ in rt.cfg.past_names]
    feeds = {"inputs_embeds": rng.standard_normal((b, 1, c["hidden_size"])).astype(np.float32),
             "attention_mask": np.ones((b, length), np.int64), "position_ids": np.full((b, 1), at, np.int64),
             "write_at": np.array(at, np.int64), "token_bias": np.zeros((1, c["vocab_size"]), np.float32)}
    want = rt.graphs.static.session.run(None, {**feeds, **dict(zip(rt.cfg.past_names, kv))})
    bound = [ort.OrtValue.ortvalue_from_numpy(a.copy()) for a in kv]
    logits = ort.OrtValue.ortvalue_from_numpy(np.zeros((b, c["vocab_size"]), np.float32))
    ids = ort.OrtValue.ortvalue_from_numpy(np.zeros(b, np.int64))
    present = ["present." + n.split(".", 1)[1] for n in rt.cfg.past_names]
    rt.graphs.static.run_bound({**feeds, **dict(zip(rt.cfg.past_names, bound))},
                        {"logits": logits, "next_ids": ids, **dict(zip(present, bound))})
    np.testing.assert_array_equal(ids.numpy(), want[1])
    np.testing.assert_array_equal(logits.numpy(), want[0])
    for got, w, before in zip(bound, want[2:], kv):
        np.testing.assert_array_equal(got.numpy(), w)
        assert not np.array_equal(w[:, :, at], before[:, :, at])  # the step wrote its position
        np.testing.assert_array_equal(np.delete(w, at, axis=2), np.delete(before, at, axis=2))


def test_in_place_check_refuses_a_graph_that_reads_the_past_elsewhere(exported, tmp_path):
    _, model, out = exported
    layers = len(OrtBlip2(out).cfg.past_names) // 2
    assert _kv_written_in_place(out / "static_lm.onnx", layers)
    graph = onnx.load(str(out / "static_lm.onnx"))
    graph.graph.node.append(onnx.helper.make_node("Identity", ["past.0.key"], ["leak"]))
    graph.graph.output.append(onnx.helper.make_tensor_value_info("leak", onnx.TensorProto.FLOAT, None))
    onnx.save(graph, str(tmp_path / "leaky.onnx"))
    assert not _kv_written_in_place(tmp_path / "leaky.onnx", layers)


def test_export_without_the_static_graph_falls_back(hf_opt, tmp_path):
    model = blip2rt.from_pretrained(with_tiny_tokenizer(hf_opt, tmp_path / "src"), device="cpu")
    export_model(model, tmp_path / "onnx", static_graph=False)
    assert not (tmp_path / "onnx" / "static_lm.onnx").exists()
    rt = OrtBlip2(tmp_path / "onnx", providers=["CPUExecutionProvider"], static_cache=True)
    px = pixels(2, seed=5)
    got = rt.generate(px.numpy(), max_new_tokens=7)
    assert rt.last_search == "dynamic"
    np.testing.assert_array_equal(got, model.generate(px, max_new_tokens=7, num_beams=1).numpy())
