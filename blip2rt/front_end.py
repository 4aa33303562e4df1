"""The front end both runtimes share (the PyTorch model and `OrtBlip2`), and the training collates:
images, prompts and questions in, ids, masks, positions and generation arguments out. It imports no
torch (the few functions that take arrays take numpy arrays or torch tensors alike).

Written once so that the runtimes cannot drift: which BOS goes where, how prompts are padded, the
positions under left padding (`PromptLayout`), how one prompt is spread over a batch, and how the
defaults and the user's arguments combine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InputError

__all__ = ["as_image_list", "default_prompt_ids", "drop_leading_bos", "generation_args", "pad_rows", "per_image",
           "static_cache_length", "LENGTH_BUCKET", "PromptLayout", "TextInputs", "left_padded_positions"]

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


def caption_texts(prompts: list[str] | None, batch: int) -> tuple[list[str] | None, int, list[str]]:
    """A caption's text, as `text_inputs` takes it: the prompt (None: the default) is also what the
    Q-Former reads, "" where there is none."""
    return prompts, batch, list(prompts) if prompts else [""] * batch


def answer_texts(questions: Sequence[str], template: str) -> tuple[list[str], int, list[str]]:
    """A question's text, as `text_inputs` takes it: the LLM reads it in `template`, the Q-Former bare."""
    return [template.format(q) for q in questions], len(questions), list(questions)


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


def left_padded_positions(mask):
    """Position ids (B, L) of a left-padded sequence's mask (B, L): 0, 1, ... over the kept tokens,
    and 1 at the padding (transformers' rule, so the positions match its generate). numpy arrays or
    torch tensors."""
    return (mask.cumsum(1) - 1) * mask + (1 - mask)


def _cat_columns(parts: list, like):
    """Concatenates (B, n) arrays along dim 1, in numpy or torch, whichever `like` is."""
    if isinstance(like, np.ndarray):
        return np.concatenate(parts, axis=1)
    import torch  # only when handed torch tensors

    return torch.cat(parts, dim=1)


def _ones(like, rows: int, cols: int):
    """(rows, cols) ones of `like`'s dtype (and device)."""
    if isinstance(like, np.ndarray):
        return np.ones((rows, cols), like.dtype)
    return like.new_ones((rows, cols))


@dataclass
class TextInputs:
    """One batch's text: the LLM's prompt after the soft prompt and, for a model whose Q-Former reads
    text (VQA fine-tuning, InstructBLIP), that text in the Q-Former's ids. numpy (B, T) int64."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    qformer_input_ids: np.ndarray | None = None
    qformer_attention_mask: np.ndarray | None = None

    def qformer(self) -> dict:
        """generate()'s Q-Former keywords."""
        return {"qformer_input_ids": self.qformer_input_ids, "qformer_attention_mask": self.qformer_attention_mask}


@dataclass(frozen=True)
class PromptLayout:
    """The one owner of how an LLM's input is laid out behind the soft prompt. The PyTorch model,
    `OrtBlip2`, the static decoder, the numpy search and the training collates all ask it.

    Decoder-only LLMs read [BOS ;] soft prompt ; prompt, the prompt left-padded for generation (its
    text ends where the new tokens start) and right-padded for training; T5's encoder reads
    soft prompt ; prompt, right-padded. The BOS goes before the soft prompt only where the model
    says so (`bos_before_soft_prompt`); the prompt then loses the BOS its tokenizer adds. With no
    prompt, the LLM's BOS alone follows the soft prompt (LAVIS's empty prompt, transformers'
    default), unless it already precedes it.
    """

    encoder_decoder: bool
    bos_token_id: int | None
    pad_token_id: int  # the tokenizer's: what prompts are padded with
    bos_before_soft_prompt: bool = False

    @property
    def bos_first(self) -> bool:
        """A BOS embedding precedes the soft prompt."""
        return self.bos_before_soft_prompt and not self.encoder_decoder and self.bos_token_id is not None

    def prefix_length(self, num_soft: int) -> int:
        """Positions before the prompt: the soft prompt, and the BOS before it."""
        return num_soft + int(self.bos_first)

    # -- prompts for generation ---------------------------------------------------------------------

    def prompt_rows(self, rows: list[list[int]]) -> list[list[int]]:
        """Each prompt's ids as the tokenizer gives them -> what follows the soft prompt."""
        return drop_leading_bos(rows, self.bos_token_id if self.bos_first else None)

    def prompt_ids(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenizer rows -> prompt ids and mask (B, T): left-padded (decoder-only) or right (T5)."""
        return pad_rows(self.prompt_rows(rows), self.pad_token_id, left=not self.encoder_decoder)

    def default_ids(self, batch: int) -> np.ndarray:
        """The prompt when none is given (B, 0 or 1)."""
        return default_prompt_ids(batch, self.bos_token_id, self.bos_before_soft_prompt)

    def text_inputs(self, rows: list[list[int]] | None, batch: int, question_rows: list[list[int]] | None = None,
                    question_pad: int = 0) -> TextInputs:
        """The LLM's prompt (tokenizer rows, or None for the default) and, where the Q-Former reads
        text, its rows (right-padded with `question_pad`, [CLS] first as BERT gives them)."""
        if rows is None:
            ids = self.default_ids(batch)
            mask = np.ones_like(ids)
        else:
            ids, mask = self.prompt_ids(rows)
        q_ids = q_mask = None
        if question_rows is not None:
            q_ids, q_mask = pad_rows(question_rows, question_pad, left=False)
        return TextInputs(ids, mask, q_ids, q_mask)

    def full_mask(self, num_soft: int, mask):
        """The prompt's mask (B, T) -> the LLM's (B, prefix + T): the BOS and soft prompt always kept.
        numpy or torch."""
        return _cat_columns([_ones(mask, mask.shape[0], self.prefix_length(num_soft)), mask], mask)

    positions = staticmethod(left_padded_positions)

    # -- teacher-forced text for training -----------------------------------------------------------

    def training_row(self, row: list[int], given: int, has_prompt: bool) -> tuple[list[int], int]:
        """One decoder-only training text (the tokenizer's ids of prompt + target) and how many of its
        first ids are given, not predicted -> as the LLM reads it behind the soft prompt: without the
        BOS its tokenizer adds where the BOS goes first; with the BOS (given) where generation would
        start from the default prompt and the tokenizer adds none."""
        bos = self.bos_token_id
        if self.bos_first and row[:1] == [bos]:
            return row[1:], max(0, given - 1)
        if not has_prompt and not self.bos_first and bos is not None and row[:1] != [bos]:
            return [bos] + row, given + 1
        return row, given

    def teacher_forced(self, rows: list[list[int]], given: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Training rows -> ids, mask and labels (B, T), right-padded; the given ids and the padding
        are labelled -100 (never predicted)."""
        ids, mask = pad_rows(rows, self.pad_token_id, left=False)
        labels = np.where(mask == 1, ids, -100)
        for i, g in enumerate(given):
            labels[i, :g] = -100
        return ids, mask, labels
