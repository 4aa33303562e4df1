"""ONNX Runtime vs eager PyTorch on the same weights: the visual prefix, one decode step, and
end-to-end captioning. Builds (once per process) a saved model and its export for a preset."""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import blip2rt


@functools.lru_cache(maxsize=4)
def _saved(preset: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix=f"blip2rt_bench_{preset}_"))
    torch.manual_seed(0)
    blip2rt.from_pretrained(preset, device="cpu").save_pretrained(root / "model")
    return root


@functools.lru_cache(maxsize=8)
def model_and_export(preset: str, impl: str = "ort") -> tuple[object, object]:
    """The eager model and its export; impl "ort-opt" exports through ORT's transformer optimizer."""
    from blip2rt.export import OrtBlip2, export_model

    root = _saved(preset)
    out = root / impl
    if not out.is_dir():
        export_model(blip2rt.from_pretrained(root / "model", device="cpu"), out, optimize=impl == "ort-opt")
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
    """One new token against `past` cached positions."""
    from transformers import DynamicCache

    model, rt = model_and_export(preset)
    c = rt.cfg
    kv = [np.random.default_rng(i).standard_normal((batch, c["num_kv_heads"], past, c["head_dim"])).astype(np.float32)
          for i in range(2 * c["num_layers"])]
    ids = np.full((batch, 1), 5, np.int64)
    mask = np.ones((batch, past + 1), np.int64)
    pos = np.full((batch, 1), past, np.int64)
    if impl == "ort":
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **dict(zip(rt.past_names, kv))}
        return lambda: rt.decode.run(feeds)
    tkv = [torch.from_numpy(a) for a in kv]
    lm = model.language_model
    t_ids, t_mask, t_pos = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos)

    def eager():
        cache = DynamicCache()
        for i in range(c["num_layers"]):
            cache.update(tkv[2 * i], tkv[2 * i + 1], i)
        with torch.no_grad():
            lm(input_ids=t_ids, attention_mask=t_mask, position_ids=t_pos, past_key_values=cache, use_cache=True)

    return eager


def caption(impl: str, preset: str, batch: int, new_tokens: int = 20, pair: tuple | None = None
            ) -> Callable[[], None]:
    model, rt = pair or model_and_export(preset)
    size = model.config.vision_config.image_size
    px = torch.randn(batch, 3, size, size)
    gen = dict(num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    if impl == "ort":
        arr = px.numpy()
        return lambda: rt.caption(arr, **gen)
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
