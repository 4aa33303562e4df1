"""ONNX Runtime vs eager PyTorch on the same weights: the visual prefix, one decode step, and
end-to-end captioning. Builds (once per process) a saved model and its export for a preset."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import blip2rt


@functools.lru_cache(maxsize=4)
def _saved(preset: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix=f"blip2rt_bench_{preset}_"))
    atexit.register(shutil.rmtree, root, True)  # blip2-mini's model and export: gigabytes
    torch.manual_seed(0)
    blip2rt.from_pretrained(preset, device="cpu").save_pretrained(root / "model")
    return root


def export_kind(impl: str) -> str:
    """The export a case runs on: "ort", "ort-opt" (ORT's transformer optimizer), "ort-int8" or
    "ort-int4" (the LLM's weights quantised)."""
    for kind in ("ort-opt", "ort-int8", "ort-int4"):
        if impl.startswith(kind):
            return kind
    return "ort"


def model_and_export(preset: str, impl: str = "ort") -> tuple[object, object]:
    """The eager model and the export (`export_kind`) a case runs on."""
    return _model_and_export(preset, export_kind(impl))


@functools.lru_cache(maxsize=8)
def _model_and_export(preset: str, kind: str) -> tuple[object, object]:
    from blip2rt.export import OrtBlip2, export_model

    root = _saved(preset)
    out = root / kind
    if not out.is_dir():
        weights = kind.split("-")[1] if kind in ("ort-int8", "ort-int4") else "fp32"
        export_model(blip2rt.from_pretrained(root / "model", device="cpu"), out, optimize=kind == "ort-opt",
                     llm_weights=weights)
    model = blip2rt.from_pretrained(root / "model", device="cpu", kernels="torch")
    return model, OrtBlip2(out, providers=["CPUExecutionProvider"])


def visual_prefix(impl: str, preset: str, batch: int, pair: tuple | None = None) -> Callable[[], None]:
    """pair: (eager model, OrtBlip2) on another device (default: the CPU pair of this export)."""
    model, rt = pair or model_and_export(preset, impl if impl.startswith("ort") else "ort")
    size = model.config.vision_config.image_size
    px = torch.randn(batch, 3, size, size)
    if impl.startswith("ort"):
        arr = px.numpy()
        return lambda: rt.image_features(arr)
    px = px.to(model.device)

    def eager():
        with torch.no_grad():
            model.image_features(px)

    return eager


def decode_step(impl: str, preset: str, batch: int, past: int = 40) -> Callable[[], None]:
    """One new token against `past` cached positions.

    impl: "ort" (decode.onnx: the cache grows by concatenation, the logits come back), "ort-static"
    (static_lm.onnx: the cache's buffers bound in and out, only the ids come back), "ort-int8" /
    "ort-int4" (decode.onnx with quantised weights), "eager" (transformers' forward over a
    DynamicCache), "static-eager" / "static-compiled" (blip2rt's static-cache decode step, eager or
    torch.compile'd)."""
    from transformers import DynamicCache

    model, rt = model_and_export(preset, impl)
    c = rt.cfg
    kv = [np.random.default_rng(i).standard_normal((batch, c.num_kv_heads, past, c.head_dim)).astype(np.float32)
          for i in range(2 * c.num_layers)]
    ids = np.full((batch, 1), 5, np.int64)
    mask = np.ones((batch, past + 1), np.int64)
    pos = np.full((batch, 1), past, np.int64)
    if impl in ("ort", "ort-int8", "ort-int4"):
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **dict(zip(c.past_names, kv))}
        return lambda: rt.graphs.decode.run(feeds)
    if impl == "ort-static":
        return _ort_static_step(rt, kv, past)
    if impl.startswith("static-"):
        return _torch_static_step(model, kv, past, compiled=impl == "static-compiled")
    tkv = [torch.from_numpy(a) for a in kv]
    lm = model.language_model
    t_ids, t_mask, t_pos = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos)

    def eager():
        cache = DynamicCache()
        for i in range(c.num_layers):
            cache.update(tkv[2 * i], tkv[2 * i + 1], i)
        with torch.no_grad():
            lm(input_ids=t_ids, attention_mask=t_mask, position_ids=t_pos, past_key_values=cache, use_cache=True)

    return eager


