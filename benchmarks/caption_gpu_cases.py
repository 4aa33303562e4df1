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


INSTRUCTION = "What is unusual about this image? Answer in a few words."


def instruct_case(impl: str, device, preset: str, batch: int, new_tokens: int) -> tuple[Callable[[], None], object]:
    """An InstructBLIP answer at a preset's shapes (random weights, bf16): the instruction goes to the
    Q-Former as its WordPiece ids and to the LLM as its prompt. impl: "graphed" (fused Q-Former, the
    static decoder's prefill and decode replayed from CUDA graphs; the instruction-conditioned visual
    prefix itself runs eagerly) | "fused" (transformers' generate behind the fused Q-Former) |
    "transformers" (InstructBlipForConditionalGeneration.generate). Returns (step, the model, whose
    `language_model` and `vision_model` the floor reads)."""
    config = blip2rt.preset_config(preset)
    size = config.vision_config.image_size
    px = torch.randn(batch, 3, size, size, device=device, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    qvocab, vocab = config.qformer_config.vocab_size, config.text_config["vocab_size"]
    qids = torch.randint(qvocab // 30, qvocab * 2 // 3, (batch, 16), generator=g).to(device)  # a 16-WordPiece instruction
    qids[:, 0] = 1 if qvocab < 1000 else 101  # [CLS]
    qmask = torch.ones_like(qids)
    prompt = torch.randint(vocab // 300 + 3, vocab * 2 // 3, (batch, 24), generator=g).to(device)  # a 24-token prompt
    if not config.is_encoder_decoder:
        prompt[:, 0] = config.text_config["bos_token_id"]
    mask = torch.ones_like(prompt)
    gen = dict(num_beams=1, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    if impl != "transformers":
        model = blip2rt.from_pretrained(preset, device=device, dtype="bf16", trainable_dtype="bf16", kernels="triton",
                                        cuda_graphs=impl == "graphed")
        if impl == "fused":
            gen.update(static_cache=False)
        return (lambda: model.generate(px, prompt, mask, qformer_input_ids=qids, qformer_attention_mask=qmask,
                                       **gen)), model
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    d = config.to_hf_dict()
    cfg = InstructBlipConfig(vision_config=d["vision_config"], qformer_config=d["qformer_config"],
                             text_config=d["text_config"], num_query_tokens=d["num_query_tokens"],
                             image_token_index=config.image_token_index)
    with torch.device(device):
        hf = InstructBlipForConditionalGeneration(cfg).to(torch.bfloat16).eval()
    ids = torch.cat([torch.full((batch, config.num_query_tokens), cfg.image_token_index, device=device), prompt], dim=1)

    def step():
        with torch.no_grad():
            hf.generate(pixel_values=px, qformer_input_ids=qids, qformer_attention_mask=qmask, input_ids=ids,
                        attention_mask=torch.ones_like(ids), **gen)

    return step, hf
