"""Stage 1: representation learning against the frozen ViT, with ITC + ITM + ITG (BLIP-2 §3.2).

One module computes the three losses so DistributedDataParallel sees one forward. Its passes:
1. the queries over the image (this pass's self-attention keys/values are ITG's past);
2. the text alone ([CLS] feature for ITC);
3. ITM over 3B pairs (pos, neg image, neg text), reusing the packed image K/V;
4. ITG: [DEC] + text, multimodal-causal, behind the cached query keys/values.
References: LAVIS `blip2_qformer.py` (Blip2Qformer.forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blip2rt import kernels
from blip2rt.kernels import AttentionMode
from blip2rt.model import Blip2
from blip2rt.qformer import ImageKV

from . import distributed as D

ITC_LABEL_SMOOTHING = 0.1
ITG_LABEL_SMOOTHING = 0.1


@dataclass
class Stage1Batch:
    input_ids: torch.Tensor  # (B, T) Q-Former WordPiece ids, [CLS] first, right-padded to a fixed T
    attention_mask: torch.Tensor  # (B, T)
    pixel_values: torch.Tensor | None = None  # (B, 3, H, W); or:
    frozen_features: torch.Tensor | None = None  # (B, N, Dv) cached ViT output before ln_vision
    image_ids: torch.Tensor | None = None  # (B,) for soft ITC targets / negative masking


def itm_positives(b: int, offset: int, width: int, device, image_ids: torch.Tensor | None = None,
                  ids_all: torch.Tensor | None = None) -> torch.Tensor:
    """(B, B_all) bool: which gathered rows are positives of this rank's B rows, never drawn as ITM
    negatives. Each row's own pair sits at its global offset; with image ids, every row of the same
    image (on any rank) is a positive too."""
    if ids_all is None:
        positives = torch.zeros(b, width, dtype=torch.bool, device=device)
        positives[torch.arange(b), offset + torch.arange(b)] = True
        return positives
    return image_ids[:, None] == ids_all[None, :]


def sample_hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, positives: torch.Tensor,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM hard negatives, one multinomial draw per direction for the whole batch.

    sim_* (B, B_all) ITC similarities; positives (B, B_all) bool, never drawn. Weights are a
    softmax in fp32 (bf16 similarities would round many weights to 0). A row with no usable
    weight (everything masked, or non-finite) draws uniformly from its non-positives.
    Returns (image index for each text, text index for each image), both into B_all.
    """
    with torch.no_grad():
        def weights(sim):
            w = sim.float().masked_fill(positives, float("-inf")).softmax(dim=1)
            bad = ~torch.isfinite(w).all(dim=1) | (w.sum(dim=1) <= 0)
            fallback = (~positives).float()
            fallback = torch.where((fallback.sum(dim=1) == 0)[:, None], 1.0, fallback)  # no negative at all: any
            return torch.where(bad[:, None], fallback, torch.nan_to_num(w, nan=0.0))

        neg_image = torch.multinomial(weights(sim_t2i), 1, generator=generator).squeeze(1)
        neg_text = torch.multinomial(weights(sim_i2t), 1, generator=generator).squeeze(1)
    return neg_image, neg_text


class Stage1Objective(nn.Module):
    def __init__(self, model: Blip2, dec_token_id: int, pad_token_id: int):
        super().__init__()
        if not model.config.with_text_heads:
            raise ValueError("stage 1 needs the Q-Former text heads (with_text_heads=True in the model config)")
        self.model = model
        self.dec_token_id = dec_token_id
        self.pad_token_id = pad_token_id

    def forward(self, batch: Stage1Batch, negatives: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor]:
        m = self.model
        backend = m.kernel_backend
        ids, mask = batch.input_ids.to(m.device), batch.attention_mask.to(m.device)
        embeds = m.image_embeds(batch.pixel_values, frozen_features=batch.frozen_features)  # (B, N, Dv)
        b, nq = embeds.shape[0], m.config.num_query_tokens

        # 1. queries over the image; 2. text alone
        image_kv = m.qformer.image_kv(embeds)
        query_out, past = m.qformer(m.query_tokens.expand(b, -1, -1), num_queries=nq, image_kv=image_kv)
        img_feats = F.normalize(m.vision_projection(query_out), dim=-1)  # (B, Q, E)
        text_out, _ = m.qformer(m.embeddings(ids), num_queries=0, text_mask=mask)
        txt_feat = F.normalize(m.text_projection(text_out[:, 0]), dim=-1)  # (B, E)

        # ITC against every rank's features (gathered copies carry no gradient, the same in one process)
        with torch.no_grad():
            m.temp.clamp_(0.001, 0.5)  # as LAVIS: keeps 1/temp bounded
        sizes = D.batch_sizes(b, m.device)
        offset = D.offset(sizes)
        ids_all = None if batch.image_ids is None else D.gather_no_grad(batch.image_ids.to(m.device), sizes)
        loss_itc, sim_i2t, sim_t2i = kernels.itc_loss(
            img_feats, txt_feat, m.temp, img_all=D.gather_no_grad(img_feats, sizes),
            txt_all=D.gather_no_grad(txt_feat, sizes), offset=offset,
            image_ids=None if batch.image_ids is None else batch.image_ids.to(m.device),
            image_ids_all=ids_all, label_smoothing=ITC_LABEL_SMOOTHING, backend=backend)

        # ITM: pos, (neg image, pos text), (pos image, neg text)
        positives = itm_positives(b, offset, sim_i2t.shape[1], m.device,
                                  None if batch.image_ids is None else batch.image_ids.to(m.device), ids_all)
        neg_image, neg_text = negatives if negatives is not None else sample_hard_negatives(sim_i2t, sim_t2i, positives)
        if D.world_size() == 1:
            kv_neg = image_kv.take(neg_image)
        else:
            kv_neg = m.qformer.image_kv(D.gather_with_grad(embeds, sizes)[neg_image])
        kv_itm = ImageKV.cat([image_kv, kv_neg, image_kv])
        ids_world, mask_world = D.gather_no_grad(ids, sizes), D.gather_no_grad(mask, sizes)
        itm_ids = torch.cat([ids, ids, ids_world[neg_text]])
        itm_mask = torch.cat([mask, mask, mask_world[neg_text]])
        itm_logits = m.itm_logits(None, itm_ids, itm_mask, image_kv=kv_itm)  # (3B, 2)
        itm_labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(m.device)
        loss_itm = F.cross_entropy(itm_logits.float(), itm_labels)

        # ITG: [DEC] + text behind the queries' cached keys/values, predicting the next token
        dec_ids = ids.clone()
        dec_ids[:, 0] = self.dec_token_id
        labels = dec_ids.masked_fill(dec_ids == self.pad_token_id, -100)
        itg_out, _ = m.qformer(m.embeddings(dec_ids), num_queries=nq, text_mask=mask,
                               mode=AttentionMode.MULTIMODAL_CAUSAL, past=past)
        head = m.itg_head
        loss_itg = kernels.linear_cross_entropy(head.hidden(itg_out[:, :-1]), head.decoder.weight, labels[:, 1:],
                                                head.bias, ITG_LABEL_SMOOTHING, backend=backend)
        return {"loss": loss_itc + loss_itm + loss_itg, "itc": loss_itc, "itm": loss_itm, "itg": loss_itg}
