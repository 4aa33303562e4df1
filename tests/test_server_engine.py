"""The server's engine without HTTP: requests that arrive together share one vision run; every
request's tokens equal a greedy search over it alone, whatever it was batched with (joining and
leaving mid-decode, different lengths); the image-embedding cache hits, evicts by bytes, keys on the
Q-Former's question, and gives the uncached tokens; seeded sampling draws the same tokens batched
or alone, from the distribution the formula gives."""

import numpy as np
import pytest

import blip2rt
from blip2rt.export import OrtBlip2, export_model
from blip2rt.export.inflight import sample_token
from blip2rt.export.search import Search
from blip2rt.server import ServerSettings
from blip2rt.server.app import prepare
from blip2rt.server.engine import InflightEngine, Work
from blip2rt.server.openai_schema import ChatCompletionRequest
from blip2rt.server.served_model import load
from hf_reference import with_tiny_tokenizers
from sampling_stats import FALSE_ALARM, chi_square_p
from server_harness import png, tiny_export, user

QUESTIONS = [None, "what is it?", "is there a red one on the left?", None, "x", "what colour is the big shape?"]


class Sink:
    """Stands in for the event loop: keeps what the engine sends."""

    def __init__(self):
        self.events = []

    def call_soon_threadsafe(self, fn, event):
        self.events.append(event)


@pytest.fixture(scope="module", params=["opt", "llama"])
def export(request, tmp_path_factory):
    return tiny_export(request.getfixturevalue(f"hf_{request.param}"), tmp_path_factory, f"engine_{request.param}")


@pytest.fixture(scope="module")
def question_export(hf_instruct_llama, tmp_path_factory):
    """An InstructBLIP export: its Q-Former reads the question."""
    src = with_tiny_tokenizers(hf_instruct_llama, tmp_path_factory.mktemp("engine_q_src"))
    model = blip2rt.from_pretrained(src, device="cpu")
    out = tmp_path_factory.mktemp("engine_q_export")
    export_model(model, out)
    return out


def engine_for(export, **settings):
    s = ServerSettings(**settings)
    served, engine, metrics = load(str(export), s, provider="cpu")
    assert isinstance(engine, InflightEngine)
    return served, engine, s


def work(served, s, image: bytes, question=None, **options):
    body = ChatCompletionRequest(messages=user(image, text=question), **options)
    return Work(prepare(body, served, s), Sink())


def run(engine, works, steps_between=None):
    """Starts `works` (a list, or a list of lists started `steps_between` steps apart) and steps until
    everything is done; returns each work's tokens per choice."""
    waves = works if steps_between else [works]
    for i, wave in enumerate(waves):
        engine._start(wave)
        for _ in range(steps_between or 0):
            if engine.busy:
                engine._step()
    while engine.busy:
        engine._step()
    flat = [w for wave in waves for w in wave]
    return [tokens(w) for w in flat]


def tokens(w) -> list[list[int]]:
    out = [[] for _ in range(w.p.pixels.shape[0])]
    ended = [False] * len(out)
    for kind, i, *rest in w.loop.events:
        if kind == "token":
            assert not ended[i]
            out[i].append(rest[0])
        elif kind == "end":
            ended[i] = True
    assert all(ended), w.loop.events
    return out


def alone(served, w) -> list[list[int]]:
    """A greedy search over each image of the request alone (OrtBlip2's graphs at batch 1)."""
    rt: OrtBlip2 = served.runtime
    p = w.p
    qids, qmask = rt.question_ids([p.question or ""])
    out = []
    for px in p.pixels:
        embeds, mask = rt.llm_inputs(rt.image_features(px[None], qids, qmask), p.text.input_ids, p.text.attention_mask)
        row = Search(rt.graphs, p.max_new, p.min_new, 1, 1.0).run(embeds, mask)[0].tolist()
        end = next((k + 1 for k, t in enumerate(row) if t in rt.graphs.eos), len(row))
        out.append(row[:end])
    return out


def test_requests_arriving_together_share_one_vision_run_and_decode_as_alone(export):
    served, engine, s = engine_for(export, max_batch=4, cache_bytes=0)
    works = [work(served, s, png(i), QUESTIONS[i % len(QUESTIONS)], max_tokens=3 + 2 * i, min_tokens=i % 3)
             for i in range(6)]
    got = run(engine, works)
    assert engine.metrics.prefix_batch.count == 2 and engine.metrics.prefix_batch.sum == 6  # 4 + 2 images
    assert got == [alone(served, w) for w in works]
    assert len({len(g[0]) for g in got}) > 1  # they left at different steps
    assert engine.metrics.decode_batch.sum / engine.metrics.decode_batch.count > 1  # and decoded together


def test_requests_joining_and_leaving_mid_decode_decode_as_alone(export):
    served, engine, s = engine_for(export, max_batch=3, context=64, cache_bytes=0)
    waves = [[work(served, s, png(10 + 2 * k + j), QUESTIONS[(k + j) % len(QUESTIONS)], max_tokens=4 + 3 * j + k)
              for j in range(2)] for k in range(4)]
    got = run(engine, waves, steps_between=2)
    assert got == [alone(served, w) for wave in waves for w in wave]
    assert max(engine.metrics.decode_batch.counts) > 0 and engine.metrics.decode_batch.sum > engine.metrics.decode_batch.count


