"""Retrieval recall over distinct captions (training/evaluate.recall_at_k), checked against a
plain-Python count on random scores and on a hand-made case where a caption is shared."""

import random

import pytest
import torch

from blip2rt.training.evaluate import recall_at_k


def _python_recall(i2t, t2i, positive, k):
    n_img, n_txt = len(positive), len(positive[0])
    hits_i = sum(any(positive[i][t] for t in sorted(range(n_txt), key=lambda t: -i2t[i][t])[:k]) for i in range(n_img))
    hits_t = sum(any(positive[i][t] for i in sorted(range(n_img), key=lambda i: -t2i[t][i])[:k]) for t in range(n_txt))
    return hits_i / n_img, hits_t / n_txt


def test_shared_caption_counts_for_every_image_that_has_it():
    positive = torch.tensor([[1, 0], [1, 0], [0, 1]], dtype=torch.bool)  # images 0 and 1 share text 0
    i2t = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])  # image 2 ranks the wrong text first
    t2i = torch.tensor([[0.5, 0.9, 0.1], [0.9, 0.1, 0.2]])  # text 1 ranks image 0 first (wrong)
    r = recall_at_k(i2t, t2i, positive, ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(2 / 3) and r["t2i_r1"] == 1 / 2
    assert r["i2t_r2"] == 1.0 and r["t2i_r2"] == 1.0  # text 1's top 2 (images 0, 2) include image 2


def test_matches_a_plain_count_on_random_scores():
    g = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    n_img, n_txt = 37, 11
    positive = torch.zeros(n_img, n_txt, dtype=torch.bool)
    for i in range(n_img):
        positive[i, rng.randrange(n_txt)] = True
    i2t, t2i = torch.randn(n_img, n_txt, generator=g), torch.randn(n_txt, n_img, generator=g)
    r = recall_at_k(i2t, t2i, positive)
    for k in (1, 5, 10):
        want_i, want_t = _python_recall(i2t.tolist(), t2i.tolist(), positive.tolist(), k)
        assert r[f"i2t_r{k}"] == pytest.approx(want_i) and r[f"t2i_r{k}"] == pytest.approx(want_t)
