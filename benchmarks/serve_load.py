"""Load test and soak of `blip2rt serve` over loopback: what RESULTS.md's server figures come from.

Starts `blip2rt serve EXPORT` in a subprocess (ONNX Runtime, CPU provider by default), then:
- load: for each concurrency (1, 4, 16 by default), a fixed number of streamed requests, each for
  the same number of tokens (min_tokens = max_tokens), on distinct images (no cache hits). Reports
  throughput (requests/s, tokens/s), latency p50/p99, time to first token p50/p99, and errors;
- soak (--soak SECONDS): requests at one concurrency for that long, sampling the server's resident
  memory each second; reports its growth from the end of the warm-up to the end, and errors.

    python benchmarks/serve_load.py --export blip2rt-demo/export
    python benchmarks/serve_load.py --export blip2rt-demo/export --soak 120 --concurrency 8

Without --export, the embedded default (blip2-mini) is exported to a temporary folder first.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def image_url(seed: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = np.full((96, 96, 3), rng.integers(0, 255, 3), np.uint8)  # a plain field with a block on it
    x, y = rng.integers(0, 60, 2)
    img[y:y + 30, x:x + 30] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def one_request(port: int, url: str, tokens: int, question: str | None) -> dict:
    """A streamed chat completion: latency, time to first token, tokens, or the error."""
    content = [{"type": "image_url", "image_url": {"url": url}}]
    if question:
        content.insert(0, {"type": "text", "text": question})
    body = json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": tokens,
                       "min_tokens": tokens, "stream": True, "stream_options": {"include_usage": True}})
    start = time.perf_counter()
    first = None
    usage = None
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            return {"error": f"HTTP {r.status}: {r.read()[:200]!r}"}
        done = False
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk.get("usage"):
                usage = chunk["usage"]
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter()
        if not done:
            return {"error": "the stream ended without [DONE]"}
    except OSError as e:
        return {"error": repr(e)}
    finally:
        conn.close()
    end = time.perf_counter()
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": usage["completion_tokens"] if usage else 0}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def load(port: int, concurrency: int, requests: int, tokens: int, seed: int) -> dict:
    urls = [image_url(seed + i) for i in range(requests)]
    questions = [None, "what colour is the square?", "is there a shape?", "what is in the picture?"]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: one_request(port, urls[i], tokens, questions[i % 4]), range(requests)))
    wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    lat, ttft = [r["latency"] for r in ok], [r["ttft"] for r in ok]
    return {"concurrency": concurrency, "requests": requests, "errors": len(errors), "error_examples": errors[:3],
            "wall_s": wall, "requests_per_s": len(ok) / wall, "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "latency_p50_s": percentile(lat, 50), "latency_p99_s": percentile(lat, 99),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99)}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def soak(port: int, pid: int, seconds: float, concurrency: int, tokens: int, warmup: float) -> dict:
    stop = time.monotonic() + seconds
    results, lock = [], threading.Lock()
    samples: list[tuple[float, float]] = []
    counter = iter(range(10**9))

    def worker():
        while time.monotonic() < stop:
            i = next(counter)
            r = one_request(port, image_url(10_000 + i % 64), tokens, None if i % 2 else "what is it?")
            with lock:
                results.append(r)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        samples.append((time.monotonic() - t0, rss_mb(pid)))
        time.sleep(1.0)
    for t in threads:
        t.join()
    after = [m for t, m in samples if t >= warmup]
    base, end = after[0], after[-1]
    errors = [r["error"] for r in results if "error" in r]
    return {"seconds": seconds, "concurrency": concurrency, "requests": len(results), "errors": len(errors),
            "error_examples": errors[:3], "rss_start_mb": samples[0][1], "rss_after_warmup_mb": base,
            "rss_end_mb": end, "rss_max_after_warmup_mb": max(after),
            "rss_growth_after_warmup_pct": 100 * (end - base) / base,
            "requests_per_s": len(results) / seconds}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(export: Path, port: int, provider: str, max_batch: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "blip2rt", "serve", str(export), "--port", str(port), "--provider", provider,
           "--max-batch", str(max_batch), "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not start in 10 minutes")
        time.sleep(0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", type=Path, help="an export folder (default: export blip2-mini to a temporary folder)")
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=48, help="requests per concurrency level (default: 48)")
    p.add_argument("--tokens", type=int, default=20, help="tokens per request (default: 20)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--soak", type=float, default=0, metavar="SECONDS", help="run the soak instead of the load test")
    p.add_argument("--warmup", type=float, default=20, help="soak: seconds before memory is compared (default: 20)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--server-arg", action="append", default=[], help="passed on to blip2rt serve")
    args = p.parse_args()

    tmp = None
    export = args.export
    if export is None:
        import blip2rt
        from blip2rt.export import export_model

        tmp = tempfile.TemporaryDirectory()
        export = Path(tmp.name) / "export"
        print("exporting blip2-mini ...", file=sys.stderr)
        export_model(blip2rt.from_pretrained("blip2-mini", device="cpu"), export)
    port = free_port()
    proc = start_server(export, port, args.provider, args.max_batch, args.server_arg)
    try:
        one_request(port, image_url(999_999), 4, None)  # warm-up: the graphs' first runs
        info = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "python": platform.python_version(), "export": str(export), "provider": args.provider,
                "max_batch": args.max_batch, "tokens": args.tokens}
        try:
            import onnxruntime

            info["onnxruntime"] = onnxruntime.__version__
        except ImportError:
            pass
        if args.soak:
            out = {**info, "soak": soak(port, proc.pid, args.soak, args.concurrency[0], args.tokens, args.warmup)}
            s = out["soak"]
            print(f"soak {s['seconds']:.0f} s at concurrency {s['concurrency']}: {s['requests']} requests, "
                  f"{s['errors']} errors; resident memory {s['rss_after_warmup_mb']:.0f} MB after warm-up, "
                  f"{s['rss_end_mb']:.0f} MB at the end ({s['rss_growth_after_warmup_pct']:+.1f}%), "
                  f"max {s['rss_max_after_warmup_mb']:.0f} MB")
        else:
            rows = [load(port, c, args.requests, args.tokens, seed=1000 * c) for c in args.concurrency]
            out = {**info, "load": rows}
            print("| concurrency | requests | errors | requests/s | tokens/s | latency p50 / p99 (s) | "
                  "first token p50 / p99 (s) |")
            print("|---|---|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.2f} | "
                      f"{r['tokens_per_s']:.1f} | {r['latency_p50_s']:.3f} / {r['latency_p99_s']:.3f} | "
                      f"{r['ttft_p50_s']:.3f} / {r['ttft_p99_s']:.3f} |")
            base = rows[0]["tokens_per_s"]
            for r in rows[1:]:
                print(f"throughput at concurrency {r['concurrency']}: {r['tokens_per_s'] / base:.2f}x concurrency "
                      f"{rows[0]['concurrency']}")
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
