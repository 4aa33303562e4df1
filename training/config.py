"""Training configuration: a dataclass, read from a JSON or TOML file, with `--key value` overrides."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from blip2rt.errors import Blip2rtError
from blip2rt.kernels.launch import MAX_BATCH


COMPILE_MODES = ("none", "default", "reduce-overhead")


@dataclass
class TrainConfig:
    # 1: ITC + ITM + ITG against the frozen ViT; 2: generative, through the frozen LLM;
    # 3: VQA fine-tuning (`blip2rt train vqa`): answers generated through the frozen LLM, the
    #    question in the Q-Former too; annotations of {"image", "question", "answer"}
    stage: int = 1
    model: str = "tiny"  # preset, Hugging Face Blip2 folder, or weights file (with model_config)
    model_config: str | None = None  # for a bare weights file: a preset or a folder with config.json
    init: str | None = None  # stage 2: a stage-1 checkpoint folder (its trainable weights start the Q-Former)
    annotations: list[str] = field(default_factory=list)  # JSON files of {"image", "caption", "image_id"}
    image_root: str = "."
    shards: list[str] = field(default_factory=list)  # WebDataset .tar files, instead of annotations
    out_dir: str = "runs/blip2rt"
    batch_size: int = 32  # per process
    grad_accum: int = 1
    max_steps: int = 1000  # optimiser steps
    # lr, min_lr and warmup_steps: None takes the stage's recipe (training.stages: pre-training at
    # 1e-4 -> 1e-5 after 2k warmup steps, VQA fine-tuning at 1e-5 -> 0 after 1k)
    lr: float | None = None
    min_lr: float | None = None
    # Stage 2: the peak lr of the language projection, which starts from random while the
    # Q-Former arrives trained from stage 1 (default: lr). min_lr scales it by the same ratio.
    projection_lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    amp: str = "auto"  # auto (bf16 where the device has it natively: blip2rt.precision) | bf16 | fp16 | none
    frozen_dtype: str = "auto"  # the frozen ViT / LLM: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    kernels: str = "auto"
    # torch.compile of each micro-step's forward and backward (inductor; the fused kernels stay custom
    # ops inside it): none | default | reduce-overhead (default plus CUDA graphs; CUDA only)
    compile: str = "none"
    activation_checkpointing: bool = False
    fsdp: bool = False  # shard the frozen LLM across processes (stage 2, when it does not fit one GPU)
    augment: bool = True
    cache_features: bool = False  # needs augment = false: frozen ViT features computed once
    feature_cache: str | None = None  # the cache's folder (default: out_dir/feature_cache); stages may share one
    max_words: int = 50
    max_text_len: int = 32
    prompt: str = ""  # stage 2: text before the caption (not predicted)
    question_template: str = "Question: {} Answer:"  # VQA: the LLM's text before the answer (not predicted)
    image_size: int | None = None  # default: the model's
    num_workers: int = 2
    seed: int = 42
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    max_nonfinite: int = 10  # consecutive skipped (non-finite) steps before training stops
    resume: bool = True  # continue from out_dir's latest checkpoint if there is one

    def __post_init__(self) -> None:
        from .stages import STAGES

        recipe = STAGES[self.stage].recipe if self.stage in STAGES else None  # else validate() says why
        for name in ("lr", "min_lr", "warmup_steps"):
            if getattr(self, name) is None and recipe is not None:
                setattr(self, name, getattr(recipe, name))

    def validate(self) -> None:
        from .stages import stage

        stage(self.stage).check(self)
        if not self.annotations and not self.shards:
            raise Blip2rtError("no training data: set annotations (JSON files) or shards (WebDataset .tar files)")
        if self.cache_features and self.augment:
            raise Blip2rtError("cache_features needs augment = false: augmented images change every epoch")
        if self.cache_features and self.shards:
            raise Blip2rtError("cache_features works with annotations, not shards")
        for name in ("batch_size", "grad_accum", "max_steps"):
            if getattr(self, name) < 1:
                raise Blip2rtError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size > MAX_BATCH:
            raise Blip2rtError(f"batch_size is per process and at most {MAX_BATCH} (the largest batch the fused "
                               f"kernels' launch grids are checked for), got {self.batch_size}; use grad_accum")
        if not (self.lr and self.lr > 0) or self.min_lr is None or not 0 <= self.min_lr <= self.lr:
            raise Blip2rtError(f"lr must be positive and min_lr in [0, lr], got lr {self.lr} and min_lr {self.min_lr}")
        if self.warmup_steps is None or self.warmup_steps < 0:
            raise Blip2rtError(f"warmup_steps must be 0 or more, got {self.warmup_steps}")
        if self.projection_lr is not None and self.projection_lr <= 0:
            raise Blip2rtError(f"projection_lr must be positive, got {self.projection_lr}")
        if self.compile not in COMPILE_MODES:
            raise Blip2rtError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        if self.amp not in ("auto", "bf16", "fp16", "none"):
            raise Blip2rtError(f"amp must be auto, bf16, fp16 or none, got {self.amp!r}")


def load_config(path: str | Path | None, overrides: list[str]) -> TrainConfig:
    """A config file (JSON or TOML) plus `--key value` overrides (`--key=value` works too)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise Blip2rtError(f"config file {path} does not exist")
        text = path.read_text()
        try:
            data = _toml(text) if path.suffix == ".toml" else json.loads(text)
        except (ValueError, TypeError) as e:
            raise Blip2rtError(f"config file {path} could not be parsed ({e})") from None
    hints = get_type_hints(TrainConfig)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise Blip2rtError(f"unknown config key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--"):
            raise Blip2rtError(f"expected --key value, got {arg!r}")
        key, _, value = arg[2:].partition("=")
        if not _:
            if i + 1 >= len(overrides):
                raise Blip2rtError(f"--{key} needs a value")
            value = overrides[i + 1]
            i += 1
        key = key.replace("-", "_")
        if key not in known:
            raise Blip2rtError(f"unknown config key {key!r}; known keys: {', '.join(sorted(known))}")
        data[key] = _parse(value, hints[key], key)
        i += 1
    cfg = TrainConfig(**data)
    cfg.validate()
    return cfg


def _toml(text: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads(text)


def _parse(value: str, hint, key: str):
    origin = get_origin(hint)
    args = [a for a in get_args(hint) if a is not type(None)]
    if origin is list:
        return [v for v in value.split(",") if v]
    target = args[0] if args else hint
    if value.lower() in ("none", "null") and type(None) in get_args(hint):
        return None
    try:
        if target is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return target(value)
    except ValueError:
        raise Blip2rtError(f"--{key}: {value!r} is not a valid {getattr(target, '__name__', target)}") from None
