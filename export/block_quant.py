"""Block quantisation of an LLM graph's MatMul weights, written as onnxruntime's `MatMulNBits`
without its quantiser, in the two block formats that GGUF files (llama.cpp) ship:

- "minmax" (GGUF's Q4_1): 4-bit codes per block of 32 weights along the input dimension, with the
  block's scale d = (max - min) / 15 and its minimum m: w = d·q + m. MatMulNBits has no float
  offset on its fast path (a float zero point takes a slow one), so the graph computes
  y = MatMulNBits(x; d, q - 8) + blocksum(x) @ (m + 8·d): the 4-bit product with the default zero
  point 8, plus a small fp32 product of the per-block sums of x (K/32 of them) with the per-block
  offsets. blocksum(x) = x @ indicator, shared by the MatMuls that read the same x.
- "absmax" (GGUF's Q8_0): 8-bit codes, symmetric, d = max|w| / 127: w = d·(q - 128), the
  default zero point of 8-bit MatMulNBits; no offset.

A weight that already lies on such a grid (a GGUF checkpoint dequantised to fp32, as blip2-mini's
SmolLM2) comes back exactly, up to float rounding of d and m. No torch import.
"""

from __future__ import annotations

import numpy as np

FORMATS = {"minmax": 4, "absmax": 8}  # format: bits
DEFAULT_ZERO_POINT = {4: 8, 8: 128}  # MatMulNBits' zero point where none is given


