"""Export a BLIP-2 model to an ONNX folder that ONNX Runtime runs without PyTorch model code.

The three-graph layout of onnxruntime-genai's vision-language models:
- `vision.onnx`: pixel_values (B, 3, S, S) -> soft_prompt (B, Q, W): ViT + ln_vision + Q-Former
  + projection; a model fine-tuned for VQA with the question in the Q-Former also takes
  qformer_input_ids / qformer_attention_mask (B, Tq), and the export carries the Q-Former's
  tokenizer as `qformer_tokenizer.json`;
- decoder-only LLMs: `embed_tokens.npy` (the input embedding table), `prefill.onnx`
  (inputs_embeds, attention_mask, position_ids -> logits of the last position + the KV cache)
  and `decode.onnx` (one token, mask, position, past KV -> logits + present KV);
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
from pathlib import Path

import numpy as np
import torch
from torch import nn

from blip2rt.errors import Blip2rtError
from blip2rt.model import Blip2

from blip2rt.tokenization import QFORMER_MAX_TEXT_TOKENS

from .ort_runtime import EXPORT_CONFIG, QFORMER_TOKENIZER_FILE, kv_names

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
EXTERNAL_OVER = 1800 * 1024**2  # weights above this go to external data: protobuf's limit is 2 GB


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


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic_shapes, opset: int | None, external_over: int = EXTERNAL_OVER, rewrite: bool = False) -> None:
    """One graph; its weights go to `<name>.onnx.data` beside it when they pass `external_over`
    bytes (protobuf cannot hold a file over 2 GB).

    TorchScript's exporter traces the module once and folds its constants: for blip2-mini's LLM
    graphs it takes seconds where the dynamo exporter took over a minute each (benchmarks/RESULTS.md).
    `dynamic_shapes` names each input's dynamic axes with torch.export Dims (their names become the
    graph's dimension names); outputs take the axes of the inputs they follow (see _output_axes).

    rewrite: also run onnxscript's optimizer over the graph; only the offline ORT optimizer needs
    it (without it, that finds no SkipLayerNormalization to fuse). ORT optimizes every graph as it
    loads it, and ran the unrewritten graphs at the same speed, with the same captions.
    """
    t0 = time.perf_counter()
    module.eval()
    axes = _input_axes(input_names, dynamic_shapes)
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
            torch.onnx.export(module, args, str(traced), dynamo=False, input_names=input_names,
                              output_names=output_names, dynamic_axes=axes, opset_version=opset or DEFAULT_OPSET,
                              do_constant_folding=True)
        model = onnx.load(str(traced))
    if rewrite:
        import onnxscript

        model = onnxscript.optimizer.optimize(model)
    weight_bytes = sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                       for t in model.graph.initializer)
    external = weight_bytes > external_over
    onnx.save(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
              location=path.name + ".data" if external else None)
    log.info("exported %s in %.1fs (%.0f MB of weights%s)", path.name, time.perf_counter() - t0, weight_bytes / 1e6,
             ", external data" if external else "")


DEFAULT_OPSET = 18


def _dim_name(d) -> str:
    return getattr(d, "__name__", None) or str(d).replace(" ", "")


def _input_axes(input_names: list[str], dynamic_shapes) -> dict[str, dict[int, str]]:
    """{input name: {axis: dimension name}} from the Dims of `dynamic_shapes` (a tuple with one entry
    per argument; a varargs argument's entry is itself a tuple)."""
    flat = []
    for entry in dynamic_shapes:
        flat.extend(entry if isinstance(entry, tuple) else [entry])
    if len(flat) != len(input_names):
        raise ValueError(f"{len(flat)} dynamic-shape entries for {len(input_names)} inputs")
    return {name: {axis: _dim_name(d) for axis, d in spec.items()} for name, spec in zip(input_names, flat) if spec}


def _output_axes(output_names: list[str], axes: dict[str, dict[int, str]]) -> dict[str, dict[int, str]]:
    """Outputs' dynamic axes: the batch of the first input on every output; the soft prompt's and
    the logits' other axes are fixed; a KV output's length axis (2) takes the cache's name."""
    batch = next(iter(axes.values()))[0] if axes else "batch"
    out = {}
    for name in output_names:
        out[name] = {0: batch}
        if name.startswith(("present.", "cross.")):
            out[name][2] = f"{name.split('.')[0]}_length"
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

    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    probe = "a photo of"
    full = tok(probe)["input_ids"]
    bare = raw.encode(probe).ids
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    raise Blip2rtError("the tokenizer's tokenizer.json does not reproduce its Python tokenizer; cannot export it")


def export_model(model: Blip2, out_dir: str | Path, dtype: str = "fp32", opset: int | None = None,
                 optimize: bool = False, external_over: int = EXTERNAL_OVER) -> dict:
    """Writes the ONNX folder; returns the manifest.

    dtype: fp32, or fp16 (a half copy is exported; `model` itself is left as it was).
    optimize: run torch.onnx's graph rewriter, then onnxruntime's transformer optimizer; the manifest's
        "fusions" say what it fused. Without it the export is about a third faster (see _export).
    external_over: weight bytes above which a graph keeps its weights in `<graph>.onnx.data`.
    """
    if not model.config.with_llm:
        raise Blip2rtError("export needs a model with an LLM (captioning / VQA); this one is retrieval-only")
    if model.tokenizer is None:
        raise Blip2rtError("export needs the LLM's tokenizer files beside the checkpoint")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dtype not in ("fp32", "fp16"):
        raise Blip2rtError(f"--dtype {dtype!r}: expected fp32 or fp16")
    model = model.eval().to("cpu")
    backend = model.kernel_backend
    model.set_kernel_backend("torch")  # the graphs hold plain ONNX ops
    try:
        return _export_all(copy.deepcopy(model).half() if dtype == "fp16" else model, out, dtype, opset, optimize,
                           external_over)
    finally:
        model.set_kernel_backend(backend)


def _export_all(model: Blip2, out: Path, dtype: str, opset: int | None, optimize: bool, external_over: int) -> dict:
    float_dtype = torch.float16 if dtype == "fp16" else torch.float32
    lm = model.language_model
    cfg = lm.config
    size = model.config.vision_config.image_size
    batch = torch.export.Dim("batch", min=1, max=1024)
    graphs = {}

    px = torch.randn(2, 3, size, size, dtype=float_dtype)
    if model.config.question_in_qformer:  # the soft prompt is conditioned on the question
        qlen = torch.export.Dim("question", min=2, max=QFORMER_MAX_TEXT_TOKENS)
        qids, qmask = model.question_ids(["what colour?", "which shape is it?"])
        _export(VisualPrefix(model), (px, qids.cpu(), qmask.cpu()), out / "vision.onnx",
                ["pixel_values", "qformer_input_ids", "qformer_attention_mask"], ["soft_prompt"],
                ({0: batch}, {0: batch, 1: qlen}, {0: batch, 1: qlen}), opset, external_over, optimize)
        _write_qformer_tokenizer(model.qformer_tokenizer, out / QFORMER_TOKENIZER_FILE)
    else:
        _export(VisualPrefix(model), (px,), out / "vision.onnx", ["pixel_values"], ["soft_prompt"], ({0: batch},),
                opset, external_over, optimize)
    graphs["vision"] = "vision.onnx"

    width = lm.get_input_embeddings().embedding_dim
    np.save(out / "embed_tokens.npy", lm.get_input_embeddings().weight.detach().float().numpy().astype(
        np.float16 if dtype == "fp16" else np.float32))
    seq = torch.export.Dim("seq", min=1, max=4096)
    if model.config.is_encoder_decoder:
        emb = torch.randn(2, 6, width, dtype=float_dtype)
        mask = torch.ones(2, 6, dtype=torch.long)
        _export(T5Encoder(lm), (emb, mask), out / "encoder.onnx", ["inputs_embeds", "attention_mask"],
                ["encoder_hidden_states"], ({0: batch, 1: seq}, {0: batch, 1: seq}), opset, external_over, optimize)
        layers = cfg.num_decoder_layers if getattr(cfg, "num_decoder_layers", None) else cfg.num_layers
        kv_heads, head_dim = cfg.num_heads, cfg.d_kv
        past_names, present_names = kv_names("past", layers), kv_names("present", layers)
        cross_names = kv_names("cross", layers)
        hidden = torch.randn(2, 6, width, dtype=float_dtype)
        _export(T5DecoderFirst(lm, layers), (torch.zeros(2, 1, dtype=torch.long), hidden, mask), out / "decoder.onnx",
                ["decoder_input_ids", "encoder_hidden_states", "encoder_attention_mask"],
                ["logits", *present_names, *cross_names],
                ({0: batch}, {0: batch, 1: seq}, {0: batch, 1: seq}), opset, external_over, optimize)
        past = torch.export.Dim("past", min=1, max=4096)
        own = [torch.randn(2, kv_heads, 3, head_dim, dtype=float_dtype) for _ in range(2 * layers)]
        cross = [torch.randn(2, kv_heads, 6, head_dim, dtype=float_dtype) for _ in range(2 * layers)]
        _export(T5DecoderWithPast(lm, layers), (torch.zeros(2, 1, dtype=torch.long), mask, *own, *cross),
                out / "decoder_with_past.onnx", ["input_ids", "encoder_attention_mask", *past_names, *cross_names],
                ["logits", *present_names],
                ({0: batch}, {0: batch, 1: seq}, tuple({0: batch, 2: past} for _ in own)
                 + tuple({0: batch, 2: seq} for _ in cross)), opset, external_over, optimize)
        graphs.update(encoder="encoder.onnx", decoder="decoder.onnx", decoder_with_past="decoder_with_past.onnx")
    else:
        layers = cfg.num_hidden_layers
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        past_names, present_names = kv_names("past", layers), kv_names("present", layers)
        emb = torch.randn(2, 7, width, dtype=float_dtype)
        mask = torch.ones(2, 7, dtype=torch.long)
        pos = torch.arange(7).expand(2, 7).contiguous()
        _export(Prefill(lm, layers), (emb, mask, pos), out / "prefill.onnx",
                ["inputs_embeds", "attention_mask", "position_ids"], ["logits", *present_names],
                ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: seq}), opset, external_over, optimize)
        past = torch.export.Dim("past", min=1, max=4096)
        kv = [torch.randn(2, kv_heads, 5, head_dim, dtype=float_dtype) for _ in range(2 * layers)]
        _export(Decode(lm, layers), (torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 6, dtype=torch.long),
                                     torch.full((2, 1), 5), *kv), out / "decode.onnx",
                ["input_ids", "attention_mask", "position_ids", *past_names], ["logits", *present_names],
                ({0: batch}, {0: batch, 1: past + 1}, {0: batch}, tuple({0: batch, 2: past} for _ in kv)), opset, external_over, optimize)
        graphs.update(prefill="prefill.onnx", decode="decode.onnx")

    fusions = {}
    if optimize:  # ViT-style fusions for the vision graph, BERT-style (LayerNorm, SkipLayerNorm, BiasGelu) for the rest
        for name, f in graphs.items():
            fusions[name] = _optimize(out / f, "vit" if name == "vision" else "bert")
            log.info("optimised %s: %s", f, fusions[name] or "nothing fused")
    _write_reorder_graph(out / "reorder_kv.onnx", 2 * layers, dtype, opset)
    graphs["reorder_kv"] = "reorder_kv.onnx"

    model.tokenizer.save_pretrained(out)
    if not (out / "tokenizer.json").is_file():
        raise Blip2rtError("the LLM tokenizer has no tokenizer.json (a fast tokenizer is needed for the ONNX runtime)")
    prepend, append = _tokenizer_edges(model.tokenizer, out)
    model.config.save(out)
    gen = lm.generation_config
    runtime = {
        "format": 1, "dtype": dtype, "image_size": size,
        "image_mean": list(model.config.vision_config.image_mean), "image_std": list(model.config.vision_config.image_std),
        "num_query_tokens": model.config.num_query_tokens,
        "encoder_decoder": model.config.is_encoder_decoder, "model_type": cfg.model_type,
        "vocab_size": int(lm.get_output_embeddings().weight.shape[0]), "hidden_size": width,
        "num_layers": layers, "num_kv_heads": kv_heads, "head_dim": head_dim,
        "bos_token_id": cfg.bos_token_id, "bos_before_soft_prompt": model.config.bos_before_soft_prompt,
        "eos_token_id": gen.eos_token_id if gen.eos_token_id is not None else cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id if cfg.pad_token_id is not None else 0,
        "decoder_start_token_id": getattr(cfg, "decoder_start_token_id", None),
        "tokenizer_prepend_ids": prepend, "tokenizer_append_ids": append,
        "tokenizer_pad_id": model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0,
        "question_in_qformer": model.config.question_in_qformer,
        "graphs": graphs,
    }
    (out / EXPORT_CONFIG).write_text(json.dumps(runtime, indent=2))
    import onnx
    import onnxruntime

    manifest = {
        "blip2rt": __import__("blip2rt").__version__, "torch": torch.__version__, "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "graphs": {name: _io(out / f) for name, f in graphs.items()},
        "optimized": optimize, "fusions": fusions,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest

