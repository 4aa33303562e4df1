"""The training stages, one record each: what the trainer, `apply_state` and the CLI ask of a stage.

- stage 1, representation learning (BLIP-2 §3.2): ITC + ITM + ITG against the frozen ViT;
- stage 2, generative learning (§3.3): the soft prompt through the frozen LLM;
- vqa (stage 3 in a config), VQA fine-tuning (§4.2): stage 2's objective with the question in the
  Q-Former too, the question-conditioned Q-Former InstructBLIP later made its core.

What each stage trains, and whether its model reads the question in the Q-Former, is the model's
business (blip2rt.parts, which loading a checkpoint also reads); the rest lives here. The trainer's
settings (TrainConfig) are shared by every stage, except the optimiser recipe a stage defaults to
(`recipe`: what TrainConfig's lr, min_lr and warmup_steps take when they are left unset) and the
few rules in `check`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from blip2rt import parts
from blip2rt.errors import Blip2rtError

from .data import VQA_FIELDS, Stage1Collate, Stage2Collate, VqaCollate
from .stage1 import Stage1Objective
from .stage2 import Stage2Objective

if TYPE_CHECKING:
    from .config import TrainConfig

CAPTION_FIELDS = ("image", "caption")


@dataclass(frozen=True)
class Recipe:
    """A stage's learning-rate schedule: linear warmup to `lr`, cosine down to `min_lr`."""

    lr: float
    min_lr: float
    warmup_steps: int


# pre-training, both stages (BLIP-2 §3.4; LAVIS's stage-1 config warms up over 5k steps instead)
PRETRAINING = Recipe(lr=1e-4, min_lr=1e-5, warmup_steps=2000)
# fine-tuning a pre-trained model on a downstream task (LAVIS's BLIP-2 fine-tuning configs)
FINE_TUNING = Recipe(lr=1e-5, min_lr=0.0, warmup_steps=1000)


@dataclass(frozen=True)
class Stage:
    number: int  # TrainConfig.stage
    name: str  # `blip2rt train NAME`; the name a checkpoint records
    description: str
    fields: tuple[str, ...]  # what each annotation record holds
    objective: Callable[[nn.Module], nn.Module]  # the model -> the loss module (checks the model can train)
    collate: Callable[[nn.Module, TrainConfig], Callable]  # samples -> the objective's batch
    recipe: Recipe  # TrainConfig's lr, min_lr and warmup_steps where a config leaves them unset
    check: Callable[[TrainConfig], None] = lambda cfg: None  # this stage's own config rules

    @property
    def trains(self) -> frozenset[str]:
        """The model parts (blip2rt.parts) this stage updates."""
        return parts.STAGE_PARTS[self.number]

    @property
    def uses_llm(self) -> bool:
        """It trains through the frozen LLM; its language projection takes TrainConfig.projection_lr."""
        return "language_projection" in self.trains

    @property
    def question_in_qformer(self) -> bool:
        return self.number in parts.QUESTION_IN_QFORMER

    @property
    def vqa(self) -> bool:
        """Annotations are {image, question, answer}."""
        return self.fields == VQA_FIELDS


def _stage1_objective(m) -> nn.Module:
    tok = m.qformer_tokenizer
    if tok is None:
        raise Blip2rtError("stage 1 needs the Q-Former tokenizer (BERT + [DEC]) in the model folder")
    if "[DEC]" not in tok.get_vocab():
        tok.add_special_tokens({"bos_token": "[DEC]"})
    if len(tok) > m.config.qformer_config.vocab_size:
        raise Blip2rtError(f"the Q-Former tokenizer has {len(tok)} tokens, the Q-Former only "
                           f"{m.config.qformer_config.vocab_size}")
    return Stage1Objective(m, tok.convert_tokens_to_ids("[DEC]"), tok.pad_token_id)


def _generative_objective(stage: int) -> Callable[[nn.Module], nn.Module]:
    def objective(m) -> nn.Module:
        if stage in parts.QUESTION_IN_QFORMER:
            if not m.config.has_text_embeddings or m.qformer_tokenizer is None:
                raise Blip2rtError("VQA fine-tuning puts the question into the Q-Former: it needs the Q-Former's "
                                   "text embeddings and tokenizer (a model trained in stage 1, or InstructBLIP)")
            m.config.question_in_qformer = True
        if m.tokenizer is None:
            raise Blip2rtError(f"stage {stage} needs the LLM's tokenizer files in the model folder")
        return Stage2Objective(m)
    return objective


def _text_suffix(m) -> str | None:
    """What ends a decoder-only text: LAVIS ends OPT's at "\\n"; others at the tokenizer's EOS."""
    return "\n" if m.config.with_llm and m.config.text_config["model_type"] == "opt" else None


def _stage1_collate(m, cfg: TrainConfig):
    return Stage1Collate(m.qformer_tokenizer, cfg.max_text_len)


def _stage2_collate(m, cfg: TrainConfig):
    bos = None if m.config.is_encoder_decoder else m.config.text_config.get("bos_token_id")
    return Stage2Collate(m.tokenizer, m.config.is_encoder_decoder, cfg.max_text_len, cfg.prompt, _text_suffix(m),
                         bos_token_id=bos, bos_before_soft_prompt=m.config.bos_before_soft_prompt)


def _vqa_collate(m, cfg: TrainConfig):
    return VqaCollate(m.tokenizer, m.qformer_tokenizer, m.config.is_encoder_decoder, cfg.question_template,
                      cfg.max_text_len, _text_suffix(m), m.config.text_config.get("bos_token_id"),
                      m.config.bos_before_soft_prompt)


def _vqa_check(cfg: TrainConfig) -> None:
    if cfg.shards:
        raise Blip2rtError("VQA fine-tuning reads question annotations ({image, question, answer}), not shards")
    if cfg.question_template.count("{}") != 1:
        raise Blip2rtError(f"question_template needs one {{}} for the question, got {cfg.question_template!r}")


STAGES = {s.number: s for s in (
    Stage(parts.STAGE1, parts.STAGE_NAMES[parts.STAGE1], "representation learning: ITC + ITM + ITG",
          CAPTION_FIELDS, _stage1_objective, _stage1_collate, PRETRAINING),
    Stage(parts.STAGE2, parts.STAGE_NAMES[parts.STAGE2], "generative learning through the frozen LLM",
          CAPTION_FIELDS, _generative_objective(parts.STAGE2), _stage2_collate, PRETRAINING),
    Stage(parts.VQA, parts.STAGE_NAMES[parts.VQA], "VQA fine-tuning, the question in the Q-Former and the LLM",
          VQA_FIELDS, _generative_objective(parts.VQA), _vqa_collate, FINE_TUNING, check=_vqa_check),
)}


def stage(number: int) -> Stage:
    if number not in STAGES:
        names = ", ".join(f"{s.number} ({s.name})" for s in STAGES.values())
        raise Blip2rtError(f"stage must be one of {names}, got {number}")
    return STAGES[number]


def stage_named(name: str) -> Stage:
    return STAGES[parts.stage_number(name)]
