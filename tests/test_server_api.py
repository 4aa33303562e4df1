"""`blip2rt serve` through the official `openai` client on loopback: plain and streamed chat
completions, one choice per image, usage, the model list, errors in OpenAI's shape, /health and
/metrics; the answers equal the runtime's own `caption` / `answer` greedy output."""

import httpx2 as httpx
import openai
import pytest

import blip2rt
from blip2rt.export import OrtBlip2, export_model
from blip2rt.generation_defaults import CAPTION_DEFAULTS, VQA_DEFAULTS
from blip2rt.server import ServerSettings
from hf_reference import with_tiny_tokenizer
from server_harness import data_url, get, metric, png, running, tiny_export, user

IMAGES = [png(i) for i in range(4)]


@pytest.fixture(scope="module")
def export(hf_opt, tmp_path_factory):
    return tiny_export(hf_opt, tmp_path_factory, "server")


@pytest.fixture(scope="module")
def base(export):
    with running(export, ServerSettings(model_name="blip2-test")) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def runtime(export):
    return OrtBlip2(export, providers=["CPUExecutionProvider"])


def photos(tmp_path, images):
    paths = []
    for i, data in enumerate(images):
        p = tmp_path / f"{i}.png"
        p.write_bytes(data)
        paths.append(str(p))
    return paths


def greedy(defaults, max_tokens):
    return dict(num_beams=1, max_new_tokens=max_tokens, min_new_tokens=min(defaults["min_new_tokens"], max_tokens))


def test_a_caption_and_an_answer_equal_the_runtime_alone(client, runtime, tmp_path):
    paths = photos(tmp_path, IMAGES[:2])
    r = client.chat.completions.create(model="blip2-test", messages=user(IMAGES[0]), max_tokens=12)
    assert r.object == "chat.completion" and r.model == "blip2-test" and len(r.choices) == 1
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == runtime.caption([paths[0]], **greedy(CAPTION_DEFAULTS, 12))[0]
    q = "what is in the picture?"
    r = client.chat.completions.create(model="blip2-test", messages=user(IMAGES[1], text=q), max_tokens=7)
    assert r.choices[0].message.content == runtime.answer([paths[1]], [q], **greedy(VQA_DEFAULTS, 7))[0]
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 7 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_each_image_gets_its_own_choice_in_order(client, runtime, tmp_path):
    paths = photos(tmp_path, IMAGES)
    q = "what colour is it?"
    r = client.chat.completions.create(model="blip2-test", messages=user(*IMAGES, text=q), max_tokens=9)
    got = [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]
    want = runtime.answer(paths, [q] * 4, **greedy(VQA_DEFAULTS, 9))
    assert got == want
    assert len(set(want)) > 1  # the images give different answers: the order is checked


