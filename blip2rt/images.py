"""Image loading and preprocessing: any PIL mode to RGB, bicubic resize, mean/std (CLIP's by default).

Conversions, chosen so that nothing is silently wrong:
- grayscale ("L", "1") and CMYK/YCbCr go through PIL's own RGB conversion;
- alpha ("RGBA", "LA", palette with transparency) is composited onto white, so transparent
  pixels do not show whatever colour the file stored under them;
- 16-bit and 32-bit integer images ("I;16", "I") are scaled by their bit depth to 8 bits
  (PIL's own conversion would clip everything above 255 to white); float images ("F") are read
  as 0..1 when they lie in that range, else as 0..255.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import CLIP_MEAN, CLIP_STD
from .errors import ImageError, InputError
from .front_end import as_image_list

MIN_IMAGE_SIDE = 8  # smaller images carry no usable content once resized to 224 px

ImageInput = Union[str, Path, Image.Image]


def open_image(source: ImageInput) -> Image.Image:
    """Opens and fully decodes an image; a clear ImageError for missing, corrupt or truncated files."""
    name = getattr(source, "filename", None) or "<in-memory image>"
    if isinstance(source, (str, Path)):
        name = str(source)
        path = Path(source)
        if not path.exists():
            raise ImageError(f"image {name} does not exist")
        if path.is_dir():
            raise ImageError(f"image {name} is a directory, expected an image file")
        try:
            img = Image.open(path)
            img.load()  # decode now: truncation only shows here
        except UnidentifiedImageError:
            raise ImageError(f"image {name} is not an image format PIL can read") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"image {name} is corrupt or truncated ({e})") from None
    elif isinstance(source, Image.Image):
        img = source
        try:
            img.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"image {name} is corrupt or truncated ({e})") from None
    else:
        raise ImageError(f"expected an image path or a PIL image, got {type(source).__name__}")
    w, h = img.size
    if min(w, h) < MIN_IMAGE_SIDE:
        raise ImageError(f"image {name} is {w}x{h} pixels; at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} is needed")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB (see the module docstring for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        full_scale = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if mode == "I" and arr.max(initial=0) > 65535:
            full_scale = float(2**32 - 1) if arr.min(initial=0) >= 0 else float(2**31 - 1)
        gray = np.clip(np.rint(arr / full_scale * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        arr = np.asarray(img).astype(np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def pixel_array(images: Sequence[ImageInput], image_size: int, mean: Sequence[float] = CLIP_MEAN,
                std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """A batch of images -> (B, 3, image_size, image_size) float32 numpy, normalised by mean/std
    (CLIP's unless the encoder was trained with another)."""
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    batch = []
    for src in images:
        img = to_rgb(open_image(src)).resize((image_size, image_size), resample=Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
        batch.append(((arr - mean) / std).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(batch))


def pixel_values(images: Sequence[ImageInput], image_size: int, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD):
    """A batch of images -> (B, 3, image_size, image_size) float32 torch tensor (see pixel_array)."""
    import torch

    return torch.from_numpy(pixel_array(images, image_size, mean, std))


def encoder_pixels(images, vision_config):
    """What an image encoder reads: a pixel tensor (B, 3, H, W) as it is, or images (a path or PIL
    image, or a list of them) resized and normalised as `vision_config` says. A torch tensor."""
    import torch

    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"pixel_values must be (B, 3, H, W), got {tuple(images.shape)}")
        return images
    vc = vision_config
    return pixel_values(as_image_list(images), vc.image_size, vc.image_mean, vc.image_std)
