"""Export a BLIP-2 model to an ONNX folder that ONNX Runtime runs without PyTorch model code.

The three-graph layout of onnxruntime-genai's vision-language models:
- `vision.onnx`: pixel_values (B, 3, S, S) -> soft_prompt (B, Q, W): ViT + ln_vision + Q-Former
  + projection;
- decoder-only LLMs: `embed_tokens.npy` (the input embedding table), `prefill.onnx`
  (inputs_embeds, attention_mask, position_ids -> logits of the last position + the KV cache)
  and `decode.onnx` (one token, mask, position, past KV -> logits + present KV);
- T5: `encoder.onnx` (inputs_embeds, attention_mask -> hidden states) and `decoder.onnx`
  (decoder ids so far, encoder states and mask -> logits of the last position; no cache yet).
Plus the tokenizer files, `blip2rt_export.json` (the runtime's config) and `manifest.json`
(versions and the I/O names and shapes of every graph).

Exporter notes (DESIGN.md §5): dynamo export, `external_data=False` below 2 GB, explicit
position_ids, and varargs dynamic shapes as one tuple.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from blip2rt.errors import Blip2rtError
from blip2rt.model import Blip2

log = logging.getLogger(__name__)

EXPORT_CONFIG = "blip2rt_export.json"
MANIFEST = "manifest.json"
TWO_GB = 2 * 1024**3


class VisualPrefix(nn.Module):
    def __init__(self, model: Blip2):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.image_features(pixel_values)


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


class T5Decoder(nn.Module):
    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, decoder_input_ids, encoder_hidden_states, encoder_attention_mask):
        from transformers.modeling_outputs import BaseModelOutput

        out = self.lm(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states),
                      attention_mask=encoder_attention_mask, decoder_input_ids=decoder_input_ids, use_cache=False)
        return out.logits[:, -1]


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic_shapes, opset: int | None) -> None:
    t0 = time.perf_counter()
    module.eval()
    kwargs = dict(dynamo=True, dynamic_shapes=dynamic_shapes, input_names=input_names, output_names=output_names,
                  external_data=False)
    if opset is not None:
        kwargs["opset_version"] = opset
    with torch.no_grad():
        try:
            torch.onnx.export(module, args, str(path), **kwargs)
        except Exception as e:
            if "2GB" in str(e) or "2 GB" in str(e) or "protobuf" in str(e).lower():
                kwargs["external_data"] = True  # graphs over 2 GB keep their weights beside them
                torch.onnx.export(module, args, str(path), **kwargs)
            else:
                raise
    log.info("exported %s in %.1fs", path.name, time.perf_counter() - t0)


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


def export_model(model: Blip2, out_dir: str | Path, dtype: str = "fp32", opset: int | None = None) -> dict:
    """Writes the ONNX folder; returns the manifest."""
    if not model.config.with_llm:
        raise Blip2rtError("export needs a model with an LLM (captioning / VQA); this one is retrieval-only")
    if model.tokenizer is None:
        raise Blip2rtError("export needs the LLM's tokenizer files beside the checkpoint")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval().to("cpu")
    model.set_kernel_backend("torch")  # the graphs hold plain ONNX ops
    if dtype == "fp16":
        model = model.half()
    elif dtype != "fp32":
        raise Blip2rtError(f"--dtype {dtype!r}: expected fp32 or fp16")
    float_dtype = torch.float16 if dtype == "fp16" else torch.float32
    lm = model.language_model
    cfg = lm.config
    size = model.config.vision_config.image_size
    batch = torch.export.Dim("batch", min=1, max=1024)
    graphs = {}

    px = torch.randn(2, 3, size, size, dtype=float_dtype)
    _export(VisualPrefix(model), (px,), out / "vision.onnx", ["pixel_values"], ["soft_prompt"], ({0: batch},), opset)
    graphs["vision"] = "vision.onnx"

    width = lm.get_input_embeddings().embedding_dim
    np.save(out / "embed_tokens.npy", lm.get_input_embeddings().weight.detach().float().numpy().astype(
        np.float16 if dtype == "fp16" else np.float32))
    seq = torch.export.Dim("seq", min=1, max=4096)
    if model.config.is_encoder_decoder:
        emb = torch.randn(2, 6, width, dtype=float_dtype)
        mask = torch.ones(2, 6, dtype=torch.long)
        _export(T5Encoder(lm), (emb, mask), out / "encoder.onnx", ["inputs_embeds", "attention_mask"],
                ["encoder_hidden_states"], ({0: batch, 1: seq}, {0: batch, 1: seq}), opset)
        dec_len = torch.export.Dim("dec_len", min=1, max=1024)
        ids = torch.zeros(2, 3, dtype=torch.long)
        hidden = torch.randn(2, 6, width, dtype=float_dtype)
        _export(T5Decoder(lm), (ids, hidden, mask), out / "decoder.onnx",
                ["decoder_input_ids", "encoder_hidden_states", "encoder_attention_mask"], ["logits"],
                ({0: batch, 1: dec_len}, {0: batch, 1: seq}, {0: batch, 1: seq}), opset)
        graphs.update(encoder="encoder.onnx", decoder="decoder.onnx")
        layers = kv_heads = head_dim = 0
    else:
        layers = cfg.num_hidden_layers
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        past_names = [f"past.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
        present_names = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
        emb = torch.randn(2, 7, width, dtype=float_dtype)
        mask = torch.ones(2, 7, dtype=torch.long)
        pos = torch.arange(7).expand(2, 7).contiguous()
        _export(Prefill(lm, layers), (emb, mask, pos), out / "prefill.onnx",
                ["inputs_embeds", "attention_mask", "position_ids"], ["logits", *present_names],
                ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: seq}), opset)
        past = torch.export.Dim("past", min=1, max=4096)
        kv = [torch.randn(2, kv_heads, 5, head_dim, dtype=float_dtype) for _ in range(2 * layers)]
        _export(Decode(lm, layers), (torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 6, dtype=torch.long),
                                     torch.full((2, 1), 5), *kv), out / "decode.onnx",
                ["input_ids", "attention_mask", "position_ids", *past_names], ["logits", *present_names],
                ({0: batch}, {0: batch, 1: past + 1}, {0: batch}, tuple({0: batch, 2: past} for _ in kv)), opset)
        graphs.update(prefill="prefill.onnx", decode="decode.onnx")

    model.tokenizer.save_pretrained(out)
    if not (out / "tokenizer.json").is_file():
        raise Blip2rtError("the LLM tokenizer has no tokenizer.json (a fast tokenizer is needed for the ONNX runtime)")
    prepend, append = _tokenizer_edges(model.tokenizer, out)
    model.config.save(out)
    gen = lm.generation_config
    runtime = {
        "format": 1, "dtype": dtype, "image_size": size, "num_query_tokens": model.config.num_query_tokens,
        "encoder_decoder": model.config.is_encoder_decoder, "model_type": cfg.model_type,
        "vocab_size": int(lm.get_output_embeddings().weight.shape[0]), "hidden_size": width,
        "num_layers": layers, "num_kv_heads": kv_heads, "head_dim": head_dim,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": gen.eos_token_id if gen.eos_token_id is not None else cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id if cfg.pad_token_id is not None else 0,
        "decoder_start_token_id": getattr(cfg, "decoder_start_token_id", None),
        "tokenizer_prepend_ids": prepend, "tokenizer_append_ids": append,
        "tokenizer_pad_id": model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0,
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
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def clean(out_dir: str | Path) -> None:
    shutil.rmtree(out_dir, ignore_errors=True)
