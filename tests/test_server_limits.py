"""`blip2rt serve` under bad input and load: each bad request gets its 4xx in OpenAI's shape and
the server stays healthy; the body, the image's pixels, max_tokens and the queue are bounded (503
with Retry-After while admitted requests finish); a request times out; a client that goes away
frees its slot; SIGTERM lets the request in flight finish, then exits; schemathesis finds no 5xx."""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import httpx2 as httpx
import pytest

from blip2rt.server import ServerSettings
from server_harness import data_url, get, metric, png, post, running, tiny_export, user

LONG = {"max_tokens": 6000, "min_tokens": 6000}  # a generation that lasts a second or more


@pytest.fixture(scope="module")
def export(hf_llama, tmp_path_factory):
    """LLaMA's rotary positions let a tiny model generate for as long as these tests need."""
    return tiny_export(hf_llama, tmp_path_factory, "limits")


@pytest.fixture(scope="module")
def base(export):
    with running(export, ServerSettings(max_body_bytes=8 << 20, max_image_pixels=4_000_000)) as url:
        yield url


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (16-bit RGB) and holds a few bytes of data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def image_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]


BAD = {
    "malformed JSON": b'{"messages": [',
    "not an object": b"[1, 2, 3]",
    "messages of the wrong type": {"messages": "describe the picture"},
    "max_tokens of the wrong type": {"messages": user(png(0)), "max_tokens": "ten"},
    "temperature out of range": {"messages": user(png(0)), "temperature": 9},
    "a content part of an unknown type": {"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]},
    "an unknown role": {"messages": [{"role": "robot", "content": "hi"}]},
    "truncated base64": {"messages": image_message(data_url(png(0))[:-3])},
    "base64 of something that is not an image": {"messages": image_message(data_url(b"hello world, not a png"))},
    "a data URL that is not base64": {"messages": image_message("data:image/png,rawbytes")},
    "a 1x1 image": {"messages": user(png(0, size=(1, 1)))},
    "a GIF": {"messages": image_message(data_url(b"GIF89a" + bytes(20), "image/gif"))},
    "a 20000x20000 PNG header": {"messages": image_message(data_url(png_header(20000, 20000)))},
    "a 3000x3000 PNG over this server's pixel limit": {"messages": image_message(data_url(png_header(3000, 3000)))},
    "an empty message list": {"messages": []},
    "10,000 messages": {"messages": [{"role": "user", "content": "hi"}] * 9_999 + user(png(0))},
    "a body of 10,000 images over the limit": {"messages": user(png(0)) * 10_000},
    "no image": {"messages": [{"role": "user", "content": "what is this?"}]},
    "a local path": {"messages": image_message("/etc/passwd")},
    "a file: URL": {"messages": image_message("file:///etc/passwd")},
    "stop strings too many": {"messages": user(png(0)), "stop": ["a", "b", "c", "d", "e"]},
    "n = 3": {"messages": user(png(0)), "n": 3},
    "a body over the limit": {"messages": user(png(0)), "padding": "x" * (9 << 20)},
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_its_4xx_and_the_server_stays_healthy(base, case):
    status, body, _ = post(base, BAD[case])
    assert 400 <= status < 500, (status, body)
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    assert "Traceback" not in json.dumps(body)
    assert get(base, "/health")[0] == 200
    ok, answer, _ = post(base, {"messages": user(png(1)), "max_tokens": 2})
    assert ok == 200 and answer["choices"][0]["finish_reason"] in ("stop", "length")


def test_the_limits_say_which(base):
    assert post(base, BAD["a body over the limit"])[0] == 413
    assert "pixels" in post(base, BAD["a 20000x20000 PNG header"])[1]["error"]["message"]
    assert "at least" in post(base, BAD["a 1x1 image"])[1]["error"]["message"]


def test_a_16_bit_image_is_read_as_its_8_bit_scale(base):
    """Not an error: 16-bit PNGs are scaled by their depth (blip2rt.images), so a 16-bit image answers as
    its 8-bit version does."""
    import io

    import numpy as np
    from PIL import Image

    deep = np.random.default_rng(3).integers(0, 65536, (30, 40), dtype=np.uint16)
    buf16, buf8 = io.BytesIO(), io.BytesIO()
    Image.fromarray(deep).save(buf16, "PNG")
    Image.fromarray(np.rint(deep / 65535 * 255).astype(np.uint8)).convert("RGB").save(buf8, "PNG")
    a = post(base, {"messages": user(buf16.getvalue(), text="what is it?"), "max_tokens": 6})
    b = post(base, {"messages": user(buf8.getvalue(), text="what is it?"), "max_tokens": 6})
    assert a[0] == b[0] == 200
    assert a[1]["choices"][0]["message"] == b[1]["choices"][0]["message"]


def stream_lines(base, body, first_line: threading.Event, lines: list, timeout=60):
    with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}, timeout=timeout) as r:
        for line in r.iter_lines():
            if line:
                lines.append(line)
                first_line.set()


