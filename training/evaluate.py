"""Evaluation: image-text retrieval (stage 1), captioning and zero-shot VQA (stage 2).

- Retrieval (BLIP-2 §4.3): rank the distinct texts by ITC similarity, re-rank each image's top
  k by ITM positive logit + ITC (and each text's top k images likewise); R@1/5/10 both ways, an
  image counting as found if any of its captions is.
- Captioning: BLEU-4 and CIDEr with pycocoevalcap when it is installed (else a message saying
  how to get them); the captions are returned either way.
- VQA: accuracy of the generated answer against the reference answers (VQA's min(#matches/3, 1)
  when several are given), after lower-casing and stripping punctuation and articles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from blip2rt import retrieval as model_scores
from blip2rt.errors import Blip2rtError
from blip2rt.images import pixel_values

from .data import clean_caption


@dataclass
class RetrievalScores(model_scores.RetrievalScores):
    """The model's scores (itc, i2t, t2i) over the distinct images (I) and distinct captions (T) of
    a set of records, with what the records say matches."""

    images: list[str]
    texts: list[str]
    positive: torch.Tensor  # (I, T) bool: the image has the caption


def retrieval(model, records: list[dict], image_root: str | Path, k: int = 128, batch_size: int = 32,
              show_progress: bool = False, features=None) -> dict[str, float]:
    """R@1/5/10 both ways over the distinct images and the distinct (cleaned) captions: a caption
    shared by several images (easy-vqa's 24, COCO's rare duplicates) is one text, and each of
    those images counts it as its own."""
    s = retrieval_scores(model, records, image_root, k, batch_size, show_progress, features)
    metrics = recall_at_k(s.i2t, s.t2i, s.positive)
    metrics["itc_i2t_r1"] = recall_at_k(s.itc, s.itc.T, s.positive, ks=(1,))["i2t_r1"]  # before ITM re-ranking
    metrics["images"], metrics["texts"] = len(s.images), len(s.texts)
    return metrics


@torch.no_grad()
def retrieval_scores(model, records: list[dict], image_root: str | Path, k: int = 128, batch_size: int = 32,
                     show_progress: bool = False, features=None) -> RetrievalScores:
    """ITC over every (image, caption) pair, then ITM + ITC re-ranking of each one's k best (BLIP-2).
    features: a FeatureCache of the images' frozen ViT output, read instead of running the ViT."""
    images = list(dict.fromkeys(r["image"] for r in records))
    img_index = {name: i for i, name in enumerate(images)}
    texts = list(dict.fromkeys(clean_caption(r["caption"]) for r in records))
    txt_index = {t: i for i, t in enumerate(texts)}
    positive = torch.zeros(len(images), len(texts), dtype=torch.bool)  # (I, T)
    for r in records:
        positive[img_index[r["image"]], txt_index[clean_caption(r["caption"])]] = True
    embeds = torch.cat([image_embeds(model, images[s: s + batch_size], image_root, features)
                        for s in tqdm(range(0, len(images), batch_size), desc="retrieval: images",
                                      disable=not show_progress)])  # (I, N, Dv)
    scores = model.retrieval_scores(embeds, *model.qformer_text_ids(texts), k=k, batch_size=batch_size,
                                    show_progress=show_progress)
    return RetrievalScores(scores.itc, scores.i2t, scores.t2i, images=images, texts=texts, positive=positive)


def recall_at_k(i2t: torch.Tensor, t2i: torch.Tensor, positive: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """i2t (I, T) and t2i (T, I) scores, positive (I, T) bool -> R@k both ways: the share of images
    with a positive text among their k best, and of texts with a positive image among theirs."""
    out = {}
    for k in ks:
        top_t = i2t.topk(min(k, i2t.shape[1]), dim=1).indices  # (I, k)
        out[f"i2t_r{k}"] = positive.gather(1, top_t).any(1).float().mean().item()
        top_i = t2i.topk(min(k, t2i.shape[1]), dim=1).indices  # (T, k)
        out[f"t2i_r{k}"] = positive.T.gather(1, top_i).any(1).float().mean().item()
    return out


def caption_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float | str]:
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        return {"note": "BLEU-4 and CIDEr need pycocoevalcap: pip install pycocoevalcap"}
    gts = {k: [clean_caption(c) for c in v] for k, v in references.items()}
    res = {k: [clean_caption(predictions[k])] for k in references}
    bleu, _ = Bleu(4).compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


def image_embeds(model, names: list[str], image_root: str | Path, features=None) -> torch.Tensor:
    """(B, N, Dv) after ln_vision of these annotation images: read from `features` (a FeatureCache)
    where given, else through the frozen ViT."""
    if features is None:
        vc = model.config.vision_config
        return model.image_embeds(pixel_values([Path(image_root) / n for n in names], vc.image_size, vc.image_mean,
                                               vc.image_std))
    rows = [features.get(str(n)) for n in names]
    missing = [n for n, r in zip(names, rows) if r is None]
    if missing:
        raise Blip2rtError(f"image {missing[0]} has no row in the feature cache (it could not be read when the "
                           "cache was built, or the cache is of other images)")
    return model.image_embeds(frozen_features=torch.stack(rows))


def _image_args(model, names: list[str], image_root: str | Path, features) -> dict:
    """caption()'s and answer()'s image arguments: the paths, or the cached features' embeddings."""
    if features is None:
        return {"images": [Path(image_root) / n for n in names]}
    return {"images": None, "image_embeds": image_embeds(model, names, image_root, features)}


@torch.no_grad()
def captioning(model, records: list[dict], image_root: str | Path, batch_size: int = 16, prompt: str | None = None,
               show_progress: bool = False, features=None, **gen) -> dict:
    refs: dict[str, list[str]] = {}
    for r in records:
        refs.setdefault(r["image"], []).append(r["caption"])
    names = list(refs)
    preds = {}
    for s in tqdm(range(0, len(names), batch_size), desc="captioning", disable=not show_progress):
        batch = names[s: s + batch_size]
        for n, c in zip(batch, model.caption(**_image_args(model, batch, image_root, features), prompt=prompt, **gen)):
            preds[n] = c
    return {"captions": preds, **caption_scores(preds, refs)}


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(a: str) -> str:
    """The answer's first line, lower-cased, without punctuation and articles."""
    lines = a.strip().splitlines()
    a = re.sub(r"[^\w\s]", " ", (lines[0] if lines else "").lower())
    return " ".join(_ARTICLES.sub(" ", a).split())


@torch.no_grad()
def vqa(model, records: list[dict], image_root: str | Path, batch_size: int = 16, show_progress: bool = False,
        features=None, **gen) -> dict:
    """records: {"image", "question", "answer": str | list[str]}; each answer is scored on its first
    line (see normalize_answer), which "scored" holds."""
    correct = 0.0
    answers = []
    for s in tqdm(range(0, len(records), batch_size), desc="vqa", disable=not show_progress):
        batch = records[s: s + batch_size]
        outs = model.answer(questions=[r["question"] for r in batch],
                            **_image_args(model, [r["image"] for r in batch], image_root, features), **gen)
        for r, out in zip(batch, outs):
            refs = r["answer"] if isinstance(r["answer"], list) else [r["answer"]]
            hits = sum(normalize_answer(out) == normalize_answer(x) for x in refs)
            correct += min(1.0, hits / 3) if len(refs) > 1 else float(hits > 0)
            answers.append(out)
    return {"accuracy": correct / max(1, len(records)), "answers": answers,
            "scored": [normalize_answer(a) for a in answers]}
