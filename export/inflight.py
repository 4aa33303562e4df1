"""In-flight batching of greedy requests over one static KV buffer (static_lm.onnx), torch-free.

Requests arrive at any time with their LLM input embeddings (soft prompt and prompt, as
`OrtBlip2.llm_inputs` lays them out). Each is prefilled through the same graph as a search over it
alone would be; requests admitted together whose prompts have one length share that run as one
batch (nothing is padded, so each row computes what it would alone). Its keys and values are copied
into a free row ("slot") of a shared buffer of `slots` rows and `length` columns. From the next step it decodes with every other active row in one batched run of
the graph. A request that ends (EOS, or its `max_new` tokens) frees its slot at once.

The rows share one timeline. `col` is the column every row's next token writes, as the graph's
`write_at` takes one position for the batch. A row's own tokens sit in the columns
[start, col) and the mask hides every other column from it. The graph's causal mask hides the
columns past `col`. So a row computes exactly what it would alone, with other rows' columns masked
out, at its own positions (position ids are per row). A request whose prompt is longer than `col`
moves the timeline on: the rows already there see masked columns. When the timeline reaches the
buffer's end, every row is shifted left by the oldest row's start.

Each row's token is chosen on the host from the step's logits, with EOS blocked until the row's
`min_new`: greedily, or sampled at the row's temperature and top-p from the row's own generator (so a
seeded request draws the same tokens whatever it is batched with). Beam search is left to
`OrtBlip2.generate`. The buffers are numpy arrays
that onnxruntime reads and writes in place on the CPU provider. A CUDA batcher would keep them on
the device.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from blip2rt.front_end import static_cache_length

from .graph_runner import GraphRunner


@dataclass
class Sequence:
    """One request: its prompt, how much to generate, and what it has generated so far."""

    id: int
    embeds: np.ndarray  # (P, W) the LLM's input embeddings
    mask: np.ndarray  # (P,) int64: 0 at padding
    max_new: int
    min_new: int = 0
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    rng: np.random.Generator | None = None  # the draws of a sampled request
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    cancelled: bool = False
    slot: int | None = None
    start: int = 0  # the first column of its prompt in the shared buffer
    next_position: int = 0  # the position id of the token it feeds next

    @property
    def prompt_length(self) -> int:
        return self.embeds.shape[0]


def sample_token(scores: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """One draw from softmax(scores / temperature) restricted to its nucleus: the most probable tokens
    whose mass first reaches top_p (the token that crosses it included; ties broken by token id),
    renormalised. transformers' temperature and top-p warpers keep the same set."""
    z = scores.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]  # the mass of the more probable tokens
        keep = order[before < top_p]
        kept = np.zeros_like(p)
        kept[keep] = p[keep]
        p = kept / kept.sum()
    return int(rng.choice(p.size, p=p))


