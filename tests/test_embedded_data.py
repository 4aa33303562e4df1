"""easy-vqa as the embedded default's data: the official split, captions from each image's own
answers (the template in blip2rt/embedded/easy_vqa.py), and the pixel fallback checked against
the answers wherever those decide."""

import re

import pytest

from blip2rt.embedded import easy_vqa as E
from blip2rt.embedded.assets import easy_vqa_dir


@pytest.fixture(scope="module")
def splits():
    return {s: E.load_split(s) for s in E.SPLITS}


def test_official_split_and_caption_template(splits):
    assert len(splits["train"]) == 4000 and len(splits["test"]) == 1000
    for images in splits.values():
        captions = {im.caption for im in images}
        assert len(captions) == 24  # 8 colours x 3 shapes, all present
        pattern = re.compile(rf"^a ({'|'.join(E.COLORS)}) ({'|'.join(E.SHAPES)})$")
        assert all(pattern.match(c) for c in captions)
        assert all(im.image.is_file() and im.qa for im in images)
    assert not {im.image for im in splits["train"]} & {im.image for im in splits["test"]}


def test_captions_agree_with_every_answer(splits):
    """No caption contradicts a question: "what color is the shape?" -> its colour, and yes/no
    questions about a named colour or shape answered as the caption implies."""
    wrong = []
    for im in splits["test"]:
        for q, a in im.qa:
            words = q.rstrip("?").split()
            if words[0] == "what" and a in E.COLORS and a != im.color:
                wrong.append((im.image_id, q, a, im.caption))
            if words[0] == "what" and a in E.SHAPES and a != im.shape:
                wrong.append((im.image_id, q, a, im.caption))
            if a in ("yes", "no"):
                negated = "not" in words or "no" in words
                present = (a == "yes") != negated
                for w in words:
                    if (w in E.COLORS and (w == im.color) != present) or (w in E.SHAPES and (w == im.shape) != present):
                        wrong.append((im.image_id, q, a, im.caption))
    assert not wrong, wrong[:5]


def test_pixel_reading_matches_the_answers_where_they_decide():
    import json

    by = {}
    for q, a, i in json.loads((easy_vqa_dir() / "test" / "questions.json").read_text()):
        by.setdefault(i, []).append((q, a))
    color_ok = color_n = shape_ok = shape_n = 0
    for i, qa in by.items():
        color, shape = E._color_and_shape(qa)
        seen_color, seen_shape = E.read_shape(easy_vqa_dir() / "test" / "images" / f"{i}.png")
        if color:
            color_n, color_ok = color_n + 1, color_ok + (seen_color == color)
        if shape:
            shape_n, shape_ok = shape_n + 1, shape_ok + (seen_shape == shape)
    assert color_n > 900 and shape_n > 900
    assert color_ok / color_n >= 0.99 and shape_ok / shape_n >= 0.99, (color_ok, color_n, shape_ok, shape_n)


def test_annotations_feed_the_trainer(splits, tmp_path):
    from blip2rt.training.data import load_annotations

    path = E.write_annotations(splits["test"][:10], tmp_path / "test.json")
    rows = load_annotations([path])
    assert [r["caption"] for r in rows] == [im.caption for im in splits["test"][:10]]
    answer, rate = E.majority_answer(splits["test"])
    assert answer in ("yes", "no") and 0.2 < rate < 0.6
