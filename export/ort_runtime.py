"""`OrtBlip2`: an exported BLIP-2 folder run with ONNX Runtime alone (numpy, tokenizers, PIL).

It never imports blip2rt's PyTorch model code. The API mirrors the PyTorch model's
(`image_features`, `generate`, `caption`, `answer`), with the same arguments and defaults (the
shared front end, blip2rt.front_end), and its greedy and beam searches (search.py) follow
transformers' token for token on the same logits. The export's config is `export_config.ExportConfig`,
its LLM graphs `graph_runner.GraphRunner` (providers, IO binding, the static graph, CUDA graphs).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from blip2rt.errors import CheckpointError, InputError
from blip2rt.front_end import TextInputs, answer_texts, as_image_list, caption_texts, generation_args, per_image
from blip2rt.generation_defaults import CAPTION_DEFAULTS, DEFAULT_MAX_NEW_TOKENS, VQA_DEFAULTS, VQA_PROMPT
from blip2rt.images import pixel_array
from blip2rt.tokenization import QFORMER_MAX_TEXT_TOKENS

from .export_config import CONFIG_FILE as EXPORT_CONFIG, QFORMER_TOKENIZER_FILE, TOKENIZER_FILE, ExportConfig
from .graph_runner import GraphRunner
from .search import Search

log = logging.getLogger(__name__)


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
        self.dir = Path(export_dir)
        self.cfg = ExportConfig.read(self.dir)
        self.graphs = GraphRunner(self.dir, self.cfg, providers, io_binding, static_cache, cuda_graph)
        self.providers = self.graphs.providers
        self.question_in_qformer = self.cfg.question_in_qformer
        self.layout = self.cfg.prompt_layout
        vision_inputs = ["pixel_values"] + (["qformer_input_ids", "qformer_attention_mask"]
                                            if self.question_in_qformer else [])
        self.vision = self.graphs._session("vision", vision_inputs, ["soft_prompt"], bind=None)
        self.float = self.graphs.float
        self.last_search: str | None = None  # "static" or "dynamic": the graphs the last generate call ran
        self._load_tokenizer()

    @property
    def llm_weights(self) -> dict:
        """What the LLM graphs' weights are: {"format": "fp32" | "fp16" | "int8" | "int4", ...}
        (block size, the LM head's and the embeddings' precision, MatMuls quantised per graph)."""
        return self.cfg.llm_weights

    def _load_tokenizer(self) -> None:
        from tokenizers import Tokenizer

        path = self.dir / TOKENIZER_FILE
        if not path.is_file():
            raise CheckpointError(f"{self.dir} has no {TOKENIZER_FILE}")
        self.tokenizer = Tokenizer.from_file(str(path))
        n = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if n > self.cfg.vocab_size:
            raise CheckpointError(f"the tokenizer in {self.dir} has {n} tokens but the exported LLM only "
                                  f"{self.cfg.vocab_size}: it belongs to another model")
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
        text = self.text_inputs(list(texts), len(texts))
        return text.input_ids, text.attention_mask

    def question_ids(self, questions: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
        """The questions in the Q-Former's WordPiece ids and mask (B, Tq), right-padded, as the
        PyTorch model makes them; (None, None) for an export whose soft prompt takes no question."""
        if self.qformer_tokenizer is None:
            return None, None
        text = self.text_inputs(None, len(questions), questions)
        return text.qformer_input_ids, text.qformer_attention_mask

    def decode_text(self, ids: np.ndarray) -> list[str]:
        return [self.tokenizer.decode([int(t) for t in row], skip_special_tokens=True).strip() for row in ids]

    # ---- the API --------------------------------------------------------------------------

    def _pixels(self, images) -> np.ndarray:
        if isinstance(images, np.ndarray):
            return images.astype(self.float, copy=False)
        if hasattr(images, "numpy") and hasattr(images, "shape"):  # a torch tensor, without importing torch
            return images.detach().cpu().numpy().astype(self.float)
        c = self.cfg
        return pixel_array(as_image_list(images), c.image_size, c.image_mean, c.image_std).astype(self.float)

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
        embeds, mask = self.llm_inputs(soft, input_ids, attention_mask)
        search = Search(self.graphs, max_new_tokens, min_new_tokens, num_beams, length_penalty)
        self.last_search = "static" if self.graphs.use_static and search.num_beams == 1 else "dynamic"
        log.debug("ONNX Runtime %s search over the %s graphs", "greedy" if search.num_beams == 1 else "beam",
                 "static_lm" if self.last_search == "static" else "prefill/decode")
        return search.run(embeds, mask)

    def llm_inputs(self, soft: np.ndarray, input_ids=None, attention_mask=None) -> tuple[np.ndarray, np.ndarray]:
        """The soft prompt (B, Q, W) and the prompt's ids and mask (B, T) -> the LLM's input embeddings
        (B, P, W) and mask (B, P), laid out as `layout` says (the BOS, the soft prompt, the prompt)."""
        b, q, width = soft.shape
        layout = self.layout
        if input_ids is None:
            input_ids = layout.default_ids(b)
        input_ids = np.asarray(input_ids, dtype=np.int64)
        attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        if input_ids.shape[0] != b:
            raise InputError(f"{b} images but {input_ids.shape[0]} prompts; give one prompt per image")
        table = self.graphs.embed
        parts = [soft.astype(self.float), table[input_ids].astype(self.float)]
        if layout.bos_first:
            parts.insert(0, np.broadcast_to(table[layout.bos_token_id], (b, 1, width)).astype(self.float))
        return np.concatenate(parts, axis=1), layout.full_mask(q, attention_mask)

    def text_inputs(self, prompts: Sequence[str] | None, batch: int,
                    qformer_texts: Sequence[str] | None = None) -> TextInputs:
        """The LLM's prompts (None: the default prompt) and, for an export whose soft prompt reads text,
        `qformer_texts` in the Q-Former's ids, as the PyTorch model's `text_inputs` gives them."""
        c = self.cfg
        rows = None
        if prompts is not None:
            rows = [c.tokenizer_prepend_ids + self.tokenizer.encode(t).ids + c.tokenizer_append_ids for t in prompts]
        q_rows, q_pad = None, 0
        if qformer_texts is not None and self.qformer_tokenizer is not None:
            q_rows = [e.ids for e in self.qformer_tokenizer.encode_batch(list(qformer_texts))]
            q_pad = self.qformer_tokenizer.token_to_id("[PAD]") or 0
        return self.layout.text_inputs(rows, batch, q_rows, q_pad)

    def caption(self, images, prompt: str | Sequence[str] | None = None, **gen) -> list[str]:
        px = self._pixels(images)
        text = self.text_inputs(*caption_texts(per_image(prompt, px.shape[0], "prompt"), px.shape[0]))
        return self._generate_text(px, text, generation_args(CAPTION_DEFAULTS, gen))

    def answer(self, images, questions: str | Sequence[str], prompt_template: str = VQA_PROMPT, **gen) -> list[str]:
        px = self._pixels(images)
        text = self.text_inputs(*answer_texts(per_image(questions, px.shape[0], "question"), prompt_template))
        return self._generate_text(px, text, generation_args(VQA_DEFAULTS, gen))

    def _generate_text(self, px: np.ndarray, text: TextInputs, gen: dict) -> list[str]:
        return self.decode_text(self.generate(px, text.input_ids, text.attention_mask, **text.qformer(), **gen))
