"""easy-vqa (the `easy-vqa` package): 64 px images of one coloured shape, with its official
split (4,000 train / 1,000 test) and question/answer pairs.

Captions are built from each image's own answers, with one template:

    CAPTION_TEMPLATE = "a {color} {shape}"     e.g. "a teal triangle"

the colour and the shape from the image's own answers ("what color is the triangle?" -> blue
names both). 8 colours x 3 shapes: 24 distinct captions. The question/answer pairs stay for zero-shot VQA.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from blip2rt.errors import CheckpointError

from .assets import easy_vqa_dir

CAPTION_TEMPLATE = "a {color} {shape}"
SPLITS = ("train", "test")


@dataclass
class EasyVqaImage:
    image: Path
    image_id: int
    color: str
    shape: str
    qa: list[tuple[str, str]] = field(default_factory=list)

    @property
    def caption(self) -> str:
        return CAPTION_TEMPLATE.format(color=self.color, shape=self.shape)


def load_split(split: str, root: Path | None = None) -> list[EasyVqaImage]:
    if split not in SPLITS:
        raise ValueError(f"easy-vqa split {split!r}: expected one of {SPLITS}")
    root = root or easy_vqa_dir()
    qfile = root / split / "questions.json"
    if not qfile.is_file():
        raise CheckpointError(f"{qfile} is missing: reinstall easy-vqa")
    by_image: dict[int, list[tuple[str, str]]] = {}
    for question, answer, image_id in json.loads(qfile.read_text()):
        by_image.setdefault(int(image_id), []).append((question, answer))
    out = []
    for image_id in sorted(by_image):
        path = root / split / "images" / f"{image_id}.png"
        color, shape = _color_and_shape(by_image[image_id])
        if color is None or shape is None:  # about 7% of images: their questions leave it open
            seen_color, seen_shape = read_shape(path)
            color, shape = color or seen_color, shape or seen_shape
        out.append(EasyVqaImage(path, image_id, color, shape, by_image[image_id]))
    return out


# The generator's fill colours (exact RGB of the shape's interior pixels).
PALETTE = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "teal": (0, 128, 128), "brown": (139, 69, 19), "black": (0, 0, 0), "gray": (128, 128, 128)}


def read_shape(path: Path) -> tuple[str, str]:
    """Colour and shape from the pixels: the most common colour after the background is the
    fill; how much of its bounding box it fills tells the shape (rectangle ~1, circle ~pi/4,
    triangle ~1/2). Used only where an image's questions leave one of them open; the
    agreement with the answers is measured in tests/test_embedded_data.py."""
    import numpy as np
    from PIL import Image

    try:
        rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int32)
    except OSError as e:
        raise CheckpointError(f"easy-vqa image {path} is unreadable ({e})") from None
    flat = rgb.reshape(-1, 3)
    values, counts = np.unique(flat, axis=0, return_counts=True)
    order = np.argsort(-counts)
    fill = values[order[1]] if len(order) > 1 else values[order[0]]
    color = min(PALETTE, key=lambda c: float(((np.array(PALETTE[c]) - fill) ** 2).sum()))
    ys, xs = np.nonzero((rgb == fill).all(axis=-1))
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    ratio = len(ys) / box
    shape = "rectangle" if ratio > 0.9 else "circle" if ratio > 0.64 else "triangle"
    return color, shape


COLORS = ("red", "green", "blue", "yellow", "teal", "brown", "black", "gray")
SHAPES = ("circle", "rectangle", "triangle")


def _color_and_shape(qa: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    """What the answers say. A "what ..." question answered with a colour or a shape (its wording
    may name the other); a yes/no question about a named colour or shape, negated or not, says
    whether it is there; a value ruled out by all but one candidate is the remaining one."""
    has: dict[str, set[str]] = {"color": set(), "shape": set()}
    hasnt: dict[str, set[str]] = {"color": set(), "shape": set()}
    for q, a in qa:
        words = q.rstrip("?").split()
        named = {"color": [w for w in words if w in COLORS], "shape": [w for w in words if w in SHAPES]}
        if words[0] == "what":
            if a in COLORS:
                has["color"].add(a)
                has["shape"].update(named["shape"])
            elif a in SHAPES:
                has["shape"].add(a)
                has["color"].update(named["color"])
        elif a in ("yes", "no"):
            negated = "not" in words or "no" in words
            present = (a == "yes") != negated
            for kind in ("color", "shape"):
                (has if present else hasnt)[kind].update(named[kind])
    out = []
    for kind, values in (("color", COLORS), ("shape", SHAPES)):
        if len(has[kind]) > 1 or has[kind] & hasnt[kind]:
            raise CheckpointError(f"easy-vqa answers contradict each other about the {kind}: {qa}")
        left = [v for v in values if v not in hasnt[kind]]
        out.append(next(iter(has[kind]), left[0] if len(left) == 1 else None))
    return out[0], out[1]


def annotation_rows(images: list[EasyVqaImage], group_by_caption: bool = False) -> list[dict]:
    """LAVIS-style caption records (what blip2rt.training reads); image paths are absolute.
    group_by_caption: image_id is the caption, so the trainer treats images that share one as
    the same (ITC positives, never ITM negatives)."""
    return [{"image": str(im.image), "caption": im.caption,
             "image_id": im.caption if group_by_caption else im.image_id} for im in images]


def write_annotations(images: list[EasyVqaImage], path: Path, group_by_caption: bool = False) -> Path:
    """annotation_rows, written as a JSON file."""
    rows = annotation_rows(images, group_by_caption)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def majority_answer(images: list[EasyVqaImage]) -> tuple[str, float]:
    """The most common answer over all QA pairs and the accuracy of always giving it."""
    counts = Counter(a for im in images for _, a in im.qa)
    answer, n = counts.most_common(1)[0]
    return answer, n / sum(counts.values())
