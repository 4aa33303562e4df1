"""Weight-only quantisation of the exported LLM graphs: each MatMul whose weight is a constant
becomes onnxruntime's `MatMulNBits` (int4 or int8 codes in blocks of `BLOCK_SIZE` along the input
dimension). The activations, the KV cache, the embeddings (`embed_tokens.npy`, and the decode
graph's lookup) and the vision graph stay in the export's dtype: quantising the visual prefix moved
the soft prompt too far (RESULTS.md).

The default ("block", block_quant.py) writes GGUF's block formats: int4 as Q4_1 (a scale and a
minimum per block) with the LM head as Q8_0, int8 as Q8_0. blip2-mini's LLM ships in exactly
those formats, so its int4 export is lossless; onnxruntime's own round-to-nearest int4 (symmetric
or with integer zero points) lost 22-40 points of caption accuracy there, and its HQQ kept them but
writes float zero points, a slow path (RESULTS.md has each). Those stay reachable as
`algorithm="rtn"` / `"hqq"` for comparison.

Decoding reads every LLM weight once per token, so on a memory-bound machine the step time
follows the weights' bytes: fp32 4 bytes a weight, int8 1 + 4/32, int4 0.5 + 8/32 (scale and
minimum).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from blip2rt.errors import Blip2rtError

from .block_quant import rewrite_matmuls
from .export_config import CONFIG_FILE, MANIFEST_FILE, ExportConfig
from .graph_files import EXTERNAL_OVER, save_graph

log = logging.getLogger(__name__)

LLM_WEIGHTS = ("fp32", "int8", "int4")  # fp32: as exported (the --dtype's precision)
BITS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32
ALGORITHMS = ("block", "rtn", "hqq")
ALGORITHM = "block"
BLOCK_FORMAT = {"int4": "minmax", "int8": "absmax"}  # block_quant.py's formats: GGUF's Q4_1, Q8_0
BLOCK_WORDS = {"minmax": "a scale and a minimum", "absmax": "a scale, symmetric"}  # each block's parameters
HEAD_FORMAT = "absmax"  # the LM head in 8 bits under int4 too: GGUF files keep it there (Q8_0 or more)
SYMMETRIC = True  # rtn only
# MatMulNBits' accuracy level 4: activations quantised to int8 per block for the product, the
# fastest kernels on CPUs with integer dot products (onnxruntime's own recommendation for CPU)
ACCURACY_LEVEL = 4
# The LM head quantised like the other MatMuls, or kept in the export's dtype (RESULTS.md has both)
QUANTIZE_LM_HEAD = True


def lm_head_nodes(model, vocab: int) -> list[str]:
    """The MatMul nodes whose constant weight is (width, vocab): the LM head."""
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and len(n.input) > 1 and weights.get(n.input[1], [None])[-1:] == [vocab]]


def describe(weights: dict) -> str:
    """One line for an export's "llm_weights" record, e.g. 'int4 (MatMulNBits in blocks of 32 with a
    scale and a minimum; LM head int8; embeddings fp32)'."""
    if "block_size" not in weights:
        return weights["format"]
    blocks = f"blocks of {weights['block_size']}"
    if weights.get("blocks") in BLOCK_WORDS:
        blocks += f" with {BLOCK_WORDS[weights['blocks']]}"
    return (f"{weights['format']} (MatMulNBits in {blocks}; LM head {weights['lm_head']}; "
            f"embeddings {weights['embeddings']})")


def head_bits(llm_weights: str, lm_head: bool, algorithm: str = ALGORITHM) -> int | None:
    """The LM head's bits, or None where it keeps the export's dtype."""
    if not lm_head:
        return None
    return 8 if algorithm == "block" else BITS[llm_weights]


