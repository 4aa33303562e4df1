"""Training data: caption annotations or WebDataset shards -> augmented images + token ids.

- Annotations: LAVIS/COCO-style JSON, `[{"image": relative path, "caption": str, "image_id": any}]`,
  plus an image root. Several files may be given. VQA fine-tuning reads
  `[{"image", "question", "answer": str or list of str}]`.
- Shards: WebDataset tar files, each sample `KEY.jpg|png|webp` + `KEY.txt` (or `KEY.json` with
  "caption"), read with `tarfile` and split across ranks and workers by shard.
- Augmentation as BLIP-2: RandomResizedCrop(scale 0.5-1, bicubic) + horizontal flip + CLIP
  mean/std. Every random draw is seeded from (seed, epoch, index), so a resumed run and any
  number of loader workers see the same crops.
- Captions are cleaned as LAVIS does (lower case, punctuation to spaces, at most `max_words`).
- A missing or corrupt image is skipped and counted (`Batch.skipped`), never fatal.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blip2rt.errors import Blip2rtError, ImageError
from blip2rt.images import CLIP_MEAN, CLIP_STD, open_image, to_rgb
from blip2rt.json_files import read_json
from blip2rt.front_end import PromptLayout, pad_rows

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def clean_caption(caption: str, max_words: int = 50) -> str:
    """LAVIS's pre_caption: lower case, some punctuation to spaces, squeezed, at most max_words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def load_annotations(paths: Sequence[str | Path], fields: tuple[str, ...] = ("image", "caption")) -> list[dict]:
    """The records of JSON annotation files, each checked to hold `fields`."""
    records = []
    for path in paths:
        path = Path(path)
        data = read_json(path, "annotation file")
        if not isinstance(data, list) or not all(isinstance(r, dict) and all(f in r for f in fields) for r in data):
            raise Blip2rtError(f"annotation file {path} must be a JSON list of objects with "
                               + " and ".join(repr(f) for f in fields))
        records.extend(data)
    if not records:
        raise Blip2rtError("the annotation files hold no records")
    return records


VQA_FIELDS = ("image", "question", "answer")


def training_answer(answer: str | list[str]) -> str:
    """The answer VQA fine-tuning learns: the given one, or the most frequent of several (the first
    of equals), stripped."""
    if isinstance(answer, str):
        return answer.strip()
    if not answer:
        raise Blip2rtError("a VQA record has an empty answer list")
    answers = [str(a).strip() for a in answer]
    return max(answers, key=answers.count)


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    return random.Random(hash((seed, epoch, index)) & 0xFFFFFFFF)


