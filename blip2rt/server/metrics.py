"""The server's counters, gauges and histograms, written in Prometheus' text format at GET /metrics.
No client library: the few kinds used here are written out directly."""

from __future__ import annotations

import threading
import time
from collections import deque

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.count, self.sum = 0, 0.0

    def observe(self, v: float) -> None:
        self.count += 1
        self.sum += v
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """Updated from the event loop and the engine's thread alike (one lock)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {}  # status code -> count
        self.rejected = 0  # 503: the queue was full
        self.cancelled = 0  # the client went away or the request timed out
        self.prompt_tokens = self.generated_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.decode_batch = Histogram(BATCH_BUCKETS)  # rows per decode step
        self.prefix_batch = Histogram(BATCH_BUCKETS)  # images per vision run
        self._recent = deque()  # (time, tokens) of the last window, for tokens/s

    def request_done(self, status: int, latency_s: float | None = None) -> None:
        with self.lock:
            self.requests[status] = self.requests.get(status, 0) + 1
            if latency_s is not None:
                self.latency.observe(latency_s)

    def tokens(self, n: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.generated_tokens += n
            self._recent.append((now, n))

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        with self.lock:
            while self._recent and self._recent[0][0] < now - window:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / window

    def render(self, gauges: dict[str, tuple[str, float]], cache) -> str:
        rate = self.tokens_per_second()
        with self.lock:
            lines = []

            def metric(name, kind, help, values):
                lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}"])
                lines.extend(values)

            metric("blip2rt_requests_total", "counter", "chat completion requests answered, by HTTP status",
                   [f'blip2rt_requests_total{{status="{k}"}} {v}' for k, v in sorted(self.requests.items())]
                   or ['blip2rt_requests_total{status="200"} 0'])
            metric("blip2rt_requests_rejected_total", "counter", "requests refused with 503 because the queue was full",
                   [f"blip2rt_requests_rejected_total {self.rejected}"])
            metric("blip2rt_requests_cancelled_total", "counter",
                   "generations stopped because the client went away or the request timed out",
                   [f"blip2rt_requests_cancelled_total {self.cancelled}"])
            metric("blip2rt_prompt_tokens_total", "counter", "LLM input positions (soft prompt and text) prefilled",
                   [f"blip2rt_prompt_tokens_total {self.prompt_tokens}"])
            metric("blip2rt_generated_tokens_total", "counter", "tokens generated",
                   [f"blip2rt_generated_tokens_total {self.generated_tokens}"])
            metric("blip2rt_tokens_per_second", "gauge", "tokens generated per second over the last 10 s",
                   [f"blip2rt_tokens_per_second {rate:.3f}"])
            for name, (help, value) in gauges.items():
                metric(name, "gauge", help, [f"{name} {value}"])
            metric("blip2rt_time_to_first_token_seconds", "histogram", "from a request's arrival to its first token",
                   self.ttft.lines("blip2rt_time_to_first_token_seconds"))
            metric("blip2rt_request_latency_seconds", "histogram", "from a request's arrival to its last token",
                   self.latency.lines("blip2rt_request_latency_seconds"))
            metric("blip2rt_decode_batch_size", "histogram", "sequences in each batched decode step",
                   self.decode_batch.lines("blip2rt_decode_batch_size"))
            metric("blip2rt_prefix_batch_size", "histogram", "images in each run of the vision graph",
                   self.prefix_batch.lines("blip2rt_prefix_batch_size"))
        if cache is not None:
            for name, kind, help, value in (
                    ("blip2rt_image_cache_hits_total", "counter", "images whose soft prompt came from the cache", cache.hits),
                    ("blip2rt_image_cache_misses_total", "counter", "images run through the ViT and Q-Former", cache.misses),
                    ("blip2rt_image_cache_evictions_total", "counter", "soft prompts evicted", cache.evictions),
                    ("blip2rt_image_cache_bytes", "gauge", "bytes held by the image-embedding cache", cache.bytes),
                    ("blip2rt_image_cache_entries", "gauge", "soft prompts held", len(cache))):
                lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value}"])
        return "\n".join(lines) + "\n"
