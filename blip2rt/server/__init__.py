"""`blip2rt serve`: BLIP-2 behind OpenAI's chat completions API (FastAPI on uvicorn).

An export folder is served by ONNX Runtime with in-flight batching (engine.py), torch-free; a model
by PyTorch. `pip install blip2rt[serve]` (or fastapi and uvicorn beside the deployment install).
"""

from __future__ import annotations

from .settings import ServerSettings

__all__ = ["ServerSettings", "build", "serve"]


def build(path: str, settings: ServerSettings | None = None, **load_args):
    """The FastAPI app serving `path` (not started: uvicorn, or a test client, runs it)."""
    from .app import create_app
    from .served_model import load

    settings = settings or ServerSettings()
    served, engine, metrics = load(path, settings, **load_args)
    return create_app(served, engine, metrics, settings)


def serve(path: str, settings: ServerSettings | None = None, log_level: str = "info", **load_args) -> None:
    """Serves `path` until SIGINT or SIGTERM; either lets the admitted requests finish first (up to the
    request timeout), then exits."""
    import logging

    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(message)s")
    settings = settings or ServerSettings()
    app = build(path, settings, **load_args)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level,
                timeout_graceful_shutdown=int(settings.request_timeout_s) + 1,
                limit_concurrency=settings.max_batch + settings.max_queue + 64, access_log=log_level == "debug")
