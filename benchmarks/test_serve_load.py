"""`blip2rt serve` under load, as pytest-benchmark cases: a fixed count of streamed requests (20 tokens
each, distinct images) at concurrency 1, 4 and 16 against a server on loopback (ONNX Runtime, CPU
provider, in-flight batching over 16 slots). The median wall time of a round gives the throughput;
the last round's latency and time-to-first-token percentiles go to extra_info. serve_load.py is the
same test as a script, with the soak.

Run: blip2rt bench -k serve
"""

import pytest

from ort_cases import model_and_export
from serve_load import free_port, image_url, load, one_request, start_server
from timing import measure, per_second, quick_mode

TOKENS = 20


@pytest.fixture(scope="module", params=["tiny", "blip2-mini"])
def server(request):
    if request.param != "tiny" and quick_mode():
        pytest.skip("the quick run checks the server on tiny")
    _, rt = model_and_export(request.param)
    port = free_port()
    proc = start_server(rt.dir, port, "cpu", 16, [])
    one_request(port, image_url(0), 4, None)  # the graphs' first runs
    yield request.param, port
    proc.terminate()
    proc.wait(60)


@pytest.mark.parametrize("concurrency", [1, 4, 16])
def test_serve_load(benchmark, server, concurrency):
    preset, port = server
    requests = 16 if quick_mode() else 48
    benchmark.group = f"blip2rt serve {preset}: {requests} streamed requests x {TOKENS} tokens (cpu)"
    figures = {}

    def run():
        figures.update(load(port, concurrency, requests, TOKENS, seed=1000 * concurrency))
        assert figures["errors"] == 0, figures["error_examples"]

    measure(benchmark, run, rounds=3, warmup=0)  # the server runs in its own process: no launches here
    per_second(benchmark, "requests_per_s", requests)
    per_second(benchmark, "tokens_per_s", requests * TOKENS)
    for key in ("latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s"):
        benchmark.extra_info[key] = round(figures[key], 4)
