"""A blip2rt server on loopback for the tests: uvicorn in a thread of the test process, on a free port,
and small helpers to make requests and images."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import numpy as np
from PIL import Image

from blip2rt.server import ServerSettings, build


def tiny_export(ref, tmp_path_factory, name: str):
    """A reference's tiny model with the tiny LLM tokenizer, exported (static graph included)."""
    import blip2rt
    from blip2rt.export import export_model
    from hf_reference import with_tiny_tokenizer

    src = with_tiny_tokenizer(ref, tmp_path_factory.mktemp(f"{name}_src"))
    out = tmp_path_factory.mktemp(f"{name}_export")
    export_model(blip2rt.from_pretrained(src, device="cpu"), out)
    return out


@contextmanager
def running(export, settings: ServerSettings | None = None, **load_args):
    """Serves `export` on 127.0.0.1 (a free port); yields the base URL. Stops the server on exit."""
    import uvicorn

    settings = settings or ServerSettings()
    app = build(str(export), settings, provider="cpu", **load_args)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def png(seed: int = 0, size=(40, 30), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def user(*images: bytes, text: str | None = None) -> list[dict]:
    """One user message with these images and text."""
    parts = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    if text is not None:
        parts.insert(0, {"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


def post(base: str, body, path: str = "/v1/chat/completions", timeout: float = 60,
         headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers); `body` a dict (sent as JSON) or raw bytes."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data, {"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), dict(e.headers)


def get(base: str, path: str, timeout: float = 30) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(base + path, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(base: str, name: str) -> float:
    """A metric's value from /metrics (the sum over its labels)."""
    _, text = get(base, "/metrics")
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + " ") or line.startswith(name + "{")]
    assert values, f"{name} is not in /metrics"
    return sum(values)
