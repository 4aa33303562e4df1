"""Retrieval with `Blip2`'s heads (BLIP-2 §4.3): ITC similarity ranks every pair, ITM + ITC re-scores
each image's (and each text's) k best. One protocol, shared by `rank_texts` and the evaluator
(training/evaluate.py); `itm` and `itc` score pairs of images and texts directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blip2rt import kernels


@dataclass
class RetrievalScores:
    itc: torch.Tensor  # (I, T) ITC similarity: max over queries of the cosine, no temperature
    i2t: torch.Tensor  # (I, T) ITM + ITC for each image's k best texts, -inf elsewhere
    t2i: torch.Tensor  # (T, I) ITM + ITC for each text's k best images, -inf elsewhere


class RetrievalMixin:
    """Needs of its host: `itm_logits`, `text_features`, `image_query_features`, `image_embeds`,
    `qformer_text_ids`, `_pixels`, `kernel_backend` and `_need_text_heads`."""

    @torch.no_grad()
    def itm(self, images, texts) -> torch.Tensor:
        """(B,) probability that text i matches image i (softmax of the ITM head, class 1)."""
        self._need_text_heads("itm")
        px = self._pixels(images)
        ids, mask = self.qformer_text_ids(texts)
        if px.shape[0] != ids.shape[0]:
            if px.shape[0] == 1:
                px = px.expand(ids.shape[0], -1, -1, -1)
            elif ids.shape[0] == 1:
                ids, mask = ids.expand(px.shape[0], -1), mask.expand(px.shape[0], -1)
            else:
                raise InputError(f"itm pairs image i with text i: got {px.shape[0]} images and {ids.shape[0]} texts")
        return self.itm_logits(self.image_embeds(px), ids, mask).softmax(dim=-1)[:, 1]

    @torch.no_grad()
    def itc(self, images, texts) -> torch.Tensor:
        """(B_img, B_txt) cosine similarity, max over queries, without the temperature."""
        self._need_text_heads("itc")
        img = self.image_query_features(self.image_embeds(self._pixels(images)))  # (Bi, Q, E)
        txt = self.text_features(*self.qformer_text_ids(texts))  # (Bt, E)
        return kernels.query_max_similarity(img, txt, backend=self.kernel_backend)

    @torch.no_grad()
    def rank_texts(self, images, texts, k: int = 128) -> torch.Tensor:
        """(B_img, B_txt) retrieval scores: ITC similarity ranks all texts; the top k of each image
        are re-scored by ITM positive logit + ITC (BLIP-2's protocol); the rest score -inf."""
        self._need_text_heads("retrieval")
        embeds = self.image_embeds(self._pixels(images))  # (Bi, N, Dv)
        return self.retrieval_scores(embeds, *self.qformer_text_ids(texts), k=k).i2t

    @torch.no_grad()
    def retrieval_scores(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         k: int = 128, batch_size: int = 32, show_progress: bool = False) -> RetrievalScores:
        """BLIP-2's retrieval protocol over I images (B, N, Dv after ln_vision) and T texts (Q-Former
        ids and mask): ITC similarity of every pair, then each image's k best texts and each text's k
        best images re-scored by ITM positive logit + ITC; pairs outside those score -inf."""
        from tqdm.auto import tqdm

        self._need_text_heads("retrieval")
        n_img, n_txt = image_embeds.shape[0], input_ids.shape[0]
        img_feats = torch.cat([self.image_query_features(image_embeds[s: s + batch_size])
                               for s in range(0, n_img, batch_size)])  # (I, Q, E)
        txt_feats = torch.cat([self.text_features(input_ids[s: s + batch_size], attention_mask[s: s + batch_size])
                               for s in range(0, n_txt, batch_size)])  # (T, E)
        sims = kernels.query_max_similarity(img_feats, txt_feats, backend=self.kernel_backend)  # (I, T) fp32
        # every image's k best texts and every text's k best images, as (image, text) pairs
        ki, kt = min(k, n_txt), min(k, n_img)
        top_t = sims.topk(ki, dim=1).indices  # (I, ki)
        top_i = sims.topk(kt, dim=0).indices.T  # (T, kt)
        pair_img = torch.cat([torch.arange(n_img, device=sims.device).repeat_interleave(ki), top_i.flatten()])
        pair_txt = torch.cat([top_t.flatten(), torch.arange(n_txt, device=sims.device).repeat_interleave(kt)])
        itm_batch = 4 * batch_size  # the pairs share nothing, so they batch freely
        itm = []
        for s in tqdm(range(0, len(pair_img), itm_batch), desc="retrieval: ITM re-ranking", disable=not show_progress):
            im, tx = pair_img[s: s + itm_batch], pair_txt[s: s + itm_batch]
            itm.append(self.itm_logits(image_embeds[im], input_ids[tx], attention_mask[tx])[:, 1].float())
        rescored = torch.cat(itm) + sims[pair_img, pair_txt]  # ITM positive logit + ITC
        n_i2t = n_img * ki
        i2t = torch.full_like(sims, float("-inf"))
        i2t[pair_img[:n_i2t], pair_txt[:n_i2t]] = rescored[:n_i2t]
        t2i = torch.full_like(sims.T, float("-inf"))
        t2i[pair_txt[n_i2t:], pair_img[n_i2t:]] = rescored[n_i2t:]
        return RetrievalScores(itc=sims, i2t=i2t, t2i=t2i)
