"""`OrtBlip2`: an exported BLIP-2 folder run with ONNX Runtime alone (numpy, tokenizers, PIL).

It never imports blip2rt's PyTorch model code. The API mirrors the PyTorch model's
(`image_features`, `generate`, `caption`, `answer`), with the same arguments and defaults (the
shared front end, blip2rt.front_end), and its greedy and beam searches (search.py) follow
transformers' token for token on the same logits.
Providers: CUDA first when onnxruntime offers it, then CPU. On CUDA the KV cache (and T5's
encoder states and cross-attention KV) stay on the device through IO binding, and beams are
reordered there by `reorder_kv.onnx`; per step the new token ids go up and the last position's
logits (B x vocab) come back for the search. Greedy search over `static_lm.onnx` (decoder-only
exports) keeps fixed-length KV buffers bound in and out, so they are updated in place, and reads
back only the B ids the graph chose; on CUDA its decode step replays as a CUDA graph.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blip2rt.errors import CheckpointError, InputError
from blip2rt.front_end import (as_image_list, default_prompt_ids, drop_leading_bos, generation_args, pad_rows,
                               per_image)
from blip2rt.generation_defaults import CAPTION_DEFAULTS, DEFAULT_MAX_NEW_TOKENS, VQA_DEFAULTS, VQA_PROMPT
from blip2rt.images import pixel_array
from blip2rt.json_files import read_json
from blip2rt.tokenization import QFORMER_MAX_TEXT_TOKENS

from .search import Search

EXPORT_CONFIG = "blip2rt_export.json"
QFORMER_TOKENIZER_FILE = "qformer_tokenizer.json"  # exports whose soft prompt takes the question

log = logging.getLogger(__name__)


def kv_names(prefix: str, layers: int) -> list[str]:
    """The graphs' cache I/O names, e.g. past.0.key, past.0.value, past.1.key, ..."""
    return [f"{prefix}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


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


class OrtBlip2:
    """Args:
        export_dir: a folder written by `blip2rt export`.
        providers: onnxruntime providers in order of preference; CUDA then CPU by default.
        io_binding: keep the KV cache (and the encoder states) on the device between steps; the
            default is on for CUDA, off for CPU (where numpy arrays already are the device memory).
        static_cache: greedy search through `static_lm.onnx` (KV buffers of a fixed length updated
            in place, the token chosen inside the graph) where the export has it. Default: on the
            CUDA provider; on the CPU, where it measured no faster than the prefill/decode graphs
            (benchmarks/RESULTS.md), off. Beam search, and exports without it, use the
            prefill/decode graphs. `last_search` says which the last generate call used.
        cuda_graph: on the CUDA provider, capture the static graph's decode step as a CUDA graph
            and replay it (default on); falls back to plain runs where onnxruntime cannot capture it.
    """

    def __init__(self, export_dir: str | Path, providers: list[str] | None = None, io_binding: bool | None = None,
                 static_cache: bool | None = None, cuda_graph: bool | None = None):
        import onnxruntime as ort

        self.dir = Path(export_dir)
        cfg_path = self.dir / EXPORT_CONFIG
        if not cfg_path.is_file():
            raise CheckpointError(f"{self.dir} is not a blip2rt export folder (no {EXPORT_CONFIG}); "
                                  "write one with `blip2rt export`")
        self.cfg = read_json(cfg_path, "export config", CheckpointError)
        available = ort.get_available_providers()
        wanted = providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]
        self.providers = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        self.on_cuda = self.providers[0] == "CUDAExecutionProvider"
        self.io_binding = self.on_cuda if io_binding is None else io_binding
        bind = ("cuda" if self.on_cuda else "cpu") if self.io_binding else None
        c = self.cfg
        g = c["graphs"]
        past = kv_names("past", c["num_layers"])
        self.past_names = past
        self.question_in_qformer = bool(c.get("question_in_qformer", False))
        vision_inputs = ["pixel_values"] + (["qformer_input_ids", "qformer_attention_mask"]
                                            if self.question_in_qformer else [])
        self.vision = _Session(self.dir / g["vision"], self.providers, vision_inputs, ["soft_prompt"])
        if c["encoder_decoder"]:
            if "decoder_with_past" not in g:
                raise CheckpointError(f"{self.dir} was exported by an older blip2rt (no decoder_with_past graph); "
                                      "export it again")
            cross = kv_names("cross", c["num_layers"])
            self.cross_names = cross
            self.encoder = _Session(self.dir / g["encoder"], self.providers,
                                    ["inputs_embeds", "attention_mask"], ["encoder_hidden_states"], bind)
            self.decoder = _Session(self.dir / g["decoder"], self.providers,
                                    ["decoder_input_ids", "encoder_hidden_states", "encoder_attention_mask"],
                                    ["logits", "present.", "cross."], bind)
            self.decoder_with_past = _Session(self.dir / g["decoder_with_past"], self.providers,
                                              ["input_ids", "encoder_attention_mask", *past, *cross],
                                              ["logits", "present."], bind)
        else:  # loaded on first use: greedy search needs only the static graph, beam search only these
            for key in ("prefill", "decode"):
                if not (self.dir / g[key]).is_file():
                    raise CheckpointError(f"graph {self.dir / g[key]} is missing from the export folder")
            self._bind = bind
        wanted = self.on_cuda if static_cache is None else static_cache
        self.use_static = wanted and "static_lm" in g and not c["encoder_decoder"]
        if self.use_static and not (self.dir / g["static_lm"]).is_file():
            raise CheckpointError(f"graph {self.dir / g['static_lm']} is missing from the export folder")
        self.cuda_graph = self.on_cuda if cuda_graph is None else cuda_graph and self.on_cuda
        self._static_buffers: dict[tuple[int, int], StaticBuffers] = {}
        self.last_search: str | None = None  # "static" or "dynamic": the graphs the last generate call ran
        self.reorder = None
        if bind is not None:
            n = len(past)
            self.reorder = _Session(self.dir / g["reorder_kv"], self.providers,
                                    ["beam_idx", *[f"in.{j}" for j in range(n)]], ["out."], bind)
        self.embed = np.load(self.dir / "embed_tokens.npy", mmap_mode="r")
        self.float = np.float16 if c["dtype"] == "fp16" else np.float32
        self._load_tokenizer()
        eos = c["eos_token_id"]
        self.eos = [eos] if isinstance(eos, int) else list(eos or [])

    @property
    def llm_weights(self) -> dict:
        """What the LLM graphs' weights are: {"format": "fp32" | "fp16" | "int8" | "int4", ...}
        (block size, the LM head's and the embeddings' precision, MatMuls quantised per graph)."""
        return self.cfg.get("llm_weights") or {"format": self.cfg["dtype"]}

    @functools.cached_property
    def prefill(self) -> _Session:
        return _Session(self.dir / self.cfg["graphs"]["prefill"], self.providers,
                        ["inputs_embeds", "attention_mask", "position_ids"], ["logits", "present."], self._bind)

    @functools.cached_property
    def decode(self) -> _Session:
        return _Session(self.dir / self.cfg["graphs"]["decode"], self.providers,
                        ["input_ids", "attention_mask", "position_ids", *self.past_names], ["logits", "present."],
                        self._bind)

    @functools.cached_property
    def static(self) -> _Session:
        """static_lm.onnx, with CUDA graph capture where asked and onnxruntime allows it."""
        path = self.dir / self.cfg["graphs"]["static_lm"]
        names = ["inputs_embeds", "attention_mask", "position_ids", "write_at", "token_bias", *self.past_names]
        outputs = ["logits", "next_ids", "present."]
        device = "cuda" if self.on_cuda else "cpu"
        if self.cuda_graph:
            graphed = [("CUDAExecutionProvider", {"enable_cuda_graph": "1"}), *self.providers[1:]]
            try:
                return _Session(path, graphed, names, outputs, device)
            except Exception as e:  # noqa: BLE001 (onnxruntime's own types) some node cannot be captured
                log.warning("onnxruntime cannot capture static_lm.onnx as a CUDA graph (%s); running it without",
                            str(e).splitlines()[0])
                self.cuda_graph = False
        return _Session(path, self.providers, names, outputs, device)

    def static_buffers(self, batch: int, length: int) -> StaticBuffers:
        """The static graph's buffers for this batch size and cache length (kept between calls)."""
        import onnxruntime as ort

        key = (batch, length)
        if key not in self._static_buffers:
            device = "cuda" if self.on_cuda else "cpu"
            c = self.cfg

            def zeros(shape, dtype):
                return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), device, 0)

            kv_shape = (batch, c["num_kv_heads"], length, c["head_dim"])
            self._static_buffers[key] = StaticBuffers(
                kv=[zeros(kv_shape, self.float) for _ in self.past_names],
                mask=zeros((batch, length), np.int64), embeds=zeros((batch, 1, c["hidden_size"]), self.float),
                position=zeros((batch, 1), np.int64), write_at=zeros((), np.int64),
                bias=zeros((1, c["vocab_size"]), np.float32), logits=zeros((batch, c["vocab_size"]), self.float),
                next_ids=zeros((batch,), np.int64), graph_id=len(self._static_buffers) + 1)
        return self._static_buffers[key]

    def _load_tokenizer(self) -> None:
        from tokenizers import Tokenizer

        path = self.dir / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{self.dir} has no tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(path))
        n = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if n > self.cfg["vocab_size"]:
            raise CheckpointError(f"the tokenizer in {self.dir} has {n} tokens but the exported LLM only "
                                  f"{self.cfg['vocab_size']}: it belongs to another model")
        self.qformer_tokenizer = None
        if self.question_in_qformer:
            qpath = self.dir / QFORMER_TOKENIZER_FILE
            if not qpath.is_file():
                raise CheckpointError(f"{self.dir} takes the question in its vision graph but has no {QFORMER_TOKENIZER_FILE}")
            self.qformer_tokenizer = Tokenizer.from_file(str(qpath))
            self.qformer_tokenizer.no_padding()
            self.qformer_tokenizer.enable_truncation(QFORMER_MAX_TEXT_TOKENS)

    # ---- text ---------------------------------------------------------------------------

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids as the LLM's transformers tokenizer gives them; left-padded for decoder-only
        LLMs, right-padded for T5. Returns (ids, mask), both (B, T) int64."""
        c = self.cfg
        rows = [c["tokenizer_prepend_ids"] + self.tokenizer.encode(t).ids + c["tokenizer_append_ids"] for t in texts]
        rows = drop_leading_bos(rows, c["bos_token_id"] if c.get("bos_before_soft_prompt") else None)
        return pad_rows(rows, c["tokenizer_pad_id"], left=not c["encoder_decoder"])

    def question_ids(self, questions: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
        """The questions in the Q-Former's WordPiece ids and mask (B, Tq), right-padded, as the
        PyTorch model makes them; (None, None) for an export whose soft prompt takes no question."""
        if self.qformer_tokenizer is None:
            return None, None
        rows = [e.ids for e in self.qformer_tokenizer.encode_batch(list(questions))]
        return pad_rows(rows, self.qformer_tokenizer.token_to_id("[PAD]") or 0, left=False)

    def decode_text(self, ids: np.ndarray) -> list[str]:
        return [self.tokenizer.decode([int(t) for t in row], skip_special_tokens=True).strip() for row in ids]

    # ---- the API --------------------------------------------------------------------------

    def _pixels(self, images) -> np.ndarray:
        if isinstance(images, np.ndarray):
            return images.astype(self.float, copy=False)
        if hasattr(images, "numpy") and hasattr(images, "shape"):  # a torch tensor, without importing torch
            return images.detach().cpu().numpy().astype(self.float)
        c = self.cfg
        norm = (c["image_mean"], c["image_std"]) if "image_mean" in c else ()  # older exports: CLIP's
        return pixel_array(as_image_list(images), c["image_size"], *norm).astype(self.float)

    def image_features(self, pixel_values, qformer_input_ids=None, qformer_attention_mask=None) -> np.ndarray:
        """(B, 3, S, S) -> (B, Q, LLM width) soft prompt; an export fine-tuned with the question in
        the Q-Former also needs the question's Q-Former ids and mask (B, Tq) (see `question_ids`)."""
        feeds = {"pixel_values": self._pixels(pixel_values)}
        if self.question_in_qformer:
            if qformer_input_ids is None:
                raise InputError("this export's soft prompt is conditioned on a question: pass qformer_input_ids "
                                 "(OrtBlip2.question_ids)")
            ids = np.asarray(qformer_input_ids, dtype=np.int64)
            mask = np.ones_like(ids) if qformer_attention_mask is None else np.asarray(qformer_attention_mask, np.int64)
            feeds.update(qformer_input_ids=ids, qformer_attention_mask=mask)
        elif qformer_input_ids is not None:
            raise InputError("this export's soft prompt takes no question; pass no qformer_input_ids")
        return self.vision.run(feeds)[0]

    def generate(self, pixel_values, input_ids=None, attention_mask=None, max_new_tokens: int | None = None,
                 min_new_tokens: int = 0, num_beams: int = 1, length_penalty: float = 1.0, do_sample: bool = False,
                 qformer_input_ids=None, qformer_attention_mask=None, **unsupported) -> np.ndarray:
        """Token ids of the new text only, (B, T), like the PyTorch model's generate."""
        if do_sample or unsupported:
            raise InputError(f"the ONNX pipeline supports greedy and beam search; not {sorted(unsupported) or 'sampling'}")
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        soft = self.image_features(pixel_values, qformer_input_ids, qformer_attention_mask)
        b = soft.shape[0]
        bos = self.cfg["bos_token_id"]
        bos_first = self.cfg.get("bos_before_soft_prompt", False)  # exports before it have no such key
        if bos_first:  # [BOS ; soft prompt ; prompt], as Blip2Config.bos_before_soft_prompt
            soft = np.concatenate([np.broadcast_to(self.embed[bos], (b, 1, soft.shape[2])).astype(soft.dtype), soft], 1)
        if input_ids is None:
            input_ids = default_prompt_ids(b, bos, bos_first)
        input_ids = np.asarray(input_ids, dtype=np.int64)
        attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        if input_ids.shape[0] != b:
            raise InputError(f"{b} images but {input_ids.shape[0]} prompts; give one prompt per image")
        embeds = np.concatenate([soft.astype(self.float), self.embed[input_ids].astype(self.float)], axis=1)
        mask = np.concatenate([np.ones((b, soft.shape[1]), np.int64), attention_mask], axis=1)
        search = Search(self, max_new_tokens, min_new_tokens, num_beams, length_penalty)
        self.last_search = "static" if self.use_static and search.num_beams == 1 else "dynamic"
        log.debug("ONNX Runtime %s search over the %s graphs", "greedy" if search.num_beams == 1 else "beam",
                 "static_lm" if self.last_search == "static" else "prefill/decode")
        return search.run(embeds, mask)

    def caption(self, images, prompt: str | Sequence[str] | None = None, **gen) -> list[str]:
        px = self._pixels(images)
        gen = generation_args(CAPTION_DEFAULTS, gen)
        prompts = per_image(prompt, px.shape[0], "prompt")
        qids, qmask = self.question_ids(prompts or [""] * px.shape[0])  # the prompt is the Q-Former's text
        if prompts is None:
            return self.decode_text(self.generate(px, qformer_input_ids=qids, qformer_attention_mask=qmask, **gen))
        ids, mask = self.encode(prompts)
        return self.decode_text(self.generate(px, ids, mask, qformer_input_ids=qids, qformer_attention_mask=qmask,
                                              **gen))

    def answer(self, images, questions: str | Sequence[str], prompt_template: str = VQA_PROMPT, **gen) -> list[str]:
        px = self._pixels(images)
        questions = per_image(questions, px.shape[0], "question")
        gen = generation_args(VQA_DEFAULTS, gen)
        ids, mask = self.encode([prompt_template.format(q) for q in questions])
        qids, qmask = self.question_ids(questions)
        return self.decode_text(self.generate(px, ids, mask, qformer_input_ids=qids, qformer_attention_mask=qmask,
                                              **gen))
