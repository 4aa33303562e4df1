"""BLIP-2: frozen ViT -> Q-Former (learned queries) -> projection -> frozen LLM.

One module holds every part a checkpoint may carry: the generative path (LLM + projection) and
the retrieval/stage-1 heads (Q-Former text embeddings, ITC projections + temp, ITM head, ITG head).
Parameter names follow transformers' Blip2ForConditionalGeneration / Blip2ForImageTextRetrieval.
References: Li et al. 2023 (BLIP-2), LAVIS `blip2_qformer.py` / `blip2_opt.py` / `blip2_t5.py`.
"""

from __future__ import annotations

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
from .generation import GenerationMixin
from .images import encoder_pixels
from .llm import attention_implementation, build_language_model
from .qformer import ImageKV, QFormer, QFormerLMHead, QFormerTextEmbeddings
from .retrieval import RetrievalMixin, RetrievalScores  # noqa: F401  (RetrievalScores: its old import path)
from .tokenization import qformer_text_ids
from .vision import VisionTransformer

# Causal LMs whose logits are exactly lm_head(base_model(...)): no logit scaling or soft-capping,
# so the fused head may take their hidden states.
PLAIN_LM_HEAD = frozenset({"opt", "llama", "mistral", "qwen2", "qwen3"})


@dataclass
class Blip2Output:
    loss: torch.Tensor | None  # mean LM cross-entropy over labelled tokens
    logits: torch.Tensor | None  # (B, L, V); None when the fused head computed the loss