def quantize_blocks(w: np.ndarray, fmt: str, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """w (K, N), a MatMul's right-hand side -> (codes (N, blocks, block_size) uint8, scales (N, blocks),
    offsets (blocks, N) or None). K is padded with zeros to whole blocks; padded codes are never read
    against a real input."""
    k, n = w.shape
    blocks = -(-k // block_size)
    wt = np.zeros((n, blocks * block_size), np.float64)
    wt[:, :k] = w.T
    valid = np.zeros(blocks * block_size, bool)
    valid[:k] = True
    wt, valid = wt.reshape(n, blocks, block_size), valid.reshape(blocks, block_size)
    if fmt == "minmax":
        lo = np.where(valid, wt, np.inf).min(-1)  # (N, blocks)
        hi = np.where(valid, wt, -np.inf).max(-1)
        d = (hi - lo) / 15
        safe = np.where(d > 0, d, 1.0)
        q = np.clip(np.rint((wt - lo[..., None]) / safe[..., None]), 0, 15)
        offsets = (lo + DEFAULT_ZERO_POINT[4] * d).T  # (blocks, N): w = d·(q - 8) + (m + 8d)
    elif fmt == "absmax":
        d = np.abs(wt).max(-1) / 127
        safe = np.where(d > 0, d, 1.0)
        q = np.clip(np.rint(wt / safe[..., None]), -127, 127) + DEFAULT_ZERO_POINT[8]
        offsets = None
    else:
        raise ValueError(f"block format {fmt!r}: expected one of {', '.join(FORMATS)}")
    q = np.where(valid, q, DEFAULT_ZERO_POINT[FORMATS[fmt]]).astype(np.uint8)
    return q, d, offsets


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """(N, blocks, block_size) codes -> MatMulNBits' B: (N, blocks, block_size * bits / 8) uint8, two
    4-bit codes a byte, the even position in the low nibble."""
    if bits == 8:
        return q
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def dequantize_blocks(q: np.ndarray, d: np.ndarray, offsets: np.ndarray | None, k: int) -> np.ndarray:
    """The (K, N) weight that MatMulNBits (+ the offset term) multiplies by: the numpy reference."""
    bits = 4 if offsets is not None else 8
    w = d[..., None] * (q.astype(np.float64) - DEFAULT_ZERO_POINT[bits])  # (N, blocks, block_size)
    if offsets is not None:
        w = w + offsets.T[..., None]
    return w.reshape(w.shape[0], -1)[:, :k].T


def rewrite_matmuls(model, formats: dict[str, str], block_size: int, accuracy_level: int) -> int:
    """Replaces each MatMul named in `formats` (node name -> "minmax" | "absmax"), whose right-hand
    side is a 2-D initializer, by MatMulNBits (and the offset term for "minmax"), in place, keeping
    the graph's order; returns how many MatMuls it replaced. MatMuls that read the same input in the
    same format (a layer's q/k/v, or gate/up) become one MatMulNBits over their weights side by side,
    split after: fewer, larger ops, where a decode step pays per op. An initializer no other node
    reads is dropped."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    siblings: dict[tuple, list] = {}  # (input, format, K) -> its MatMuls, in graph order
    for node in graph.node:
        if node.name in formats:
            w = inits[node.input[1]]
            if len(w.dims) != 2:
                raise ValueError(f"{node.name}: a MatMul weight of shape {list(w.dims)}, not (K, N)")
            siblings.setdefault((node.input[0], formats[node.name], w.dims[0]), []).append(node)
    nodes, new_inits, blocksums, indicators, dropped = [], [], {}, set(), set()
    first = {id(group[0]): group for group in siblings.values()}
    for node in graph.node:
        if node.name not in formats:
            nodes.append(node)
            continue
        group = first.get(id(node))
        if group is None:  # emitted with the first of its siblings
            continue
        x, fmt = node.input[0], formats[node.name]
        ws = [numpy_helper.to_array(inits[m.input[1]]) for m in group]
        k, dtype = ws[0].shape[0], ws[0].dtype
        parts = [quantize_blocks(w.astype(np.float64), fmt, block_size) for w in ws]
        q = np.concatenate([p[0] for p in parts])  # (N1 + N2 + ..., blocks, block_size)
        d = np.concatenate([p[1] for p in parts])
        offsets = None if parts[0][2] is None else np.concatenate([p[2] for p in parts], axis=1)
        widths = [w.shape[1] for w in ws]
        bits = FORMATS[fmt]
        tag = node.name.strip("/").replace("/", "_") or node.input[1]
        if len(group) > 1:
            tag += f"_and_{len(group) - 1}_siblings"
        codes, scales = f"{tag}_q{bits}", f"{tag}_scales"
        new_inits += [numpy_helper.from_array(pack_codes(q, bits), codes),
                      numpy_helper.from_array(d.reshape(-1).astype(dtype), scales)]
        out = node.output[0] if len(group) == 1 else f"{tag}_out"
        product = out if offsets is None else f"{tag}_nbits"
        nodes.append(helper.make_node("MatMulNBits", [x, codes, scales], [product], name=f"{tag}_MatMulNBits",
                                      domain="com.microsoft", K=k, N=sum(widths), bits=bits,
                                      block_size=block_size, accuracy_level=accuracy_level))
        if offsets is not None:
            sums = blocksums.get((x, k))
            if sums is None:  # (..., K) @ (K, blocks) 0/1 -> (..., blocks): each block's sum of x
                indicator = f"block_indicator_{k}_{block_size}_{np.dtype(dtype).name}"  # one per dtype
                if indicator not in indicators:
                    ind = (np.arange(k)[:, None] // block_size == np.arange(offsets.shape[0])[None]).astype(dtype)
                    new_inits.append(numpy_helper.from_array(ind, indicator))
                    indicators.add(indicator)
                sums = blocksums[(x, k)] = f"{tag}_blocksums"
                nodes.append(helper.make_node("MatMul", [x, indicator], [sums], name=f"{tag}_BlockSums"))
            nodes.append(helper.make_node("MatMul", [sums, f"{tag}_offsets"], [f"{tag}_offset_term"],
                                          name=f"{tag}_Offsets"))
            new_inits.append(numpy_helper.from_array(offsets.astype(dtype), f"{tag}_offsets"))
            nodes.append(helper.make_node("Add", [product, f"{tag}_offset_term"], [out], name=f"{tag}_AddOffsets"))
        if len(group) > 1:
            new_inits.append(numpy_helper.from_array(np.array(widths, np.int64), f"{tag}_widths"))
            nodes.append(helper.make_node("Split", [out, f"{tag}_widths"], [m.output[0] for m in group], axis=-1,
                                          name=f"{tag}_Split"))
        for m in group:
            readers[m.input[1]] -= 1
            if readers[m.input[1]] == 0:
                dropped.add(m.input[1])
    kept = [t for t in graph.initializer if t.name not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return sum(len(group) for group in siblings.values())
