"""Tiny transformers Blip2 models, saved with save_pretrained: the independent reference.

Weights are re-drawn with a visible spread (transformers initialises the vision tower with
std 1e-10, which would make every image look alike and the parity tests toothless). The EVA k
bias stays zero, as in every real BLIP-2 checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, LlamaConfig,
                          OPTConfig, T5Config)

NUM_QUERIES = 4
TEXT_VOCAB = 99
IMAGE_TOKEN = 98  # transformers' placeholder id for the query positions
QFORMER_VOCAB = 60

VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=14, layer_norm_eps=1e-6)
QFORMER = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
               vocab_size=QFORMER_VOCAB, max_position_embeddings=40, cross_attention_frequency=2)


def text_config(kind: str):
    if kind == "opt":
        return OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=37,
                         vocab_size=TEXT_VOCAB, word_embed_proj_dim=32, max_position_embeddings=64,
                         bos_token_id=2, eos_token_id=2, pad_token_id=1)
    if kind == "llama":
        return LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=37, vocab_size=TEXT_VOCAB, max_position_embeddings=64,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    if kind == "t5":
        return T5Config(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2, vocab_size=TEXT_VOCAB,
                        bos_token_id=1, eos_token_id=1, pad_token_id=0, decoder_start_token_id=0)
    raise ValueError(kind)


@dataclass
class HFReference:
    folder: Path
    model: torch.nn.Module  # the transformers model, eval mode, fp32
    kind: str


def randomize_(model: torch.nn.Module, std: float = 0.2, llm_std: float = 0.5) -> None:
    """Re-draws every weight; the LLM gets a wider spread so greedy decoding does not collapse
    into repeating one token (which would make token-identity checks trivially true)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name.lower()):
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0, 0.1)
            else:
                p.normal_(0, llm_std if name.startswith("language_model.") else std)
        for name, p in model.named_parameters():
            if name.endswith("self_attn.qkv.bias"):
                d = p.shape[0] // 3
                p[d: 2 * d] = 0  # EVA has no k bias


def build_hf_folder(folder: Path, kind: str) -> HFReference:
    torch.manual_seed({"opt": 1, "llama": 2, "t5": 3, "retrieval": 4}[kind])
    if kind == "retrieval":
        cfg = Blip2Config(vision_config=VISION, qformer_config={**QFORMER, "use_qformer_text_input": True},
                          text_config=text_config("opt").to_dict(), num_query_tokens=NUM_QUERIES,
                          image_text_hidden_size=16)
        model = Blip2ForImageTextRetrieval(cfg)
    else:
        cfg = Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=text_config(kind).to_dict(),
                          num_query_tokens=NUM_QUERIES, image_token_index=IMAGE_TOKEN)
        model = Blip2ForConditionalGeneration(cfg)
    randomize_(model, llm_std=1.0 if kind == "t5" else 0.5)
    model.eval()
    model.save_pretrained(folder)
    return HFReference(folder=Path(folder), model=model, kind=kind)


def with_tiny_tokenizer(ref: HFReference, folder: Path) -> Path:
    """A copy of the reference's folder with the 50-token LLM tokenizer (inside its vocabulary),
    which export and the text APIs need."""
    import shutil

    from blip2rt.tokenization import tiny_llm_tokenizer

    shutil.copytree(ref.folder, folder, dirs_exist_ok=True)
    tiny_llm_tokenizer().save_pretrained(folder)
    return folder


def with_tiny_tokenizers(ref, folder: Path) -> Path:
    """A copy of a reference InstructBLIP folder with the character tokenizers of the `tiny` preset
    (inside both vocabularies), as the text APIs and the export need."""
    from blip2rt.tokenization import QFORMER_TOKENIZER_DIR, tiny_qformer_tokenizer

    with_tiny_tokenizer(ref, folder)
    tiny_qformer_tokenizer().save_pretrained(folder / QFORMER_TOKENIZER_DIR)
    return folder


def hf_prompt_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' Blip2 layout: NUM_QUERIES image placeholders before the (left-padded) prompt."""
    b = input_ids.shape[0]
    ids = torch.cat([torch.full((b, NUM_QUERIES), IMAGE_TOKEN), input_ids], dim=1)
    mask = torch.cat([torch.ones(b, NUM_QUERIES, dtype=attention_mask.dtype), attention_mask], dim=1)
    return ids, mask


def hf_itm_logits(ref: HFReference, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor:
    """transformers' ITM logits (B, 2) of image i with text i."""
    with torch.no_grad():
        return ref.model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                         use_image_text_matching_head=True).logits_per_image


# ---- InstructBLIP: other shapes than the Blip2 references above (cross-attention in every layer,
# 5 queries, a 3x3 patch grid), so that nothing tuned on those passes here by accident ----------

INSTRUCT_QUERIES = 5
INSTRUCT_VISION = dict(hidden_size=40, intermediate_size=52, num_hidden_layers=3, num_attention_heads=5, image_size=42,
                       patch_size=14, layer_norm_eps=1e-6)
INSTRUCT_QFORMER = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                        vocab_size=QFORMER_VOCAB, max_position_embeddings=48, cross_attention_frequency=1)


def instruct_text_config(kind: str):
    if kind == "llama":  # Vicuna's family
        return LlamaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
                           intermediate_size=44, vocab_size=TEXT_VOCAB, max_position_embeddings=64,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if kind == "t5":  # Flan-T5's
        return T5Config(d_model=48, d_ff=44, d_kv=12, num_heads=4, num_layers=2, num_decoder_layers=1,
                        vocab_size=TEXT_VOCAB, feed_forward_proj="gated-gelu", bos_token_id=1, eos_token_id=1,
                        pad_token_id=0, decoder_start_token_id=0, tie_word_embeddings=False)
    raise ValueError(kind)


def build_instructblip_folder(folder: Path, kind: str) -> HFReference:
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    torch.manual_seed({"llama": 12, "t5": 13}[kind])
    cfg = InstructBlipConfig(vision_config=INSTRUCT_VISION, qformer_config=INSTRUCT_QFORMER,
                             text_config=instruct_text_config(kind).to_dict(), num_query_tokens=INSTRUCT_QUERIES,
                             image_token_index=IMAGE_TOKEN)
    model = InstructBlipForConditionalGeneration(cfg)
    randomize_(model, llm_std=2.0 if kind == "t5" else 0.5)
    with torch.no_grad():
        model.query_tokens.normal_(0, 0.5)  # transformers starts them at zero: every query alike
    model.eval()
    model.save_pretrained(folder)
    return HFReference(folder=Path(folder), model=model, kind=kind)


def hf_instruct_prompt_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' InstructBLIP layout: the placeholders before the prompt, as its processor puts them."""
    b = input_ids.shape[0]
    ids = torch.cat([torch.full((b, INSTRUCT_QUERIES), IMAGE_TOKEN), input_ids], dim=1)
    mask = torch.cat([torch.ones(b, INSTRUCT_QUERIES, dtype=attention_mask.dtype), attention_mask], dim=1)
    return ids, mask