class Blip2(GenerationMixin, RetrievalMixin, nn.Module):
    """The modules and their forward passes. Generation (`generate`, `caption`, `answer`) is
    GenerationMixin's (blip2rt.generation), retrieval (`itm`, `itc`, `rank_texts`) RetrievalMixin's
    (blip2rt.retrieval); loading and saving are blip2rt.pretrained's."""

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
        if config.has_text_embeddings:
            self.embeddings = QFormerTextEmbeddings(qcfg)
        if config.with_text_heads:
            self.vision_projection = nn.Linear(d, config.image_text_hidden_size)
            self.text_projection = nn.Linear(d, config.image_text_hidden_size)
            self.itm_head = nn.Linear(d, 2)
            self.temp = nn.Parameter(torch.tensor(0.07))  # ITC temperature (learnable, paper init)
            self.itg_head = QFormerLMHead(qcfg)
        self.tokenizer = None  # the LLM's
        self.qformer_tokenizer = None  # BERT WordPiece + [DEC]
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
        """"torch", "triton" or "auto" (see blip2rt.kernels.backend): held by the Q-Former, whose ops dispatch on
        it, and read by the losses computed here."""
        return self.qformer.kernel_backend

    def set_kernel_backend(self, backend: str) -> None:
        self.qformer.kernel_backend = backend

    @property
    def cuda_graphs(self) -> bool:
        """Whether inference replays CUDA graphs (blip2rt.cuda_graphs): the visual prefix per batch
        bucket, and the static-cache decoding's prefill and decode steps."""
        return self.__dict__.get("_visual_prefix_graphs") is not None

    def set_cuda_graphs(self, on: bool, buckets=None, capture=None) -> None:
        """Turns CUDA-graph inference on or off. buckets, capture: blip2rt.cuda_graphs.GraphedByBatch's
        (the tests replace the capture on the CPU)."""
        if not on:
            self.__dict__["_visual_prefix_graphs"] = None
            return
        if capture is None and self.device.type != "cuda":
            raise InputError(f"cuda_graphs needs the model on a CUDA device; it is on {self.device}")
        from .cuda_graphs import BUCKETS, GraphedByBatch

        self._need_llm("cuda_graphs")
        self.__dict__["_visual_prefix_graphs"] = GraphedByBatch(self._visual_prefix, buckets or BUCKETS, capture)

    def _visual_prefix(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the soft prompt (B, Q, LLM width) in the LLM's dtype: what the graphs hold."""
        out = self.query_output(self.image_embeds(pixel_values))
        return self.language_projection(out).to(self.language_model.dtype)

    def save_pretrained(self, folder: str | Path) -> None:
        """config.json + model.safetensors (tied weights once) + tokenizer files: what from_pretrained reads."""
        from .pretrained import save_pretrained

        save_pretrained(self, folder)

    def save_instructblip(self, folder: str | Path) -> Path:
        """A transformers InstructBLIP folder (model, config, processor) of a model with the question in
        its Q-Former: see blip2rt.instructblip."""
        from .instructblip import save_instructblip

        return save_instructblip(self, folder)

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

    def image_features(self, pixel_values: torch.Tensor, qformer_input_ids: torch.Tensor | None = None,
                       qformer_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, Q, LLM width): the soft visual prompt (HF get_image_features().pooler_output);
        conditioned on the question's (instruction's) Q-Former ids (B, Tq) and mask where the model reads
        them (InstructBLIP, VQA fine-tuning), under transformers' names."""
        self._need_llm("image_features")
        return self.language_projection(self.query_output(self.image_embeds(pixel_values),
                                                          *self._question(qformer_input_ids, qformer_attention_mask)))

    def soft_prompt(self, pixel_values: torch.Tensor | None, question_ids: torch.Tensor | None = None,
                    question_mask: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """The soft prompt in the LLM's dtype, ready to prepend to its input embeddings; from pixels,
        or from image tokens after ln_vision (`image_embeds`, e.g. cached frozen features)."""
        self._need_llm("soft_prompt")
        graphs = self.__dict__.get("_visual_prefix_graphs")
        if graphs is not None and image_embeds is None and question_ids is None and not torch.is_grad_enabled():
            return graphs(pixel_values.to(self.device))
        if image_embeds is None:
            image_embeds = self.image_embeds(pixel_values)
        out = self.query_output(image_embeds, *self._question(question_ids, question_mask))
        return self.language_projection(out).to(self.language_model.dtype)

    def _question(self, ids: torch.Tensor | None, mask: torch.Tensor | None) -> tuple:
        """(ids, mask) of the question for the Q-Former, or (None, None) where it takes none."""
        if ids is None:
            return None, None
        if not (self.config.question_in_qformer and hasattr(self, "embeddings")):
            raise InputError("this model's Q-Former takes no question (it was not fine-tuned for VQA with "
                             "question_in_qformer); pass no qformer_input_ids")
        return ids, mask

    # ---- LLM side -------------------------------------------------------------------------

    def _llm_inputs(self, pixel_values, input_ids, attention_mask, image_embeds=None, question_ids=None,
                    question_mask=None):
        """The LLM's input embeddings (B, P, W) and mask (B, P), P = [BOS ;] soft prompt ; prompt, as
        `prompt_layout` lays them out; and the prompt's ids."""
        prompt = self.soft_prompt(pixel_values, question_ids, question_mask, image_embeds=image_embeds)
        b, q = prompt.shape[:2]
        layout = self.prompt_layout
        if input_ids is None:
            input_ids = torch.from_numpy(layout.default_ids(b))
        input_ids = input_ids.to(self.device)
        if input_ids.shape[0] != b:
            raise InputError(f"{b} images but {input_ids.shape[0]} prompts; give one prompt per image")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        table = self.language_model.get_input_embeddings()
        parts = [prompt, table(input_ids).to(prompt.dtype)]
        if layout.bos_first:
            bos = torch.full((b, 1), layout.bos_token_id, dtype=torch.long, device=self.device)
            parts.insert(0, table(bos).to(prompt.dtype))
        return torch.cat(parts, dim=1), layout.full_mask(q, attention_mask), input_ids

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
        right_padded: bool = False,
    ) -> Blip2Output:
        """LM loss of the text behind the soft prompt (query positions never count).

        return_logits=False (training): where the LM head is a plain linear layer, only the T
        positions that predict the text go through it, and no logits are returned.
        right_padded: the text is padded on the right only, as training batches are
        (front_end.PromptLayout.teacher_forced). A decoder-only LLM then runs without a padding mask:
        causal attention alone keeps the padding from every labelled position, so no mask is built
        or checked on the host (transformers reads a padding mask back to decide whether it can skip
        it) and attention can take its causal fast path."""
        self._need_llm("forward")
        embeds, mask, _ = self._llm_inputs(pixel_values, input_ids, attention_mask, image_embeds, qformer_input_ids,
                                           qformer_attention_mask)
        if right_padded and labels is not None and not self.config.is_encoder_decoder:
            mask = None
        if self.config.is_encoder_decoder:
            out = self.language_model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_input_ids,
                                      decoder_attention_mask=decoder_attention_mask, labels=labels)
            return Blip2Output(loss=out.loss, logits=out.logits)
        if labels is None:
            return Blip2Output(loss=None, logits=self.language_model(inputs_embeds=embeds, attention_mask=mask).logits)
        q = embeds.shape[1] - labels.shape[1]  # the soft prompt (and a BOS before it): never targets
        labels = labels.to(self.device)
        if self.config.text_config["model_type"] in PLAIN_LM_HEAD and (
                self.kernel_backend != "torch" or not return_logits):
            # Position q - 1 + t predicts text token t: the head runs on those T positions only
            # (the fused kernel in chunks, never storing the (B, T, V) logits).
            hidden = self.language_model.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            hidden = hidden[:, q - 1:-1]  # (B, T, W)
            head = self.language_model.get_output_embeddings()
            loss = kernels.linear_cross_entropy(hidden, head.weight, labels, head.bias, backend=self.kernel_backend)
            return Blip2Output(loss=loss, logits=None)
        logits = self.language_model(inputs_embeds=embeds, attention_mask=mask).logits  # (B, Q + T, V)
        full = F.pad(labels, (q, 0), value=-100)  # (B, Q + T)
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), full[:, 1:].flatten(), ignore_index=-100)
        return Blip2Output(loss=loss, logits=logits)

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

    # ---- input handling -------------------------------------------------------------------

    def _pixels(self, images) -> torch.Tensor:
        """(B, 3, H, W) pixel values on the model's device, from images or a pixel tensor."""
        return encoder_pixels(images, self.config.vision_config).to(self.device)

    def qformer_text_ids(self, texts) -> tuple[torch.Tensor, torch.Tensor]:
        """Q-Former WordPiece ids and mask (B, T) of texts (or a tokenized mapping with input_ids,
        attention_mask), on the model's device (blip2rt.tokenization.qformer_text_ids)."""
        ids, mask = qformer_text_ids(self.qformer_tokenizer, texts)
        return ids.to(self.device), mask.to(self.device)

    def _need_llm(self, what: str) -> None:
        if not self.config.with_llm:
            raise InputError(f"{what} needs an LLM, and this checkpoint has none (it is a retrieval model)")

    def _need_text_heads(self, what: str) -> None:
        if not self.config.with_text_heads:
            raise InputError(f"{what} needs the retrieval heads (ITC/ITM), and this checkpoint has none; load a "
                             "Blip2ForImageTextRetrieval folder or a LAVIS stage-1 checkpoint")

