"""Block quantisation written as MatMulNBits (export/block_quant.py). Oracles: the `gguf` package's
own Q4_1 / Q8_0 quantiser and dequantiser (llama.cpp's formats, in numpy), the block formulas
written out here, and onnxruntime running the rewritten graph against numpy."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gguf import GGMLQuantizationType, quants
from onnx import TensorProto, helper, numpy_helper

from blip2rt.export.block_quant import dequantize_blocks, quantize_blocks, rewrite_matmuls

GGUF_TYPE = {"minmax": GGMLQuantizationType.Q4_1, "absmax": GGMLQuantizationType.Q8_0}


def _on_gguf_grid(fmt, rows, cols, seed):
    """A (K, N) weight that a GGUF file would hold: gguf's quantiser then its dequantiser, of N rows of K."""
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 0.05
    return quants.dequantize(quants.quantize(w, GGUF_TYPE[fmt]), GGUF_TYPE[fmt]).astype(np.float32).T


@pytest.mark.parametrize("fmt", ["minmax", "absmax"])
def test_a_weight_on_a_gguf_grid_comes_back_exactly(fmt):
    w = _on_gguf_grid(fmt, rows=24, cols=96, seed=0)  # (K=96, N=24)
    q, d, offsets = quantize_blocks(w.astype(np.float64), fmt, 32)
    back = dequantize_blocks(q, d, offsets, w.shape[0])
    scale = np.abs(w).max()
    np.testing.assert_allclose(back, w, rtol=0, atol=scale * 2e-7)  # float rounding of d and m only
    assert q.dtype == np.uint8 and q.max() <= (15 if fmt == "minmax" else 255)


def test_the_real_embedded_llm_weights_come_back_exactly():
    """blip2-mini's SmolLM2 ships as GGUF: its MLP and attention weights Q4_1, the embeddings
    (tied to the LM head) Q8_0. Both re-quantise without loss."""
    from gguf import GGUFReader

    from blip2rt.embedded.assets import smollm2_gguf

    reader = GGUFReader(str(smollm2_gguf()))
    seen = set()
    for t in reader.tensors:
        if t.name not in ("blk.3.ffn_down.weight", "blk.7.attn_k.weight", "token_embd.weight"):
            continue
        fmt = {"Q4_1": "minmax", "Q8_0": "absmax"}[t.tensor_type.name]
        rows = quants.dequantize(t.data, t.tensor_type)[:2048].astype(np.float64)  # (N, K)
        q, d, offsets = quantize_blocks(rows.T, fmt, 32)
        back = dequantize_blocks(q, d, offsets, rows.shape[1])
        np.testing.assert_allclose(back, rows.T, rtol=0, atol=np.abs(rows).max() * 2e-7)
        seen.add(fmt)
    assert seen == {"minmax", "absmax"}


@pytest.mark.parametrize("fmt", ["minmax", "absmax"])
def test_off_grid_weights_round_to_the_nearest_code_of_their_block(fmt):
    """Against the formulas: min/max (or max|w|) per block of 32, codes rounded, error at most d/2,
    and a ragged last block (K = 40) quantised over its own 8 weights."""
    w = np.random.default_rng(1).standard_normal((40, 5))
    q, d, offsets = quantize_blocks(w, fmt, 32)
    assert q.shape == (5, 2, 32) and d.shape == (5, 2)
    for n in range(5):
        for b, rows in enumerate((slice(0, 32), slice(32, 40))):
            block = w[rows, n]
            if fmt == "minmax":
                assert d[n, b] == pytest.approx((block.max() - block.min()) / 15)
                assert offsets[b, n] == pytest.approx(block.min() + 8 * d[n, b])
            else:
                assert d[n, b] == pytest.approx(np.abs(block).max() / 127)
    back = dequantize_blocks(q, d, offsets, 40)
    per_row_d = np.repeat(d.T, 32, axis=0)[:40]  # (K, N)
    assert (np.abs(back - w) <= per_row_d / 2 + 1e-12).all()
    assert np.abs(back - w).max() > 0  # random weights are not on the grid


