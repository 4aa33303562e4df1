"""What `blip2rt serve` is set up with: where it listens, what it runs, and the limits it holds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None  # the id /v1/models lists; the folder's name by default
    max_batch: int = 16  # rows of the in-flight KV buffer: requests decoding at once
    context: int = 512  # columns of that buffer: prompt plus new tokens of one request, at most
    max_queue: int = 64  # requests waiting for a slot; beyond it, 503 with Retry-After
    max_tokens: int = 256  # max_tokens is clamped to this
    max_body_bytes: int = 16 << 20
    max_image_pixels: int = 40_000_000  # width x height, read from the header before decoding
    max_images: int = 8  # per request
    max_text_chars: int = 4000  # of the text that becomes the prompt
    max_stop: int = 4  # stop strings per request
    request_timeout_s: float = 120.0
    retry_after_s: int = 1
    cache_bytes: int = 256 << 20  # the image-embedding cache; 0 turns it off
    allow_url_fetch: bool = False
    allow_local_dir: Path | None = None
    url_fetch_timeout_s: float = 10.0
