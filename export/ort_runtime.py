"""`OrtBlip2`: an exported BLIP-2 folder run with ONNX Runtime alone (numpy, tokenizers, PIL).

It never imports blip2rt's PyTorch model code. The API mirrors the PyTorch model's
(`image_features`, `generate`, `caption`, `answer`), with the same arguments and defaults, and
its greedy and beam searches follow transformers' (token for token on the same logits):
- greedy: argmax; finished rows are padded;
- beam: log-softmax, then 2 x beams candidates per step; a candidate ending in EOS (or at the
  length limit) joins the finished pool scored by log-prob / generated_length ** length_penalty;
  the search stops by transformers' default heuristic (early_stopping=False).
Providers: CUDA first when onnxruntime offers it, then CPU. On CUDA the KV cache (and T5's
encoder states and cross-attention KV) stay on the device through IO binding, and beams are
reordered there by `reorder_kv.onnx`; per step the new token ids go up and the last position's
logits (B x vocab) come back for the search.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from blip2rt.errors import CheckpointError, InputError
from blip2rt.generation_defaults import CAPTION_DEFAULTS, DEFAULT_MAX_NEW_TOKENS, VQA_DEFAULTS, VQA_PROMPT
from blip2rt.images import pixel_array
from blip2rt.tokenization import QFORMER_MAX_TEXT_TOKENS

EXPORT_CONFIG = "blip2rt_export.json"
QFORMER_TOKENIZER_FILE = "qformer_tokenizer.json"  # exports whose soft prompt takes the question
NEG = -1.0e9


def kv_names(prefix: str, layers: int) -> list[str]:
    """The graphs' cache I/O names, e.g. past.0.key, past.0.value, past.1.key, ..."""
    return [f"{prefix}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


class _Session:
    """One graph, checked for the I/O names the pipeline uses.

    With `bind_device` ("cuda" or "cpu") it runs through IO binding: inputs may be OrtValues that
    already live on that device, and every output but the first `host` ones stays there.
    """

    def __init__(self, path: Path, providers: list[str], inputs: list[str], outputs_prefix: list[str],
                 bind_device: str | None = None):
        import onnxruntime as ort

        if not path.is_file():
            raise CheckpointError(f"graph {path} is missing from the export folder")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as e:  # onnxruntime raises several types for an unreadable model
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
        binding = self.session.io_binding()
        for name, v in feeds.items():
            if isinstance(v, self._ortvalue):
                binding.bind_ortvalue_input(name, v)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(v))
        for i, name in enumerate(self.output_names):
            binding.bind_output(name, "cpu" if i < host else self.bind_device)
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return [o.numpy() for o in outs[:host]] + list(outs[host:])

    def _numpy(self, v):
        return v.numpy() if isinstance(v, self._ortvalue) else v