def quantize_graph(path: Path, llm_weights: str, vocab: int, lm_head: bool, external_over: int = EXTERNAL_OVER,
                   algorithm: str = ALGORITHM, block_size: int = BLOCK_SIZE, symmetric: bool = SYMMETRIC,
                   accuracy_level: int = ACCURACY_LEVEL, dest: Path | None = None) -> dict:
    """Rewrites the graph at `path` in place, or writes it to `dest`; returns what it quantised. algorithm: "block" (GGUF's
    block formats, block_quant.py), or onnxruntime's quantiser: "rtn" (round to nearest per block)
    or "hqq" (half-quadratic: scales and zero points fitted per block, no calibration data; needs
    torch)."""
    import onnx

    if llm_weights not in BITS:
        raise Blip2rtError(f"--llm-weights {llm_weights!r}: expected one of {', '.join(LLM_WEIGHTS)}")
    if algorithm not in ALGORITHMS:
        raise Blip2rtError(f"quantisation algorithm {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
    model = onnx.load(str(path))
    head = lm_head_nodes(model, vocab)
    constants = {t.name: len(t.dims) for t in model.graph.initializer}
    weighted = [n for n in model.graph.node if n.op_type == "MatMul" and constants.get(n.input[1]) == 2]
    before = len(weighted)  # weights, not QK/AV
    if algorithm == "block":
        chosen = [n for n in weighted if lm_head or n.name not in head]
        formats = {n.name: HEAD_FORMAT if n.name in head else BLOCK_FORMAT[llm_weights] for n in chosen}
        if len(formats) != len(chosen):
            raise Blip2rtError(f"{path.name}: MatMul nodes without unique names; cannot quantise by name")
        out = model
        quantized = rewrite_matmuls(out, formats, block_size, accuracy_level)
    else:
        out, quantized = _ort_quantiser(model, head, llm_weights, lm_head, algorithm, block_size, symmetric,
                                        accuracy_level)
    if quantized == 0:
        raise Blip2rtError(f"{path.name}: found no MatMul weight to quantise")
    size = save_graph(out, dest or path, external_over)
    log.info("%s: %d of %d MatMul weights to %s MatMulNBits (%.0f MB of weights)", path.name, quantized, before,
             llm_weights, size / 1e6)
    ops = sum(n.op_type == "MatMulNBits" for n in out.graph.node)  # fewer where siblings were merged
    return {"matmuls": quantized, "kept": before - quantized, "matmul_nbits": ops}  # kept: left in the dtype


def _ort_quantiser(model, head: list[str], llm_weights: str, lm_head: bool, algorithm: str, block_size: int,
                   symmetric: bool, accuracy_level: int):
    """onnxruntime's MatMulNBitsQuantizer over the graph: (the new model, MatMuls quantised)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    bits = BITS[llm_weights]
    if algorithm == "hqq":
        config = HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits, op_types_to_quantize=("MatMul",))
    else:
        config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits,
                                              accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=[] if lm_head else head, algo_config=config)
    quantizer.process()
    out = quantizer.model.model
    quantized = 0
    for node in out.graph.node:
        if node.op_type == "MatMulNBits":
            quantized += 1
            if not any(a.name == "accuracy_level" for a in node.attribute):  # HQQ sets none
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", accuracy_level))
    return out, quantized


def quantize_export(export_dir: str | Path, llm_weights: str, lm_head: bool = QUANTIZE_LM_HEAD,
                    external_over: int = EXTERNAL_OVER, to: str | Path | None = None,
                    accuracy_level: int = ACCURACY_LEVEL) -> dict:
    """Quantises the LLM graphs of a finished export folder (what `export --llm-weights` does after
    writing it) in place, or into a new folder `to` beside an untouched fp32 one (an earlier export
    there is replaced), and records it in blip2rt_export.json and manifest.json under "llm_weights";
    returns the updated manifest. accuracy_level: MatMulNBits' (4: int8 activations in the product,
    the fast one; 1: fp32, for telling the weights' error from the activations')."""
    src = Path(export_dir)
    cfg = ExportConfig.read(src)
    before = cfg.llm_weights["format"]
    if before not in ("fp32", "fp16"):
        raise Blip2rtError(f"{src} already holds {before} LLM weights; quantise an fp32 or fp16 export")
    graphs = cfg.llm_graphs
    out = src if to is None else Path(to)
    if out != src:
        if out.resolve() == src.resolve():
            raise Blip2rtError(f"quantising {src} into itself: leave `to` out for in place")
        if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
            raise Blip2rtError(f"{out} holds files but no export; quantise into an empty folder or an earlier export")
        shutil.rmtree(out, ignore_errors=True)
        rewritten = {name for key in graphs for name in (cfg.graphs[key], cfg.graphs[key] + ".data")}
        shutil.copytree(src, out, ignore=lambda folder, names: [n for n in names if n in rewritten])
    manifest_path = out / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    done = {key: quantize_graph(src / cfg.graphs[key], llm_weights, cfg.vocab_size, lm_head, external_over,
                                accuracy_level=accuracy_level, dest=out / cfg.graphs[key])
            for key in graphs}
    head = head_bits(llm_weights, lm_head)
    cfg.llm_weights = manifest["llm_weights"] = {
        "format": llm_weights, "algorithm": ALGORITHM, "blocks": BLOCK_FORMAT[llm_weights], "activations": cfg.dtype,
        "block_size": BLOCK_SIZE, "accuracy_level": accuracy_level, "lm_head": f"int{head}" if head else cfg.dtype,
        "embeddings": cfg.dtype, "graphs": done}
    cfg.write(out)
    manifest["bytes_on_disk"] = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest
