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

import torch
from torch import nn
from transformers.activations import ACT2FN

from blip2rt import kernels
from blip2rt.kernels import AttentionMode

from .config import QFormerConfig

PastKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: self-attention (k, v), each (B, H, K, d)


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

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, H*d) -> (B, H, L, d)
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)


class QFormerResidualOutput(nn.Module):
    """Post-LN residual: LayerNorm(x + dropout(dense(h)))."""

    def __init__(self, in_width: int, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.kernel_backend = "torch"

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        ln = self.LayerNorm
        p = self.dropout.p if self.training else 0.0
        return kernels.residual_layer_norm(self.dense(h), residual, ln.weight, ln.bias, ln.eps, p,
                                           backend=self.kernel_backend)


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
        image_embeds: torch.Tensor | None,  # (B, N, Dv)
        past: tuple[torch.Tensor, torch.Tensor] | None,
        backend: str,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attn = self.attention.attention
        drop = attn.dropout_p if self.training else 0.0
        q = attn.split_heads(attn.query(x))
        k = attn.split_heads(attn.key(x))
        v = attn.split_heads(attn.value(x))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        ctx = kernels.qformer_self_attention(q, k, v, num_queries=num_queries, text_mask=text_mask, mode=mode,
                                             dropout_p=drop, backend=backend)
        b, n, d = x.shape
        h = self.attention.output(ctx.transpose(1, 2).reshape(b, n, d), x)

        # Query positions present in this call: the first `local_queries` of x.
        past_len = 0 if past is None else past[0].shape[2]
        local_queries = max(0, min(num_queries - past_len, n))
        outs = []
        if local_queries > 0:
            hq = h[:, :local_queries]
            if self.has_cross_attention:
                if image_embeds is None:
                    raise ValueError("this Q-Former layer cross-attends to the image, but no image tokens were given")
                ca = self.crossattention.attention
                cq = ca.split_heads(ca.query(hq))
                ck = ca.split_heads(ca.key(image_embeds))
                cv = ca.split_heads(ca.value(image_embeds))
                cctx = kernels.qformer_cross_attention(cq, ck, cv, dropout_p=ca.dropout_p if self.training else 0.0,
                                                       backend=backend)
                hq = self.crossattention.output(cctx.transpose(1, 2).reshape(b, local_queries, d), hq)
            outs.append(self.output_query(self.intermediate_query(hq), hq))
        if local_queries < n:
            if not hasattr(self, "intermediate"):
                raise ValueError("this Q-Former has no text feed-forward (use_qformer_text_input=False)")
            ht = h[:, local_queries:]
            outs.append(self.output(self.intermediate(ht), ht))
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
        self.kernel_backend = "torch"  # set by the model from the kernel switch

    def forward(
        self,
        embeds: torch.Tensor,  # (B, L, D): [query tokens ; text embeddings] of this call
        num_queries: int,
        text_mask: torch.Tensor | None = None,  # (B, T) over all text positions; None: all real
        mode: AttentionMode = AttentionMode.BIDIRECTIONAL,
        image_embeds: torch.Tensor | None = None,  # (B, N, Dv) after ln_vision
        past: PastKV | None = None,
    ) -> tuple[torch.Tensor, PastKV]:
        dtype = self.layernorm.weight.dtype
        x = self.dropout(self.layernorm(embeds.to(dtype)))
        if image_embeds is not None:
            image_embeds = image_embeds.to(dtype)
        past_len = 0 if past is None else past[0][0].shape[2]
        num_text = past_len + x.shape[1] - num_queries
        if num_text > 0 and text_mask is None:
            text_mask = torch.ones(x.shape[0], num_text, dtype=torch.long, device=x.device)
        if text_mask is not None and text_mask.shape[1] != num_text:
            raise ValueError(f"text_mask covers {text_mask.shape[1]} positions, the input has {num_text} text positions")
        present: PastKV = []
        for i, layer in enumerate(self.encoder.layer):
            x, kv = layer(x, num_queries, text_mask, mode, image_embeds, None if past is None else past[i],
                          self.kernel_backend)
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
