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


def _oracle(m, pixels, texts, k):
    """Brute force, one pair at a time: ITC = max over queries of the cosine of that image's query
    features with that text's feature; ITM = that pair's positive logit. Each image keeps its k best
    texts by ITC, scored ITM + ITC; the rest -inf (BLIP-2's protocol). Returns (I, T) ITC and scores."""
    n_img, n_txt = pixels.shape[0], len(texts)
    itc, itm = torch.zeros(n_img, n_txt), torch.zeros(n_img, n_txt)
    with torch.no_grad():
        for i in range(n_img):
            embeds = m.image_embeds(pixels[i:i + 1])
            queries = m.image_query_features(embeds)[0]  # (Q, E)
            for t, text in enumerate(texts):
                enc = m.qformer_tokenizer([text], return_tensors="pt")  # this text alone: no padding
                feature = m.text_features(enc["input_ids"], enc["attention_mask"])[0]
                itc[i, t] = max(float(queries[q] @ feature) for q in range(queries.shape[0]))
                itm[i, t] = m.itm_logits(embeds, enc["input_ids"], enc["attention_mask"])[0, 1]
    return itc, itm


def _rerank(itc_row, itm_row, k):
    out = torch.full_like(itc_row, float("-inf"))
    for j in sorted(range(len(itc_row)), key=lambda j: -itc_row[j])[:k]:
        out[j] = itm_row[j] + itc_row[j]
    return out


def test_rank_texts_and_evaluate_retrieval_equal_a_brute_force_oracle(tmp_path):
    """On 5 images and 4 distinct captions (two images share one), k = 2: the re-ranked scores and every
    recall equal the pair-by-pair oracle's."""
    import blip2rt
    from blip2rt.images import pixel_values
    from blip2rt.training import evaluate
    from toy_data import draw

    torch.manual_seed(0)
    m = blip2rt.from_pretrained("tiny", device="cpu")
    shapes = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle"), ("red", "square")]
    captions = ["a red circle", "a blue square", "a green triangle", "a red circle", "a red square"]  # 0 and 3 share
    (tmp_path / "images").mkdir()
    records = []
    for i, ((colour, shape), caption) in enumerate(zip(shapes, captions)):
        draw(colour, shape, jitter=i).save(tmp_path / "images" / f"{i}.png")
        records.append({"image": f"images/{i}.png", "caption": caption})
    texts = list(dict.fromkeys(captions))
    vc = m.config.vision_config
    px = pixel_values([tmp_path / r["image"] for r in records], vc.image_size, vc.image_mean, vc.image_std)
    itc, itm = _oracle(m, px, texts, k=2)

    got = m.rank_texts(px, texts, k=2)
    want = torch.stack([_rerank(itc[i], itm[i], 2) for i in range(len(records))])
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)], atol=1e-5, rtol=1e-5)

    scores = evaluate.retrieval_scores(m, records, tmp_path, k=2, batch_size=2)  # batches smaller than the sets
    i2t = want
    t2i = torch.stack([_rerank(itc[:, t], itm[:, t], 2) for t in range(len(texts))])
    positive = torch.tensor([[texts.index(c) == t for t in range(len(texts))] for c in captions])
    assert scores.texts == texts and torch.equal(scores.positive, positive)
    torch.testing.assert_close(scores.itc, itc, atol=1e-5, rtol=1e-5)
    for got_scores, want_scores in ((scores.i2t, i2t), (scores.t2i, t2i)):
        assert torch.equal(torch.isinf(got_scores), torch.isinf(want_scores))
        torch.testing.assert_close(got_scores[~torch.isinf(got_scores)], want_scores[~torch.isinf(want_scores)],
                                   atol=1e-5, rtol=1e-5)
    metrics = evaluate.retrieval(m, records, tmp_path, k=2, batch_size=2)
    oracle = recall_at_k(i2t, t2i, positive)
    for key, value in oracle.items():
        assert metrics[key] == pytest.approx(value), key
    assert metrics["itc_i2t_r1"] == pytest.approx(recall_at_k(itc, itc.T, positive, ks=(1,))["i2t_r1"])
    assert (metrics["images"], metrics["texts"]) == (5, 4)
