"""Export a BLIP-2 model to an ONNX folder that ONNX Runtime runs without PyTorch model code.

The three-graph layout of onnxruntime-genai's vision-language models:
- `vision.onnx`: pixel_values (B, 3, S, S) -> soft_prompt (B, Q, W): ViT + ln_vision + Q-Former
  + projection; a model fine-tuned for VQA with the question in the Q-Former also takes
  qformer_input_ids / qformer_attention_mask (B, Tq), and the export carries the Q-Former's
  tokenizer as `qformer_tokenizer.json`;
- decoder-only LLMs: `embed_tokens.npy` (the input embedding table), `prefill.onnx`
  (inputs_embeds, attention_mask, position_ids -> logits of the last position + the KV cache)
  and `decode.onnx` (one token, mask, position, past KV -> logits + present KV), and
  `static_lm.onnx` (embeddings, a full-length mask, positions, the write position, a logit bias,
  fixed-length KV buffers -> logits, the greedy ids, the buffers written at that position);
- T5: `encoder.onnx` (inputs_embeds, attention_mask -> hidden states), `decoder.onnx` (the first
  step: start token, encoder states, mask -> logits + self KV + cross KV) and
  `decoder_with_past.onnx` (one token, mask, self KV, cross KV -> logits + present self KV).
Plus the tokenizer files, `blip2rt_export.json` (the runtime's config) and `manifest.json`
(versions and the I/O names and shapes of every graph).

Exporter notes: TorchScript's exporter (one trace; see _export), explicit position_ids, weights
in external data past 1.8 GB, and dynamic axes named by torch.export Dims.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from blip2rt.errors import Blip2rtError
from blip2rt.llm import position_limit
from blip2rt.model import Blip2

from blip2rt.tokenization import QFORMER_MAX_TEXT_TOKENS

from .export_config import EMBEDDINGS_FILE, MANIFEST_FILE, QFORMER_TOKENIZER_FILE, TOKENIZER_FILE, ExportConfig, kv_names
from .graph_files import EXTERNAL_OVER, save_graph
from .quantize import LLM_WEIGHTS, QUANTIZE_LM_HEAD, quantize_export

log = logging.getLogger(__name__)



class VisualPrefix(nn.Module):
    def __init__(self, model: Blip2):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, qformer_input_ids: torch.Tensor | None = None,
                qformer_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.image_features(pixel_values, qformer_input_ids, qformer_attention_mask)


def _cache_tensors(cache, layers: int) -> list[torch.Tensor]:
    out = []
    for i in range(layers):
        layer = cache.layers[i]
        out += [layer.keys, layer.values]
    return out


class Prefill(nn.Module):
    def __init__(self, lm: nn.Module, layers: int):
        super().__init__()
        self.lm, self.layers = lm, layers

    def forward(self, inputs_embeds, attention_mask, position_ids):
        from transformers import DynamicCache

        out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=DynamicCache(), use_cache=True)
        return (out.logits[:, -1], *_cache_tensors(out.past_key_values, self.layers))


class Decode(nn.Module):
    def __init__(self, lm: nn.Module, layers: int):
        super().__init__()
        self.lm, self.layers = lm, layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=cache, use_cache=True)
        return (out.logits[:, -1], *_cache_tensors(out.past_key_values, self.layers))


class T5Encoder(nn.Module):
    def __init__(self, lm: nn.Module):
        super().__init__()
        self.encoder = lm.get_encoder()

    def forward(self, inputs_embeds, attention_mask):
        return self.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state


def _t5_cache(self_kv, cross_kv, layers: int):
    from transformers import DynamicCache, EncoderDecoderCache

    own, cross = DynamicCache(), DynamicCache()
    for i in range(layers):
        if self_kv:
            own.update(self_kv[2 * i], self_kv[2 * i + 1], i)
        if cross_kv:
            cross.update(cross_kv[2 * i], cross_kv[2 * i + 1], i)
    return EncoderDecoderCache(own, cross)


class T5DecoderFirst(nn.Module):
    """The first decoder step: logits + the self-attention KV + the cross-attention KV it computed."""

    def __init__(self, lm: nn.Module, layers: int):
        super().__init__()
        self.lm, self.layers = lm, layers

    def forward(self, decoder_input_ids, encoder_hidden_states, encoder_attention_mask):
        from transformers.modeling_outputs import BaseModelOutput

        out = self.lm(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states),
                      attention_mask=encoder_attention_mask, decoder_input_ids=decoder_input_ids,
                      past_key_values=_t5_cache(None, None, self.layers), use_cache=True)
        cache = out.past_key_values
        return (out.logits[:, -1], *_cache_tensors(cache.self_attention_cache, self.layers),
                *_cache_tensors(cache.cross_attention_cache, self.layers))


class T5DecoderWithPast(nn.Module):
    """One more decoder token over the cached self-attention KV and the fixed cross-attention KV."""

    def __init__(self, lm: nn.Module, layers: int):
        super().__init__()
        self.lm, self.layers = lm, layers

    def forward(self, input_ids, encoder_attention_mask, *kv):
        from transformers.modeling_outputs import BaseModelOutput

        own, cross = kv[: 2 * self.layers], kv[2 * self.layers:]
        b, src = encoder_attention_mask.shape
        dummy = cross[0].new_zeros(b, src, self.lm.config.d_model)  # unused: the cross KV is cached
        out = self.lm(encoder_outputs=BaseModelOutput(last_hidden_state=dummy), attention_mask=encoder_attention_mask,
                      decoder_input_ids=input_ids, past_key_values=_t5_cache(own, cross, self.layers), use_cache=True)
        return (out.logits[:, -1], *_cache_tensors(out.past_key_values.self_attention_cache, self.layers))


def _export(spec: GraphSpec, path: Path, opset: int | None, external_over: int = EXTERNAL_OVER,
            rewrite: bool = False) -> None:
    """One graph; its weights go to `<name>.onnx.data` beside it when they pass `external_over`
    bytes (protobuf cannot hold a file over 2 GB).

    TorchScript's exporter traces the module once and folds its constants: for blip2-mini's LLM
    graphs it takes seconds where the dynamo exporter took over a minute each (benchmarks/RESULTS.md).
    The spec's Dims name each input's dynamic axes (their names become the graph's dimension
    names); outputs take the axes of the inputs they follow (see _output_axes).

    rewrite: also run onnxscript's optimizer over the graph; only the offline ORT optimizer needs
    it (without it, that finds no SkipLayerNormalization to fuse). ORT optimizes every graph as it
    loads it, and ran the unrewritten graphs at the same speed, with the same captions.
    """
    t0 = time.perf_counter()
    module = spec.module.eval()
    input_names = [name for name, _, _ in spec.inputs]
    output_names = spec.outputs
    args = tuple(t for _, t, _ in spec.inputs)
    axes = _input_axes(spec)
    axes.update(_output_axes(output_names, axes))
    import tempfile

    import onnx

    # a folder of its own: past 2 GB, TorchScript's exporter writes each weight as a file beside the graph
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        traced = Path(tmp) / path.name
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)  # shape reads, traced as intended
            # torch recommends its dynamo exporter instead; it exports these graphs right, 10x slower
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export",
                                    category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
            # transformers' attention masks index with aranges, never negative: the padded-batch tests
            # check the graphs' logits and tokens against PyTorch
            warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
            # the static cache's in-place writes become scatters whose outputs are the graph's present.*;
            # the runtime binds past.i and present.i to one buffer, which makes them in place again
            warnings.filterwarnings("ignore", message="ONNX Preprocess - Removing mutation from node aten::index_copy_")
            torch.onnx.export(module, args, str(traced), dynamo=False, input_names=input_names,
                              output_names=output_names, dynamic_axes=axes, opset_version=opset or DEFAULT_OPSET,
                              do_constant_folding=True)
        model = onnx.load(str(traced))
    if rewrite:
        import onnxscript

        model = onnxscript.optimizer.optimize(model)
    size = save_graph(model, path, external_over)
    external = size > external_over
    log.info("exported %s in %.1fs (%.0f MB of weights%s)", path.name, time.perf_counter() - t0, size / 1e6,
             ", external data" if external else "")


DEFAULT_OPSET = 18


def _dim_name(d) -> str:
    return getattr(d, "__name__", None) or str(d).replace(" ", "")


def _input_axes(spec: GraphSpec) -> dict[str, dict[int, str]]:
    """{input name: {axis: dimension name}} from the spec's Dims."""
    return {name: {axis: _dim_name(d) for axis, d in dims.items()} for name, _, dims in spec.inputs if dims}


