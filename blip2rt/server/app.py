"""The HTTP face of `blip2rt serve`: FastAPI routes in OpenAI's shapes over the engine.

POST /v1/chat/completions (plain or streamed as server-sent events), GET /v1/models, GET /health,
GET /metrics. Every error is OpenAI's JSON with its status, never a stack trace.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from blip2rt.errors import Blip2rtError
from blip2rt.front_end import answer_texts, caption_texts
from blip2rt.generation_defaults import CAPTION_DEFAULTS, VQA_DEFAULTS, VQA_PROMPT

from .chat_inputs import read_chat
from .engine import Engine, Prepared, Work
from .errors import ApiError, bad_request
from .metrics import Metrics
from .openai_schema import ChatCompletionRequest
from .served_model import ServedModel
from .settings import ServerSettings
from .text_stream import TextStream

log = logging.getLogger("blip2rt.server")

MAX_STOP_CHARS = 64
DISCONNECT_CHECK_S = 0.25  # how often a request that is not streamed asks whether its client is still there


def create_app(served: ServedModel, engine: Engine, metrics: Metrics, settings: ServerSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        log.info("serving %s (%s on %s), %s", served.name, served.backend, ", ".join(served.providers),
                 type(engine).__name__)
        yield
        engine.stop()  # after uvicorn's graceful shutdown has let the admitted requests finish

    app = FastAPI(title="blip2rt", version=_version(), lifespan=lifespan,
                  description="BLIP-2 captions and visual question answering behind OpenAI's chat completions API.")
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        metrics.request_done(e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        message = "the body is not valid JSON" if first.get("type") == "json_invalid" else \
            f"{where or 'body'}: {first.get('msg', 'invalid')}"
        metrics.request_done(400)
        return JSONResponse(bad_request(message, where).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        metrics.request_done(e.status_code)
        return JSONResponse(ApiError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        log.exception("unexpected error")
        metrics.request_done(500)
        return JSONResponse(ApiError(500, "internal server error", type="server_error").body(), status_code=500)

    @app.get("/health")
    async def health():
        if not engine.healthy:
            return JSONResponse({"status": "error", "reason": "the engine stopped"}, status_code=503)
        return {"status": "ok", "model": served.name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": created,
                                            "owned_by": "blip2rt"}]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        gauges = {
            "blip2rt_queue_depth": ("requests admitted and waiting for a slot", engine.queue_depth()),
            "blip2rt_active_sequences": ("sequences decoding now", engine.active()),
            "blip2rt_requests_in_flight": ("requests admitted and not finished", engine.inflight),
            "blip2rt_capacity": ("requests admitted at most (slots plus queue)", engine.capacity),
        }
        return PlainTextResponse(metrics.render(gauges, getattr(engine, "cache", None)),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        start = time.monotonic()
        if body.model and body.model != served.name:
            raise ApiError(404, f"the model {body.model!r} is not served here; this server serves {served.name!r}",
                           type="not_found_error", param="model", code="model_not_found")
        engine.refuse_if_full()  # before decoding anything
        prepared = await run_in_threadpool(prepare, body, served, settings)
        work = Work(prepared, asyncio.get_running_loop())
        engine.admit(work)
        reply = Reply(work, served, stop_strings(body), body, metrics, request, start + settings.request_timeout_s)
        if body.stream:
            return StreamingResponse(reply.sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = await reply.whole()
        metrics.request_done(200, time.monotonic() - start)
        return result

    return app


def stop_strings(body: ChatCompletionRequest) -> list[str]:
    return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])


def prepare(body: ChatCompletionRequest, served: ServedModel, s: ServerSettings) -> Prepared:
    """Decodes the images and tokenizes the text (in a worker thread: no model runs here)."""
    stop = stop_strings(body)
    if len(stop) > s.max_stop or any(len(x) > MAX_STOP_CHARS for x in stop):
        raise bad_request(f"give at most {s.max_stop} stop strings of at most {MAX_STOP_CHARS} characters", "stop")
    chat = read_chat(body, s)
    try:
        pixels = served.pixels(chat.images)
        if chat.question is None:
            text, defaults = served.text_inputs(*caption_texts(None, 1)), CAPTION_DEFAULTS
        else:
            text, defaults = served.text_inputs(*answer_texts([chat.question], VQA_PROMPT)), VQA_DEFAULTS
    except Blip2rtError as e:
        raise bad_request(str(e), "messages") from None
    positions = served.prompt_positions(text)
    room = s.context - positions
    if room < 1:
        raise bad_request(f"the prompt takes {positions} of the server's {s.context} positions; shorten the text",
                          "messages", "context_length_exceeded")
    asked = body.max_completion_tokens or body.max_tokens or defaults["max_new_tokens"]
    max_new = min(asked, s.max_tokens, room)  # clamped, as the server's limits say
    min_new = min(defaults["min_new_tokens"] if body.min_tokens is None else body.min_tokens, max_new)
    return Prepared(pixels, chat.digests, chat.question, text, positions, max_new, min_new,
                    float(body.temperature or 0.0), float(body.top_p if body.top_p is not None else 1.0), body.seed)


class Reply:
    """A request's answer as the engine's events arrive: whole, or as server-sent events."""

    def __init__(self, work: Work, served: ServedModel, stop: list[str], body: ChatCompletionRequest,
                 metrics: Metrics, request: Request, deadline: float):
        self.work, self.served, self.body, self.metrics, self.request = work, served, body, metrics, request
        n = work.p.pixels.shape[0]
        self.streams = [TextStream(served.tokenizer, stop) for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.completion = [0] * n
        self.deadline = deadline
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())

    async def events(self):
        """(choice, text piece, finish_reason or None) as they come; ends when every choice has ended."""
        w = self.work
        look = time.monotonic() + DISCONNECT_CHECK_S
        try:
            while any(f is None for f in self.finish):
                now = time.monotonic()
                left = self.deadline - now
                if left <= 0:
                    self._cancel()
                    raise ApiError(504, "the request took longer than the server's timeout", type="timeout",
                                   code="timeout")
                if now >= look and not self.body.stream:  # a stream hears of it from the server
                    look = now + DISCONNECT_CHECK_S
                    if await self.request.is_disconnected():
                        self._cancel()
                        return
                try:
                    ev = await asyncio.wait_for(w.events.get(), min(left, DISCONNECT_CHECK_S))
                except asyncio.TimeoutError:
                    continue
                kind = ev[0]
                if kind == "error":
                    raise ev[1]
                i = ev[1]
                s = self.streams[i]
                if kind == "token":
                    if s.stopped or self.finish[i] is not None:
                        continue
                    self.completion[i] += 1
                    piece = s.push(ev[2])
                    if s.stopped:
                        w.stopped.add(i)
                    if piece:
                        yield i, piece, None
                elif kind == "end":
                    if self.finish[i] is None:
                        self.finish[i] = "stop" if s.stopped else ev[2]
                        tail = s.finish()
                        yield i, tail, self.finish[i]
        except asyncio.CancelledError:  # the client went away mid-stream
            self._cancel()
            raise

    def _cancel(self) -> None:
        if not self.work.cancelled:
            self.work.cancelled = True
            with self.metrics.lock:
                self.metrics.cancelled += 1

    def usage(self) -> dict:
        prompt = self.work.p.prompt_positions * len(self.streams)
        done = sum(self.completion)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    async def whole(self) -> dict:
        async for _ in self.events():
            pass
        if any(f is None for f in self.finish):  # the client went away
            raise ApiError(499, "the client closed the request")
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.served.name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": s.text},
                             "logprobs": None, "finish_reason": f}
                            for i, (s, f) in enumerate(zip(self.streams, self.finish))],
                "usage": self.usage()}

    def _chunk(self, choices: list[dict], **extra) -> str:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.served.name, "choices": choices, **extra}
        return f"data: {json.dumps(chunk)}\n\n"

    async def sse(self):
        status = 499  # unless it ends otherwise: the client went away
        try:
            yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None} for i in range(len(self.streams))])
            async for i, piece, finish in self.events():
                delta = {"content": piece} if piece else {}
                yield self._chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}])
            opts = self.body.stream_options
            if opts is not None and opts.include_usage:
                yield self._chunk([], usage=self.usage())
            status = 200
        except ApiError as e:
            status = e.status
            yield f"data: {json.dumps(e.body())}\n\n"
        except Exception:  # noqa: BLE001: the stream has begun; say so in it, never a trace
            log.exception("stream failed")
            status = 500
            yield f"data: {json.dumps(ApiError(500, 'internal server error', type='server_error').body())}\n\n"
        finally:
            self.metrics.request_done(status, time.monotonic() - self.work.arrival if status == 200 else None)
        yield "data: [DONE]\n\n"


class BodyLimit:
    """Reads a request's body up to `limit` bytes before the app sees it. Beyond, the rest is read and
    dropped (up to DRAIN times the limit, so that the client hears the answer rather than a reset
    connection), and the answer is 413."""

    DRAIN = 8

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        over = length is not None and length.isdigit() and int(length) > self.limit
        if over and int(length) > self.DRAIN * self.limit:
            return await self._refuse(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                over = True
                chunks = []
                if size > self.DRAIN * self.limit:
                    break
            elif not over:
                chunks.append(body)
            if not message.get("more_body", False):
                break
        if over:
            return await self._refuse(send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send):
        body = json.dumps(ApiError(413, f"the request body is over this server's {self.limit} bytes").body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _version() -> str:
    import blip2rt

    return blip2rt.__version__
