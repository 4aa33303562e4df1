"""Caption latency on a GPU at the paper's shapes (ViT-g + OPT-2.7B, random weights, bf16):
blip2rt fused (Triton Q-Former + the LLM through SDPA/FlashAttention), blip2rt eager
(kernels="torch"), blip2rt over its static KV cache with the decode step compiled (a CUDA graph),
and transformers' Blip2ForConditionalGeneration.generate at the same shapes.

The memory-bandwidth floor is floors.py's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import blip2rt


def caption_case(impl: str, device, preset: str, batch: int, new_tokens: int = 30) -> tuple[Callable[[], None], object]:
    """impl: "fused" | "graphed" (fused, with cuda_graphs: the visual prefix, prefill and decode steps
    replayed from CUDA graphs) | "torch" | "static-compiled" | "transformers". Returns (step, the
    blip2rt model for the floor)."""
    model = blip2rt.from_pretrained(preset, device=device, dtype="bf16", trainable_dtype="bf16",
                                    kernels="triton" if impl in ("fused", "graphed") else "torch",
                                    cuda_graphs=impl == "graphed")
    size = model.config.vision_config.image_size
    px = torch.randn(batch, 3, size, size, device=device, dtype=torch.bfloat16)
    gen = dict(num_beams=1, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    if impl == "static-compiled":
        gen.update(static_cache=True, compile_step=True)
    if impl == "fused":
        gen.update(static_cache=False)
    if impl != "transformers":
        return (lambda: model.generate(px, **gen)), model
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    d = model.config.to_hf_dict()
    d["image_token_index"] = d["text_config"]["vocab_size"] - 1
    cfg = Blip2Config(**d)
    with torch.device(device):
        hf = Blip2ForConditionalGeneration(cfg).to(torch.bfloat16).eval()
    q = model.config.num_query_tokens
    ids = torch.cat([torch.full((batch, q), cfg.image_token_index), torch.full((batch, 1), cfg.text_config.bos_token_id)],
                    dim=1).to(device)

    def step():
        with torch.no_grad():
            hf.generate(pixel_values=px, input_ids=ids, attention_mask=torch.ones_like(ids), **gen)

    return step, model
