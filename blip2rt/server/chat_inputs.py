"""A chat request -> what BLIP-2 reads: the images and the text of one user turn.

BLIP-2 is not a chat model. It reads the last user message; if that message has no image, the images
of the latest earlier user message that has one (a follow-up question about the same picture).
System, assistant and older turns are not read. Each image is its own BLIP-2 input, with the same
text, and gets its own choice in the response, in the order of the images: `choices[i]` answers
image i. No text asks for a caption; text is a question, asked as `answer()` asks it.

Images come as data: URLs (PNG, JPEG or WebP in base64). The server fetches http(s) URLs only
with --allow-url-fetch and reads local files only under --allow-local-dir. An image's size is read
from its header and refused above the pixel limit before any decoding.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from blip2rt.errors import ImageError
from blip2rt.images import open_image, to_rgb

from .errors import bad_request
from .openai_schema import ChatCompletionRequest, ImagePart, TextPart
from .settings import ServerSettings

FORMATS = ("PNG", "JPEG", "WEBP")


@dataclass
class ChatInput:
    images: list[Image.Image]  # RGB, decoded
    digests: list[str]  # sha256 of each image's bytes: the embedding cache's key
    question: str | None  # None: a caption


def read_chat(req: ChatCompletionRequest, s: ServerSettings) -> ChatInput:
    users = [m for m in req.messages if m.role == "user"]
    if not users:
        raise bad_request("the messages have no user message", "messages")
    last = users[-1]
    text = " ".join(p.text for p in _parts(last) if isinstance(p, TextPart)).strip()
    with_images = [m for m in users if any(isinstance(p, ImagePart) for p in _parts(m))]
    if not with_images:
        raise bad_request("BLIP-2 answers about images: give at least one image_url part in a user message",
                          "messages")
    urls = [p.image_url.url for p in _parts(with_images[-1]) if isinstance(p, ImagePart)]
    if len(urls) > s.max_images:
        raise bad_request(f"{len(urls)} images in one message; this server takes at most {s.max_images}", "messages")
    if len(text) > s.max_text_chars:
        raise bad_request(f"the text is {len(text)} characters; this server takes at most {s.max_text_chars}",
                          "messages")
    images, digests = [], []
    for i, url in enumerate(urls):
        data = image_bytes(url, s)
        images.append(decode_image(data, s, f"image {i}"))
        digests.append(hashlib.sha256(data).hexdigest())
    return ChatInput(images, digests, text or None)


def _parts(message) -> list:
    c = message.content
    if c is None:
        return []
    if isinstance(c, str):
        return [TextPart(type="text", text=c)]
    return c


def image_bytes(url: str, s: ServerSettings) -> bytes:
    scheme = urlparse(url).scheme.lower() if ":" in url[:12] else ""
    if scheme == "data":
        head, sep, payload = url.partition(",")
        if not sep or not head.lower().endswith(";base64"):
            raise bad_request("an image data: URL must be base64: data:image/png;base64,...", "messages")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request("the image's base64 is malformed or truncated", "messages") from None
    if scheme in ("http", "https"):
        if not s.allow_url_fetch:
            raise bad_request("this server does not fetch image URLs; send the image as a data: URL "
                              "(or start the server with --allow-url-fetch)", "messages")
        return _fetch(url, s)
    if scheme in ("file", ""):
        return _local_file(unquote(urlparse(url).path) if scheme == "file" else url, s)
    raise bad_request(f"image URLs with scheme {scheme!r} are not read; send a data: URL", "messages")


def _fetch(url: str, s: ServerSettings) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=s.url_fetch_timeout_s) as r:  # noqa: S310 (opted in)
            data = r.read(s.max_body_bytes + 1)
    except OSError as e:
        raise bad_request(f"could not fetch the image ({e})", "messages") from None
    if len(data) > s.max_body_bytes:
        raise bad_request(f"the fetched image is over {s.max_body_bytes} bytes", "messages")
    return data


def _local_file(path: str, s: ServerSettings) -> bytes:
    if s.allow_local_dir is None:
        raise bad_request("this server reads no local files; send the image as a data: URL "
                          "(or start the server with --allow-local-dir DIR)", "messages")
    root = Path(s.allow_local_dir).resolve()
    p = (root / path).resolve()
    if not p.is_relative_to(root):
        raise bad_request("local images are read only under the server's --allow-local-dir", "messages")
    if not p.is_file():
        raise bad_request(f"no image file {path} under the server's --allow-local-dir", "messages")
    if p.stat().st_size > s.max_body_bytes:
        raise bad_request(f"the image file is over {s.max_body_bytes} bytes", "messages")
    return p.read_bytes()


def decode_image(data: bytes, s: ServerSettings, name: str) -> Image.Image:
    """PNG/JPEG/WebP bytes -> an RGB image; the pixel count checked from the header first."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise bad_request(f"{name} is not an image (PNG, JPEG or WebP)", "messages") from None
    except Image.DecompressionBombError:
        raise bad_request(f"{name} has more pixels than this server decodes", "messages") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise bad_request(f"{name} could not be read ({e})", "messages") from None
    if img.format not in FORMATS:
        raise bad_request(f"{name} is {img.format}; send PNG, JPEG or WebP", "messages")
    w, h = img.size
    if w * h > s.max_image_pixels:
        raise bad_request(f"{name} is {w}x{h} pixels; this server decodes at most {s.max_image_pixels} pixels",
                          "messages")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return to_rgb(open_image(img))
    except ImageError as e:
        raise bad_request(f"{name}: {e}", "messages") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise bad_request(f"{name} could not be decoded ({e})", "messages") from None
