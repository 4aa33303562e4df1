"""The frozen LLM, built by transformers from its config: decoder-only (OPT, Llama, ...) or T5.

Attention: `flash_attention_2` when the `flash_attn` package imports and the model runs in
fp16/bf16 on CUDA, otherwise PyTorch SDPA (whose CUDA flash backend is FlashAttention-2), and
eager only for architectures that support neither. `attn_implementation` of the built model
says which one runs.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def position_limit(config) -> int | None:
    """The positions an LLM's ids must stay below: OPT's index a learned table; LLaMA's rotary and
    T5's relative positions have no table (None)."""
    return getattr(config, "max_position_embeddings", None) if config.model_type == "opt" else None


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def preferred_attention(device: torch.device, dtype: torch.dtype) -> str:
    if flash_attn_installed() and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return "flash_attention_2"
    return "sdpa"


def build_language_model(text_config: dict, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    params = {k: v for k, v in text_config.items() if k != "model_type"}
    cfg = AutoConfig.for_model(text_config["model_type"], **params)
    auto = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    last_error = None
    for impl in dict.fromkeys([preferred_attention(device, dtype), "sdpa", "eager"]):
        try:
            return auto.from_config(cfg, attn_implementation=impl, dtype=dtype)
        except (ValueError, ImportError) as e:  # the architecture does not support this implementation
            log.info("LLM attention %s unavailable for %s: %s", impl, cfg.model_type, e)
            last_error = e
    raise RuntimeError(f"could not build the {cfg.model_type} LLM: {last_error}")


def attention_implementation(language_model: nn.Module) -> str:
    return getattr(language_model.config, "_attn_implementation", None) or "eager"
