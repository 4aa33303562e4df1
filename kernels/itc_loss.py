"""BLIP-2's image-text contrastive loss (BLIP-2 §3.2, ITC):

    s[i, t] = max_q img[i, q] . txt[t] / temp
    loss    = (CE(s_i2t, targets) + CE(s_t2i, targets)) / 2,    label smoothing 0.1

The query max is the fused op (`query_max_similarity`: a Triton kernel that never stores the
(B_i, B_t, Q) similarities, or its torch reference); the cross-entropy runs in torch on the small
(B, B_all) matrix. This module imports no Triton.

Distributed: each rank scores its B images against all gathered texts and its B texts against all
gathered images; the gathered copies carry no gradient (as LAVIS's all-gather), and the targets are
`offset + arange(B)` (offset = rank * B for equal batches). One process (no gathered features, or
the local ones themselves): the same features on both sides, with gradient, as LAVIS on one GPU.

NaN contract: a NaN in the features makes the similarities it touches NaN (the running max keeps
a NaN once seen) and so the loss NaN; it is never skipped by the max.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import implementation


def itc_loss(
    img: torch.Tensor,  # (B, Q, D) this rank's image query features, normalised
    txt: torch.Tensor,  # (B, D) this rank's text features, normalised
    temp: torch.Tensor,  # scalar, learnable
    *,
    img_all: torch.Tensor | None = None,  # (B * world, Q, D) gathered; None: single process
    txt_all: torch.Tensor | None = None,  # (B * world, D) gathered
    offset: int = 0,  # where this rank's rows start among the gathered ones (rank * B for equal batches)
    image_ids: torch.Tensor | None = None,  # (B,) for soft targets on multi-caption data
    image_ids_all: torch.Tensor | None = None,  # (B * world,)
    label_smoothing: float = 0.1,
    backend: str = "torch",  # the query max's: "torch" or "triton" (the fused kernel)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, sim_i2t, sim_t2i); the sims are (B, B * world), temperature applied."""
    qmax = implementation("query_max_similarity", backend)
    b = img.shape[0]
    if (img_all is None or img_all is img) and (txt_all is None or txt_all is txt):
        # one process (the "gathered" features are these very tensors): the full gradient, both ways,
        # as LAVIS on one GPU
        raw = qmax(img, txt)  # (B, B)
        sim_i2t, sim_t2i = raw / temp, raw.t() / temp
    else:
        if img_all is None or txt_all is None:
            raise ValueError("itc_loss: pass both img_all and txt_all (the gathered features), or neither")
        sim_i2t = qmax(img, txt_all.detach()) / temp  # (B, B_all)
        sim_t2i = qmax(img_all.detach(), txt).t() / temp  # (B, B_all)
    if image_ids is None:
        targets = torch.arange(offset, offset + b, device=img.device)
        loss = (F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
                + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)) / 2
    else:
        ids_all = image_ids if image_ids_all is None else image_ids_all
        positives = (image_ids[:, None] == ids_all[None, :]).float()  # (B, B_all)
        soft = (1 - label_smoothing) * positives / positives.sum(1, keepdim=True) + label_smoothing / ids_all.numel()
        loss = (-(soft * F.log_softmax(sim_i2t, dim=1)).sum(1).mean()
                - (soft * F.log_softmax(sim_t2i, dim=1)).sum(1).mean()) / 2
    return loss, sim_i2t, sim_t2i