def _output_axes(output_names: list[str], axes: dict[str, dict[int, str]]) -> dict[str, dict[int, str]]:
    """Outputs' dynamic axes: the batch of the first input on every output; the soft prompt's and
    the logits' other axes are fixed; a KV output's length axis (2) takes the cache's name (the
    static cache's: its buffers' length)."""
    batch = next(iter(axes.values()))[0] if axes else "batch"
    static = axes.get("past.0", {}).get(2) == MAX_LENGTH.__name__
    out = {}
    for name in output_names:
        out[name] = {0: batch}
        if name.startswith(("present.", "cross.")):
            out[name][2] = MAX_LENGTH.__name__ if static else f"{name.split('.')[0]}_length"
        elif name == "encoder_hidden_states":
            out[name][1] = "seq"
    return out


def _write_reorder_graph(path: Path, tensors: int, dtype: str, opset: int | None) -> None:
    """`reorder_kv.onnx`: beam_idx (N,) and `tensors` KV tensors (N, H, T, D) -> the same rows
    gathered, so beam search can reorder the cache where it lives (the device, under IO binding)."""
    import onnx
    from onnx import TensorProto, helper

    elem = TensorProto.FLOAT16 if dtype == "fp16" else TensorProto.FLOAT
    dims = ["rows", "heads", "length", "head_dim"]
    inputs = [helper.make_tensor_value_info("beam_idx", TensorProto.INT64, ["beams"])]
    outputs, nodes = [], []
    for j in range(tensors):
        inputs.append(helper.make_tensor_value_info(f"in.{j}", elem, dims))
        outputs.append(helper.make_tensor_value_info(f"out.{j}", elem, ["beams", *dims[1:]]))
        nodes.append(helper.make_node("Gather", [f"in.{j}", "beam_idx"], [f"out.{j}"], axis=0))
    graph = helper.make_graph(nodes, "reorder_kv", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", min(opset or 18, 21))])
    model.ir_version = 9  # readable by onnxruntime >= 1.15
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _optimize(path: Path, model_type: str) -> dict[str, int]:
    """ORT's offline transformer optimizer on one graph, in place; returns the fused-op counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    # num_heads=0, hidden_size=0: detected from the graph; opt_level=0: only the Python fusions
    # (the session applies its own graph optimisations when it loads the file).
    m = optimize_model(str(path), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0)
    large = path.with_name(path.name + ".data").exists()
    m.save_model_to_file(str(path), use_external_data_format=large)
    return {k: v for k, v in m.get_fused_operator_statistics().items() if v}


def _write_qformer_tokenizer(tok, path: Path) -> None:
    """The Q-Former's WordPiece tokenizer as one tokenizer.json, for the runtime's questions, without
    the truncation or padding a call may have left set on it (the runtime sets its own); checked to
    give transformers' ids ([CLS] ... [SEP]) on a sample question."""
    import tempfile

    from tokenizers import Tokenizer

    if tok is None or not getattr(tok, "is_fast", False):
        raise Blip2rtError("exporting a model with the question in the Q-Former needs its fast Q-Former tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        raw = Tokenizer.from_file(str(Path(tmp) / "tokenizer.json"))
    raw.no_truncation()
    raw.no_padding()
    raw.save(str(path))
    probe = "is there a red circle in the image, or is there not?"
    if Tokenizer.from_file(str(path)).encode(probe).ids != tok(probe)["input_ids"]:
        raise Blip2rtError("the Q-Former tokenizer's tokenizer.json does not reproduce its Python tokenizer")


def _io(path: Path) -> dict:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def shape(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return {"inputs": {v.name: shape(v) for v in graph.input}, "outputs": {v.name: shape(v) for v in graph.output}}


def _tokenizer_edges(tok, folder: Path) -> tuple[list[int], list[int]]:
    """Ids transformers' tokenizer adds around tokenizer.json's own output (e.g. a BOS that a
    Python tokenizer class adds), so the runtime can reproduce it with `tokenizers` alone."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    probe = "a photo of"
    full = tok(probe)["input_ids"]
    bare = raw.encode(probe).ids
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    raise Blip2rtError("the tokenizer's tokenizer.json does not reproduce its Python tokenizer; cannot export it")


def export_model(model: Blip2, out_dir: str | Path, dtype: str = "fp32", opset: int | None = None,
                 optimize: bool = False, external_over: int = EXTERNAL_OVER, static_graph: bool = True,
                 llm_weights: str = "fp32") -> dict:
    """Writes the ONNX folder; returns the manifest.

    dtype: fp32, or fp16 (a half copy is exported; `model` itself is left as it was).
    optimize: run torch.onnx's graph rewriter, then onnxruntime's transformer optimizer; the manifest's
        "fusions" say what it fused. Without it the export is about a third faster (see _export).
    external_over: weight bytes above which a graph keeps its weights in `<graph>.onnx.data`.
    static_graph: decoder-only LLMs also get `static_lm.onnx` (greedy decoding over a static KV
        cache, one more copy of the LLM's weights); beam search keeps the prefill/decode graphs.
    llm_weights: "int8" or "int4" quantises the LLM graphs' MatMul weights to onnxruntime's
        MatMulNBits in GGUF's block formats (export/quantize.py); "fp32" leaves them in `dtype`.
        The vision graph and the embeddings keep `dtype`.
    """
    if not model.config.with_llm:
        raise Blip2rtError("export needs a model with an LLM (captioning / VQA); this one is retrieval-only")
    if model.tokenizer is None:
        raise Blip2rtError("export needs the LLM's tokenizer files beside the checkpoint")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dtype not in ("fp32", "fp16"):
        raise Blip2rtError(f"--dtype {dtype!r}: expected fp32 or fp16")
    if llm_weights not in LLM_WEIGHTS:
        raise Blip2rtError(f"--llm-weights {llm_weights!r}: expected one of {', '.join(LLM_WEIGHTS)}")
    model = model.eval().to("cpu")
    backend = model.kernel_backend
    model.set_kernel_backend("torch")  # the graphs hold plain ONNX ops
    traced = model
    if dtype == "fp16":
        traced = copy.deepcopy(model).half()
        # transformers' eager attention: fp16 products with an fp32 softmax cast back. torch.onnx's
        # lowering of SDPA casts Q·K and V to fp32 and leaves the attention output there, so OPT's
        # next LayerNorm met fp32 input with fp16 weights and the graph failed to load, and Llama's
        # attention and o_proj ran in fp32
        traced.language_model.set_attn_implementation("eager")
    try:
        return _export_all(traced, out, dtype, opset, optimize, external_over, static_graph, llm_weights)
    finally:
        model.set_kernel_backend(backend)


@dataclass
class GraphSpec:
    """One graph of the export: the module traced, example inputs, and every input's and output's
    name with the dynamic axes of each input (torch.export Dims; outputs follow their inputs)."""

    key: str  # its name in blip2rt_export.json's "graphs"
    module: nn.Module
    inputs: list[tuple[str, torch.Tensor, dict]]  # (name, example, {axis: Dim})
    outputs: list[str]

    @property
    def file(self) -> str:
        return f"{self.key}.onnx"


@dataclass
class LlmShape:
    """What the graph specs and the runtime config need to know of the LLM."""

    width: int
    layers: int
    kv_heads: int
    head_dim: int


def _llm_shape(model: Blip2) -> LlmShape:
    lm = model.language_model
    cfg = lm.config
    width = lm.get_input_embeddings().embedding_dim
    if model.config.is_encoder_decoder:
        layers = cfg.num_decoder_layers if getattr(cfg, "num_decoder_layers", None) else cfg.num_layers
        return LlmShape(width, layers, cfg.num_heads, cfg.d_kv)
    heads = cfg.num_attention_heads
    return LlmShape(width, cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads,
                    getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)


# The dynamic axes every graph names; examples use batch 2 and short lengths.
BATCH = torch.export.Dim("batch", min=1, max=1024)
SEQ = torch.export.Dim("seq", min=1, max=4096)
PAST = torch.export.Dim("past", min=1, max=4096)
MAX_LENGTH = torch.export.Dim("max_length", min=2, max=4096)  # the static cache's length
QUESTION = torch.export.Dim("question", min=2, max=QFORMER_MAX_TEXT_TOKENS)


def _vision_spec(model: Blip2, dtype: torch.dtype) -> GraphSpec:
    size = model.config.vision_config.image_size
    inputs = [("pixel_values", torch.randn(2, 3, size, size, dtype=dtype), {0: BATCH})]
    if model.config.question_in_qformer:  # the soft prompt is conditioned on the question
        qids, qmask = model.question_ids(["what colour?", "which shape is it?"])
        inputs += [("qformer_input_ids", qids.cpu(), {0: BATCH, 1: QUESTION}),
                   ("qformer_attention_mask", qmask.cpu(), {0: BATCH, 1: QUESTION})]
    return GraphSpec("vision", VisualPrefix(model), inputs, ["soft_prompt"])


def _static_spec(lm: nn.Module, s: LlmShape, dtype: torch.dtype) -> GraphSpec:
    """`static_lm.onnx`: the LLM over KV buffers of a fixed length L, written in place at
    `write_at`, for the prefill (T = prompt) and every greedy step (T = 1); it also returns the
    greedy choice, so a step sends only the ids back to the host."""
    from blip2rt.static_decoding import StaticLM

    past = kv_names("past", s.layers)
    vocab = lm.get_output_embeddings().weight.shape[0]
    return GraphSpec("static_lm", StaticLM(lm), [
        ("inputs_embeds", torch.randn(2, 3, s.width, dtype=dtype), {0: BATCH, 1: SEQ}),
        ("attention_mask", torch.ones(2, 20, dtype=torch.long), {0: BATCH, 1: MAX_LENGTH}),
        ("position_ids", torch.arange(3).expand(2, 3).contiguous(), {0: BATCH, 1: SEQ}),
        ("write_at", torch.tensor(0), {}),
        ("token_bias", torch.zeros(1, vocab), {}),
        *((name, torch.zeros(2, s.kv_heads, 20, s.head_dim, dtype=dtype), {0: BATCH, 2: MAX_LENGTH}) for name in past),
    ], ["logits", "next_ids", *kv_names("present", s.layers)])


def _kv_written_in_place(path: Path, layers: int) -> bool:
    """Whether each `past.i` of the static graph is read only by its shape and by one scatter that
    yields `present.i`: then binding both names to one buffer updates the cache in place."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    for i, name in enumerate(kv_names("past", layers)):
        users = [n for n in graph.node if name in n.input]
        writes = [n for n in users if n.op_type != "Shape"]
        if len(writes) != 1 or writes[0].op_type != "ScatterElements" or writes[0].input[0] != name \
                or list(writes[0].output) != [f"present.{name.split('.', 1)[1]}"]:
            return False
    return True


def _decoder_only_specs(lm: nn.Module, s: LlmShape, dtype: torch.dtype) -> list[GraphSpec]:
    past, present = kv_names("past", s.layers), kv_names("present", s.layers)
    kv = [torch.randn(2, s.kv_heads, 5, s.head_dim, dtype=dtype) for _ in past]
    return [
        GraphSpec("prefill", Prefill(lm, s.layers), [
            ("inputs_embeds", torch.randn(2, 7, s.width, dtype=dtype), {0: BATCH, 1: SEQ}),
            ("attention_mask", torch.ones(2, 7, dtype=torch.long), {0: BATCH, 1: SEQ}),
            ("position_ids", torch.arange(7).expand(2, 7).contiguous(), {0: BATCH, 1: SEQ}),
        ], ["logits", *present]),
        GraphSpec("decode", Decode(lm, s.layers), [
            ("input_ids", torch.zeros(2, 1, dtype=torch.long), {0: BATCH}),
            ("attention_mask", torch.ones(2, 6, dtype=torch.long), {0: BATCH, 1: PAST + 1}),
            ("position_ids", torch.full((2, 1), 5), {0: BATCH}),
            *((name, t, {0: BATCH, 2: PAST}) for name, t in zip(past, kv)),
        ], ["logits", *present]),
    ]


def _t5_specs(lm: nn.Module, s: LlmShape, dtype: torch.dtype) -> list[GraphSpec]:
    past, present, cross = kv_names("past", s.layers), kv_names("present", s.layers), kv_names("cross", s.layers)
    mask = ("encoder_attention_mask", torch.ones(2, 6, dtype=torch.long), {0: BATCH, 1: SEQ})
    start = torch.zeros(2, 1, dtype=torch.long)
    return [
        GraphSpec("encoder", T5Encoder(lm), [
            ("inputs_embeds", torch.randn(2, 6, s.width, dtype=dtype), {0: BATCH, 1: SEQ}),
            ("attention_mask", torch.ones(2, 6, dtype=torch.long), {0: BATCH, 1: SEQ}),
        ], ["encoder_hidden_states"]),
        GraphSpec("decoder", T5DecoderFirst(lm, s.layers), [
            ("decoder_input_ids", start, {0: BATCH}),
            ("encoder_hidden_states", torch.randn(2, 6, s.width, dtype=dtype), {0: BATCH, 1: SEQ}),
            mask,
        ], ["logits", *present, *cross]),
        GraphSpec("decoder_with_past", T5DecoderWithPast(lm, s.layers), [
            ("input_ids", start, {0: BATCH}), mask,
            *((name, torch.randn(2, s.kv_heads, 3, s.head_dim, dtype=dtype), {0: BATCH, 2: PAST}) for name in past),
            *((name, torch.randn(2, s.kv_heads, 6, s.head_dim, dtype=dtype), {0: BATCH, 2: SEQ}) for name in cross),
        ], ["logits", *present]),
    ]


def _export_all(model: Blip2, out: Path, dtype: str, opset: int | None, optimize: bool, external_over: int,
                static_graph: bool, llm_weights: str) -> dict:
    float_dtype = torch.float16 if dtype == "fp16" else torch.float32
    lm = model.language_model
    cfg = lm.config
    size = model.config.vision_config.image_size
    shape = _llm_shape(model)
    family = _t5_specs if model.config.is_encoder_decoder else _decoder_only_specs
    specs = [_vision_spec(model, float_dtype), *family(lm, shape, float_dtype)]
    if static_graph and not model.config.is_encoder_decoder:
        specs.append(_static_spec(lm, shape, float_dtype))
    for spec in specs:
        _export(spec, out / spec.file, opset, external_over, rewrite=optimize)
    if model.config.question_in_qformer:
        _write_qformer_tokenizer(model.qformer_tokenizer, out / QFORMER_TOKENIZER_FILE)
    np.save(out / EMBEDDINGS_FILE, lm.get_input_embeddings().weight.detach().float().numpy().astype(
        np.float16 if dtype == "fp16" else np.float32))
    graphs = {spec.key: spec.file for spec in specs}
    width, layers, kv_heads, head_dim = shape.width, shape.layers, shape.kv_heads, shape.head_dim

    fusions = {}
    if optimize:  # ViT-style fusions for the vision graph, BERT-style (LayerNorm, SkipLayerNorm, BiasGelu) for the rest
        for name, f in graphs.items():
            fusions[name] = _optimize(out / f, "vit" if name == "vision" else "bert")
            log.info("optimised %s: %s", f, fusions[name] or "nothing fused")
    if "static_lm" in graphs and not _kv_written_in_place(out / graphs["static_lm"], layers):
        log.warning("the %s graph does not write its KV cache with one scatter per tensor; static_lm.onnx is left "
                    "out and greedy decoding uses the prefill/decode graphs", cfg.model_type)
        for f in out.glob("static_lm.onnx*"):
            f.unlink()
        del graphs["static_lm"]
        fusions.pop("static_lm", None)
    _write_reorder_graph(out / "reorder_kv.onnx", 2 * layers, dtype, opset)
    graphs["reorder_kv"] = "reorder_kv.onnx"

    model.tokenizer.save_pretrained(out)
    if not (out / TOKENIZER_FILE).is_file():
        raise Blip2rtError("the LLM tokenizer has no tokenizer.json (a fast tokenizer is needed for the ONNX runtime)")
    prepend, append = _tokenizer_edges(model.tokenizer, out)
    model.config.save(out)
    gen = lm.generation_config
    ExportConfig(
        dtype=dtype, image_size=size, image_mean=list(model.config.vision_config.image_mean),
        image_std=list(model.config.vision_config.image_std), num_query_tokens=model.config.num_query_tokens,
        encoder_decoder=model.config.is_encoder_decoder, model_type=cfg.model_type,
        vocab_size=int(lm.get_output_embeddings().weight.shape[0]), hidden_size=width, num_layers=layers,
        num_kv_heads=kv_heads, head_dim=head_dim, bos_token_id=cfg.bos_token_id,
        bos_before_soft_prompt=model.config.bos_before_soft_prompt,
        eos_token_id=gen.eos_token_id if gen.eos_token_id is not None else cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id if cfg.pad_token_id is not None else 0,
        decoder_start_token_id=getattr(cfg, "decoder_start_token_id", None),
        tokenizer_prepend_ids=prepend, tokenizer_append_ids=append,
        tokenizer_pad_id=model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0,
        question_in_qformer=model.config.question_in_qformer, graphs=graphs,
        max_positions=position_limit(cfg),
    ).write(out)
    import onnx
    import onnxruntime

    manifest = {
        "blip2rt": __import__("blip2rt").__version__, "torch": torch.__version__, "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "graphs": {name: _io(out / f) for name, f in graphs.items()},
        "optimized": optimize, "fusions": fusions, "llm_weights": {"format": dtype},
        "bytes_on_disk": {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()},
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    if llm_weights != "fp32":
        return quantize_export(out, llm_weights, lm_head=QUANTIZE_LM_HEAD, external_over=external_over)
    return manifest

