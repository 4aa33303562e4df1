"""The front end both runtimes share: padding, BOS, one prompt for a batch, generation defaults."""

import numpy as np
import pytest

from blip2rt.errors import InputError
from blip2rt.front_end import (as_image_list, default_prompt_ids, drop_leading_bos, generation_args, pad_rows,
                               per_image)
from blip2rt.generation_defaults import CAPTION_DEFAULTS, VQA_DEFAULTS


def test_rows_pad_left_for_decoders_and_right_for_t5():
    rows = [[5, 6, 7], [8]]
    ids, mask = pad_rows(rows, pad_id=0, left=True)
    np.testing.assert_array_equal(ids, [[5, 6, 7], [0, 0, 8]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
    ids, mask = pad_rows(rows, pad_id=9, left=False)
    np.testing.assert_array_equal(ids, [[5, 6, 7], [8, 9, 9]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0]])
    assert ids.dtype == mask.dtype == np.int64


def test_only_a_leading_bos_is_dropped():
    assert drop_leading_bos([[1, 4, 1], [4, 1], []], 1) == [[4, 1], [4, 1], []]
    assert drop_leading_bos([[1, 4]], None) == [[1, 4]]


def test_the_default_prompt_is_the_bos_unless_it_already_leads():
    np.testing.assert_array_equal(default_prompt_ids(2, 7, False), [[7], [7]])
    assert default_prompt_ids(2, 7, True).shape == (2, 0)
    assert default_prompt_ids(3, None, False).shape == (3, 0)


def test_one_text_spreads_over_the_batch_and_a_wrong_count_is_refused():
    assert per_image("a photo of", 3, "prompt") == ["a photo of"] * 3
    assert per_image(["a", "b"], 2, "question") == ["a", "b"]
    assert per_image(None, 4, "prompt") is None
    with pytest.raises(InputError, match="3 images but 2 questions; give one question per image or one for all"):
        per_image(["a", "b"], 3, "question")


def test_generation_arguments_merge_over_the_defaults():
    assert generation_args(CAPTION_DEFAULTS, {}) == CAPTION_DEFAULTS
    # a user's short maximum wins over the default minimum (8)
    assert generation_args(CAPTION_DEFAULTS, {"max_new_tokens": 3})["min_new_tokens"] == 3
    assert generation_args(CAPTION_DEFAULTS, {"min_new_tokens": 2})["min_new_tokens"] == 2
    # the VQA default's length penalty weighs beams only
    assert generation_args(VQA_DEFAULTS, {})["length_penalty"] == VQA_DEFAULTS["length_penalty"]
    assert "length_penalty" not in generation_args(VQA_DEFAULTS, {"num_beams": 1})
    assert CAPTION_DEFAULTS == dict(num_beams=5, max_new_tokens=30, min_new_tokens=8)  # the table is not mutated


def test_images_become_a_non_empty_list():
    assert as_image_list("a.jpg") == ["a.jpg"]
    assert as_image_list(("a.jpg", "b.jpg")) == ["a.jpg", "b.jpg"]
    with pytest.raises(InputError, match="no images given"):
        as_image_list([])
