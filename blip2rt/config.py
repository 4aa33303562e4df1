"""BLIP-2 configuration as dataclasses.

Field names follow transformers' `Blip2Config` (vision_config / qformer_config / text_config),
so Hugging Face `config.json` files read and write without a translation table. The LLM part
stays a plain dict: the LLM itself is built by transformers from it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .json_files import read_json

# Architectures a Hugging Face Blip2 folder may declare, and what each carries.
RETRIEVAL_ARCHITECTURE = "Blip2ForImageTextRetrieval"
GENERATION_ARCHITECTURE = "Blip2ForConditionalGeneration"
# InstructBLIP: the BLIP-2 architecture with the instruction in the Q-Former (question_in_qformer)
INSTRUCTBLIP_MODEL_TYPE = "instructblip"
INSTRUCTBLIP_ARCHITECTURE = "InstructBlipForConditionalGeneration"


# Image normalisations (mean, std per RGB channel on 0-1 pixels)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # EVA-CLIP, BLIP-2's ViTs
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class VisionConfig:
    """EVA / BLIP-2 ViT: pre-LN blocks, fused qkv with q and v biases only. DINOv2 adds layer
    scale (`layer_scale`) and a k bias, and stores positions for a larger grid (`position_grid`)."""

    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    # ln_vision's eps; None: layer_norm_eps, as transformers' port. LAVIS builds ln_vision with torch's
    # default (1e-5), and a model loaded from LAVIS weights computes it so (blip2rt.checkpoint).
    ln_vision_eps: float | None = None
    qkv_bias: bool = True
    layer_scale: bool = False  # DINOv2: each residual branch scaled by a learned per-channel vector
    position_grid: int | None = None  # the grid the position embeddings were trained at (None: this size)
    # the normalisation the encoder was trained with: CLIP's for EVA (BLIP-2), ImageNet's for DINOv2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    @property
    def stored_grid(self) -> int:
        return self.position_grid or self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class QFormerConfig:
    """BERT-style Q-Former; cross-attention every `cross_attention_frequency` layers."""

    vocab_size: int = 30523  # BERT's 30522 + the [DEC] token BLIP-2 adds
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    use_qformer_text_input: bool = False  # builds the text feed-forward of every layer

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def has_cross_attention(self, layer_idx: int) -> bool:
        return layer_idx % self.cross_attention_frequency == 0


@dataclass
class Blip2Config:
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    qformer_config: QFormerConfig = field(default_factory=QFormerConfig)
    # transformers config dict of the frozen LLM (must hold "model_type"); None: no LLM.
    text_config: dict[str, Any] | None = None
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256
    # Text path of the Q-Former (embeddings, ITC projections, ITM head, ITG head, temp):
    # what stage 1 and retrieval need.
    with_text_heads: bool = False
    initializer_range: float = 0.02
    # Decoder-only LLMs: put the LLM's BOS before the soft prompt ([BOS ; soft prompt ; text])
    # instead of after it (the paper's [soft prompt ; BOS ; text]). A small LLM trained for a
    # few hundred steps keeps the first token as its attention sink this way; with the soft
    # prompt first, SmolLM2-135M's stage-2 loss stayed near 5 nats and no caption depended on
    # the image (blip2rt/embedded/demo.py).
    bos_before_soft_prompt: bool = False
    # VQA fine-tuning (BLIP-2 §4.2) and InstructBLIP: the question's (instruction's) WordPiece tokens
    # also enter the Q-Former, where they meet the queries in self-attention (bidirectional; only the
    # queries cross-attend to the image), so the soft prompt is conditioned on them. Builds the
    # Q-Former's text embeddings and text feed-forward.
    question_in_qformer: bool = False
    # transformers' placeholder id for the soft prompt's positions in an InstructBLIP / Blip2 folder's
    # input_ids (blip2rt lays the soft prompt out itself and never reads it; kept to write it back)
    image_token_index: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.vision_config, dict):
            self.vision_config = _from_dict(VisionConfig, self.vision_config)
        if isinstance(self.qformer_config, dict):
            self.qformer_config = _from_dict(QFormerConfig, self.qformer_config)
        # The image tokens are what the cross-attention keys/values project from.
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        if self.has_text_embeddings:
            self.qformer_config.use_qformer_text_input = True
        if self.text_config is not None and "model_type" not in self.text_config:
            raise CheckpointError("text_config needs a 'model_type' (e.g. 'opt', 'llama', 't5')")
        if self.text_config is None and not self.with_text_heads:
            raise CheckpointError("a BLIP-2 config needs an LLM (text_config), the text heads, or both")
        if self.bos_before_soft_prompt and (self.is_encoder_decoder or self.text_config is None
                                            or self.text_config.get("bos_token_id") is None):
            raise CheckpointError("bos_before_soft_prompt needs a decoder-only LLM with a bos_token_id")
        if self.question_in_qformer and not self.with_llm:
            raise CheckpointError("question_in_qformer needs an LLM: the question conditions its soft prompt")

    @property
    def has_text_embeddings(self) -> bool:
        """Whether the Q-Former reads text: its word and position embeddings and text feed-forward."""
        return self.with_text_heads or self.question_in_qformer

    @property
    def is_instructblip(self) -> bool:
        """An InstructBLIP model: an LLM, the instruction in the Q-Former, and no stage-1 heads."""
        return self.question_in_qformer and not self.with_text_heads

    @property
    def with_llm(self) -> bool:
        return self.text_config is not None

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.text_config and self.text_config.get("is_encoder_decoder", False)) or (
            self.text_config is not None and self.text_config["model_type"] in {"t5", "mt5", "umt5"}
        )

    # ---- Hugging Face config.json --------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "Blip2Config":
        archs = d.get("architectures") or []
        retrieval = RETRIEVAL_ARCHITECTURE in archs
        instruct = d.get("model_type") == INSTRUCTBLIP_MODEL_TYPE or INSTRUCTBLIP_ARCHITECTURE in archs
        text_config = None if retrieval else copy.deepcopy(d.get("text_config"))
        if not retrieval and text_config is None:
            raise CheckpointError("config.json has no text_config, and is not a Blip2ForImageTextRetrieval config")
        return cls(
            vision_config=_from_dict(VisionConfig, d.get("vision_config") or {}),
            qformer_config=_from_dict(QFormerConfig, d.get("qformer_config") or {}),
            text_config=text_config,
            num_query_tokens=d.get("num_query_tokens", 32),
            image_text_hidden_size=d.get("image_text_hidden_size", 256),
            with_text_heads=retrieval or bool(d.get("blip2rt_with_text_heads", False)),
            initializer_range=d.get("initializer_range", 0.02),
            bos_before_soft_prompt=bool(d.get("blip2rt_bos_before_soft_prompt", False)),
            question_in_qformer=instruct or bool(d.get("blip2rt_question_in_qformer", False)),
            image_token_index=d.get("image_token_index", d.get("image_token_id")),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "model_type": "blip-2",
            "architectures": [GENERATION_ARCHITECTURE if self.with_llm else RETRIEVAL_ARCHITECTURE],
            "vision_config": dataclasses.asdict(self.vision_config),
            "qformer_config": dataclasses.asdict(self.qformer_config),
            "num_query_tokens": self.num_query_tokens,
            "image_text_hidden_size": self.image_text_hidden_size,
            "initializer_range": self.initializer_range,
            "blip2rt_with_text_heads": self.with_text_heads,
            "blip2rt_bos_before_soft_prompt": self.bos_before_soft_prompt,
            "blip2rt_question_in_qformer": self.question_in_qformer,
        }
        if self.image_token_index is not None:
            d["image_token_index"] = self.image_token_index
        if self.text_config is not None:
            d["text_config"] = copy.deepcopy(self.text_config)
        return d

    @classmethod
    def from_json_file(cls, path: str | Path) -> "Blip2Config":
        return cls.from_hf_dict(read_json(path, "config file", CheckpointError))

    def save(self, folder: str | Path) -> None:
        Path(folder, "config.json").write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True))


def _from_dict(cls, d: dict[str, Any]):
    """Builds a section dataclass from a (possibly larger) Hugging Face dict."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names}
    for k in ("image_size", "patch_size"):
        v = kwargs.get(k)
        if isinstance(v, (list, tuple)):
            if len(set(v)) != 1:
                raise CheckpointError(f"vision_config.{k}={v}: only square sizes are supported")
            kwargs[k] = v[0]
    for k in ("image_mean", "image_std"):
        if k in kwargs:
            v = kwargs[k]
            if not (isinstance(v, (list, tuple)) and len(v) == 3):
                raise CheckpointError(f"vision_config.{k}={v!r}: expected three numbers (R, G, B)")
            kwargs[k] = tuple(float(x) for x in v)
    return cls(**kwargs)
