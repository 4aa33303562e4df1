"""The Querying Transformer: a post-LN BERT encoder over [queries ; text].

- Queries and text share the self-attention; the mask comes from the objective
  (`AttentionMode`) and the text padding, through `blip2rt.kernels`.
- Query positions also cross-attend to the image tokens in every
  `cross_attention_frequency`-th layer, and have their own feed-forward
  (`intermediate_query` / `output_query`); text positions use the BERT feed-forward.
- Self-attention keys/values can be returned and fed back as `past` (ITG reuses those of the
  ITC image pass).
Module names follow transformers' Blip2QFormerModel / LAVIS `Qformer.py` so checkpoints map by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers.activations import ACT2FN

from blip2rt import kernels
from blip2rt.kernels import AttentionMode

from .config import QFormerConfig

PastKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: self-attention (k, v), each (B, K, H, d)


@dataclass
class ImageKV:
    """Keys and values of the image tokens for every cross-attention layer, from one GEMM.

    packed: (B, N, layers, 2, H, d), a view of the [B*N, Dv] x [Dv, 2*layers*D] product.
    Computed once per image and indexed: ITM's 3B batch reuses its B images, and generation
    runs the Q-Former once.
    """

    packed: torch.Tensor

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(k, v) of every cross-attention layer, each a (B, N, H, d) strided view.

        One split of all 2 x layers parts (kernels.packed_grads.split_packed, unbind's views): its
        backward gathers every layer's dK and dV in one tensor of the packed shape, which the fused
        attention writes in place; indexed views would each zero-fill a buffer the size of `packed`,
        and unbind would stack the grads, per layer and again for the layers.
        """
        b, n, layers, two, h, d = self.packed.shape
        parts = kernels.split_packed(self.packed.view(b, n, layers * two, h, d))
        return [(parts[2 * i], parts[2 * i + 1]) for i in range(layers)]

    def take(self, index: torch.Tensor) -> "ImageKV":
        """The rows of another batch, e.g. hard-negative images: (len(index), N, ...)."""
        return ImageKV(self.packed.index_select(0, index))

    @staticmethod
    def cat(parts: list["ImageKV"]) -> "ImageKV":
        return ImageKV(torch.cat([p.packed for p in parts]))


class PackedLinears:
    """Several nn.Linear over one input as one GEMM: their weights stacked [W_0; W_1; ...] (and biases).
    The per-module weights stay the parameters (and the checkpoint format). The stacked copy is built
    afresh under autograd (so the grads flow back to each) and under torch.compile, and otherwise kept
    until a weight changes: its address or its version counter. Whatever writes the weights in place
    without bumping the counter (torch's fused AdamW) must bump it (the trainer does)."""

    def __init__(self):
        self._cache: tuple | None = None

    def weights(self, mods: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(m.weight.requires_grad for m in mods)):
            return torch.cat([m.weight for m in mods]), torch.cat([m.bias for m in mods])  # traced / trained: no cache
        key = tuple((m.weight.data_ptr(), m.weight._version, m.bias._version) for m in mods)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, torch.cat([m.weight for m in mods]), torch.cat([m.bias for m in mods]))
        return self._cache[1], self._cache[2]


class QFormerMultiHeadAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        kv_width = cfg.encoder_hidden_size if is_cross_attention else cfg.hidden_size
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob
        self._qkv = PackedLinears()

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, H*d) -> (B, L, H, d), a view
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention's q, k and v of x (B, L, D) from one GEMM: each (B, L, H, d), a strided view
        of the (B, L, 3D) product (the fused and the torch attention both read strided heads), split by
        kernels.split_packed, so the fused backward writes dq, dk and dv into one grad of the product."""
        w, bias = self._qkv.weights([self.query, self.key, self.value])
        out = F.linear(x, w, bias)
        b, n, _ = out.shape
        return kernels.split_packed(out.view(b, n, 3, self.num_heads, self.head_dim))


class QFormerResidualOutput(nn.Module):
    """Post-LN residual: LayerNorm(x + dropout(dense(h)))."""

    def __init__(self, in_width: int, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        ln = self.LayerNorm
        p = self.dropout.p if self.training else 0.0
        return kernels.residual_layer_norm(self.dense(h), residual, ln.weight, ln.bias, ln.eps, p, backend=backend)


class QFormerAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        self.attention = QFormerMultiHeadAttention(cfg, is_cross_attention)
        self.output = QFormerResidualOutput(cfg.hidden_size, cfg)


class QFormerIntermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = ACT2FN[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, layer_idx: int):
        super().__init__()
        self.attention = QFormerAttention(cfg)
        self.has_cross_attention = cfg.has_cross_attention(layer_idx)
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(cfg, is_cross_attention=True)
        if cfg.use_qformer_text_input:
            self.intermediate = QFormerIntermediate(cfg)
            self.output = QFormerResidualOutput(cfg.intermediate_size, cfg)
        self.intermediate_query = QFormerIntermediate(cfg)
        self.output_query = QFormerResidualOutput(cfg.intermediate_size, cfg)

    def forward(
        self,
        x: torch.Tensor,  # (B, L, D): the current positions (queries first, if any)
        num_queries: int,  # query positions in the full sequence (past included)
        text_mask: torch.Tensor | None,  # (B, T) over all text positions
        mode: AttentionMode,
        image_kv: tuple[torch.Tensor, torch.Tensor] | None,  # this layer's image (k, v), (B, N, H, d)
        past: tuple[torch.Tensor, torch.Tensor] | None,
        backend: str,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attn = self.attention.attention
        drop = attn.dropout_p if self.training else 0.0
        q, k, v = attn.qkv(x)  # (B, L, H, d) each, from one GEMM
        if past is not None:
            k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)
        ctx = kernels.qformer_self_attention(q, k, v, num_queries=num_queries, text_mask=text_mask, mode=mode,
                                             dropout_p=drop, backend=backend)  # (B, L, H, d)
        b, n, d = x.shape
        h = self.attention.output(ctx.reshape(b, n, d), x, backend)

        # Query positions present in this call: the first `local_queries` of x.
        past_len = 0 if past is None else past[0].shape[1]
        local_queries = max(0, min(num_queries - past_len, n))
        outs = []
        if local_queries > 0:
            hq = h[:, :local_queries]
            if self.has_cross_attention:
                if image_kv is None:
                    raise ValueError("this Q-Former layer cross-attends to the image, but no image tokens were given")
                ca = self.crossattention.attention
                cq = ca.split_heads(ca.query(hq))
                cctx = kernels.qformer_cross_attention(cq, *image_kv, dropout_p=ca.dropout_p if self.training else 0.0,
                                                       backend=backend)  # (B, Q, H, d)
                hq = self.crossattention.output(cctx.reshape(b, local_queries, d), hq, backend)
            outs.append(self.output_query(self.intermediate_query(hq), hq, backend))
        if local_queries < n:
            if not hasattr(self, "intermediate"):
                raise ValueError("this Q-Former has no text feed-forward (use_qformer_text_input=False)")
            ht = h[:, local_queries:]
            outs.append(self.output(self.intermediate(ht), ht, backend))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return out, (k, v)


class QFormerEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg, i) for i in range(cfg.num_hidden_layers))


class QFormer(nn.Module):
    """embeddings (B, L, D) -> hidden states (B, L, D), plus the self-attention keys/values per layer."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.config = cfg
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # BERT's embedding LayerNorm
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.encoder = QFormerEncoder(cfg)
        self.kernel_backend = "torch"  # "torch" | "triton" | "auto": the one switch every op of the Q-Former reads
        self.gradient_checkpointing = False  # recompute each layer in the backward (training memory)
        self._image_kv = PackedLinears()

    def cross_layers(self) -> list[QFormerLayer]:
        return [layer for layer in self.encoder.layer if layer.has_cross_attention]

    def image_kv(self, image_embeds: torch.Tensor) -> ImageKV:
        """(B, N, Dv) image tokens -> keys and values of every cross-attention layer, in one GEMM."""
        # [key_0; value_0; key_1; ...]: (2 * layers * D, Dv)
        w, bias = self._image_kv.weights([m for layer in self.cross_layers() for m in (
            layer.crossattention.attention.key, layer.crossattention.attention.value)])
        b, n, _ = image_embeds.shape
        packed = F.linear(image_embeds.to(w.dtype), w, bias)  # (B, N, 2 * layers * D)
        cfg = self.config
        return ImageKV(packed.view(b, n, len(self.cross_layers()), 2, cfg.num_attention_heads, cfg.head_dim))

    def forward(
        self,
        embeds: torch.Tensor,  # (B, L, D): [query tokens ; text embeddings] of this call
        num_queries: int,
        text_mask: torch.Tensor | None = None,  # (B, T) over all text positions; None: all real
        mode: AttentionMode = AttentionMode.BIDIRECTIONAL,
        image_embeds: torch.Tensor | None = None,  # (B, N, Dv) after ln_vision
        past: PastKV | None = None,
        image_kv: ImageKV | None = None,  # precomputed from image_embeds (see image_kv); wins if given
    ) -> tuple[torch.Tensor, PastKV]:
        dtype = self.layernorm.weight.dtype
        x = self.dropout(self.layernorm(embeds.to(dtype)))
        if image_kv is None and image_embeds is not None:
            image_kv = self.image_kv(image_embeds)
        past_len = 0 if past is None else past[0][0].shape[1]
        num_text = past_len + x.shape[1] - num_queries
        if num_text > 0 and text_mask is None:
            text_mask = torch.ones(x.shape[0], num_text, dtype=torch.int8, device=x.device)
        if text_mask is not None:
            if text_mask.shape[1] != num_text:
                raise ValueError(f"text_mask covers {text_mask.shape[1]} positions, the input has {num_text} text "
                                 "positions")
            text_mask = text_mask.to(device=x.device, dtype=torch.int8).contiguous()  # once, for every layer
        present: PastKV = []
        cross_kv = iter(image_kv.layers()) if image_kv is not None else None  # in cross-attention layer order
        for i, layer in enumerate(self.encoder.layer):
            layer_kv = next(cross_kv) if layer.has_cross_attention and cross_kv is not None else None
            args = (x, num_queries, text_mask, mode, layer_kv, None if past is None else past[i], self.kernel_backend)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, kv = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                x, kv = layer(*args)
            present.append(kv)
        return x, present


class QFormerTextEmbeddings(nn.Module):
    """Word + absolute position embeddings of the Q-Former's text (LayerNorm is applied in QFormer)."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, D)
        t = input_ids.shape[1]
        if t > self.position_embeddings.num_embeddings:
            raise ValueError(f"text of {t} tokens exceeds the Q-Former's {self.position_embeddings.num_embeddings} positions")
        pos = torch.arange(t, device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]


class QFormerLMHead(nn.Module):
    """BERT's prediction head for ITG: dense -> act -> LayerNorm -> decoder (tied to word embeddings) + bias."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.transform.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.act = ACT2FN[cfg.hidden_act]
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The transformed states the vocabulary projection reads (B, T, D)."""
        return self.transform.LayerNorm(self.act(self.transform.dense(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, V)
        return self.decoder(self.hidden(x)) + self.bias
