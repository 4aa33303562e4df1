"""Frozen image features cached on disk: with a frozen ViT and no augmentation, the ViT's output
never changes, so it is computed once and later epochs skip the ViT entirely.

Stored before ln_vision (which trains): `features.npy` (images, tokens, width) memmap, float16 for
training (half the disk and reads; the rounding is below the LayerNorm's noise) or float32 for
evaluation (the pixels' exact result), and `index.json` mapping each image's annotation path to
its row. Unreadable images have no row.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from blip2rt.errors import ImageError
from blip2rt.images import open_image

from .data import train_transform


class FeatureCache:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.index: dict[str, int] = json.loads((folder / "index.json").read_text())
        self.features = np.load(folder / "features.npy", mmap_mode="r")

    def get(self, image: str) -> torch.Tensor | None:
        row = self.index.get(image)
        return None if row is None else torch.from_numpy(np.array(self.features[row], dtype=np.float32))

    @staticmethod
    def exists(folder: str | Path) -> bool:
        return (Path(folder) / "index.json").is_file() and (Path(folder) / "features.npy").is_file()

    @classmethod
    def build(cls, model, images: list[str], image_root: str | Path, folder: str | Path,
              batch_size: int = 32, show_progress: bool = True, dtype=np.float16) -> "FeatureCache":
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        unique = list(dict.fromkeys(images))
        vc = model.config.vision_config
        size = vc.image_size
        tokens = model.config.vision_config.num_patches + 1
        width = model.config.vision_config.hidden_size
        tmp = folder / "features.npy.tmp"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(len(unique), tokens, width))
        index, row = {}, 0
        for start in tqdm(range(0, len(unique), batch_size), desc="caching image features", unit="batch",
                          disable=not show_progress):
            names, pixels = [], []
            for name in unique[start: start + batch_size]:
                try:
                    pixels.append(train_transform(open_image(Path(image_root) / name), size, None, False,
                                                  vc.image_mean, vc.image_std))
                    names.append(name)
                except ImageError:
                    continue  # counted as skipped when training reads it
            if not pixels:
                continue
            with torch.no_grad():
                feats = model.vision_model.encode(torch.stack(pixels).to(model.device))
            out[row: row + len(names)] = feats.float().cpu().numpy().astype(dtype)
            index.update({n: row + i for i, n in enumerate(names)})
            row += len(names)
        out.flush()
        del out
        tmp.replace(folder / "features.npy")
        (folder / "index.json.tmp").write_text(json.dumps(index))
        (folder / "index.json.tmp").replace(folder / "index.json")
        return cls(folder)
