"""Caption latency on a GPU at the paper's shapes (ViT-g + OPT-2.7B, random weights, bf16):
blip2rt fused (Triton Q-Former + the LLM through SDPA/FlashAttention), blip2rt eager
(kernels="torch"), and transformers' Blip2ForConditionalGeneration.generate at the same shapes.

The memory-bandwidth floor: each new token reads every LLM weight once, so a token costs at
least (LLM weight bytes) / (measured copy bandwidth); the visual prefix adds the ViT-g's bytes once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import blip2rt


def copy_bandwidth(device, gib: float = 2.0, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), the median of `repeats`."""
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times = sorted(times[1:])
    return 2 * a.numel() * a.element_size() / times[len(times) // 2]


def floor_seconds(model, new_tokens: int, bandwidth: float) -> float:
    llm = sum(p.numel() * p.element_size() for p in model.language_model.parameters())
    vit = sum(p.numel() * p.element_size() for p in model.vision_model.parameters())
    return (new_tokens * llm + vit) / bandwidth


def caption_case(impl: str, device, preset: str, batch: int, new_tokens: int = 30) -> tuple[Callable[[], None], object]:
    """impl: "fused" | "torch" | "transformers". Returns (step, the blip2rt model for the floor)."""
    model = blip2rt.from_pretrained(preset, device=device, dtype="bf16", trainable_dtype="bf16",
                                    kernels="triton" if impl == "fused" else "torch")
    size = model.config.vision_config.image_size
    px = torch.randn(batch, 3, size, size, device=device, dtype=torch.bfloat16)
    gen = dict(num_beams=1, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
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
