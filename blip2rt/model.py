"""BLIP-2: frozen ViT -> Q-Former (learned queries) -> projection -> frozen LLM.

One module holds every part a checkpoint may carry: the generative path (LLM + projection) and
the retrieval/stage-1 heads (Q-Former text embeddings, ITC projections + temp, ITM head, ITG head).
Parameter names follow transformers' Blip2ForConditionalGeneration / Blip2ForImageTextRetrieval.
References: Li et al. 2023 (BLIP-2), LAVIS `blip2_qformer.py` / `blip2_opt.py` / `blip2_t5.py`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from blip2rt import kernels
from blip2rt.kernels import AttentionMode

from . import parts
from .config import Blip2Config
from .errors import InputError
from .front_end import as_image_list, default_prompt_ids, generation_args, pad_rows, per_image
from .generation_defaults import CAPTION_DEFAULTS, DEFAULT_MAX_NEW_TOKENS, VQA_DEFAULTS, VQA_PROMPT
from .images import pixel_values as images_to_pixels
from .llm import attention_implementation, build_language_model
from .qformer import ImageKV, QFormer, QFormerLMHead, QFormerTextEmbeddings
from .tokenization import QFORMER_MAX_TEXT_TOKENS, QFORMER_TOKENIZER_DIR, prompt_token_rows
from .vision import VisionTransformer

# Causal LMs whose logits are exactly lm_head(base_model(...)): no logit scaling or soft-capping,
# so the fused head may take their hidden states.
PLAIN_LM_HEAD = frozenset({"opt", "llama", "mistral", "qwen2", "qwen3"})


@dataclass
class Blip2Output:
    loss: torch.Tensor | None  # mean LM cross-entropy over labelled tokens
    logits: torch.Tensor | None  # (B, L, V); None when the fused head computed the loss


@dataclass
class RetrievalScores:
    itc: torch.Tensor  # (I, T) ITC similarity: max over queries of the cosine, no temperature
    i2t: torch.Tensor  # (I, T) ITM + ITC for each image's k best texts, -inf elsewhere
    t2i: torch.Tensor  # (T, I) ITM + ITC for each text's k best images, -inf elsewhere


class Blip2(nn.Module):
    def __init__(self, config: Blip2Config, frozen_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        qcfg = config.qformer_config
        d = qcfg.hidden_size
        # The device decides the LLM's attention implementation; default: the active device context.
        device = torch.device(device) if device is not None else torch.get_default_device()
        self.vision_model = VisionTransformer(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, d))
        self.qformer = QFormer(qcfg)
        if config.with_llm:
            self.language_model = build_language_model(config.text_config, device, frozen_dtype)
            width = self.language_model.get_input_embeddings().embedding_dim
            self.language_projection = nn.Linear(d, width)
        if config.with_text_heads:
            self.embeddings = QFormerTextEmbeddings(qcfg)
            self.vision_projection = nn.Linear(d, config.image_text_hidden_size)
            self.text_projection = nn.Linear(d, config.image_text_hidden_size)
            self.itm_head = nn.Linear(d, 2)
            self.temp = nn.Parameter(torch.tensor(0.07))  # ITC temperature (learnable, paper init)
            self.itg_head = QFormerLMHead(qcfg)
        self.tokenizer = None  # the LLM's
        self.qformer_tokenizer = None  # BERT WordPiece + [DEC]
        self._static_decoder = None  # generate(static_cache=True): its KV buffers and compiled steps
        self._init_trainable(config.initializer_range)
        if config.with_text_heads:
            self.itg_head.decoder.weight = self.embeddings.word_embeddings.weight  # tied, as in BERT
        for p in self.frozen_parameters():
            p.requires_grad_(False)
        self.vision_model.embeddings.to(frozen_dtype)
        self.vision_model.encoder.to(frozen_dtype)

    # ---- structure ----------------------------------------------------------------------

    def _init_trainable(self, std: float) -> None:
        """BERT-style init: N(0, std) weights, zero biases, unit LayerNorms (LLM keeps its own)."""
        for name, module in self.named_modules():
            if name.startswith("language_model"):
                continue
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.query_tokens, std=std)
        nn.init.normal_(self.vision_model.embeddings.class_embedding, std=std)
        nn.init.normal_(self.vision_model.embeddings.position_embedding, std=std)

    # ---- the named parts (blip2rt.parts) ---------------------------------------------------

    part_of = staticmethod(parts.part_of)

    def frozen_parameters(self):
        """The frozen image encoder (all but ln_vision) and the frozen LLM."""
        return (p for n, p in self.named_parameters() if parts.part_of(n) in parts.FROZEN)

    def frozen_prefixes(self) -> tuple[str, ...]:
        return parts.prefixes(parts.FROZEN if self.config.with_llm else parts.FROZEN - {"llm"})

    def trainable_names(self, stage: int) -> list[str]:
        """The parameters that training `stage` (1, 2, or 3 for VQA fine-tuning) updates."""
        layers = self.config.qformer_config.num_hidden_layers
        return [n for n, _ in self.named_parameters() if parts.trains_in(n, stage, layers)]

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen parts never train: no dropout in the ViT or the LLM.
        self.vision_model.embeddings.eval()
        self.vision_model.encoder.eval()
        if self.config.with_llm:
            self.language_model.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    @property
    def attn_implementation(self) -> str:
        """The LLM's attention: "flash_attention_2", "sdpa" or "eager"."""
        return attention_implementation(self.language_model) if self.config.with_llm else "none"

    @property
    def kernel_backend(self) -> str:
        """"torch" or "triton" (see blip2rt.kernels.backend): held by the Q-Former, whose ops dispatch on
        it, and read by the losses computed here."""
        return self.qformer.kernel_backend

    def set_kernel_backend(self, backend: str) -> None:
        self.qformer.kernel_backend = backend

    def save_pretrained(self, folder: str | Path) -> None:
        """config.json + model.safetensors (tied weights once) + tokenizer files: what from_pretrained reads."""
        from safetensors.torch import save_model

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder)
        save_model(self, str(folder / "model.safetensors"))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        if self.qformer_tokenizer is not None:
            self.qformer_tokenizer.save_pretrained(folder / QFORMER_TOKENIZER_DIR if self.config.with_llm else folder)

    # ---- image side -----------------------------------------------------------------------

    def image_embeds(self, pixel_values: torch.Tensor | None = None, *,
                     frozen_features: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, Dv) image tokens after ln_vision, in the Q-Former's dtype: from pixels (B, 3, H, W)
        through the frozen ViT, or from `frozen_features`, the ViT's output cached before ln_vision
        (training/feature_cache.py)."""
        if frozen_features is None:
            frozen = not self.vision_model.encoder.layers[0].mlp.fc1.weight.requires_grad
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                frozen_features = self.vision_model.encode(pixel_values.to(self.device))
        ln = self.vision_model.post_layernorm
        return ln(frozen_features.to(self.device, ln.weight.dtype))

    def query_output(self, image_embeds: torch.Tensor, question_ids: torch.Tensor | None = None,
                     question_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, Dv) -> (B, Q, D): the queries after the Q-Former.

        With a question, (B, Tq) Q-Former WordPiece ids and mask, its tokens join the queries in
        self-attention (bidirectional, as in ITM; only the queries cross-attend to the image): the
        question-conditioned Q-Former of BLIP-2's VQA fine-tuning."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        nq = queries.shape[1]
        if question_ids is None:
            out, _ = self.qformer(queries, num_queries=nq, image_embeds=image_embeds)
            return out
        if question_mask is None:
            question_mask = torch.ones_like(question_ids)
        text = self.embeddings(question_ids.to(self.device)).to(queries.dtype)
        out, _ = self.qformer(torch.cat([queries, text], dim=1), num_queries=nq, text_mask=question_mask.to(self.device),
                              mode=AttentionMode.BIDIRECTIONAL, image_embeds=image_embeds)
        return out[:, :nq]

    def image_features(self, pixel_values: torch.Tensor, question_ids: torch.Tensor | None = None,
                       question_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, Q, LLM width): the soft visual prompt (HF get_image_features().pooler_output);
        conditioned on the question's Q-Former ids where the model was fine-tuned so."""
        self._need_llm("image_features")
        return self.language_projection(self.query_output(self.image_embeds(pixel_values),
                                                          *self._question(question_ids, question_mask)))

    def soft_prompt(self, pixel_values: torch.Tensor | None, question_ids: torch.Tensor | None = None,
                    question_mask: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """The soft prompt in the LLM's dtype, ready to prepend to its input embeddings; from pixels,
        or from image tokens after ln_vision (`image_embeds`, e.g. cached frozen features)."""
        self._need_llm("soft_prompt")
        if image_embeds is None:
            image_embeds = self.image_embeds(pixel_values)
        out = self.query_output(image_embeds, *self._question(question_ids, question_mask))
        return self.language_projection(out).to(self.language_model.dtype)

    def _question(self, ids: torch.Tensor | None, mask: torch.Tensor | None) -> tuple:
        """(ids, mask) of the question for the Q-Former, or (None, None) where it takes none."""
        if ids is None:
            return None, None
        if not self.config.question_in_qformer:
            raise InputError("this model's Q-Former takes no question (it was not fine-tuned for VQA with "
                             "question_in_qformer); pass no qformer_input_ids")
        return ids, mask

    def question_ids(self, questions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """Q-Former ids and mask (B, Tq) of the questions where the model conditions its soft prompt
        on them (config.question_in_qformer), else (None, None)."""
        if not self.config.question_in_qformer:
            return None, None
        return self.qformer_text_ids(list(questions))

    # ---- LLM side -------------------------------------------------------------------------

    def _llm_inputs(self, pixel_values, input_ids, attention_mask, image_embeds=None, question_ids=None,
                    question_mask=None):
        """[soft prompt ; prompt embeddings] (B, Q + T, W) and its mask, or with
        config.bos_before_soft_prompt [BOS ; soft prompt ; prompt embeddings] (B, 1 + Q + T, W)."""
        prompt = self.soft_prompt(pixel_values, question_ids, question_mask, image_embeds=image_embeds)
        b = prompt.shape[0]
        if input_ids is None:
            input_ids = self._default_prompt_ids(b)
        input_ids = input_ids.to(self.device)
        if input_ids.shape[0] != b:
            raise InputError(f"{b} images but {input_ids.shape[0]} prompts; give one prompt per image")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        table = self.language_model.get_input_embeddings()
        if self.config.bos_before_soft_prompt:
            bos = torch.full((b, 1), self.language_model.config.bos_token_id, dtype=torch.long, device=self.device)
            prompt = torch.cat([table(bos).to(prompt.dtype), prompt], dim=1)
        embeds = torch.cat([prompt, table(input_ids).to(prompt.dtype)], dim=1)
        q = prompt.shape[1]
        mask = torch.cat([torch.ones(b, q, dtype=attention_mask.dtype, device=self.device), attention_mask], dim=1)
        return embeds, mask, input_ids

    def _default_prompt_ids(self, batch: int) -> torch.Tensor:
        """No prompt: the LLM's BOS alone (as LAVIS's empty prompt and HF's default), or nothing
        (no BOS, or the BOS already before the soft prompt)."""
        ids = default_prompt_ids(batch, self.language_model.config.bos_token_id, self.config.bos_before_soft_prompt)
        return torch.from_numpy(ids).to(self.device)

    def forward(
        self,
        pixel_values: torch.Tensor | None,  # (B, 3, H, W); or image_embeds
        input_ids: torch.Tensor,  # (B, T) LLM ids of the text, no image placeholders
        attention_mask: torch.Tensor | None = None,  # (B, T)
        labels: torch.Tensor | None = None,  # decoder-only: (B, T) aligned with input_ids; T5: target ids
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,  # (B, N, Dv) after ln_vision, instead of pixel_values
        return_logits: bool = True,
        qformer_input_ids: torch.Tensor | None = None,  # (B, Tq) the question's Q-Former ids (question_in_qformer)
        qformer_attention_mask: torch.Tensor | None = None,  # (B, Tq)
    ) -> Blip2Output:
        """LM loss of the text behind the soft prompt (query positions never count).

        return_logits=False (training): where the LM head is a plain linear layer, only the T
        positions that predict the text go through it, and no logits are returned."""
        self._need_llm("forward")
        embeds, mask, _ = self._llm_inputs(pixel_values, input_ids, attention_mask, image_embeds, qformer_input_ids,
                                           qformer_attention_mask)
        if self.config.is_encoder_decoder:
            out = self.language_model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_input_ids,
                                      decoder_attention_mask=decoder_attention_mask, labels=labels)
            return Blip2Output(loss=out.loss, logits=out.logits)
        if labels is None:
            return Blip2Output(loss=None, logits=self.language_model(inputs_embeds=embeds, attention_mask=mask).logits)
        q = embeds.shape[1] - labels.shape[1]  # the soft prompt (and a BOS before it): never targets
        labels = labels.to(self.device)
        if self.config.text_config["model_type"] in PLAIN_LM_HEAD and (
                self.kernel_backend == "triton" or not return_logits):
            # Position q - 1 + t predicts text token t: the head runs on those T positions only
            # (the fused kernel in chunks, never storing the (B, T, V) logits).
            hidden = self.language_model.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            hidden = hidden[:, q - 1:-1]  # (B, T, W)
            head = self.language_model.get_output_embeddings()
            if self.kernel_backend == "triton":
                loss = kernels.linear_cross_entropy(hidden, head.weight, labels, head.bias, backend="triton")
            else:
                # flattened first: a strided (B, T, W) slice would make the head a batched matmul
                # over B copies of its weight, several times slower on CPU than one (B*T, W) matmul
                loss = F.cross_entropy(head(hidden.flatten(0, 1)).float(), labels.flatten(), ignore_index=-100)
            return Blip2Output(loss=loss, logits=None)
        logits = self.language_model(inputs_embeds=embeds, attention_mask=mask).logits  # (B, Q + T, V)
        full = F.pad(labels, (q, 0), value=-100)  # (B, Q + T)
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), full[:, 1:].flatten(), ignore_index=-100)
        return Blip2Output(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor | None, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *, qformer_input_ids: torch.Tensor | None = None,
                 qformer_attention_mask: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                 static_cache: bool = False, compile_step: bool | None = None, **gen) -> torch.Tensor:
        """Token ids of the new text only (B, T). `gen` takes transformers' generate arguments.

        input_ids: the prompt as the LLM's tokenizer gives it (BOS included where it adds one),
        left-padded for decoder-only LLMs; the soft prompt is prepended here. qformer_input_ids /
        qformer_attention_mask: the question in the Q-Former's tokens, for a model fine-tuned with
        question_in_qformer (see `question_ids`). image_embeds: (B, N, Dv) after ln_vision (see
        `image_embeds`), instead of pixel_values.
        static_cache: greedy or sampled decoding over a preallocated KV cache with the token chosen
        on the device (blip2rt.static_decoding), instead of transformers' generate; decoder-only
        LLMs, and no beam search. compile_step: torch.compile its decode step (default: on CUDA,
        where it runs as a CUDA graph; on the CPU the first call pays inductor's compile).
        """
        self._need_llm("generate")
        if "max_new_tokens" not in gen and "max_length" not in gen:
            gen["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
        lm = self.language_model
        pad = lm.config.pad_token_id if lm.config.pad_token_id is not None else 0
        if static_cache:
            from .static_decoding import StaticDecoder, request_from

            request = request_from(gen, lm, pad)  # checked before any work
            if self._static_decoder is None or self._static_decoder.lm is not lm:
                self._static_decoder = StaticDecoder(lm)
        embeds, mask, input_ids = self._llm_inputs(pixel_values, input_ids, attention_mask, image_embeds,
                                                   qformer_input_ids, qformer_attention_mask)
        if static_cache:
            compiled = self.device.type == "cuda" if compile_step is None else compile_step
            return self._static_decoder.generate(embeds, mask, request, compiled)
        if self.config.is_encoder_decoder:
            out = lm.generate(inputs_embeds=embeds, attention_mask=mask, **gen)
            return out[:, 1:]  # drop the decoder start token
        # The ids beside the embeddings let a repetition penalty see the prompt. The soft prompt's
        # positions hold the pad id there, and the penalty skips them: they are not text.
        num_soft = embeds.shape[1] - input_ids.shape[1]
        ids = torch.cat([torch.full((embeds.shape[0], num_soft), pad, dtype=torch.long, device=self.device),
                         input_ids], dim=1)
        if gen.get("pad_token_id") is None and lm.generation_config.pad_token_id is None:
            gen["pad_token_id"] = pad
        penalty = gen.pop("repetition_penalty", None)
        if penalty is not None and penalty != 1.0:
            from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

            processors = LogitsProcessorList(gen.pop("logits_processor", None) or [])
            processors.append(RepetitionPenaltyLogitsProcessor(float(penalty), prompt_ignore_length=num_soft))
            gen["logits_processor"] = processors
        out = lm.generate(input_ids=ids, inputs_embeds=embeds, attention_mask=mask, **gen)
        return out[:, ids.shape[1]:]

    # ---- text in, text out ----------------------------------------------------------------

    def caption(self, images=None, prompt: str | Sequence[str] | None = None, *,
                image_embeds: torch.Tensor | None = None, **gen) -> list[str]:
        """Captions of images (paths, PIL images or pixel values), or of their `image_embeds`;
        `prompt` (e.g. "a photo of") is continued, one for all or one per image. A model fine-tuned
        with question_in_qformer also gives the prompt ("" for none) to its Q-Former."""
        image = self._image_input(images, image_embeds)
        b = next(iter(image.values())).shape[0]
        prompts = per_image(prompt, b, "prompt")
        qids, qmask = self.question_ids(prompts or [""] * b)
        return self._generate_text(image, prompts, generation_args(CAPTION_DEFAULTS, gen), qformer_input_ids=qids,
                                   qformer_attention_mask=qmask)

    def answer(self, images, questions: str | Sequence[str], prompt_template: str = VQA_PROMPT, *,
               image_embeds: torch.Tensor | None = None, **gen) -> list[str]:
        """VQA: one question per image (or one for all), "Question: {q} Answer:" by default. A model
        fine-tuned with question_in_qformer also gives the question to its Q-Former. `images` may be
        None where `image_embeds` are given."""
        image = self._image_input(images, image_embeds)
        b = next(iter(image.values())).shape[0]
        questions = per_image(questions, b, "question")
        qids, qmask = self.question_ids(questions)
        return self._generate_text(image, [prompt_template.format(q) for q in questions],
                                   generation_args(VQA_DEFAULTS, gen), qformer_input_ids=qids, qformer_attention_mask=qmask)

    def _image_input(self, images, image_embeds: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """{"pixel_values": ...} from images, or {"image_embeds": ...}: generate's image argument."""
        if (images is None) == (image_embeds is None):
            raise InputError("give images or image_embeds, one of the two")
        if image_embeds is not None:
            return {"image_embeds": image_embeds.to(self.device)}
        return {"pixel_values": self._pixels(images)}

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """LLM ids and mask (B, T) of text prompts: left-padded (decoder-only) or right-padded (T5);
        without the tokenizer's BOS where the model puts the BOS before the soft prompt."""
        tok = self._need_tokenizer()
        bos = self.language_model.config.bos_token_id if self.config.bos_before_soft_prompt else None
        ids, mask = pad_rows(prompt_token_rows(tok, prompts, bos), tok.pad_token_id if tok.pad_token_id is not None else 0,
                             left=not self.config.is_encoder_decoder)
        return torch.from_numpy(ids), torch.from_numpy(mask)

    def _generate_text(self, image: dict, prompts: list[str] | None, gen: dict, **question) -> list[str]:
        """gen: already merged with the defaults (front_end.generation_args)."""
        tok = self._need_tokenizer()
        input_ids = mask = None
        if prompts is not None:
            input_ids, mask = self.encode_prompts(prompts)
        ids = self.generate(image.get("pixel_values"), input_ids, mask, image_embeds=image.get("image_embeds"),
                            **question, **gen)
        return [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]

    # ---- retrieval: ITM and ITC -----------------------------------------------------------

    def itm_logits(self, image_embeds: torch.Tensor | None, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, image_kv: ImageKV | None = None) -> torch.Tensor:
        """(B, N, Dv) (or their packed K/V), (B, T) -> (B, 2): ITM head averaged over the queries,
        bidirectional mask."""
        self._need_text_heads("itm")
        queries = self.query_tokens.expand(input_ids.shape[0], -1, -1)
        text = self.embeddings(input_ids).to(queries.dtype)
        x = torch.cat([queries, text], dim=1)
        out, _ = self.qformer(x, num_queries=queries.shape[1], text_mask=attention_mask,
                              mode=AttentionMode.BIDIRECTIONAL, image_embeds=image_embeds, image_kv=image_kv)
        return self.itm_head(out[:, : queries.shape[1]]).mean(dim=1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, E): normalised text_projection of the [CLS] state of a text-only pass."""
        self._need_text_heads("itc")
        out, _ = self.qformer(self.embeddings(input_ids), num_queries=0, text_mask=attention_mask)
        return F.normalize(self.text_projection(out[:, 0]), dim=-1)

    def image_query_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, N, Dv) -> (B, Q, E): normalised vision_projection of every query output."""
        self._need_text_heads("itc")
        return F.normalize(self.vision_projection(self.query_output(image_embeds)), dim=-1)

    @torch.no_grad()
    def itm(self, images, texts) -> torch.Tensor:
        """(B,) probability that text i matches image i (softmax of the ITM head, class 1)."""
        self._need_text_heads("itm")
        px = self._pixels(images)
        ids, mask = self.qformer_text_ids(texts)
        if px.shape[0] != ids.shape[0]:
            if px.shape[0] == 1:
                px = px.expand(ids.shape[0], -1, -1, -1)
            elif ids.shape[0] == 1:
                ids, mask = ids.expand(px.shape[0], -1), mask.expand(px.shape[0], -1)
            else:
                raise InputError(f"itm pairs image i with text i: got {px.shape[0]} images and {ids.shape[0]} texts")
        return self.itm_logits(self.image_embeds(px), ids, mask).softmax(dim=-1)[:, 1]

    @torch.no_grad()
    def itc(self, images, texts) -> torch.Tensor:
        """(B_img, B_txt) cosine similarity, max over queries, without the temperature."""
        self._need_text_heads("itc")
        img = self.image_query_features(self.image_embeds(self._pixels(images)))  # (Bi, Q, E)
        txt = self.text_features(*self.qformer_text_ids(texts))  # (Bt, E)
        return kernels.query_max_similarity(img, txt, backend=self.kernel_backend)

    @torch.no_grad()
    def rank_texts(self, images, texts, k: int = 128) -> torch.Tensor:
        """(B_img, B_txt) retrieval scores: ITC similarity ranks all texts; the top k of each image
        are re-scored by ITM positive logit + ITC (BLIP-2's protocol); the rest score -inf."""
        self._need_text_heads("retrieval")
        embeds = self.image_embeds(self._pixels(images))  # (Bi, N, Dv)
        return self.retrieval_scores(embeds, *self.qformer_text_ids(texts), k=k).i2t

    @torch.no_grad()
    def retrieval_scores(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         k: int = 128, batch_size: int = 32, show_progress: bool = False) -> RetrievalScores:
        """BLIP-2's retrieval protocol over I images (B, N, Dv after ln_vision) and T texts (Q-Former
        ids and mask): ITC similarity of every pair, then each image's k best texts and each text's k
        best images re-scored by ITM positive logit + ITC; pairs outside those score -inf."""
        from tqdm.auto import tqdm

        self._need_text_heads("retrieval")
        n_img, n_txt = image_embeds.shape[0], input_ids.shape[0]
        img_feats = torch.cat([self.image_query_features(image_embeds[s: s + batch_size])
                               for s in range(0, n_img, batch_size)])  # (I, Q, E)
        txt_feats = torch.cat([self.text_features(input_ids[s: s + batch_size], attention_mask[s: s + batch_size])
                               for s in range(0, n_txt, batch_size)])  # (T, E)
        sims = kernels.query_max_similarity(img_feats, txt_feats, backend=self.kernel_backend)  # (I, T) fp32
        # every image's k best texts and every text's k best images, as (image, text) pairs
        ki, kt = min(k, n_txt), min(k, n_img)
        top_t = sims.topk(ki, dim=1).indices  # (I, ki)
        top_i = sims.topk(kt, dim=0).indices.T  # (T, kt)
        pair_img = torch.cat([torch.arange(n_img, device=sims.device).repeat_interleave(ki), top_i.flatten()])
        pair_txt = torch.cat([top_t.flatten(), torch.arange(n_txt, device=sims.device).repeat_interleave(kt)])
        itm_batch = 4 * batch_size  # the pairs share nothing, so they batch freely
        itm = []
        for s in tqdm(range(0, len(pair_img), itm_batch), desc="retrieval: ITM re-ranking", disable=not show_progress):
            im, tx = pair_img[s: s + itm_batch], pair_txt[s: s + itm_batch]
            itm.append(self.itm_logits(image_embeds[im], input_ids[tx], attention_mask[tx])[:, 1].float())
        rescored = torch.cat(itm) + sims[pair_img, pair_txt]  # ITM positive logit + ITC
        n_i2t = n_img * ki
        i2t = torch.full_like(sims, float("-inf"))
        i2t[pair_img[:n_i2t], pair_txt[:n_i2t]] = rescored[:n_i2t]
        t2i = torch.full_like(sims.T, float("-inf"))
        t2i[pair_txt[n_i2t:], pair_img[n_i2t:]] = rescored[n_i2t:]
        return RetrievalScores(itc=sims, i2t=i2t, t2i=t2i)

    # ---- input handling -------------------------------------------------------------------

    def _pixels(self, images) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise InputError(f"pixel_values must be (B, 3, H, W), got {tuple(images.shape)}")
            return images.to(self.device)
        vc = self.config.vision_config
        return images_to_pixels(as_image_list(images), vc.image_size, vc.image_mean, vc.image_std).to(self.device)

    def qformer_text_ids(self, texts) -> tuple[torch.Tensor, torch.Tensor]:
        """Q-Former WordPiece ids and mask (B, T), right-padded and truncated at QFORMER_MAX_TEXT_TOKENS,
        of texts (or a tokenized mapping with input_ids, attention_mask), on the model's device."""
        if isinstance(texts, Mapping):
            ids = torch.as_tensor(texts["input_ids"])
            mask = torch.as_tensor(texts["attention_mask"]) if "attention_mask" in texts else torch.ones_like(ids)
            return ids.to(self.device), mask.to(self.device)
        if isinstance(texts, str):
            texts = [texts]
        if self.qformer_tokenizer is None:
            raise InputError("this model has no Q-Former tokenizer; pass texts as a tokenized mapping "
                             "(input_ids, attention_mask) or load a checkpoint folder with tokenizer files")
        enc = self.qformer_tokenizer(list(texts), padding="longest", truncation=True,
                                     max_length=QFORMER_MAX_TEXT_TOKENS, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def _need_llm(self, what: str) -> None:
        if not self.config.with_llm:
            raise InputError(f"{what} needs an LLM, and this checkpoint has none (it is a retrieval model)")

    def _need_text_heads(self, what: str) -> None:
        if not self.config.with_text_heads:
            raise InputError(f"{what} needs the retrieval heads (ITC/ITM), and this checkpoint has none; load a "
                             "Blip2ForImageTextRetrieval folder or a LAVIS stage-1 checkpoint")

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise InputError("this model has no LLM tokenizer; load a checkpoint folder with tokenizer files, "
                             "or call generate() with token ids")
        return self.tokenizer