def test_a_full_queue_answers_503_with_retry_after_while_the_admitted_finish(export):
    settings = ServerSettings(max_batch=1, max_queue=0, max_tokens=6000, context=8192)
    with running(export, settings) as url:
        first, lines = threading.Event(), []
        t = threading.Thread(target=stream_lines, args=(url, {"messages": user(png(2)), **LONG}, first, lines))
        t.start()
        assert first.wait(30)
        status, body, headers = post(url, {"messages": user(png(3)), "max_tokens": 2})
        assert status == 503 and body["error"]["code"] == "queue_full"
        assert int(headers["retry-after"]) >= 1
        t.join(60)
        assert lines[-1] == "data: [DONE]"
        finish = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines[:-1]]
        assert finish[-1] == "length" and len(lines) > 100
        assert metric(url, "blip2rt_requests_rejected_total") == 1
        assert post(url, {"messages": user(png(3)), "max_tokens": 2})[0] == 200  # admitted again


def wait_for(condition, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_request_past_its_timeout_gets_504_and_frees_its_slot(export):
    settings = ServerSettings(max_tokens=6000, context=8192, request_timeout_s=0.2)
    with running(export, settings) as url:
        status, body, _ = post(url, {"messages": user(png(4)), **LONG})
        assert status == 504 and body["error"]["type"] == "timeout"
        wait_for(lambda: metric(url, "blip2rt_active_sequences") == 0 and metric(url, "blip2rt_requests_in_flight") == 0)
        assert metric(url, "blip2rt_requests_cancelled_total") == 1


def test_a_client_that_goes_away_cancels_its_generation(export):
    settings = ServerSettings(max_tokens=6000, context=8192)
    with running(export, settings) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=30,
                          json={"messages": user(png(5)), **LONG, "stream": True}) as r:
            lines = r.iter_lines()
            next(lines)
            next(lines)
        wait_for(lambda: metric(url, "blip2rt_requests_cancelled_total") == 1)
        wait_for(lambda: metric(url, "blip2rt_active_sequences") == 0 and metric(url, "blip2rt_requests_in_flight") == 0)
        generated = metric(url, "blip2rt_generated_tokens_total")
        assert generated < 6000  # it stopped
        # the same, not streamed: the connection closes while the server generates
        host, port = url[7:].split(":")
        body = json.dumps({"messages": user(png(6)), **LONG}).encode()
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_for(lambda: metric(url, "blip2rt_active_sequences") == 1)
        wait_for(lambda: metric(url, "blip2rt_requests_cancelled_total") == 2)
        wait_for(lambda: metric(url, "blip2rt_requests_in_flight") == 0)
        assert metric(url, "blip2rt_generated_tokens_total") < generated + 6000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_lets_the_request_in_flight_finish_then_exits(export):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "blip2rt", "serve", str(export), "--port", str(port), "--provider",
                             "cpu", "--max-tokens", "6000", "--context", "8192", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            try:
                return get(url, "/health", timeout=1)[0] == 200
            except OSError:
                return False
        wait_for(up, 120)
        first, lines = threading.Event(), []
        t = threading.Thread(target=stream_lines, args=(url, {"messages": user(png(7)), **LONG}, first, lines))
        t.start()
        assert first.wait(30)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert len(lines) > 1000  # every token came
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn ends by the signal it drained for
        with pytest.raises(OSError):
            get(url, "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.stdout.read()
    assert "Traceback" not in out, out


def test_schemathesis_finds_no_server_error(base):
    """Inputs generated from the server's own OpenAPI schema, valid and invalid, for every operation:
    no 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in ops} == {"/v1/chat/completions", "/v1/models", "/health", "/metrics"}
    statuses = []
    for op in ops:
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.method == "post" else [])
        for mode in modes:
            @settings(max_examples=50 if op.method == "post" else 3, deadline=None, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                response = case.call_and_validate(base_url=base, checks=[not_a_server_error], timeout=60)
                statuses.append((op.path, response.status_code))

            check()
    posted = {code for path, code in statuses if path == "/v1/chat/completions"}
    assert posted and all(400 <= c < 500 or c == 200 for c in posted), posted
    assert len([1 for path, _ in statuses if path == "/v1/chat/completions"]) >= 50
    assert get(base, "/health")[0] == 200
