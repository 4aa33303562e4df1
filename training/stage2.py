"""Stage 2: generative learning through the frozen LLM (BLIP-2 §3.3), and VQA fine-tuning (§4.2),
the same objective with the question in the Q-Former and before the answer.

- Decoder-only LLMs: [soft prompt ; text] into the LLM, loss on the text tokens; query
  positions, prompt tokens and padding are -100 (Blip2.forward shifts and masks).
- Encoder-decoder LLMs: each caption is split at a random word; the encoder reads
  [soft prompt ; prefix] and the decoder predicts the suffix (prefix language modelling).
  LAVIS leaves this split to the user; here `split_for_prefix_lm` does it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

from blip2rt.model import Blip2


@dataclass
class Stage2Batch:
    input_ids: torch.Tensor  # (B, T) LLM ids: the text (decoder-only) or the prefix (encoder-decoder)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # decoder-only: (B, T) aligned with input_ids; encoder-decoder: (B, S) suffix ids
    pixel_values: torch.Tensor | None = None  # (B, 3, H, W); or:
    frozen_features: torch.Tensor | None = None  # (B, N, Dv) cached ViT output before ln_vision
    qformer_input_ids: torch.Tensor | None = None  # (B, Tq) VQA: the question, for the Q-Former
    qformer_attention_mask: torch.Tensor | None = None  # (B, Tq)


def split_for_prefix_lm(caption: str, rng: random.Random) -> tuple[str, str]:
    """A random split between words: (prefix, suffix), the suffix never empty.

    One-word captions get an empty prefix: the decoder then predicts the whole caption.
    """
    words = caption.split()
    if len(words) < 2:
        return "", caption.strip()
    k = rng.randint(1, len(words) - 1)
    return " ".join(words[:k]), " ".join(words[k:])


class Stage2Objective(nn.Module):
    def __init__(self, model: Blip2):
        super().__init__()
        if not model.config.with_llm:
            raise ValueError("stage 2 needs an LLM in the model config")
        self.model = model

    def forward(self, batch: Stage2Batch) -> dict[str, torch.Tensor]:
        m = self.model
        embeds = None if batch.frozen_features is None else m.image_embeds(frozen_features=batch.frozen_features)
        out = m(batch.pixel_values, batch.input_ids.to(m.device), batch.attention_mask.to(m.device),
                labels=batch.labels.to(m.device), image_embeds=embeds, return_logits=False,
                qformer_input_ids=batch.qformer_input_ids, qformer_attention_mask=batch.qformer_attention_mask,
                right_padded=True)
        return {"loss": out.loss, "lm": out.loss}