def test_a_constant_block_keeps_its_value():
    w = np.full((32, 3), 0.25)
    for fmt in ("minmax", "absmax"):
        q, d, offsets = quantize_blocks(w, fmt, 32)
        np.testing.assert_allclose(dequantize_blocks(q, d, offsets, 32), w, atol=1e-12)


def _graph(weights, k):
    """y_i = x @ W_i for each weight, all reading the same x (B, T, K); plus z = y_0 @ W_last."""
    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"/layer/mm{i}/MatMul")
             for i in range(len(weights) - 1)]
    nodes.append(helper.make_node("MatMul", ["y0", f"w{len(weights) - 1}"], ["z"], name="/head/MatMul"))
    outs = [f"y{i}" for i in range(len(weights) - 1)] + ["z"]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", k])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["b", "t", None]) for o in outs], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("k", [64, 48])  # whole blocks, and a ragged last block
def test_the_rewritten_graph_computes_the_dequantised_product(k):
    """Three MatMuls read x: two in "minmax" (merged into one MatMulNBits, split after), one in
    "absmax" (its own); the head reads the first one's output."""
    rng = np.random.default_rng(2)
    weights = [rng.standard_normal((k, n)).astype(np.float32) * 0.1 for n in (24, 16, 8)]
    weights.append(rng.standard_normal((24, 40)).astype(np.float32) * 0.1)
    model = _graph(weights, k)
    fmts = ("minmax", "minmax", "absmax", "absmax")
    formats = {"/layer/mm0/MatMul": "minmax", "/layer/mm1/MatMul": "minmax", "/layer/mm2/MatMul": "absmax",
               "/head/MatMul": "absmax"}
    assert rewrite_matmuls(model, formats, 32, accuracy_level=0) == 4
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 3 and ops.count("Split") == 1 and "MatMul" in ops
    assert sum(n.name.endswith("_BlockSums") for n in model.graph.node) == 1
    assert not {"w0", "w1", "w2", "w3"} & {t.name for t in model.graph.initializer}
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    deq = []
    for w, fmt in zip(weights, fmts):
        q, d, off = quantize_blocks(w.astype(np.float64), fmt, 32)
        deq.append(dequantize_blocks(q, d, off, w.shape[0]))
    want = [x @ deq[0], x @ deq[1], x @ deq[2]]
    want.append(want[0] @ deq[3])
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_an_initializer_read_elsewhere_is_kept():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((32, 8)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), helper.make_node("Identity", ["w"], ["w_out"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("w_out", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    rewrite_matmuls(model, {"mm": "minmax"}, 32, accuracy_level=0)
    assert "w" in {t.name for t in model.graph.initializer}
    _, w_out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.ones((1, 32), np.float32)})
    np.testing.assert_array_equal(w_out, w)


def test_matmuls_of_two_dtypes_get_an_indicator_each():
    """An fp32 MatMul beside an fp16 one of the same K (their block sums need one indicator per
    dtype: a shared one failed to load)."""
    rng = np.random.default_rng(4)
    w16, w32 = (rng.standard_normal((32, 8)) * 0.1 for _ in range(2))
    g = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w16"], ["y16"], name="mm16"),
         helper.make_node("MatMul", ["b", "w32"], ["y32"], name="mm32")], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT16, [1, 32]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y16", TensorProto.FLOAT16, [1, 8]),
         helper.make_tensor_value_info("y32", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(w16.astype(np.float16), "w16"), numpy_helper.from_array(w32.astype(np.float32), "w32")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    rewrite_matmuls(model, {"mm16": "minmax", "mm32": "minmax"}, 32, accuracy_level=0)
    a, b = rng.standard_normal((1, 32)), rng.standard_normal((1, 32))
    y16, y32 = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"a": a.astype(np.float16), "b": b.astype(np.float32)})
    for x, y, w in ((a, y16, w16.astype(np.float16)), (b, y32, w32.astype(np.float32))):
        q, d, off = quantize_blocks(w.astype(np.float64), "minmax", 32)
        np.testing.assert_allclose(y.astype(np.float64), x @ dequantize_blocks(q, d, off, 32), rtol=2e-2, atol=2e-2)
