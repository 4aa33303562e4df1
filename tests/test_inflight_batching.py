"""In-flight batching (blip2rt.export.inflight): every request's greedy tokens equal a greedy search
over it alone (OrtBlip2's static graph at batch 1), whatever it was batched with: requests of
different lengths, joining and leaving mid-decode, a full batch that makes others wait, a buffer
that has to shift its rows, and a request cancelled half-way."""

import numpy as np
import pytest

import blip2rt
from blip2rt.export import OrtBlip2, export_model
from blip2rt.export.inflight import InflightBatcher
from hf_reference import with_tiny_tokenizer

PROMPTS = ["a", "a photo of", "the red one is", "x y z w v", "", "what is this? it is a", "b", "left of the"]


@pytest.fixture(scope="module", params=["opt", "llama"])
def runtime(request, tmp_path_factory):
    ref = request.getfixturevalue(f"hf_{request.param}")
    src = with_tiny_tokenizer(ref, tmp_path_factory.mktemp(f"inflight_src_{request.param}"))
    out = tmp_path_factory.mktemp(f"inflight_onnx_{request.param}")
    export_model(blip2rt.from_pretrained(src, device="cpu"), out)
    return OrtBlip2(out, providers=["CPUExecutionProvider"], static_cache=True)


def requests(rt, n, seed=0):
    """n requests: (embeds (1, P, W), mask (1, P), max_new, min_new), prompts of unequal length."""
    rng = np.random.default_rng(seed)
    size = rt.cfg.image_size
    out = []
    for i in range(n):
        px = rng.standard_normal((1, 3, size, size)).astype(np.float32)
        ids, mask = rt.encode([PROMPTS[i % len(PROMPTS)]])
        embeds, full = rt.llm_inputs(rt.image_features(px), ids, mask)
        out.append((embeds, full, int(rng.integers(3, 13)), int(rng.integers(0, 3))))
    return out


def alone(rt, embeds, mask, max_new, min_new) -> list[int]:
    """A greedy search over the request alone, trimmed after its EOS."""
    from blip2rt.export.search import Search

    row = Search(rt.graphs, max_new, min_new, 1, 1.0).run(embeds, mask)[0].tolist()
    for i, t in enumerate(row):
        if t in rt.graphs.eos:
            return row[:i + 1]
    return row


def test_staggered_requests_decode_as_they_would_alone(runtime):
    """Three slots, eight requests: two at first, one more at each of the next steps, so requests
    join while others decode, wait for a free slot, and leave at different steps."""
    reqs = requests(runtime, 8)
    want = [alone(runtime, *r) for r in reqs]
    assert len({len(w) for w in want}) > 1  # they end at different steps
    b = InflightBatcher(runtime.graphs, slots=3, length=64)
    seqs = [b.submit(e[0], m[0], mx, mn) for e, m, mx, mn in reqs[:2]]
    later = list(reqs[2:])
    joined_mid_decode = 0
    while b.busy or later:
        if later:
            e, m, mx, mn = later.pop(0)
            joined_mid_decode += bool(b.active)
            seqs.append(b.submit(e[0], m[0], mx, mn))
        b.step()
        assert len(b.active) <= 3
    assert joined_mid_decode >= 3
    assert [s.tokens for s in seqs] == want
    assert all(s.finished for s in seqs)


def test_a_short_buffer_shifts_its_rows_and_still_agrees(runtime):
    """A buffer barely longer than one request: the timeline reaches its end and every row moves left."""
    reqs = requests(runtime, 6, seed=1)
    want = [alone(runtime, *r) for r in reqs]
    longest = max(r[0].shape[1] + r[2] for r in reqs)
    b = InflightBatcher(runtime.graphs, slots=2, length=longest + 2)
    seqs = [b.submit(e[0], m[0], mx, mn) for e, m, mx, mn in reqs]
    b.run_until_done()
    assert [s.tokens for s in seqs] == want
    assert b.shifts > 0


def test_a_cancelled_request_frees_its_slot_for_the_next(runtime):
    reqs = requests(runtime, 3, seed=2)
    reqs = [(e, m, 12, 12) for e, m, _, _ in reqs]  # each runs its 12 tokens (EOS blocked)
    b = InflightBatcher(runtime.graphs, slots=1, length=64)
    first, second = b.submit(reqs[0][0][0], reqs[0][1][0], 12, 12), b.submit(reqs[1][0][0], reqs[1][1][0], 12, 12)
    b.step()
    b.step()
    assert first.slot == 0 and second.slot is None and not second.tokens  # one slot: the second waits
    b.cancel(first)
    assert first.finished and first.cancelled and not b.active
    b.run_until_done()
    assert len(first.tokens) == 2 and second.tokens == alone(runtime, *reqs[1])


def test_requests_that_do_not_fit_are_refused(runtime):
    (e, m, _, _), = requests(runtime, 1)
    b = InflightBatcher(runtime.graphs, slots=2, length=e.shape[1] + 4)
    with pytest.raises(ValueError, match="do not fit"):
        b.submit(e[0], m[0], max_new=5)
    with pytest.raises(ValueError, match="at least 1"):
        b.submit(e[0], m[0], max_new=0)


def test_requests_of_one_prompt_length_prefill_as_one_batch_and_agree(runtime):
    """Six requests admitted together, two prompt lengths: two prefill runs, and each request's tokens
    are still those of a search over it alone (no row is padded)."""
    rng = np.random.default_rng(3)
    size = runtime.cfg.image_size
    reqs = []
    for i in range(6):
        px = rng.standard_normal((1, 3, size, size)).astype(np.float32)
        ids, mask = runtime.encode(["a photo of" if i % 2 else "b"])
        embeds, full = runtime.llm_inputs(runtime.image_features(px), ids, mask)
        reqs.append((embeds, full, 4 + i, 0))
    assert len({r[0].shape[1] for r in reqs}) == 2
    want = [alone(runtime, *r) for r in reqs]
    b = InflightBatcher(runtime.graphs, slots=6, length=64)
    seqs = [b.submit(e[0], m[0], mx, mn) for e, m, mx, mn in reqs]
    b.run_until_done()
    assert b.prefills == 2
    assert [s.tokens for s in seqs] == want