class OrtBlip2:
    """Args:
        export_dir: a folder written by `blip2rt export`.
        providers: onnxruntime providers in order of preference; CUDA then CPU by default.
        io_binding: keep the KV cache (and the encoder states) on the device between steps; the
            default is on for CUDA, off for CPU (where numpy arrays already are the device memory).
    """

    def __init__(self, export_dir: str | Path, providers: list[str] | None = None, io_binding: bool | None = None):
        import onnxruntime as ort

        self.dir = Path(export_dir)
        cfg_path = self.dir / EXPORT_CONFIG
        if not cfg_path.is_file():
            raise CheckpointError(f"{self.dir} is not a blip2rt export folder (no {EXPORT_CONFIG}); "
                                  "write one with `blip2rt export`")
        try:
            self.cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path} is not valid JSON ({e})") from None
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
        else:
            self.prefill = _Session(self.dir / g["prefill"], self.providers,
                                    ["inputs_embeds", "attention_mask", "position_ids"], ["logits", "present."], bind)
            self.decode = _Session(self.dir / g["decode"], self.providers,
                                   ["input_ids", "attention_mask", "position_ids", *past], ["logits", "present."], bind)
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
        if c.get("bos_before_soft_prompt"):  # the BOS already goes before the soft prompt
            rows = [r[1:] if r[:1] == [c["bos_token_id"]] else r for r in rows]
        t = max(len(r) for r in rows)
        ids = np.full((len(rows), t), c["tokenizer_pad_id"], dtype=np.int64)
        mask = np.zeros((len(rows), t), dtype=np.int64)
        for i, r in enumerate(rows):
            if c["encoder_decoder"]:
                ids[i, :len(r)], mask[i, :len(r)] = r, 1
            else:
                ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
        return ids, mask

    def question_ids(self, questions: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
        """The questions in the Q-Former's WordPiece ids and mask (B, Tq), right-padded, as the
        PyTorch model makes them; (None, None) for an export whose soft prompt takes no question."""
        if self.qformer_tokenizer is None:
            return None, None
        rows = [e.ids for e in self.qformer_tokenizer.encode_batch(list(questions))]
        t = max(len(r) for r in rows)
        pad = self.qformer_tokenizer.token_to_id("[PAD]") or 0
        ids = np.full((len(rows), t), pad, dtype=np.int64)
        mask = np.zeros((len(rows), t), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        return ids, mask

    def decode_text(self, ids: np.ndarray) -> list[str]:
        return [self.tokenizer.decode([int(t) for t in row], skip_special_tokens=True).strip() for row in ids]

    # ---- the API --------------------------------------------------------------------------

    def _pixels(self, images) -> np.ndarray:
        if isinstance(images, np.ndarray):
            return images.astype(self.float, copy=False)
        if hasattr(images, "numpy") and hasattr(images, "shape"):  # a torch tensor, without importing torch
            return images.detach().cpu().numpy().astype(self.float)
        if not isinstance(images, (list, tuple)):
            images = [images]
        c = self.cfg
        norm = (c["image_mean"], c["image_std"]) if "image_mean" in c else ()  # older exports: CLIP's
        return pixel_array(images, c["image_size"], *norm).astype(self.float)

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
        if input_ids is None:  # no prompt: the BOS alone, unless it is already first
            n = 0 if bos is None or bos_first else 1
            input_ids = np.full((b, n), bos or 0, dtype=np.int64)
        input_ids = np.asarray(input_ids, dtype=np.int64)
        attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        if input_ids.shape[0] != b:
            raise InputError(f"{b} images but {input_ids.shape[0]} prompts; give one prompt per image")
        embeds = np.concatenate([soft.astype(self.float), self.embed[input_ids].astype(self.float)], axis=1)
        mask = np.concatenate([np.ones((b, soft.shape[1]), np.int64), attention_mask], axis=1)
        search = _Search(self, max_new_tokens, min_new_tokens, num_beams, length_penalty)
        return search.run(embeds, mask)

    def caption(self, images, prompt: str | Sequence[str] | None = None, **gen) -> list[str]:
        px = self._pixels(images)
        gen = {**CAPTION_DEFAULTS, **gen}
        gen["min_new_tokens"] = min(gen["min_new_tokens"], gen["max_new_tokens"])
        prompts = None if prompt is None else ([prompt] * px.shape[0] if isinstance(prompt, str) else list(prompt))
        qids, qmask = self.question_ids(prompts or [""] * px.shape[0])  # the prompt is the Q-Former's text
        if prompts is None:
            return self.decode_text(self.generate(px, qformer_input_ids=qids, qformer_attention_mask=qmask, **gen))
        ids, mask = self.encode(prompts)
        return self.decode_text(self.generate(px, ids, mask, qformer_input_ids=qids, qformer_attention_mask=qmask,
                                              **gen))

    def answer(self, images, questions: str | Sequence[str], prompt_template: str = VQA_PROMPT, **gen) -> list[str]:
        px = self._pixels(images)
        questions = [questions] * px.shape[0] if isinstance(questions, str) else list(questions)
        gen = {**VQA_DEFAULTS, **gen}
        gen["min_new_tokens"] = min(gen["min_new_tokens"], gen["max_new_tokens"])
        if len(questions) != px.shape[0]:
            raise InputError(f"{px.shape[0]} images but {len(questions)} questions; give one question per image "
                             "or one for all")
        ids, mask = self.encode([prompt_template.format(q) for q in questions])
        qids, qmask = self.question_ids(questions)
        return self.decode_text(self.generate(px, ids, mask, qformer_input_ids=qids, qformer_attention_mask=qmask,
                                              **gen))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class _Search:
    """Greedy or beam search over the prefill/decode graphs (or the T5 encoder/decoder)."""

    def __init__(self, rt: OrtBlip2, max_new: int, min_new: int, num_beams: int, length_penalty: float):
        self.rt, self.max_new, self.min_new = rt, max_new, min_new
        self.num_beams, self.length_penalty = max(1, num_beams), length_penalty

    # -- model steps --------------------------------------------------------------------------
    # state = (self-attention KV, fixed feeds). The KV is a list of arrays, or of OrtValues on the
    # device under IO binding. The fixed feeds (mask, position, cross KV) are equal across the beams
    # of one image, so reordering beams touches only the KV.

    def _start(self, embeds, mask):
        rt = self.rt
        if rt.cfg["encoder_decoder"]:
            hidden = rt.encoder.run({"inputs_embeds": embeds, "attention_mask": mask}, host=0)[0]
            start = rt.cfg["decoder_start_token_id"] or 0
            dec = np.full((embeds.shape[0], 1), start, dtype=np.int64)
            out = rt.decoder.run({"decoder_input_ids": dec, "encoder_hidden_states": hidden,
                                  "encoder_attention_mask": mask}, host=1)
            n = len(rt.past_names)
            cross = dict(zip(rt.cross_names, out[1 + n:]))
            return out[0], (out[1:1 + n], {"encoder_attention_mask": mask, **cross})
        pos = np.cumsum(mask, axis=1) - 1
        pos[mask == 0] = 1  # transformers' position ids for left padding
        out = rt.prefill.run({"inputs_embeds": embeds, "attention_mask": mask, "position_ids": pos}, host=1)
        return out[0], (out[1:], {"attention_mask": mask, "position_ids": pos[:, -1:]})

    def _step(self, state, tokens):
        rt = self.rt
        kv, fixed = state
        feeds = {"input_ids": tokens[:, None].astype(np.int64), **dict(zip(rt.past_names, kv))}
        if rt.cfg["encoder_decoder"]:
            out = rt.decoder_with_past.run({**feeds, **fixed}, host=1)
            return out[0], (out[1:], fixed)
        mask = fixed["attention_mask"]
        fixed = {"attention_mask": np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1),
                 "position_ids": fixed["position_ids"] + 1}
        out = rt.decode.run({**feeds, **fixed}, host=1)
        return out[0], (out[1:], fixed)

    def _reorder(self, state, rows: np.ndarray):
        kv, fixed = state
        if self.rt.reorder is None:
            return [t[rows] for t in kv], fixed
        feeds = {"beam_idx": rows.astype(np.int64), **{f"in.{j}": t for j, t in enumerate(kv)}}
        return self.rt.reorder.run(feeds, host=0), fixed

    def _block_eos(self, scores: np.ndarray, generated: int) -> None:
        if generated < self.min_new:
            scores[:, self.rt.eos] = -np.inf

    # -- searches -----------------------------------------------------------------------------

    def run(self, embeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self._greedy(embeds, mask) if self.num_beams == 1 else self._beam(embeds, mask)

    def _greedy(self, embeds, mask) -> np.ndarray:
        b = embeds.shape[0]
        pad = self.rt.cfg["pad_token_id"]
        logits, state = self._start(embeds, mask)
        out = []
        unfinished = np.ones(b, dtype=bool)
        for t in range(self.max_new):
            scores = logits.astype(np.float32).copy()
            self._block_eos(scores, t)
            tokens = np.where(unfinished, scores.argmax(axis=-1), pad)
            out.append(tokens)
            unfinished &= ~np.isin(tokens, self.rt.eos)
            if not unfinished.any() or t + 1 == self.max_new:
                break
            logits, state = self._step(state, tokens)
        return np.stack(out, axis=1) if out else np.zeros((b, 0), np.int64)

    def _beam(self, embeds, mask) -> np.ndarray:
        nb, lp = self.num_beams, self.length_penalty
        b = embeds.shape[0]
        pad = self.rt.cfg["pad_token_id"]
        fill = pad if pad else (self.rt.eos[0] if self.rt.eos else -1)  # transformers: pad_token_id or eos[0]
        keep = max(2, 1 + len(self.rt.eos)) * nb
        # every beam starts from the same prompt (transformers expands the inputs before the prefill)
        logits, state = self._start(np.repeat(embeds, nb, axis=0), np.repeat(mask, nb, axis=0))
        run_seq = np.full((b, nb, self.max_new), fill, dtype=np.int64)
        run_scores = np.zeros((b, nb), np.float32)
        run_scores[:, 1:] = NEG
        fin_seq = run_seq.copy()
        fin_len = np.zeros((b, nb), np.int64)
        fin_scores = np.full((b, nb), NEG, np.float32)
        fin_done = np.zeros((b, nb), dtype=bool)
        improvable = np.ones((b, 1), dtype=bool)
        for t in range(self.max_new):
            logp = _log_softmax(logits)
            self._block_eos(logp, t)
            v = logp.shape[-1]
            cand = (logp.reshape(b, nb, v) + run_scores[:, :, None]).reshape(b, nb * v)
            top = np.argsort(-cand, axis=1, kind="stable")[:, :keep]  # (b, keep), best first
            top_scores = np.take_along_axis(cand, top, axis=1)
            src, tok = top // v, top % v
            seqs = np.take_along_axis(run_seq, src[:, :, None], axis=1)
            seqs[:, :, t] = tok
            hits = np.isin(tok, self.rt.eos) | (t + 1 >= self.max_new)
            # the best unfinished candidates continue
            cont = np.argsort(-(top_scores + hits * NEG), axis=1, kind="stable")[:, :nb]
            run_seq = np.take_along_axis(seqs, cont[:, :, None], axis=1)
            run_scores = np.take_along_axis(top_scores + hits * NEG, cont, axis=1).astype(np.float32)
            # candidates among the top nb that just finished join the finished pool
            just = hits & (np.arange(keep) < nb)[None, :]
            scored = top_scores / float(t + 1) ** lp
            scored = scored + (~improvable) * NEG + (~just) * NEG
            all_seq = np.concatenate([fin_seq, seqs], axis=1)
            all_scores = np.concatenate([fin_scores, scored], axis=1)
            all_len = np.concatenate([fin_len, np.full((b, keep), t + 1)], axis=1)
            all_done = np.concatenate([fin_done, just], axis=1)
            best = np.argsort(-all_scores, axis=1, kind="stable")[:, :nb]
            fin_seq = np.take_along_axis(all_seq, best[:, :, None], axis=1)
            fin_scores = np.take_along_axis(all_scores, best, axis=1)
            fin_len = np.take_along_axis(all_len, best, axis=1)
            fin_done = np.take_along_axis(all_done, best, axis=1)
            # transformers' early-stop heuristic (early_stopping=False): stop once no running beam can win
            best_running = run_scores[:, :1] / float(t + 1) ** lp
            worst_done = np.where(fin_done, fin_scores.min(axis=1, keepdims=True), NEG)
            improvable = improvable & (best_running > worst_done).any(axis=1, keepdims=True)
            if not improvable.any() or hits.all() or t + 1 == self.max_new:
                break
            rows = (np.arange(b)[:, None] * nb + np.take_along_axis(src, cont, axis=1)).reshape(-1)
            state = self._reorder(state, rows)
            logits, state = self._step(state, run_seq[:, :, t].reshape(-1))
        best_seq, best_len = fin_seq[:, 0], fin_len[:, 0]
        width = int(best_len.max()) if best_len.size else 0
        out = best_seq[:, :width].copy()
        for i, n in enumerate(best_len):
            out[i, n:] = fill
        return out