def test_streaming_gives_the_same_text_in_pieces_then_done(client, base):
    msgs = user(IMAGES[2], text="what is this?")
    whole = client.chat.completions.create(model="blip2-test", messages=msgs, max_tokens=10)
    stream = client.chat.completions.create(model="blip2-test", messages=msgs, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert len([p for p in pieces if p]) > 1  # it came in pieces
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    with httpx.stream("POST", base + "/v1/chat/completions", timeout=30,
                      json={"messages": msgs, "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_a_stop_string_ends_the_text_before_it(client):
    msgs = user(IMAGES[3], text="what is this?")
    whole = client.chat.completions.create(model="blip2-test", messages=msgs, max_tokens=10).choices[0].message.content
    assert len(whole) > 3
    stop = whole[2:4]
    r = client.chat.completions.create(model="blip2-test", messages=msgs, max_tokens=10, stop=[stop])
    assert r.choices[0].message.content == whole[:whole.find(stop)].strip()
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="blip2-test", messages=msgs, max_tokens=10, stop=stop, stream=True) if c.choices)
    assert streamed == r.choices[0].message.content


def test_max_tokens_is_clamped_to_the_servers_limit(export):
    with running(export, ServerSettings(max_tokens=4)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.chat.completions.create(model=client.models.list().data[0].id, messages=user(IMAGES[0]),
                                           max_tokens=10_000, extra_body={"min_tokens": 10_000})
        assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"


def test_seeded_sampling_repeats_and_differs_from_greedy(client):
    msgs = user(IMAGES[0], text="what is it?")
    a = client.chat.completions.create(model="blip2-test", messages=msgs, max_tokens=10, temperature=1.5, seed=7,
                                       extra_body={"min_tokens": 10})
    b = client.chat.completions.create(model="blip2-test", messages=msgs, max_tokens=10, temperature=1.5, seed=7,
                                       extra_body={"min_tokens": 10})
    others = {client.chat.completions.create(model="blip2-test", messages=msgs, max_tokens=10, temperature=1.5,
                                             seed=s, extra_body={"min_tokens": 10}).choices[0].message.content
              for s in range(8, 12)}
    assert a.choices[0].message.content == b.choices[0].message.content
    assert len(others | {a.choices[0].message.content}) > 1


def test_errors_are_openai_errors_with_4xx(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="another-model", messages=user(IMAGES[0]))
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="blip2-test", messages=[{"role": "user", "content": "hello"}])
    assert "image" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="blip2-test", messages=user(IMAGES[0]), n=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="blip2-test", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    assert "--allow-url-fetch" in e.value.body["message"]


def test_models_health_and_metrics(client, base):
    assert [m.id for m in client.models.list().data] == ["blip2-test"]
    assert get(base, "/health") == (200, '{"status":"ok","model":"blip2-test"}')
    before = metric(base, "blip2rt_generated_tokens_total")
    r = client.chat.completions.create(model="blip2-test", messages=user(IMAGES[1]), max_tokens=5)
    assert metric(base, "blip2rt_generated_tokens_total") == before + r.usage.completion_tokens
    for name in ("blip2rt_queue_depth", "blip2rt_decode_batch_size_count", "blip2rt_time_to_first_token_seconds_count",
                 "blip2rt_tokens_per_second", "blip2rt_image_cache_hits_total", "blip2rt_requests_total"):
        metric(base, name)
    assert metric(base, "blip2rt_time_to_first_token_seconds_count") >= 1


def test_a_pytorch_model_and_a_t5_export_are_served_one_request_at_a_time(hf_opt, hf_t5, tmp_path):
    """Without in-flight batching (the PyTorch model; an encoder-decoder export), requests still get
    the runtime's own greedy answers."""
    from blip2rt.server.engine import SequentialEngine
    from blip2rt.server.served_model import load

    src = with_tiny_tokenizer(hf_opt, tmp_path / "opt")
    t5_src = with_tiny_tokenizer(hf_t5, tmp_path / "t5")
    export_model(blip2rt.from_pretrained(t5_src, device="cpu"), tmp_path / "t5_export")
    paths = photos(tmp_path, IMAGES[:2])
    q = "what is it?"
    for path, reference in ((src, blip2rt.from_pretrained(src, device="cpu")),
                            (tmp_path / "t5_export", OrtBlip2(tmp_path / "t5_export", providers=["CPUExecutionProvider"]))):
        assert isinstance(load(str(path), ServerSettings(), provider="cpu", device="cpu")[1], SequentialEngine)
        with running(path, ServerSettings(model_name="m"), device="cpu") as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
            r = client.chat.completions.create(model="m", messages=user(*IMAGES[:2], text=q), max_tokens=6)
            got = [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]
            assert got == reference.answer(paths, [q, q], **greedy(VQA_DEFAULTS, 6))
            r = client.chat.completions.create(model="m", messages=user(IMAGES[0]), max_tokens=5, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in r if c.choices) == \
                reference.caption(paths[:1], **greedy(CAPTION_DEFAULTS, 5))[0]


def test_url_fetch_and_local_files_only_where_allowed(export, tmp_path):
    """--allow-url-fetch reads http URLs (here a file server on loopback); --allow-local-dir reads
    paths and file: URLs under its folder only. Both answer as the same image sent as a data: URL."""
    import functools
    import http.server
    import threading

    root = tmp_path / "images"
    root.mkdir()
    (root / "a.png").write_bytes(IMAGES[0])
    (tmp_path / "outside.png").write_bytes(IMAGES[1])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()

    def ask(client, url):
        return client.chat.completions.create(model="m", max_tokens=6, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}]}]).choices[0].message.content

    try:
        settings = ServerSettings(model_name="m", allow_url_fetch=True, allow_local_dir=root)
        with running(export, settings) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
            want = ask(client, data_url(IMAGES[0]))
            assert ask(client, f"http://127.0.0.1:{files.server_address[1]}/a.png") == want
            assert ask(client, "a.png") == want
            assert ask(client, f"file://{root / 'a.png'}") == want
            for outside in ("../outside.png", str(tmp_path / "outside.png"), f"file://{tmp_path / 'outside.png'}"):
                with pytest.raises(openai.BadRequestError, match="allow-local-dir"):
                    ask(client, outside)
            with pytest.raises(openai.BadRequestError, match="could not fetch"):
                ask(client, f"http://127.0.0.1:{files.server_address[1]}/missing.png")
    finally:
        files.shutdown()


def test_the_serve_command_helps_refuses_clearly_and_needs_no_torch(tmp_path):
    import subprocess
    import sys

    code = ("import sys\nfrom blip2rt.cli import main\n"
            "try:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "--max-batch" in out and "--allow-url-fetch" in out and "--cache-mb" in out
    assert out.strip().endswith("no torch")
    done = subprocess.run([sys.executable, "-m", "blip2rt", "serve", str(tmp_path / "missing")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("blip2rt serve: error:") and len(done.stderr.strip().splitlines()) == 1


def test_opts_position_table_bounds_the_served_context(export):
    """OPT's learned positions (64 in this config) are recorded by the export and cut --context."""
    from blip2rt.export.export_config import ExportConfig
    from blip2rt.server.served_model import load

    assert ExportConfig.read(export).max_positions == 64
    settings = ServerSettings(context=512)
    load(str(export), settings, provider="cpu")
    assert settings.context == 64
