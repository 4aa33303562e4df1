"""torch.compile's on-disk caches, keyed on the code of blip2rt's fused ops.

torch.compile keeps compiled graphs on disk across processes (inductor's FX graph cache and
AOTAutograd's cache). Their keys do not cover a custom op's Python: its implementation, its fake, or
the backward formula registered for it. After this package's code changes (an upgrade, a local edit),
a warm cache can replay a backward compiled against the old code: with the old arguments, which
fails, or with the old formula, which gives wrong gradients without a word. So importing the package
adds a digest of its own sources to torch's cache-key tag (`torch.compiler.config.cache_key_tag`):
changed kernels, new cache entries. A tag the user set is kept beside it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

KERNELS_DIR = Path(__file__).resolve().parent
TAG_PREFIX = "blip2rt-kernels-"


def source_digest(source_dir: Path = KERNELS_DIR) -> str:
    """16 hex digits over the names and bytes of the package's Python files, in name order."""
    digest = hashlib.sha256()
    for path in sorted(Path(source_dir).glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def tag_compile_caches(source_dir: Path = KERNELS_DIR) -> str | None:
    """Puts this package's digest in torch.compile's cache-key tag, replacing an older blip2rt digest and
    keeping any other tag ("|"-separated); the tag now in force, or None where this torch has no such
    setting."""
    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):
        return None
    ours = TAG_PREFIX + source_digest(source_dir)
    parts = [part for part in str(config.cache_key_tag).split("|") if part]
    if ours not in parts:
        config.cache_key_tag = "|".join([part for part in parts if not part.startswith(TAG_PREFIX)] + [ours])
    return config.cache_key_tag