class InflightBatcher:
    """Greedy decoding of many requests at once over `graphs`' static_lm.onnx, on the CPU provider.

    `submit` queues a request; each `step` admits what fits (a prefill each) and runs one batched
    decode step; it returns the (sequence, token) pairs it produced. `run_until_done` steps until
    nothing is left. The tokens of every request equal those of a greedy search over it alone
    (tests/test_inflight_batching.py)."""

    def __init__(self, graphs: GraphRunner, slots: int = 8, length: int = 512):
        if "static_lm" not in graphs.cfg.graphs or graphs.cfg.encoder_decoder:
            raise ValueError("in-flight batching needs a decoder-only export with static_lm.onnx")
        if graphs.on_cuda:
            raise ValueError("this in-flight batcher keeps its buffers in host memory: use the CPU provider")
        self.graphs, self.slots, self.length = graphs, slots, length
        c = graphs.cfg
        f = graphs.float

        # Host buffers of `slots` rows that onnxruntime reads and writes in place. A step runs over the
        # rows up to the highest busy slot only (slots are taken lowest first), through OrtValues over
        # those leading rows, made once per row count.
        self.kv = [np.zeros((slots, c.num_kv_heads, length, c.head_dim), f) for _ in c.past_names]
        self.mask = np.zeros((slots, length), np.int64)
        self.embeds = np.zeros((slots, 1, c.hidden_size), f)
        self.position = np.zeros((slots, 1), np.int64)
        self.write_at = np.zeros((), np.int64)
        self.logits = np.zeros((slots, c.vocab_size), f)
        self._ids_out = np.zeros((slots,), np.int64)
        self._bias = np.zeros((1, c.vocab_size), np.float32)
        self._bound: dict[int, tuple[dict, dict]] = {}
        self.col = 0
        self.shifts = 0  # how often the rows were shifted left (the timeline reached the end)
        self.prefills = 0  # prefill runs (a run takes every admitted request of one prompt length)
        self.active: dict[int, Sequence] = {}  # slot -> sequence
        self.pending: list[Sequence] = []
        self._ids = itertools.count()
        self.eos = np.asarray(graphs.eos, np.int64)

    # -- requests -------------------------------------------------------------------------------

    def submit(self, embeds: np.ndarray, mask: np.ndarray | None = None, max_new: int = 30,
               min_new: int = 0, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> Sequence:
        """Queues one request: embeds (P, W) (or (1, P, W)), its mask (P,). Greedy at temperature 0,
        else sampled (see `sample_token`; `seed` fixes the draws). Returns its Sequence, whose
        `tokens` grow as `step` runs and whose `finished` says when it is done."""
        embeds = np.asarray(embeds)
        if embeds.ndim == 3:
            if embeds.shape[0] != 1:
                raise ValueError("submit takes one request; submit each row of a batch")
            embeds = embeds[0]
        mask = np.ones(embeds.shape[0], np.int64) if mask is None else np.asarray(mask, np.int64).reshape(-1)
        if max_new < 1:
            raise ValueError("max_new must be at least 1")
        if embeds.shape[0] + max_new > self.length:
            raise ValueError(f"a prompt of {embeds.shape[0]} positions and {max_new} new tokens do not fit the "
                             f"batcher's {self.length} columns")
        limit = self.graphs.cfg.max_positions
        if limit is not None and embeds.shape[0] + max_new > limit:
            raise ValueError(f"a prompt of {embeds.shape[0]} positions and {max_new} new tokens pass the LLM's "
                             f"{limit} positions")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
        rng = np.random.default_rng(seed) if temperature > 0 else None
        seq = Sequence(next(self._ids), embeds.astype(self.graphs.float), mask, max_new, min_new,
                       temperature, top_p, rng)
        self.pending.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Ends a request now (a client that went away): its slot is free for the next."""
        seq.cancelled = True
        if seq in self.pending:
            self.pending.remove(seq)
        self._finish(seq)

    @property
    def busy(self) -> bool:
        return bool(self.active or self.pending)

    # -- stepping -------------------------------------------------------------------------------

    def step(self) -> list[tuple[Sequence, int]]:
        """Admits the pending requests that fit (each prefilled alone; its first token is produced
        here), then one decode step for the rows that were already running."""
        produced = []
        running = list(self.active.values())
        if running:
            produced += self._decode(running)
        admitted = []
        while self.pending and len(self.active) + len(admitted) < self.slots:
            if not self._make_room(max(s.prompt_length for s in admitted + self.pending[:1])):
                break
            admitted.append(self.pending.pop(0))
        for group in self._prefill_groups(admitted):
            produced += self._admit(group)
        if not self.active:
            self.col = 0
        return produced

    def run_until_done(self) -> None:
        while self.busy:
            self.step()

    # -- internals ------------------------------------------------------------------------------

    def _binding(self, rows: int) -> tuple[dict, dict]:
        """The static graph's inputs and outputs over the first `rows` rows of the buffers."""
        if rows not in self._bound:
            import onnxruntime as ort

            c = self.graphs.cfg

            def v(a):
                return ort.OrtValue.ortvalue_from_numpy(a, "cpu", 0)  # shares `a`'s memory (contiguous rows)

            inputs = {"inputs_embeds": v(self.embeds[:rows]), "attention_mask": v(self.mask[:rows]),
                      "position_ids": v(self.position[:rows]), "write_at": v(self.write_at),
                      "token_bias": v(self._bias), **{n: v(a[:rows]) for n, a in zip(c.past_names, self.kv)}}
            outputs = {"logits": v(self.logits[:rows]), "next_ids": v(self._ids_out[:rows]),
                       **{n: v(a[:rows]) for n, a in zip(c.present_names, self.kv)}}
            self._bound[rows] = inputs, outputs
        return self._bound[rows]

    def _choose(self, logits: np.ndarray, seq: Sequence) -> int:
        scores = logits.astype(np.float32)
        if len(seq.tokens) < seq.min_new and self.eos.size:
            scores = scores.copy()
            scores[self.eos] = -np.inf
        if seq.temperature > 0:
            return sample_token(scores, seq.temperature, seq.top_p, seq.rng)
        return int(scores.argmax())

    def _emit(self, seq: Sequence, token: int) -> int:
        seq.tokens.append(token)
        if token in self.eos or len(seq.tokens) >= seq.max_new:
            self._finish(seq)
        return token

    def _finish(self, seq: Sequence) -> None:
        seq.finished = True
        if seq.slot is not None and self.active.get(seq.slot) is seq:
            del self.active[seq.slot]
            self.mask[seq.slot] = 0
        seq.slot = None

    def _make_room(self, prompt: int) -> bool:
        """Whether a prompt of this length can start at the timeline's column (moving it on, or
        shifting every row left, as needed)."""
        if max(self.col, prompt) >= self.length:
            self._compact()
        return max(self.col, prompt) < self.length

    def _compact(self) -> None:
        """Shifts every row left by the oldest active row's start."""
        if not self.active:
            self.col = 0
            return
        s = min(seq.start for seq in self.active.values())
        if s == 0:
            return
        n = self.col - s
        self.shifts += 1
        for a in self.kv:
            a[:, :, :n] = a[:, :, s:self.col]
        self.mask[:, :n] = self.mask[:, s:self.col]
        self.mask[:, n:] = 0
        for seq in self.active.values():
            seq.start -= s
        self.col = n

    def _prefill_groups(self, seqs: list[Sequence]) -> list[list[Sequence]]:
        """The admitted requests in groups that prefill as one batch: equal prompt lengths and equal
        prefill buffers, so that no row is padded and each computes what it would alone."""
        groups: dict[tuple[int, int], list[Sequence]] = {}
        for seq in seqs:
            key = (seq.prompt_length, static_cache_length(seq.prompt_length, seq.max_new))
            groups.setdefault(key, []).append(seq)
        return list(groups.values())

    def _admit(self, seqs: list[Sequence]) -> list[tuple[Sequence, int]]:
        """Prefills `seqs` (one prompt length) in one batch, as a greedy search over each alone would,
        and copies each one's keys and values into a free slot, ending at the timeline's column.
        Returns their first tokens."""
        p = seqs[0].prompt_length
        embeds = np.stack([seq.embeds for seq in seqs])
        mask = np.stack([seq.mask for seq in seqs])
        run = self.graphs.static_run(embeds, mask, max(seq.max_new for seq in seqs), 0)
        self.prefills += 1
        logits = run.logits()
        kv = [t.numpy() for t in run.buf.kv]
        produced = []
        for row, seq in enumerate(seqs):
            first = self._emit(seq, self._choose(logits[row], seq))
            produced.append((seq, first))
            if seq.finished:
                continue
            self.col = max(self.col, p)
            slot = next(i for i in range(self.slots) if i not in self.active)
            seq.slot, seq.start = slot, self.col - p
            for mine, theirs in zip(self.kv, kv):
                mine[slot, :, seq.start:self.col] = theirs[row, :, :p]
            self.mask[slot] = 0
            self.mask[slot, seq.start:self.col] = seq.mask
            seq.next_position = int(run.positions[row, -1]) + 1
            self.active[slot] = seq
        return produced

    def _decode(self, running: list[Sequence]) -> list[tuple[Sequence, int]]:
        """One batched step: each running row feeds its last token at the timeline's column."""
        if self.col >= self.length:
            self._compact()
        col, table = self.col, self.graphs.embed
        self.embeds[:] = 0
        for seq in running:
            self.embeds[seq.slot, 0] = table[seq.tokens[-1]]
            self.position[seq.slot, 0] = seq.next_position
        self.mask[:, col] = 1  # idle rows attend to their own column only
        self.write_at[...] = col
        self.graphs.static.run_bound(*self._binding(max(self.active) + 1), None)
        idle = [i for i in range(self.slots) if i not in self.active]
        self.mask[idle, col] = 0
        self.col += 1
        produced = []
        for seq in running:
            seq.next_position += 1
            produced.append((seq, self._emit(seq, self._choose(self.logits[seq.slot], seq))))
        return produced