def test_several_images_of_one_request_are_choices_decoded_as_alone(export):
    served, engine, s = engine_for(export, max_batch=4, cache_bytes=0)
    body = ChatCompletionRequest(messages=user(png(1), png(2), png(3), text="what is it?"), max_tokens=6)
    w = Work(prepare(body, served, s), Sink())
    assert run(engine, [w]) == [alone(served, w)]


def test_the_cache_hits_a_repeated_image_and_gives_the_uncached_tokens(export):
    served, engine, s = engine_for(export, max_batch=4)
    uncached_served, uncached, _ = engine_for(export, max_batch=4, cache_bytes=0)
    first = run(engine, [work(served, s, png(5), "what is it?", max_tokens=6)])
    assert run(engine, [work(served, s, png(5), "what is it?", max_tokens=6)]) == first
    caption = run(engine, [work(served, s, png(5), None, max_tokens=6)])
    assert caption == run(uncached, [work(uncached_served, s, png(5), None, max_tokens=6)])
    assert (engine.cache.hits, engine.cache.misses) == (2, 1)  # this export's soft prompt does not read the text
    assert engine.metrics.prefix_batch.count == 1  # the ViT and Q-Former ran once
    together = [work(served, s, png(6), max_tokens=6), work(served, s, png(6), "what is it?", max_tokens=6)]
    run(engine, together)
    assert engine.metrics.prefix_batch.count == 2 and engine.metrics.prefix_batch.sum == 2  # once for both
    assert first == run(uncached, [work(uncached_served, s, png(5), "what is it?", max_tokens=6)])


def test_the_cache_evicts_the_least_recent_beyond_its_bytes(export):
    served, engine, s = engine_for(export, max_batch=4)
    run(engine, [work(served, s, png(20), max_tokens=2)])
    one = engine.cache.bytes
    assert one > 0 and len(engine.cache) == 1
    engine.cache.max_bytes = 2 * one
    run(engine, [work(served, s, png(21), max_tokens=2)])
    run(engine, [work(served, s, png(20), max_tokens=2)])  # a hit: 20 is now the most recent
    run(engine, [work(served, s, png(22), max_tokens=2)])  # evicts 21
    assert engine.cache.bytes == 2 * one and engine.cache.evictions == 1
    misses = engine.cache.misses
    run(engine, [work(served, s, png(20), max_tokens=2)])
    assert engine.cache.misses == misses
    run(engine, [work(served, s, png(21), max_tokens=2)])
    assert engine.cache.misses == misses + 1


def test_the_cache_keys_on_the_question_where_the_q_former_reads_it(question_export):
    served, engine, s = engine_for(question_export, max_batch=4)
    _, uncached, _ = engine_for(question_export, max_batch=4, cache_bytes=0)
    assert served.runtime.question_in_qformer
    a = run(engine, [work(served, s, png(30), "what is it?", max_tokens=5)])
    b = run(engine, [work(served, s, png(30), "is there a circle?", max_tokens=5)])
    assert engine.cache.misses == 2 and engine.cache.hits == 0
    c = run(engine, [work(served, s, png(30), "what is it?", max_tokens=5)])
    assert engine.cache.hits == 1 and c == a
    w = work(served, s, png(30), "is there a circle?", max_tokens=5)
    assert b == run(uncached, [w]) == [alone(served, w)]


def test_seeded_sampling_draws_the_same_batched_or_alone(export):
    served, engine, s = engine_for(export, max_batch=4, cache_bytes=0)
    opts = dict(max_tokens=8, min_tokens=8, temperature=1.3, top_p=0.9)
    lone = run(engine, [work(served, s, png(40), "what is it?", seed=11, **opts)])
    crowd = [work(served, s, png(41 + i), QUESTIONS[i], seed=i, **opts) for i in range(3)]
    mine = work(served, s, png(40), "what is it?", seed=11, **opts)
    assert run(engine, [crowd, [mine]], steps_between=2)[-1] == lone[0]
    others = run(engine, [work(served, s, png(40), "what is it?", seed=12 + k, **opts) for k in range(4)])
    assert any(o != lone[0] for o in others)


def test_sample_token_draws_softmax_over_the_nucleus():
    """The formula: p = softmax(scores / T); keep the most probable tokens until their mass reaches
    top_p (the crossing token included); renormalise. Chi-square over 20,000 draws."""
    scores = np.array([2.0, 1.0, 0.5, 0.0, -1.0, 3.0], np.float32)
    rng = np.random.default_rng(0)
    for temperature, top_p in ((0.7, 0.8), (1.5, 1.0), (1.0, 0.5)):
        p = np.exp(scores.astype(np.float64) / temperature)
        p /= p.sum()
        order = np.argsort(-p)
        keep, mass = [], 0.0
        for t in order:
            keep.append(t)
            mass += p[t]
            if mass >= top_p:
                break
        want = np.zeros_like(p)
        want[keep] = p[keep] / p[keep].sum()
        counts = np.bincount([sample_token(scores, temperature, top_p, rng) for _ in range(20_000)], minlength=6)
        import torch

        assert chi_square_p(torch.tensor(counts)[None], torch.tensor(want)[None]) > FALSE_ALARM