def train_transform(img: Image.Image, size: int, rng: random.Random, augment: bool = True,
                    mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """RGB PIL image -> (3, size, size) float32, normalised by mean/std (the encoder's); RandomResizedCrop
    + flip if augment."""
    img = to_rgb(img)
    if augment:
        w, h = img.size
        area = w * h
        for _ in range(10):  # torchvision's RandomResizedCrop: scale (0.5, 1), ratio (3/4, 4/3)
            target = area * rng.uniform(0.5, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
                img = img.crop((x0, y0, x0 + cw, y0 + ch))
                break
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = img.resize((size, size), resample=Image.Resampling.BICUBIC)
    arr = (np.asarray(img, dtype=np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


@dataclass
class Sample:
    index: int
    caption: str
    image_id: int
    seed: int = 0  # for per-sample draws made after loading (the stage-2 prefix split)
    question: str | None = None  # VQA: the question; `caption` then holds the answer to learn
    pixel_values: torch.Tensor | None = None  # None: the image could not be read
    frozen_features: torch.Tensor | None = None
    error: str | None = None


class CaptionDataset(torch.utils.data.Dataset):
    def __init__(self, annotations: Sequence[str | Path], image_root: str | Path, image_size: int,
                 augment: bool = True, max_words: int = 50, seed: int = 0, feature_cache=None,
                 normalization: tuple[Sequence[float], Sequence[float]] = (CLIP_MEAN, CLIP_STD), vqa: bool = False):
        """vqa: the records are questions ({"image", "question", "answer"}); a sample's caption is the
        answer (the most frequent, where several are given)."""
        self.vqa = vqa
        self.records = load_annotations(annotations, VQA_FIELDS if vqa else ("image", "caption"))
        self.image_root = Path(image_root)
        self.image_size, self.augment, self.max_words, self.seed = image_size, augment, max_words, seed
        self.normalization = normalization  # (mean, std) the image encoder was trained with
        self.epoch = 0
        self.feature_cache = feature_cache
        # image_id -> a dense integer (ITC soft targets and ITM masking compare ids)
        ids = {}
        self.image_ids = [ids.setdefault(str(r.get("image_id", r["image"])), len(ids)) for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, i: int) -> Path:
        return self.image_root / self.records[i]["image"]

    def __getitem__(self, i: int) -> Sample:
        rec = self.records[i]
        text = training_answer(rec["answer"]) if self.vqa else clean_caption(rec["caption"], self.max_words)
        sample = Sample(index=i, caption=text, image_id=self.image_ids[i],
                        seed=sample_rng(self.seed, self.epoch, i).getrandbits(32),
                        question=str(rec["question"]).strip() if self.vqa else None)
        if self.feature_cache is not None:
            sample.frozen_features = self.feature_cache.get(str(rec["image"]))
            if sample.frozen_features is None:
                sample.error = f"image {rec['image']} could not be read when the feature cache was built"
            return sample
        try:
            img = open_image(self.image_path(i))
            sample.pixel_values = train_transform(img, self.image_size, sample_rng(self.seed, self.epoch, i),
                                                  self.augment, *self.normalization)
        except ImageError as e:
            sample.error = str(e)
        return sample


class ShardDataset(torch.utils.data.IterableDataset):
    """WebDataset tar shards, split by shard across ranks and loader workers."""

    def __init__(self, shards: Sequence[str | Path], image_size: int, augment: bool = True, max_words: int = 50,
                 seed: int = 0, rank: int = 0, world: int = 1,
                 normalization: tuple[Sequence[float], Sequence[float]] = (CLIP_MEAN, CLIP_STD)):
        self.shards = [Path(s) for s in shards]
        self.normalization = normalization
        missing = [s for s in self.shards if not s.is_file()]
        if missing:
            raise Blip2rtError(f"shard {missing[0]} does not exist")
        self.image_size, self.augment, self.max_words, self.seed = image_size, augment, max_words, seed
        self.rank, self.world, self.epoch = rank, world, 0

    def _my_shards(self) -> list[Path]:
        info = torch.utils.data.get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        return self.shards[self.rank * workers + wid:: self.world * workers]

    def __iter__(self) -> Iterator[Sample]:
        n = 0
        for shard in self._my_shards():
            for key, files in _tar_samples(shard):
                image = next((files[s] for s in IMAGE_SUFFIXES if s in files), None)
                caption = files.get(".txt", b"").decode("utf-8", "replace")
                if not caption and ".json" in files:
                    caption = json.loads(files[".json"]).get("caption", "")
                key_id = zlib.crc32(key.encode())  # str hash() differs between processes
                sample = Sample(index=n, caption=clean_caption(caption, self.max_words), image_id=key_id,
                                seed=sample_rng(self.seed, self.epoch, key_id).getrandbits(32))
                n += 1
                try:
                    if image is None:
                        raise ImageError(f"sample {key} in {shard.name} has no image")
                    img = open_image(Image.open(io.BytesIO(image)))
                    sample.pixel_values = train_transform(img, self.image_size,
                                                          sample_rng(self.seed, self.epoch, key_id), self.augment,
                                                          *self.normalization)
                except (ImageError, OSError) as e:
                    sample.error = str(e)
                yield sample


def _tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {".jpg": bytes, ".txt": bytes, ...}) for consecutive members sharing a key."""
    key, files = None, {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name
            stem, dot, ext = name.rpartition(".")
            if not dot:
                continue
            if stem != key and files:
                yield key, files
                files = {}
            key = stem
            f = tar.extractfile(member)
            files["." + ext.lower()] = f.read() if f else b""
    if files:
        yield key, files


class ResumableSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch, this rank's share of it, starting at `start` (resume)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True):
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(n / world)

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.per_rank - self.start

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order += order[: self.per_rank * self.world - self.n]  # pad so every rank has as many
        mine = order[self.rank:: self.world]
        return iter(mine[self.start:])


@dataclass
class Batch:
    objective_inputs: object  # Stage1Batch or Stage2Batch
    size: int
    skipped: int  # samples dropped for unreadable images


class Stage1Collate:
    """Samples -> Stage1Batch; Q-Former ids padded to a fixed length so ranks can gather them."""

    def __init__(self, tokenizer, max_length: int = 32):
        self.tok, self.max_length = tokenizer, max_length

    def __call__(self, samples: list[Sample]) -> Batch:
        from .stage1 import Stage1Batch

        ok = [s for s in samples if s.error is None]
        if not ok:
            return Batch(None, 0, len(samples))
        enc = self.tok([s.caption for s in ok], padding="max_length", truncation=True, max_length=self.max_length,
                       return_tensors="pt")
        images = _stack_images(ok)
        return Batch(Stage1Batch(enc["input_ids"], enc["attention_mask"], image_ids=torch.tensor([s.image_id for s in ok]),
                                 **images), len(ok), len(samples) - len(ok))


class Stage2Collate:
    """Samples -> Stage2Batch for a decoder-only or an encoder-decoder LLM."""

    def __init__(self, tokenizer, encoder_decoder: bool, max_length: int = 32, prompt: str = "",
                 text_suffix: str | None = None, bos_token_id: int | None = None, bos_before_soft_prompt: bool = False):
        """The text behind the soft prompt is laid out as generation lays out its prompt
        (front_end.PromptLayout): with no prompt, the LLM's BOS precedes the caption, given and not
        predicted, where the tokenizer adds none; where the model puts the BOS before the soft prompt,
        the one the tokenizer adds goes."""
        self.tok, self.enc_dec, self.max_length, self.prompt = tokenizer, encoder_decoder, max_length, prompt
        self.suffix = text_suffix if text_suffix is not None else (tokenizer.eos_token or "")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.layout = PromptLayout(encoder_decoder, bos_token_id, pad, bos_before_soft_prompt)
        self.prompt_len = len(tokenizer(prompt)["input_ids"]) if prompt else 0

    def __call__(self, samples: list[Sample]) -> Batch:
        from .stage2 import Stage2Batch, split_for_prefix_lm

        ok = [s for s in samples if s.error is None]
        if not ok:
            return Batch(None, 0, len(samples))
        images = _stack_images(ok)
        if self.enc_dec:
            pairs = [split_for_prefix_lm(s.caption, random.Random(s.seed)) for s in ok]
            ids, mask = self.layout.prompt_ids(self._rows([self.prompt + p for p, _ in pairs]))
            targets, target_mask = pad_rows(self._rows([t for _, t in pairs]), self.layout.pad_token_id, left=False)
            labels = np.where(target_mask == 1, targets, -100)
        else:
            laid = [self.layout.training_row(row, self.prompt_len, bool(self.prompt))
                    for row in self._rows([self.prompt + s.caption + self.suffix for s in ok])]
            ids, mask, labels = self.layout.teacher_forced([r for r, _ in laid], [g for _, g in laid])
        batch = Stage2Batch(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels), **images)
        return Batch(batch, len(ok), len(samples) - len(ok))

    def _rows(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, truncation=True, max_length=self.max_length)["input_ids"]


class VqaCollate:
    """Samples with questions -> Stage2Batch for VQA fine-tuning (BLIP-2 §4.2).

    The LLM reads `template.format(question)` (given, not predicted; tokenised and laid out exactly
    as `Blip2.encode_prompts` does at inference) and learns the answer after it, then `text_suffix`
    (decoder-only) or its EOS (encoder-decoder). The question also goes to the Q-Former in its own
    WordPiece ids, [CLS] first."""

    def __init__(self, tokenizer, qformer_tokenizer, encoder_decoder: bool, template: str, max_length: int = 32,
                 text_suffix: str | None = None, bos_token_id: int | None = None, bos_before_soft_prompt: bool = False,
                 max_question_length: int = 32):
        self.tok, self.qtok, self.enc_dec, self.template = tokenizer, qformer_tokenizer, encoder_decoder, template
        self.max_length, self.max_question_length = max_length, max_question_length
        self.suffix = text_suffix if text_suffix is not None else (tokenizer.eos_token or "")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.layout = PromptLayout(encoder_decoder, bos_token_id, pad, bos_before_soft_prompt)

    def __call__(self, samples: list[Sample]) -> Batch:
        from .stage2 import Stage2Batch

        ok = [s for s in samples if s.error is None]
        if not ok:
            return Batch(None, 0, len(samples))
        q_rows = self.qtok([s.question for s in ok], truncation=True, max_length=self.max_question_length)["input_ids"]
        q_ids, q_mask = pad_rows(q_rows, self.qtok.pad_token_id or 0, left=False)
        prompts = [self.template.format(s.question) for s in ok]
        if self.enc_dec:
            ids, mask = self.layout.prompt_ids(self.tok(prompts, truncation=True, max_length=self.max_length)["input_ids"])
            answers = self.tok([s.caption for s in ok], truncation=True, max_length=self.max_length)["input_ids"]
            targets, target_mask = pad_rows(answers, self.layout.pad_token_id, left=False)
            labels = np.where(target_mask == 1, targets, -100)
        else:
            rows, given = [], []
            for s, p in zip(ok, self.layout.prompt_rows(self.tok(prompts)["input_ids"])):
                a = self.tok(" " + s.caption + self.suffix, add_special_tokens=False)["input_ids"]
                rows.append(p + a[: self.max_length])  # max_length caps the answer; the prompt stays whole
                given.append(len(p))
            ids, mask, labels = self.layout.teacher_forced(rows, given)
        batch = Stage2Batch(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels),
                            qformer_input_ids=torch.from_numpy(q_ids), qformer_attention_mask=torch.from_numpy(q_mask),
                            **_stack_images(ok))
        return Batch(batch, len(ok), len(samples) - len(ok))


def _stack_images(samples: list[Sample]) -> dict[str, torch.Tensor]:
    if samples[0].frozen_features is not None:
        return {"frozen_features": torch.stack([s.frozen_features for s in samples])}
    return {"pixel_values": torch.stack([s.pixel_values for s in samples])}