def _ort_static_step(rt, kv: list[np.ndarray], past: int) -> Callable[[], None]:
    """static_lm.onnx's decode step over buffers holding `past` positions, as the search runs it."""
    from blip2rt.front_end import static_cache_length

    b = kv[0].shape[0]
    graphs, c = rt.graphs, rt.cfg
    buf = graphs.static_buffers(b, static_cache_length(past, 1))
    length = buf.mask.shape()[1]
    for dst, src in zip(buf.kv, kv):
        full = np.zeros((*src.shape[:2], length, src.shape[3]), np.float32)
        full[:, :, :past] = src
        dst.update_inplace(full)
    buf.mask.update_inplace(np.ones((b, length), np.int64))
    buf.position.update_inplace(np.full((b, 1), past, np.int64))
    buf.write_at.update_inplace(np.array(past, np.int64))
    buf.embeds.update_inplace(np.ascontiguousarray(graphs.embed[np.full(b, 5)][:, None].astype(graphs.float)))
    inputs = {"inputs_embeds": buf.embeds, "attention_mask": buf.mask, "position_ids": buf.position,
              "write_at": buf.write_at, "token_bias": buf.bias, **dict(zip(c.past_names, buf.kv))}
    outputs = {"logits": buf.logits, "next_ids": buf.next_ids, **dict(zip(c.present_names, buf.kv))}

    def step():
        graphs.static.run_bound(inputs, outputs)
        return buf.next_ids.numpy()  # the ids: all that crosses back per step

    return step


def _torch_static_step(model, kv: list[np.ndarray], past: int, compiled: bool) -> Callable[[], None]:
    """blip2rt's static-cache decode step (the function generate(static_cache=True) loops over)."""
    from blip2rt.front_end import static_cache_length
    from blip2rt.static_decoding import StaticDecoder

    lm = model.language_model
    decoder = StaticDecoder(lm)
    b = kv[0].shape[0]
    length = static_cache_length(past, 1)
    buffers = decoder.buffers(b, length, torch.float32, torch.device("cpu"))
    for dst, src in zip(buffers, kv):
        dst[:, :, :past] = torch.from_numpy(src)
    eos = lm.generation_config.eos_token_id
    eos = tuple([eos] if isinstance(eos, int) else eos or [])
    step = decoder.step_function(None, eos, 0, compiled, torch.device("cpu"))
    tokens, unfinished = torch.full((b,), 5), torch.ones(b, dtype=torch.bool)
    write_at, first = torch.tensor(past), torch.zeros(b, 1, dtype=torch.long)
    bias, mask = torch.zeros(1, lm.get_output_embeddings().weight.shape[0]), torch.ones(b, length, dtype=torch.long)

    def run():
        with torch.no_grad():
            return step(tokens, unfinished, write_at, first, bias, mask, *buffers)

    return run


