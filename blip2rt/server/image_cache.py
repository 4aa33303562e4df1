"""The image-embedding cache: soft prompts keyed by the image bytes' hash (and, for a model whose
Q-Former reads the question, that text), least recently used first out, bounded in bytes. A hit
skips the ViT and the Q-Former."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np


class EmbeddingCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: tuple, value: np.ndarray) -> None:
        """Keeps a copy of `value` (Q, W); one larger than the whole cache is not kept."""
        if value.nbytes > self.max_bytes:
            return
        value = np.array(value, copy=True)
        value.flags.writeable = False
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            self._items[key] = value
            self.bytes += value.nbytes
            while self.bytes > self.max_bytes:
                _, gone = self._items.popitem(last=False)
                self.bytes -= gone.nbytes
                self.evictions += 1
