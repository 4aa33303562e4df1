"""A learnable toy set: coloured shapes on white, captioned from colour and shape."""

import json
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")


def draw(colour: str, shape: str, size: int = 56, jitter: int = 0) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    lo, hi = 8 + jitter, size - 8 - jitter
    if shape == "circle":
        d.ellipse((lo, lo, hi, hi), fill=COLOURS[colour])
    elif shape == "square":
        d.rectangle((lo, lo, hi, hi), fill=COLOURS[colour])
    else:
        d.polygon([(size // 2, lo), (hi, hi), (lo, hi)], fill=COLOURS[colour])
    return img


def make_toy_set(root: Path, repeats: int = 2, corrupt: int = 0) -> Path:
    """root/images/*.png and root/train.json; `corrupt` extra records point at broken files."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for r in range(repeats):
        for colour in COLOURS:
            for shape in SHAPES:
                name = f"images/{colour}_{shape}_{r}.png"
                draw(colour, shape, jitter=2 * r).save(root / name)
                records.append({"image": name, "caption": f"a {colour} {shape}.", "image_id": f"{colour}_{shape}_{r}"})
    for i in range(corrupt):
        name = f"images/broken_{i}.png"
        (root / name).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
        records.append({"image": name, "caption": "a broken file", "image_id": f"broken_{i}"})
    (root / "train.json").write_text(json.dumps(records))
    return root / "train.json"
