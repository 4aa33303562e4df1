"""Generation for `Blip2`: the LLM's prompt laid out behind the soft prompt (front_end.PromptLayout),
transformers' `generate` (beam search, sampling, T5) or the static-cache decoder
(blip2rt.static_decoding, kept between calls), and text in, text out (`caption`, `answer`).

A mixin, as transformers keeps generation beside its models: `Blip2` is the modules and their
forward passes; this is what turns them into tokens and text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .front_end import PromptLayout, TextInputs, answer_texts, caption_texts, generation_args, per_image
from .generation_defaults import CAPTION_DEFAULTS, DEFAULT_MAX_NEW_TOKENS, VQA_DEFAULTS, VQA_PROMPT
from .errors import InputError
from .tokenization import QFORMER_MAX_TEXT_TOKENS


class GenerationMixin:
    """Needs of its host: `language_model`, `config`, `tokenizer`, `qformer_tokenizer`, `device`,
    `_llm_inputs` (the LLM's input embeddings and mask) and `_pixels`."""

    @property
    def tokenizer(self):
        """The LLM's tokenizer (None for a model without one)."""
        return self.__dict__.get("_tokenizer")

    @tokenizer.setter
    def tokenizer(self, tok) -> None:
        # its pad id, read once here: the tokenizer's own lookup is host code that a compiled step
        # (torch.compile) cannot trace
        self.__dict__["_tokenizer"] = tok
        self.__dict__["_prompt_pad_id"] = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0

    @property
    def prompt_layout(self) -> PromptLayout:
        """Where the BOS, the soft prompt and the prompt go in the LLM's input (blip2rt.front_end)."""
        self._need_llm("prompt_layout")
        return PromptLayout(self.config.is_encoder_decoder, self.language_model.config.bos_token_id,
                            self.__dict__.get("_prompt_pad_id", 0), self.config.bos_before_soft_prompt)

    def question_ids(self, questions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """Q-Former ids and mask (B, Tq) of the questions where the model conditions its soft prompt
        on them (config.question_in_qformer), else (None, None)."""
        if not self.config.question_in_qformer:
            return None, None
        return self.qformer_text_ids(list(questions))

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor | None, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *, qformer_input_ids: torch.Tensor | None = None,
                 qformer_attention_mask: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                 static_cache: bool | None = None, compile_step: bool | None = None, **gen) -> torch.Tensor:
        """Token ids of the new text only (B, T). `gen` takes transformers' generate arguments.

        input_ids: the prompt as the LLM's tokenizer gives it (BOS included where it adds one),
        left-padded for decoder-only LLMs; the soft prompt is prepended here. qformer_input_ids /
        qformer_attention_mask: the question in the Q-Former's tokens, for a model fine-tuned with
        question_in_qformer (see `question_ids`). image_embeds: (B, N, Dv) after ln_vision (see
        `image_embeds`), instead of pixel_values.
        static_cache: greedy or sampled decoding over a preallocated KV cache with the token chosen
        on the device (blip2rt.static_decoding), instead of transformers' generate; decoder-only
        LLMs, and no beam search. Default: on where the model runs CUDA graphs (`cuda_graphs`) and
        the request allows it, else off. compile_step: torch.compile its decode step (default: on
        CUDA, where it runs as a CUDA graph; on the CPU the first call pays inductor's compile); with
        `cuda_graphs` the prefill is compiled so too.
        """
        self._need_llm("generate")
        if "max_new_tokens" not in gen and "max_length" not in gen:
            gen["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
        lm = self.language_model
        pad = lm.config.pad_token_id if lm.config.pad_token_id is not None else 0
        if static_cache is None:
            from .static_decoding import supports

            static_cache = self.cuda_graphs and not self.config.is_encoder_decoder and supports(gen)
        if static_cache:
            from .static_decoding import StaticDecoder, request_from

            request = request_from(gen, lm, pad)  # checked before any work
            if getattr(self, "_static_decoder", None) is None or self._static_decoder.lm is not lm:
                self._static_decoder = StaticDecoder(lm)  # its KV buffers and compiled steps, kept between calls
        embeds, mask, input_ids = self._llm_inputs(pixel_values, input_ids, attention_mask, image_embeds,
                                                   qformer_input_ids, qformer_attention_mask)
        if static_cache:
            compiled = self.device.type == "cuda" if compile_step is None else compile_step
            return self._static_decoder.generate(embeds, mask, request, compiled,
                                                 graph_prefill=compiled and self.cuda_graphs)
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

    def caption(self, images=None, prompt: str | Sequence[str] | None = None, *,
                image_embeds: torch.Tensor | None = None, **gen) -> list[str]:
        """Captions of images (paths, PIL images or pixel values), or of their `image_embeds`;
        `prompt` (e.g. "a photo of") is continued, one for all or one per image. A model fine-tuned
        with question_in_qformer also gives the prompt ("" for none) to its Q-Former."""
        image = self._image_input(images, image_embeds)
        b = next(iter(image.values())).shape[0]
        return self._generate_text(image, self.text_inputs(*caption_texts(per_image(prompt, b, "prompt"), b)),
                                   generation_args(CAPTION_DEFAULTS, gen))

    def answer(self, images, questions: str | Sequence[str], prompt_template: str = VQA_PROMPT, *,
               image_embeds: torch.Tensor | None = None, **gen) -> list[str]:
        """VQA: one question per image (or one for all), "Question: {q} Answer:" by default. A model
        fine-tuned with question_in_qformer also gives the question to its Q-Former. `images` may be
        None where `image_embeds` are given."""
        image = self._image_input(images, image_embeds)
        b = next(iter(image.values())).shape[0]
        return self._generate_text(image, self.text_inputs(*answer_texts(per_image(questions, b, "question"),
                                                                          prompt_template)),
                                   generation_args(VQA_DEFAULTS, gen))

    def _image_input(self, images, image_embeds: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """{"pixel_values": ...} from images, or {"image_embeds": ...}: generate's image argument."""
        if (images is None) == (image_embeds is None):
            raise InputError("give images or image_embeds, one of the two")
        if image_embeds is not None:
            return {"image_embeds": image_embeds.to(self.device)}
        return {"pixel_values": self._pixels(images)}

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """LLM ids and mask (B, T) of text prompts, as `prompt_layout` pads them."""
        tok = self._need_tokenizer()
        ids, mask = self.prompt_layout.prompt_ids(tok(list(prompts))["input_ids"])
        return torch.from_numpy(ids), torch.from_numpy(mask)

    def text_inputs(self, prompts: Sequence[str] | None, batch: int,
                    qformer_texts: Sequence[str] | None = None) -> TextInputs:
        """The LLM's prompts (None: the default prompt) and, where the Q-Former reads text
        (config.question_in_qformer), `qformer_texts` in its ids: numpy, as `prompt_layout` lays them out."""
        rows = None if prompts is None else self._need_tokenizer()(list(prompts))["input_ids"]
        q_rows, q_pad = None, 0
        if qformer_texts is not None and self.config.question_in_qformer:
            q_rows = self.qformer_tokenizer(list(qformer_texts), truncation=True,
                                            max_length=QFORMER_MAX_TEXT_TOKENS)["input_ids"]
            q_pad = self.qformer_tokenizer.pad_token_id or 0
        return self.prompt_layout.text_inputs(rows, batch, q_rows, q_pad)

    def _generate_text(self, image: dict, text: TextInputs, gen: dict) -> list[str]:
        """gen: already merged with the defaults (front_end.generation_args)."""
        tok = self._need_tokenizer()
        tensors = {k: None if v is None else torch.from_numpy(v) for k, v in text.qformer().items()}
        ids = self.generate(image.get("pixel_values"), torch.from_numpy(text.input_ids),
                            torch.from_numpy(text.attention_mask), image_embeds=image.get("image_embeds"), **tensors,
                            **gen)
        return [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise InputError("this model has no LLM tokenizer; load a checkpoint folder with tokenizer files, "
                             "or call generate() with token ids")
        return self.tokenizer
