"""In-flight batching of greedy requests over one static KV buffer (static_lm.onnx), torch-free.

Requests arrive at any time with their LLM input embeddings (soft prompt and prompt, as
`OrtBlip2.llm_inputs` lays them out). Each is prefilled alone, through the same graph at batch 1,
and its keys and values are copied into a free row ("slot") of a shared buffer of `slots` rows and
`length` columns. From the next step it decodes with every other active row in one batched run of
the graph. A request that ends (EOS, or its `max_new` tokens) frees its slot at once.

The rows share one timeline. `col` is the column every row's next token writes, as the graph's
`write_at` takes one position for the batch. A row's own tokens sit in the columns
[start, col) and the mask hides every other column from it. The graph's causal mask hides the
columns past `col`. So a row computes exactly what it would alone, with other rows' columns masked
out, at its own positions (position ids are per row). A request whose prompt is longer than `col`
moves the timeline on: the rows already there see masked columns. When the timeline reaches the
buffer's end, every row is shifted left by the oldest row's start.

Only the greedy choice is made (on the host, from the step's logits, with EOS blocked until a row's
`min_new`). Beam search and sampling are left to `OrtBlip2.generate`. The buffers are numpy arrays
that onnxruntime reads and writes in place on the CPU provider. A CUDA batcher would keep them on
the device.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from .graph_runner import GraphRunner


@dataclass
class Sequence:
    """One request: its prompt, how much to generate, and what it has generated so far."""

    id: int
    embeds: np.ndarray  # (P, W) the LLM's input embeddings
    mask: np.ndarray  # (P,) int64: 0 at padding
    max_new: int
    min_new: int = 0
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    cancelled: bool = False
    slot: int | None = None
    start: int = 0  # the first column of its prompt in the shared buffer
    next_position: int = 0  # the position id of the token it feeds next

    @property
    def prompt_length(self) -> int:
        return self.embeds.shape[0]


class InflightBatcher:
    """Greedy decoding of many requests at once over `graphs`' static_lm.onnx, on the CPU provider.

    `submit` queues a request; each `step` admits what fits (a prefill each) and runs one batched
    decode step; it returns the (sequence, token) pairs it produced. `run_until_done` steps until
    nothing is left. The tokens of every request equal those of a greedy search over it alone
    (tests/test_inflight_batching.py)."""

    def __init__(self, graphs: GraphRunner, slots: int = 8, length: int = 512):
        import onnxruntime as ort

        if "static_lm" not in graphs.cfg.graphs or graphs.cfg.encoder_decoder:
            raise ValueError("in-flight batching needs a decoder-only export with static_lm.onnx")
        if graphs.on_cuda:
            raise ValueError("this in-flight batcher keeps its buffers in host memory: use the CPU provider")
        self.graphs, self.slots, self.length = graphs, slots, length
        c = graphs.cfg
        f = graphs.float

        def buffer(shape, dtype):
            a = np.zeros(shape, dtype)
            return a, ort.OrtValue.ortvalue_from_numpy(a, "cpu", 0)  # onnxruntime reads and writes `a` itself

        kv = [buffer((slots, c.num_kv_heads, length, c.head_dim), f) for _ in c.past_names]
        self.kv = [a for a, _ in kv]
        self.mask, mask_v = buffer((slots, length), np.int64)
        self.embeds, embeds_v = buffer((slots, 1, c.hidden_size), f)
        self.position, position_v = buffer((slots, 1), np.int64)
        self.write_at, write_v = buffer((), np.int64)
        _, bias_v = buffer((1, c.vocab_size), np.float32)
        self.logits, logits_v = buffer((slots, c.vocab_size), f)
        _, ids_v = buffer((slots,), np.int64)
        self.inputs = {"inputs_embeds": embeds_v, "attention_mask": mask_v, "position_ids": position_v,
                       "write_at": write_v, "token_bias": bias_v, **{n: v for n, (_, v) in zip(c.past_names, kv)}}
        self.outputs = {"logits": logits_v, "next_ids": ids_v,
                        **{n: v for n, (_, v) in zip(c.present_names, kv)}}
        self.col = 0
        self.shifts = 0  # how often the rows were shifted left (the timeline reached the end)
        self.active: dict[int, Sequence] = {}  # slot -> sequence
        self.pending: list[Sequence] = []
        self._ids = itertools.count()
        self.eos = np.asarray(graphs.eos, np.int64)

    # -- requests -------------------------------------------------------------------------------

    def submit(self, embeds: np.ndarray, mask: np.ndarray | None = None, max_new: int = 30,
               min_new: int = 0) -> Sequence:
        """Queues one request: embeds (P, W) (or (1, P, W)), its mask (P,). Returns its Sequence,
        whose `tokens` grow as `step` runs and whose `finished` says when it is done."""
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
        seq = Sequence(next(self._ids), embeds.astype(self.graphs.float), mask, max_new, min_new)
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
        while self.pending and len(self.active) < self.slots:
            seq = self.pending[0]
            if not self._make_room(seq.prompt_length):
                break
            self.pending.pop(0)
            produced.append((seq, self._admit(seq)))
        if not self.active:
            self.col = 0
        return produced

    def run_until_done(self) -> None:
        while self.busy:
            self.step()

    # -- internals ------------------------------------------------------------------------------

    def _choose(self, logits: np.ndarray, seq: Sequence) -> int:
        scores = logits.astype(np.float32)
        if len(seq.tokens) < seq.min_new and self.eos.size:
            scores = scores.copy()
            scores[self.eos] = -np.inf
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

    def _admit(self, seq: Sequence) -> int:
        """Prefills `seq` alone (batch 1, as a greedy search over it alone would) and copies its keys
        and values into a free slot, ending at the timeline's column. Returns its first token."""
        p = seq.prompt_length
        run = self.graphs.static_run(seq.embeds[None], seq.mask[None], seq.max_new, 0)
        first = self._emit(seq, self._choose(run.logits()[0], seq))
        if seq.finished:
            return first
        self.col = max(self.col, p)
        slot = next(i for i in range(self.slots) if i not in self.active)
        seq.slot, seq.start = slot, self.col - p
        for mine, solo in zip(self.kv, run.buf.kv):
            mine[slot, :, seq.start:self.col] = solo.numpy()[0, :, :p]
        self.mask[slot] = 0
        self.mask[slot, seq.start:self.col] = seq.mask
        seq.next_position = int(run.positions[0, -1]) + 1
        self.active[slot] = seq
        return first

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
        self.graphs.static.run_bound(self.inputs, self.outputs, None)
        idle = [i for i in range(self.slots) if i not in self.active]
        self.mask[idle, col] = 0
        self.col += 1
        produced = []
        for seq in running:
            seq.next_position += 1
            produced.append((seq, self._emit(seq, self._choose(self.logits[seq.slot], seq))))
        return produced

