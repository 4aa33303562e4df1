"""The front end both runtimes share (the PyTorch model and `OrtBlip2`): images, prompts and
questions in, numpy ids and masks and generation arguments out. It imports no torch.

Written once so that the two runtimes cannot drift: which BOS goes where, how prompts are padded,
how one prompt is spread over a batch, and how the defaults and the user's arguments combine.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InputError

__all__ = ["as_image_list", "default_prompt_ids", "drop_leading_bos",
           "generation_args", "pad_rows", "per_image", "static_cache_length", "LENGTH_BUCKET"]

LENGTH_BUCKET = 32  # static KV caches are this many positions long, or a multiple


def static_cache_length(prompt: int, max_new: int) -> int:
    """The static KV cache's length for a prompt (soft prompt included) and `max_new` tokens, rounded
    up to a multiple of LENGTH_BUCKET, so that captions of nearby lengths share one buffer set, one
    compiled step and one CUDA graph."""
    return -(-(prompt + max_new) // LENGTH_BUCKET) * LENGTH_BUCKET


def as_image_list(images) -> list:
    """One image (a path or a PIL image) or a list of them -> a non-empty list."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise InputError("no images given")
    return list(images)


def per_image(values: str | Sequence[str] | None, batch: int, what: str) -> list[str] | None:
    """One text for every image, or one per image -> a list of `batch` texts (None stays None)."""
    if values is None:
        return None
    values = [values] * batch if isinstance(values, str) else list(values)
    if len(values) != batch:
        raise InputError(f"{batch} images but {len(values)} {what}s; give one {what} per image or one for all")
    return values


def generation_args(defaults: dict, gen: dict) -> dict:
    """The defaults, overridden by the user's `gen`. A user's short maximum wins over a default
    minimum; greedy search drops the beam-only length penalty."""
    out = {**defaults, **gen}
    if "max_new_tokens" in out and "min_new_tokens" in out:
        out["min_new_tokens"] = min(out["min_new_tokens"], out["max_new_tokens"])
    if out.get("num_beams", 1) == 1:
        out.pop("length_penalty", None)
    return out


def drop_leading_bos(rows: list[list[int]], bos: int | None) -> list[list[int]]:
    """Each row without a leading `bos` (None: unchanged): for models that put the BOS before the
    soft prompt themselves (Blip2Config.bos_before_soft_prompt)."""
    return rows if bos is None else [r[1:] if r[:1] == [bos] else r for r in rows]


def pad_rows(rows: list[list[int]], pad_id: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    """Token rows -> ids and mask (B, T) int64, padded on the left (decoder-only LLMs, so the text
    ends where generation starts) or on the right (T5, and the Q-Former's BERT text)."""
    t = max(len(r) for r in rows)
    ids = np.full((len(rows), t), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), t), dtype=np.int64)
    for i, r in enumerate(rows):
        cols = slice(t - len(r), t) if left else slice(0, len(r))
        ids[i, cols], mask[i, cols] = r, 1
    return ids, mask


def default_prompt_ids(batch: int, bos: int | None, bos_before_soft_prompt: bool) -> np.ndarray:
    """The prompt when none is given (B, 0 or 1): the LLM's BOS alone (as LAVIS's empty prompt and
    transformers' default), or nothing where there is no BOS or it already precedes the soft prompt."""
    if bos is None or bos_before_soft_prompt:
        return np.zeros((batch, 0), dtype=np.int64)
    return np.full((batch, 1), bos, dtype=np.int64)
