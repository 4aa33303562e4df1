"""The LLM graphs of an export, loaded into ONNX Runtime sessions, behind the small interface the
searches use: `start` (the prompt), `step` (one token per row), `reorder` (beams), and `static_run`
(a greedy run over static_lm.onnx with its KV buffers bound in and out).

Providers: CUDA first when onnxruntime offers it, then CPU. On CUDA the KV cache (and T5's encoder
states and cross-attention KV) stay on the device through IO binding, and beams are reordered there
by `reorder_kv.onnx`; per step the new token ids go up and the last position's logits (B x vocab)
come back for the search. Over `static_lm.onnx` the fixed-length KV buffers are bound as both the
graph's past and present (updated in place), the graph picks the token, and per step only the B ids
come back; on CUDA its decode step replays as a CUDA graph.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blip2rt.errors import CheckpointError
from blip2rt.front_end import PromptLayout, static_cache_length

from .export_config import EMBEDDINGS_FILE, ExportConfig

log = logging.getLogger(__name__)


class _Session:
    """One graph, checked for the I/O names the pipeline uses.

    With `bind_device` ("cuda" or "cpu") it runs through IO binding: inputs may be OrtValues that
    already live on that device, and every output but the first `host` ones stays there.
    """

    def __init__(self, path: Path, providers: list, inputs: list[str], outputs_prefix: list[str],
                 bind_device: str | None = None):
        import onnxruntime as ort

        if not path.is_file():
            raise CheckpointError(f"graph {path} is missing from the export folder")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as e:  # onnxruntime raises several types for an unreadable model
            if "cuda graph" in str(e).lower() or "cuda_graph" in str(e).lower():
                raise  # the caller retries without CUDA graphs
            raise CheckpointError(f"graph {path} could not be loaded by onnxruntime ({str(e).splitlines()[0]})") from None
        have_in = [i.name for i in self.session.get_inputs()]
        have_out = [o.name for o in self.session.get_outputs()]
        missing = [n for n in inputs if n not in have_in]
        if missing or not all(any(o.startswith(p) for o in have_out) for p in outputs_prefix):
            raise CheckpointError(f"graph {path.name} has inputs {have_in} and outputs {have_out[:4]}..., expected "
                                  f"inputs {inputs} and outputs {outputs_prefix}: not a blip2rt export of this kind")
        self.output_names = have_out
        self.bind_device = bind_device
        self._ortvalue = ort.OrtValue

    def run(self, feeds: dict, host: int | None = None) -> list:
        """All outputs as numpy arrays; or, when binding, the first `host` as numpy and the rest as
        OrtValues on the bound device."""
        if self.bind_device is None or host is None:
            return self.session.run(None, {k: self._numpy(v) for k, v in feeds.items()})
        binding = self._bound_inputs(feeds)
        for i, name in enumerate(self.output_names):
            binding.bind_output(name, "cpu" if i < host else self.bind_device)
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return [o.numpy() for o in outs[:host]] + list(outs[host:])

    def run_bound(self, inputs: dict, outputs: dict, graph_id: int | None = None) -> None:
        """One run through IO binding with every output bound to a given OrtValue (the static
        cache: the same buffers in and out). inputs: OrtValues or numpy arrays (copied in).
        graph_id: the CUDA graph this run captures or replays; -1 runs without one."""
        import onnxruntime as ort

        binding = self._bound_inputs(inputs)
        for name, v in outputs.items():
            binding.bind_ortvalue_output(name, v)
        options = None
        if graph_id is not None:
            options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
        self.session.run_with_iobinding(binding, options)

    def _bound_inputs(self, feeds: dict):
        """An IO binding with `feeds` bound: OrtValues where they live, numpy arrays copied in."""
        binding = self.session.io_binding()
        for name, v in feeds.items():
            if isinstance(v, self._ortvalue):
                binding.bind_ortvalue_input(name, v)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(v))
        return binding

    def _numpy(self, v):
        return v.numpy() if isinstance(v, self._ortvalue) else v


@dataclass
class StaticBuffers:
    """The OrtValues one batch size and cache length decode with, allocated once on the bound
    device and kept (a CUDA graph replays on fixed addresses); the host writes into them in place."""

    kv: list  # 2 x layers (B, kv heads, L, head dim): past.i and present.i both
    mask: object  # (B, L) int64: the prompt's padding mask, then ones
    embeds: object  # (B, 1, W): the decode step's input token, embedded on the host
    position: object  # (B, 1) int64
    write_at: object  # () int64
    bias: object  # (1, V) float32: -inf on EOS while min_new_tokens is not reached
    logits: object  # (B, V)
    next_ids: object  # (B,) int64: the greedy choice, the only output read back
    graph_id: int  # the CUDA graph of this shape (when CUDA graphs are on)


class StaticRun:
    """One greedy search over static_lm.onnx: the prefill has run; `next_ids` reads the graph's
    choice, `advance` feeds the chosen tokens as the next step."""

    def __init__(self, graphs: GraphRunner, buf: StaticBuffers, embeds: np.ndarray, mask: np.ndarray, min_new: int):
        self.graphs, self.buf, self.min_new = graphs, buf, min_new
        b, self.prompt_length, _ = embeds.shape
        length = buf.mask.shape()[1]
        buf.mask.update_inplace(np.concatenate([mask, np.ones((b, length - self.prompt_length), np.int64)], axis=1))
        self.free = np.zeros((1, graphs.cfg.vocab_size), np.float32)
        blocked = self.free.copy()
        blocked[:, graphs.eos] = -np.inf
        buf.bias.update_inplace(blocked if min_new > 0 else self.free)
        self.positions = PromptLayout.positions(mask)
        kv = dict(zip(graphs.cfg.past_names, buf.kv))
        self.outputs = {"logits": buf.logits, "next_ids": buf.next_ids, **dict(zip(graphs.cfg.present_names, buf.kv))}
        self.step_inputs = {"inputs_embeds": buf.embeds, "attention_mask": buf.mask, "position_ids": buf.position,
                            "write_at": buf.write_at, "token_bias": buf.bias, **kv}
        graphs.static.run_bound({"inputs_embeds": embeds, "attention_mask": buf.mask, "position_ids": self.positions,
                                 "write_at": np.zeros((), np.int64), "token_bias": buf.bias, **kv}, self.outputs,
                                -1 if graphs.cuda_graph else None)  # the prefill's shape is not the step's: never captured

    def next_ids(self) -> np.ndarray:
        """(B,) the greedy choice of the last run."""
        return self.buf.next_ids.numpy()

    def logits(self) -> np.ndarray:
        """(B, V) the last run's logits (the searches read only the ids; checks read these)."""
        return self.buf.logits.numpy()

    def advance(self, tokens: np.ndarray, t: int) -> None:
        """Runs decode step t + 1 on the tokens (B,) chosen at step t (0: the prefill's choice)."""
        g, buf = self.graphs, self.buf
        buf.embeds.update_inplace(np.ascontiguousarray(g.embed[tokens][:, None].astype(g.float)))
        buf.position.update_inplace(self.positions[:, -1:] + 1 + t)
        buf.write_at.update_inplace(np.array(self.prompt_length + t, np.int64))
        if t + 1 == self.min_new:
            buf.bias.update_inplace(self.free)
        g.static.run_bound(self.step_inputs, self.outputs, buf.graph_id if g.cuda_graph else None)


