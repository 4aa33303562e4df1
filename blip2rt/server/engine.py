"""The engine: one thread that owns the model and runs every request's generation.

Requests reach it through `admit` from the event loop, already decoded and tokenized (`Prepared`),
and it answers through each request's event queue: ("token", choice, id), ("end", choice,
finish_reason), ("error", ApiError). The event loop tells it of a client that went away, a request
that timed out, or a choice that met a stop string, by flags it reads between steps.

`InflightEngine` (ONNX Runtime on the CPU provider, a decoder-only export with static_lm.onnx):
- the requests that arrived since the last step have their images' soft prompts made in one vision
  run (the image-embedding cache's hits skip it);
- each image becomes a sequence of the in-flight batcher: prefilled alone, then decoded with every
  other running sequence, one step at a time; a finished one frees its slot at once.

`SequentialEngine` (the PyTorch model, the CUDA provider, T5 exports, exports without a static
graph): one request at a time, its images in one batch, through the runtime's own `generate`; its
tokens are sent when the request is done.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from blip2rt.front_end import TextInputs

from .errors import ApiError
from .image_cache import EmbeddingCache
from .metrics import Metrics
from .settings import ServerSettings

log = logging.getLogger("blip2rt.server")


@dataclass
class Prepared:
    """One request as the engine takes it."""

    pixels: np.ndarray  # (n, 3, S, S): one row per image, one choice per image
    digests: list[str]  # sha256 of each image's bytes
    question: str | None  # None: a caption
    text: TextInputs  # one row: the LLM's prompt ids and mask (and the Q-Former's)
    prompt_positions: int  # the LLM's input length: soft prompt, BOS and prompt
    max_new: int
    min_new: int
    temperature: float  # 0: greedy
    top_p: float
    seed: int | None  # image i draws with seed + i


class Work:
    """One admitted request, shared by the event loop and the engine's thread."""

    def __init__(self, prepared: Prepared, loop: asyncio.AbstractEventLoop):
        self.p = prepared
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.arrival = time.monotonic()
        self.cancelled = False  # set by the event loop: stop every choice
        self.stopped: set[int] = set()  # set by the event loop: choices that met a stop string
        self.open_choices = prepared.pixels.shape[0]
        self.first_token_at: float | None = None

    def send(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class Engine:
    def __init__(self, runtime, settings: ServerSettings, metrics: Metrics):
        self.rt, self.settings, self.metrics = runtime, settings, metrics
        self.inbox: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.inflight = 0  # admitted and not finished
        self.capacity = settings.max_batch + settings.max_queue
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="blip2rt-engine", daemon=True)
        self.failed: BaseException | None = None

    # -- the event loop's side ----------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Ends the thread once every admitted request is done (SIGTERM's drain)."""
        self._stop = True
        self.inbox.put(None)
        self.thread.join(timeout)

    @property
    def healthy(self) -> bool:
        return self.thread.is_alive() and self.failed is None

    def admit(self, work: Work) -> None:
        """Takes a request, or refuses it with 503 and Retry-After when the queue is full."""
        with self.lock:
            self.refuse_if_full()
            self.inflight += 1
        self.inbox.put(work)

    def refuse_if_full(self) -> None:
        if self.inflight >= self.capacity:
            with self.metrics.lock:
                self.metrics.rejected += 1
            raise ApiError(503, f"the server is at capacity ({self.inflight} requests); retry shortly",
                           type="server_busy", code="queue_full",
                           headers={"Retry-After": str(self.settings.retry_after_s)})

    def queue_depth(self) -> int:
        """Requests admitted and not yet decoding."""
        return self.inbox.qsize()

    def active(self) -> int:
        return 0

    # -- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                new = self._take(block=not self.busy)
                if new is None:
                    return
                if new:
                    self._start(new)
                self._reap()
                if self.busy:
                    self._step()
        except BaseException as e:  # noqa: BLE001: the server reports it at /health
            log.exception("the engine stopped")
            self.failed = e

    def _take(self, block: bool) -> list[Work] | None:
        """The requests that arrived; None when stopping and nothing is left."""
        got = []
        try:
            item = self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()
            while True:
                if item is not None:
                    got.append(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass
        if self._stop and not got and not self.busy and self.inbox.empty():
            return None
        return got

    def _done(self, work: Work) -> None:
        with self.lock:
            self.inflight -= 1

    def _fail(self, works: list[Work], e: BaseException) -> None:
        log.exception("generation failed", exc_info=e)
        for w in works:
            w.send("error", ApiError(500, "the generation failed inside the server", type="server_error"))
            self._done(w)

    @property
    def busy(self) -> bool:
        raise NotImplementedError

    def _start(self, works: list[Work]) -> None:
        raise NotImplementedError

    def _reap(self) -> None:
        """Drops what the event loop cancelled or stopped."""

    def _step(self) -> None:
        raise NotImplementedError


class InflightEngine(Engine):
    def __init__(self, runtime, settings: ServerSettings, metrics: Metrics):
        from blip2rt.export.inflight import InflightBatcher

        super().__init__(runtime, settings, metrics)
        self.batcher = InflightBatcher(runtime.graphs, settings.max_batch, settings.context)
        self.cache = EmbeddingCache(settings.cache_bytes) if settings.cache_bytes > 0 else None
        self.live: dict[int, tuple[Work, int, object]] = {}  # sequence id -> (work, choice, sequence)
        self.works: set[Work] = set()

    @property
    def busy(self) -> bool:
        return self.batcher.busy

    def queue_depth(self) -> int:
        return self.inbox.qsize() + len(self.batcher.pending)

    def active(self) -> int:
        return len(self.batcher.active)

    def _key(self, work: Work, i: int) -> tuple:
        return (work.p.digests[i], work.p.question or "") if self.rt.question_in_qformer else (work.p.digests[i],)

    def soft_prompts(self, works: list[Work]) -> list[list[np.ndarray]]:
        """Each request's soft prompts (Q, W) per image: from the cache, the rest in vision runs of
        up to `max_batch` images, an image repeated among them run once."""
        keys = [[self._key(w, i) for i in range(w.p.pixels.shape[0])] for w in works]
        found: dict[tuple, np.ndarray] = {}
        todo: dict[tuple, tuple[Work, int]] = {}
        for w, ks in zip(works, keys):
            for i, k in enumerate(ks):
                if k in found or k in todo:
                    continue
                hit = self.cache.get(k) if self.cache is not None else None
                if hit is None:
                    todo[k] = (w, i)
                else:
                    found[k] = hit
        pending = list(todo.items())
        step = self.settings.max_batch
        for start in range(0, len(pending), step):
            chunk = pending[start:start + step]
            px = np.stack([w.p.pixels[i] for _, (w, i) in chunk])
            qids, qmask = self.rt.question_ids([w.p.question or "" for _, (w, _i) in chunk])
            soft = self.rt.image_features(px, qids, qmask)
            self.metrics.prefix_batch.observe(len(chunk))
            for (k, _), row in zip(chunk, soft):
                found[k] = row
                if self.cache is not None:
                    self.cache.put(k, row)
        return [[found[k] for k in ks] for ks in keys]

    def _start(self, works: list[Work]) -> None:
        works = [w for w in works if not self._dropped_before_start(w)]
        if not works:
            return
        try:
            softs = self.soft_prompts(works)
        except Exception as e:  # noqa: BLE001
            self._fail(works, e)
            return
        for w, soft in zip(works, softs):
            try:
                p = w.p
                for i, row in enumerate(soft):
                    embeds, mask = self.rt.llm_inputs(row[None], p.text.input_ids, p.text.attention_mask)
                    seq = self.batcher.submit(embeds[0], mask[0], p.max_new, p.min_new, p.temperature, p.top_p,
                                              None if p.seed is None else p.seed + i)
                    self.live[seq.id] = (w, i, seq)
                    with self.metrics.lock:
                        self.metrics.prompt_tokens += embeds.shape[1]
                self.works.add(w)
            except Exception as e:  # noqa: BLE001
                self._cancel(w)
                self._fail([w], e)

    def _dropped_before_start(self, w: Work) -> bool:
        if w.cancelled:
            self._done(w)
            return True
        return False

    def _cancel(self, w: Work) -> None:
        for sid, (work, _i, seq) in list(self.live.items()):
            if work is w:
                self.batcher.cancel(seq)
                del self.live[sid]
        self.works.discard(w)

    def _reap(self) -> None:
        for w in list(self.works):
            if w.cancelled:
                self._cancel(w)
                self._done(w)
                continue
            for sid, (work, i, seq) in list(self.live.items()):
                if work is w and i in w.stopped and not seq.finished:
                    self.batcher.cancel(seq)
                    self._end(sid, "stop")

    def _end(self, sid: int, reason: str) -> None:
        w, i, _ = self.live.pop(sid)
        w.send("end", i, reason)
        w.open_choices -= 1
        if w.open_choices == 0:
            self.works.discard(w)
            self._done(w)

    def _step(self) -> None:
        decoding = len(self.batcher.active)
        try:
            produced = self.batcher.step()
        except Exception as e:  # noqa: BLE001: fail what is running, keep serving
            works = list(self.works)
            for w in works:
                self._cancel(w)
            self._fail(works, e)
            return
        if decoding:
            self.metrics.decode_batch.observe(decoding)
        if produced:
            self.metrics.tokens(len(produced))
        now = time.monotonic()
        eos = self.batcher.eos
        for seq, token in produced:
            entry = self.live.get(seq.id)
            if entry is None:
                continue
            w, i, _ = entry
            if w.first_token_at is None:
                w.first_token_at = now
                with self.metrics.lock:
                    self.metrics.ttft.observe(now - w.arrival)
            w.send("token", i, token)
            if seq.finished:
                self._end(seq.id, "stop" if token in eos else "length")


class SequentialEngine(Engine):
    """One request at a time through the runtime's `generate` (greedy; sampling where the runtime has it)."""

    def __init__(self, runtime, settings: ServerSettings, metrics: Metrics, eos: set[int], torch_model: bool = False):
        super().__init__(runtime, settings, metrics)
        self.torch_model, self.eos = torch_model, eos
        self.waiting: list[Work] = []
        self.cache = None

    @property
    def busy(self) -> bool:
        return bool(self.waiting)

    def queue_depth(self) -> int:
        return self.inbox.qsize() + len(self.waiting)

    def _start(self, works: list[Work]) -> None:
        self.waiting.extend(works)

    def _step(self) -> None:
        w = self.waiting.pop(0)
        if w.cancelled:
            self._done(w)
            return
        p = w.p
        n = p.pixels.shape[0]
        try:
            ids = np.repeat(p.text.input_ids, n, 0)
            mask = np.repeat(p.text.attention_mask, n, 0)
            q = {k: None if v is None else np.repeat(v, n, 0) for k, v in p.text.qformer().items()}
            gen = dict(max_new_tokens=p.max_new, min_new_tokens=p.min_new, num_beams=1)
            if p.temperature > 0:
                gen.update(do_sample=True, temperature=p.temperature, top_p=p.top_p)
            self.metrics.prefix_batch.observe(n)
            out = self._generate(p.pixels, ids, mask, q, gen, p.seed)
        except Exception as e:  # noqa: BLE001
            self._fail([w], e)
            return
        now = time.monotonic()
        with self.metrics.lock:
            self.metrics.ttft.observe(now - w.arrival)
            self.metrics.prompt_tokens += n * p.prompt_positions
        self.metrics.decode_batch.observe(n)
        for i, row in enumerate(out):
            reason = "length"
            for t in row.tolist():
                w.send("token", i, t)
                if t in self.eos:
                    reason = "stop"
                    break
            self.metrics.tokens(len(row))
            w.send("end", i, reason)
        self._done(w)

    def _generate(self, pixels, ids, mask, q, gen, seed) -> np.ndarray:
        if not self.torch_model:
            return np.asarray(self.rt.generate(pixels, ids, mask, **q, **gen))
        import torch

        if seed is not None:
            torch.manual_seed(seed)
        t = {k: None if v is None else torch.from_numpy(v).to(self.rt.device) for k, v in q.items()}
        with torch.inference_mode():
            out = self.rt.generate(torch.from_numpy(pixels).to(self.rt.device), torch.from_numpy(ids).to(self.rt.device),
                                   torch.from_numpy(mask).to(self.rt.device), **t, **gen)
        return out.cpu().numpy()