def caption(impl: str, preset: str, batch: int, new_tokens: int = 20, pair: tuple | None = None
            ) -> Callable[[], None]:
    """impl: "ort" (OrtBlip2's default: over prefill/decode.onnx on the CPU, static_lm.onnx on CUDA),
    "ort-static" / "ort-dynamic" (either, forced), "ort-int8" / "ort-int4" (the default, with the LLM's
    weights quantised), "eager"
    (transformers' generate), "static-eager" / "static-compiled" (generate(static_cache=True)),
    "transformers-static" (transformers' generate with its own static cache), "transformers"
    (transformers' own Blip2)."""
    model, rt = pair or model_and_export(preset, impl)
    size = model.config.vision_config.image_size
    px = torch.randn(batch, 3, size, size)
    gen = dict(num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    if impl.startswith("ort"):
        arr = px.numpy()
        forced = {"ort-static": True, "ort-dynamic": False}.get(impl)
        if forced is not None:
            from blip2rt.export import OrtBlip2

            rt = OrtBlip2(rt.dir, providers=rt.providers, static_cache=forced)
        return lambda: rt.caption(arr, **gen)
    if impl.startswith("static-"):
        gen.update(static_cache=True, compile_step=impl == "static-compiled")
    if impl == "transformers-static":  # transformers' own static cache under its generate, the soft prompt ours
        gen.update(cache_implementation="static")
    if impl == "transformers":  # the same saved weights, through transformers' own Blip2 generate
        from transformers import Blip2ForConditionalGeneration

        hf = Blip2ForConditionalGeneration.from_pretrained(_saved(preset) / "model").eval()
        if hf.config.image_token_index is None:  # blip2rt's config.json has no placeholder id: any id in the vocabulary
            hf.config.image_token_index = hf.config.text_config.vocab_size - 1
        q = model.config.num_query_tokens
        ids = torch.cat([torch.full((batch, q), hf.config.image_token_index),
                         torch.full((batch, 1), hf.config.text_config.bos_token_id)], dim=1)

        def hf_caption():
            with torch.no_grad():
                hf.generate(pixel_values=px, input_ids=ids, attention_mask=torch.ones_like(ids), **gen)

        return hf_caption
    px = px.to(model.device)
    return lambda: model.caption(px, **gen)


@functools.lru_cache(maxsize=2)
def _cuda_pair(preset: str) -> tuple[object, object]:
    """The eager model on CUDA and the export on ORT's CUDA provider (IO binding: KV on the device)."""
    from blip2rt.export import OrtBlip2

    model_and_export(preset)  # exports once
    root = _saved(preset)
    model = blip2rt.from_pretrained(root / "model", device="cuda", dtype="fp32", kernels="torch")
    return model, OrtBlip2(root / "ort", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def ort_cuda_visual_prefix(impl: str, preset: str, batch: int) -> Callable[[], None]:
    return visual_prefix(impl, preset, batch, pair=_cuda_pair(preset))


def ort_cuda_caption(impl: str, preset: str, batch: int, new_tokens: int = 20) -> Callable[[], None]:
    return caption(impl, preset, batch, new_tokens, pair=_cuda_pair(preset))


@functools.lru_cache(maxsize=1)
def fp16_cuda_export(preset: str) -> tuple[object, object]:
    """A preset's random weights exported in fp16 (no saved checkpoint: at ViT-g + OPT-2.7B it would
    be 15 GB), run on ORT's CUDA provider; returns (the CPU model, for the floor; OrtBlip2)."""
    from blip2rt.export import OrtBlip2, export_model

    root = Path(tempfile.mkdtemp(prefix=f"blip2rt_bench_{preset}_fp16_"))
    atexit.register(shutil.rmtree, root, True)
    torch.manual_seed(0)
    model = blip2rt.from_pretrained(preset, device="cpu", dtype="fp32", kernels="torch")
    export_model(model, root / "ort", dtype="fp16")
    return model, OrtBlip2(root / "ort", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


@functools.lru_cache(maxsize=8)
def weights_export(preset: str, weights: str, providers: tuple[str, ...]) -> tuple[object, object]:
    """The saved model's export with its LLM graphs in `weights`: "fp32" or "fp16" (the export's
    dtype), optionally quantised: "fp16-int8", "fp16-int4" (the deployment precisions on CUDA),
    "fp32-int4"...; returns (the CPU model, for the floor; OrtBlip2 on `providers`)."""
    from blip2rt.export import OrtBlip2, export_model
    from blip2rt.export.quantize import quantize_export

    root = _saved(preset)
    dtype, _, quantised = weights.partition("-")
    base = root / f"weights-{dtype}"
    model = blip2rt.from_pretrained(root / "model", device="cpu", dtype="fp32", kernels="torch")
    if not base.is_dir():
        export_model(model, base, dtype=dtype)
    out = base
    if quantised:
        out = root / f"weights-{weights}"
        if not out.is_dir():
            quantize_export(base, quantised, to=out)
    return model, OrtBlip2(out, providers=list(providers))


def weights_caption(weights: str, preset: str, batch: int, providers: tuple[str, ...],
                    new_tokens: int = 20) -> Callable[[], None]:
    """Greedy captions (OrtBlip2's default search for the provider) of the `weights_export`."""
    model, rt = weights_export(preset, weights, providers)
    size = model.config.vision_config.image_size
    px = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(
        np.float16 if weights.startswith("fp16") else np.float32)
    gen = dict(num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return lambda: rt.caption(px, **gen)


def ort_cuda_fp16_caption(impl: str, preset: str, batch: int, new_tokens: int) -> Callable[[], None]:
    """impl: "ort" (static_lm.onnx, its decode step a CUDA graph) or "ort-dynamic"."""
    from blip2rt.export import OrtBlip2

    model, rt = fp16_cuda_export(preset)
    if impl == "ort-dynamic":
        rt = OrtBlip2(rt.dir, providers=rt.providers, static_cache=False)
    size = model.config.vision_config.image_size
    px = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float16)
    gen = dict(num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return lambda: rt.caption(px, **gen)
