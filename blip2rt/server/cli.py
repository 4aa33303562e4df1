"""`blip2rt serve`'s flags and its run, importable without torch (the deployment install)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .settings import ServerSettings

HELP = "serve a model over HTTP: OpenAI's chat completions API, in-flight batching, an image-embedding cache"
DESCRIPTION = """\
Serves an export folder (`blip2rt export`; ONNX Runtime, in-flight batching on the CPU provider) or a model
(a Hugging Face folder, a LAVIS file with --config, or a preset; PyTorch, one request at a time) behind
OpenAI's chat completions API: POST /v1/chat/completions, GET /v1/models, /health and /metrics.

A user message's images (data: URLs) are each answered in a choice of their own; its text is the
question (no text: a caption). Needs `pip install blip2rt[serve]`.
"""
EXAMPLES = """\
examples:
  blip2rt serve blip2rt-demo/export
  blip2rt serve blip2rt-demo/export --port 9000 --max-batch 32 --cache-mb 512
  curl -s 127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' -d '{"messages": [{"role": "user",
      "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}]}'
"""


def add_serve_args(p: argparse.ArgumentParser) -> None:
    d = ServerSettings()
    p.add_argument("path", metavar="EXPORT_OR_MODEL",
                   help="an export folder (served by ONNX Runtime) or a model folder, LAVIS file or preset (PyTorch)")
    p.add_argument("--host", default=d.host, help=f"address to listen on (default: {d.host}, this machine only)")
    p.add_argument("--port", type=int, default=d.port, help=f"(default: {d.port})")
    p.add_argument("--model-name", default=None, help="the id /v1/models lists (default: the folder's name)")
    p.add_argument("--provider", choices=["cpu", "cuda"], default=None,
                   help="ONNX Runtime provider (default: CUDA where onnxruntime has it, else CPU); in-flight batching "
                        "runs on the CPU provider, the CUDA provider serves one request at a time")
    p.add_argument("--config", default=None, help="PyTorch: for a bare weights file, the preset or folder it fits")
    p.add_argument("--device", default=None, help="PyTorch: cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="PyTorch: the frozen parts' dtype")
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"requests decoding at once: rows of the in-flight KV buffer (default: {d.max_batch})")
    g.add_argument("--context", type=int, default=d.context,
                   help=f"positions per row: soft prompt, prompt and new tokens (default: {d.context})")
    g.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"requests waiting beyond the batch; then 503 with Retry-After (default: {d.max_queue})")
    g.add_argument("--max-tokens", type=int, default=d.max_tokens,
                   help=f"max_tokens is clamped to this (default: {d.max_tokens})")
    g.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20,
                   help=f"largest request body (default: {d.max_body_bytes >> 20})")
    g.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                   help=f"largest image, width x height, checked before decoding (default: {d.max_image_pixels})")
    g.add_argument("--max-images", type=int, default=d.max_images, help=f"per request (default: {d.max_images})")
    g.add_argument("--timeout", type=float, default=d.request_timeout_s,
                   help=f"seconds a request may take; also how long SIGTERM waits for them (default: {d.request_timeout_s:g})")
    g.add_argument("--cache-mb", type=float, default=d.cache_bytes / 2**20,
                   help=f"the image-embedding cache's size; 0 turns it off (default: {d.cache_bytes >> 20})")
    g.add_argument("--allow-url-fetch", action="store_true",
                   help="fetch http(s) image URLs on a client's behalf (off: only data: URLs)")
    g.add_argument("--allow-local-dir", type=Path, default=None, metavar="DIR",
                   help="read image paths and file: URLs, under DIR only (off: none)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def settings_from(args) -> ServerSettings:
    for name in ("max_batch", "context", "max_tokens", "max_images", "port"):
        if getattr(args, name) < 1:
            raise SystemExit(f"blip2rt serve: error: --{name.replace('_', '-')} must be at least 1")
    return ServerSettings(
        host=args.host, port=args.port, model_name=args.model_name, max_batch=args.max_batch, context=args.context,
        max_queue=max(0, args.max_queue), max_tokens=args.max_tokens, max_body_bytes=int(args.max_body_mb * 2**20),
        max_image_pixels=args.max_image_pixels, max_images=args.max_images, request_timeout_s=args.timeout,
        cache_bytes=int(args.cache_mb * 2**20), allow_url_fetch=args.allow_url_fetch,
        allow_local_dir=args.allow_local_dir)


def run_serve(args) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise SystemExit("blip2rt serve: error: the server needs FastAPI and uvicorn: pip install 'blip2rt[serve]'") from None
    from . import serve

    serve(args.path, settings_from(args), log_level=args.log_level, provider=args.provider, config=args.config,
          device=args.device, dtype=args.dtype)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blip2rt serve", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_args(p)
    return p