class GraphRunner:
    """The LLM graphs of one export. The state between `start`, `step` and `reorder` is
    (self-attention KV, fixed feeds): the KV a list of arrays, or of OrtValues on the device under IO
    binding; the fixed feeds (mask, position, cross KV) are equal across the beams of one image, so
    reordering beams touches only the KV."""

    def __init__(self, folder: Path, cfg: ExportConfig, providers: list[str] | None = None,
                 io_binding: bool | None = None, static_cache: bool | None = None, cuda_graph: bool | None = None):
        import onnxruntime as ort

        self.dir, self.cfg = folder, cfg
        available = ort.get_available_providers()
        wanted = providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]
        self.providers = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        self.on_cuda = self.providers[0] == "CUDAExecutionProvider"
        self.io_binding = self.on_cuda if io_binding is None else io_binding
        self._bind = ("cuda" if self.on_cuda else "cpu") if self.io_binding else None
        past = cfg.past_names
        if cfg.encoder_decoder:
            self.encoder = self._session("encoder", ["inputs_embeds", "attention_mask"], ["encoder_hidden_states"])
            self.decoder = self._session("decoder", ["decoder_input_ids", "encoder_hidden_states",
                                                     "encoder_attention_mask"], ["logits", "present.", "cross."])
            self.decoder_with_past = self._session("decoder_with_past", ["input_ids", "encoder_attention_mask", *past,
                                                                         *cfg.cross_names], ["logits", "present."])
        else:  # loaded on first use: greedy search needs only the static graph, beam search only these
            for key in ("prefill", "decode"):
                self._graph_file(key)
        wanted = self.on_cuda if static_cache is None else static_cache
        self.use_static = bool(wanted) and "static_lm" in cfg.graphs and not cfg.encoder_decoder
        if self.use_static:
            self._graph_file("static_lm")
        self.cuda_graph = self.on_cuda if cuda_graph is None else cuda_graph and self.on_cuda
        self._static_buffers: dict[tuple[int, int], StaticBuffers] = {}
        self.reorder_graph = None
        if self._bind is not None:
            self.reorder_graph = self._session("reorder_kv", ["beam_idx", *[f"in.{j}" for j in range(len(past))]],
                                               ["out."])
        self.embed = np.load(folder / EMBEDDINGS_FILE, mmap_mode="r")
        self.float = np.float16 if cfg.dtype == "fp16" else np.float32
        self.eos = cfg.eos_ids
        self.pad_token_id = cfg.pad_token_id

    def _graph_file(self, key: str) -> Path:
        path = self.dir / self.cfg.graphs[key]
        if not path.is_file():
            raise CheckpointError(f"graph {path} is missing from the export folder")
        return path

    def _session(self, key: str, inputs: list[str], outputs: list[str], providers: list | None = None,
                 bind: str | None | bool = True) -> _Session:
        return _Session(self._graph_file(key), providers or self.providers, inputs, outputs,
                        self._bind if bind is True else bind)

    @functools.cached_property
    def prefill(self) -> _Session:
        return self._session("prefill", ["inputs_embeds", "attention_mask", "position_ids"], ["logits", "present."])

    @functools.cached_property
    def decode(self) -> _Session:
        return self._session("decode", ["input_ids", "attention_mask", "position_ids", *self.cfg.past_names],
                             ["logits", "present."])

    @functools.cached_property
    def static(self) -> _Session:
        """static_lm.onnx, with CUDA graph capture where asked and onnxruntime allows it."""
        names = ["inputs_embeds", "attention_mask", "position_ids", "write_at", "token_bias", *self.cfg.past_names]
        outputs = ["logits", "next_ids", "present."]
        device = "cuda" if self.on_cuda else "cpu"
        if self.cuda_graph:
            graphed = [("CUDAExecutionProvider", {"enable_cuda_graph": "1"}), *self.providers[1:]]
            try:
                return self._session("static_lm", names, outputs, graphed, device)
            except Exception as e:  # noqa: BLE001 (onnxruntime's own types) some node cannot be captured
                log.warning("onnxruntime cannot capture static_lm.onnx as a CUDA graph (%s); running it without",
                            str(e).splitlines()[0])
                self.cuda_graph = False
        return self._session("static_lm", names, outputs, bind=device)

    def static_buffers(self, batch: int, length: int) -> StaticBuffers:
        """The static graph's buffers for this batch size and cache length (kept between calls)."""
        import onnxruntime as ort

        key = (batch, length)
        if key not in self._static_buffers:
            device = "cuda" if self.on_cuda else "cpu"
            c = self.cfg

            def zeros(shape, dtype):
                return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), device, 0)

            kv_shape = (batch, c.num_kv_heads, length, c.head_dim)
            self._static_buffers[key] = StaticBuffers(
                kv=[zeros(kv_shape, self.float) for _ in c.past_names],
                mask=zeros((batch, length), np.int64), embeds=zeros((batch, 1, c.hidden_size), self.float),
                position=zeros((batch, 1), np.int64), write_at=zeros((), np.int64),
                bias=zeros((1, c.vocab_size), np.float32), logits=zeros((batch, c.vocab_size), self.float),
                next_ids=zeros((batch,), np.int64), graph_id=len(self._static_buffers) + 1)
        return self._static_buffers[key]

    # -- the interface the searches use ---------------------------------------------------------

    def start(self, embeds: np.ndarray, mask: np.ndarray):
        """The prompt (B, P, W) and its mask (B, P) -> the last position's logits (B, V) and the state."""
        if self.cfg.encoder_decoder:
            hidden = self.encoder.run({"inputs_embeds": embeds, "attention_mask": mask}, host=0)[0]
            start = self.cfg.decoder_start_token_id or 0
            dec = np.full((embeds.shape[0], 1), start, dtype=np.int64)
            out = self.decoder.run({"decoder_input_ids": dec, "encoder_hidden_states": hidden,
                                    "encoder_attention_mask": mask}, host=1)
            n = len(self.cfg.past_names)
            cross = dict(zip(self.cfg.cross_names, out[1 + n:]))
            return out[0], (out[1:1 + n], {"encoder_attention_mask": mask, **cross})
        pos = PromptLayout.positions(mask)
        out = self.prefill.run({"inputs_embeds": embeds, "attention_mask": mask, "position_ids": pos}, host=1)
        return out[0], (out[1:], {"attention_mask": mask, "position_ids": pos[:, -1:]})

    def step(self, state, tokens: np.ndarray):
        """One token per row (B,) -> the next logits (B, V) and the state."""
        kv, fixed = state
        feeds = {"input_ids": tokens[:, None].astype(np.int64), **dict(zip(self.cfg.past_names, kv))}
        if self.cfg.encoder_decoder:
            out = self.decoder_with_past.run({**feeds, **fixed}, host=1)
            return out[0], (out[1:], fixed)
        mask = fixed["attention_mask"]
        fixed = {"attention_mask": np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1),
                 "position_ids": fixed["position_ids"] + 1}
        out = self.decode.run({**feeds, **fixed}, host=1)
        return out[0], (out[1:], fixed)

    def reorder(self, state, rows: np.ndarray):
        """The state of rows `rows` (the beams that continue), in that order."""
        kv, fixed = state
        if self.reorder_graph is None:
            return [t[rows] for t in kv], fixed
        feeds = {"beam_idx": rows.astype(np.int64), **{f"in.{j}": t for j, t in enumerate(kv)}}
        return self.reorder_graph.run(feeds, host=0), fixed

    def static_run(self, embeds: np.ndarray, mask: np.ndarray, max_new: int, min_new: int) -> StaticRun:
        """A greedy run over static_lm.onnx with its prefill done (see StaticRun)."""
        buf = self.static_buffers(embeds.shape[0], static_cache_length(embeds.shape[1], max_new))
        return StaticRun(self, buf, embeds, mask, min_new)
