"""Weight-only quantisation of the exported LLM graphs, with onnxruntime's own quantiser: each
MatMul whose weight is a constant becomes a `MatMulNBits` (int4 or int8 weights in blocks of
`BLOCK_SIZE` along the input dimension, one scale per block, symmetric). The activations, the KV
cache, the embeddings (`embed_tokens.npy`, and the decode graph's lookup) and the vision graph stay
in the export's dtype: quantising the visual prefix moved the soft prompt too far (RESULTS.md).

Decoding reads every LLM weight once per token, so on a memory-bound machine the step time
follows the weights' bytes: fp32 4 bytes a weight, int8 1 + 4/32, int4 0.5 + 4/32.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from blip2rt.errors import Blip2rtError

from .graph_files import EXTERNAL_OVER, save_graph

log = logging.getLogger(__name__)

LLM_WEIGHTS = ("fp32", "int8", "int4")  # fp32: as exported (the --dtype's precision)
BITS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32
ALGORITHM = "rtn"
SYMMETRIC = True
# MatMulNBits' accuracy level 4: activations quantised to int8 per block for the product, the
# fastest kernels on CPUs with integer dot products (onnxruntime's own recommendation for CPU)
ACCURACY_LEVEL = 4
NOT_LLM = ("vision", "reorder_kv")  # every other graph of an export runs the LLM
# The LM head quantised like the other MatMuls, or kept in the export's dtype (RESULTS.md has both)
QUANTIZE_LM_HEAD = True


def lm_head_nodes(model, vocab: int) -> list[str]:
    """The MatMul nodes whose constant weight is (width, vocab): the LM head."""
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and len(n.input) > 1 and weights.get(n.input[1], [None])[-1:] == [vocab]]


def quantize_graph(path: Path, llm_weights: str, vocab: int, lm_head: bool, external_over: int = EXTERNAL_OVER,
                   algorithm: str = ALGORITHM, block_size: int = BLOCK_SIZE, symmetric: bool = SYMMETRIC) -> dict:
    """Rewrites the graph at `path` in place; returns what it quantised. algorithm: "rtn" (round to
    nearest per block) or "hqq" (half-quadratic: scales and zero points fitted per block, no
    calibration data; needs torch)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    if llm_weights not in BITS:
        raise Blip2rtError(f"--llm-weights {llm_weights!r}: expected one of {', '.join(LLM_WEIGHTS)}")
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    model = onnx.load(str(path))
    head = lm_head_nodes(model, vocab)
    constants = {t.name for t in model.graph.initializer}
    before = sum(n.op_type == "MatMul" and n.input[1] in constants for n in model.graph.node)  # weights, not QK/AV
    bits = BITS[llm_weights]
    if algorithm == "hqq":
        config = HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits, op_types_to_quantize=("MatMul",))
    else:
        config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits,
                                              accuracy_level=ACCURACY_LEVEL, op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=[] if lm_head else head, algo_config=config)
    quantizer.process()
    out = quantizer.model.model
    quantized = 0
    for node in out.graph.node:
        if node.op_type == "MatMulNBits":
            quantized += 1
            if not any(a.name == "accuracy_level" for a in node.attribute):  # HQQ sets none
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", ACCURACY_LEVEL))
    if quantized == 0:
        raise Blip2rtError(f"{path.name}: onnxruntime's quantiser found no MatMul weight to quantise")
    size = save_graph(out, path, external_over)
    log.info("%s: %d of %d MatMul weights to %s MatMulNBits (%.0f MB of weights)", path.name, quantized, before,
             llm_weights, size / 1e6)
    return {"matmuls": quantized, "kept": before - quantized}  # kept: MatMul weights left in the dtype


def quantize_export(export_dir: str | Path, llm_weights: str, lm_head: bool = QUANTIZE_LM_HEAD,
                    external_over: int = EXTERNAL_OVER) -> dict:
    """Quantises the LLM graphs of a finished export folder in place (what `export --llm-weights`
    does after writing it) and records it in blip2rt_export.json and manifest.json under
    "llm_weights"; returns the updated manifest."""
    from .ort_runtime import EXPORT_CONFIG

    out = Path(export_dir)
    cfg_path, manifest_path = out / EXPORT_CONFIG, out / "manifest.json"
    cfg, manifest = json.loads(cfg_path.read_text()), json.loads(manifest_path.read_text())
    before = cfg.get("llm_weights", {}).get("format", cfg["dtype"])
    if before not in ("fp32", "fp16"):
        raise Blip2rtError(f"{out} already holds {before} LLM weights; quantise an fp32 or fp16 export")
    graphs = [key for key in cfg["graphs"] if key not in NOT_LLM]
    done = {key: quantize_graph(out / cfg["graphs"][key], llm_weights, cfg["vocab_size"], lm_head, external_over)
            for key in graphs}
    weights = {"format": llm_weights, "activations": cfg["dtype"], "block_size": BLOCK_SIZE,
               "accuracy_level": ACCURACY_LEVEL, "lm_head": llm_weights if lm_head else cfg["dtype"],
               "embeddings": cfg["dtype"],
               "graphs": done}
    cfg["llm_weights"] = manifest["llm_weights"] = weights
    cfg_path.write_text(json.dumps(cfg, indent=2))
    manifest["bytes_on_disk"] = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest
