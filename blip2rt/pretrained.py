"""`blip2rt.from_pretrained`: a preset name, a Hugging Face Blip2 folder, or a LAVIS `.pth`.

- Preset (`blip2-opt-2.7b`, ..., `tiny`): the published shapes, randomly initialised.
- Folder: `config.json` plus `model.safetensors` (or shards, or pytorch_model.bin), or a LAVIS
  `*.pth` beside the config; tokenizer files at its root are loaded too.
- A weights file (`.pth`, `.pt`, `.bin`, `.safetensors`): LAVIS or blip2rt names; `config=`
  says which model it fits (a preset or a folder). When that folder has weights, they load
  first and the file overlays them: LAVIS saves only the trainable parts. `blip2-mini` is such
  a base too (its real parts), so a trainer checkpoint of it loads with config="blip2-mini".
  A VQA fine-tuning checkpoint (marked in its metadata) turns on question_in_qformer.

dtype applies to the frozen parts (ViT, LLM); the trainable parts (ln_vision, Q-Former,
queries, projections, heads) stay in `trainable_dtype`, fp32 by default, as LAVIS and
transformers keep the Q-Former.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from blip2rt.kernels import resolve_backend

from .checkpoint import (LAVIS_LN_VISION_EPS, is_lavis_state_dict, lavis_to_blip2rt, load_weights,
                         checkpoint_stage, read_hf_folder, read_tensor_file)
from . import parts
from .config import Blip2Config
from .errors import CheckpointError, InputError
from .instructblip import has_instructblip_names, reads_instruction, to_blip2rt_names
from .model import Blip2
from .presets import PRESET_NAMES, preset_config
from .tokenization import QFORMER_TOKENIZER_DIR, has_tokenizer_files, load_tokenizer, tiny_llm_tokenizer, \
    tiny_qformer_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not supported; expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def parse_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise InputError(f"device {device!r} is not a torch device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device} was asked for, but CUDA is not available on this machine")
    return device


def from_pretrained(
    path_or_preset: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    kernels: str = "auto",
    *,
    config: str | Path | Blip2Config | None = None,
    trainable_dtype: str | torch.dtype = torch.float32,
    seed: int | None = 0,
    cuda_graphs: bool | None = None,
) -> Blip2:
    """Builds a BLIP-2 model in eval mode; see the module docstring for what `path_or_preset` may be.

    seed: what no checkpoint fills (a preset's parts, blip2-mini's cross-attention and language
    projection) is initialised from its own generator seeded with this, so two loads give the same
    model and torch's global generator is left as it was. None draws from the global generator.
    cuda_graphs: inference replays CUDA graphs (blip2rt.cuda_graphs; CUDA devices only). Default: on
    for a model with an LLM on CUDA, where captions took a ninth of the eager time on an H200
    (benchmarks/RESULTS.md), off elsewhere."""
    device = parse_device(device)
    frozen_dtype = parse_dtype(dtype, device)
    trainable_dtype = parse_dtype(trainable_dtype, device)
    backend = resolve_backend(kernels, device)
    path = Path(path_or_preset)

    with _seeded(device, seed), device:  # parameters are created (and randomly initialised) where they will run
        model, tokenizer_dir = _build(path, path_or_preset, config, frozen_dtype)
    _cast_trainable(model, trainable_dtype)
    model.to(device)
    model.set_kernel_backend(backend)
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda" and model.config.with_llm
    if cuda_graphs:
        model.set_cuda_graphs(True)
    return model.eval()


@contextmanager
def _seeded(device: torch.device, seed: int | None):
    """torch's generator for `device` seeded with `seed` inside, as it was outside (None: untouched)."""
    if seed is None:
        yield
        return
    index = (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else None
    with torch.random.fork_rng(devices=[] if index is None else [index]):
        torch.default_generator.manual_seed(seed)  # CPU initialisation draws from it
        if index is not None:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def _build(path: Path, path_or_preset, config, frozen_dtype: torch.dtype) -> tuple[Blip2, Path | None]:
    tokenizer_dir = None
    if not path.exists() and str(path_or_preset) in PRESET_NAMES:
        model = Blip2(preset_config(str(path_or_preset)), frozen_dtype)
        if str(path_or_preset) == "tiny":
            model.tokenizer, model.qformer_tokenizer = tiny_llm_tokenizer(), tiny_qformer_tokenizer()
        elif str(path_or_preset) == "blip2-mini":  # real weights, from the asset packages
            from .embedded.mini import load_parts

            load_parts(model)
    elif path.is_dir():
        model = Blip2(Blip2Config.from_json_file(path / "config.json"), frozen_dtype)
        lavis_files = sorted(path.glob("*.pth"))
        has_hf_weights = any((path / n).exists() for n in ("model.safetensors", "model.safetensors.index.json",
                                                            "pytorch_model.bin", "pytorch_model.bin.index.json"))
        if has_hf_weights:
            apply_state(model, read_hf_folder(path), str(path))
        if lavis_files:
            if len(lavis_files) > 1:
                raise CheckpointError(f"{path} holds several .pth files ({', '.join(f.name for f in lavis_files)}); "
                                      "pass the one to load as path_or_preset, with config=<this folder>")
            apply_state(model, read_tensor_file(lavis_files[0]), str(lavis_files[0]), over_base=has_hf_weights)
        elif not has_hf_weights:
            raise CheckpointError(f"{path} has a config.json but no weights (model.safetensors, shards, "
                                  "pytorch_model.bin or a LAVIS .pth)")
        tokenizer_dir = path
    elif path.is_file() and path.suffix in WEIGHT_SUFFIXES:
        if config is None:
            raise CheckpointError(f"{path} is a bare weights file; pass config= (a preset name, or a folder with "
                                  "config.json) to say which model it fits")
        model, base_loaded, tokenizer_dir = _base_for(config, frozen_dtype)
        apply_state(model, read_tensor_file(path), str(path), over_base=base_loaded)
    elif path.exists():
        raise CheckpointError(f"{path} is neither a checkpoint folder nor a weights file ({', '.join(WEIGHT_SUFFIXES)})")
    else:
        raise CheckpointError(f"{path_or_preset!r} is not a path that exists nor a preset; presets: "
                              f"{', '.join(PRESET_NAMES)}")

    if tokenizer_dir is not None:
        _attach_tokenizers(model, Path(tokenizer_dir))
    return model, tokenizer_dir


def _base_for(config, frozen_dtype: torch.dtype) -> tuple[Blip2, bool, Path | None]:
    """The model a bare weights file loads into, and whether base weights were loaded."""
    if isinstance(config, Blip2Config):
        return Blip2(config, frozen_dtype), False, None
    cpath = Path(config)
    if not cpath.exists() and str(config) in PRESET_NAMES:
        model = Blip2(preset_config(str(config)), frozen_dtype)
        if str(config) == "blip2-mini":  # its real parts (and tokenizers), from the asset packages
            from .embedded.mini import load_parts

            load_parts(model)
            return model, True, None
        return model, False, None
    if cpath.is_file() and cpath.name.endswith(".json"):
        return Blip2(Blip2Config.from_json_file(cpath), frozen_dtype), False, cpath.parent
    if cpath.is_dir():
        model = Blip2(Blip2Config.from_json_file(cpath / "config.json"), frozen_dtype)
        try:
            state = read_hf_folder(cpath)
        except CheckpointError:
            return model, False, cpath  # a config-only folder
        apply_state(model, state, str(cpath))
        return model, True, cpath
    raise CheckpointError(f"config={config!r} is neither a preset, a config.json, nor a folder")


def apply_state(model: Blip2, state: dict[str, torch.Tensor], source: str, over_base: bool = False) -> None:
    """Loads a state dict (LAVIS or blip2rt names) into `model`; over a base, frozen parts may be absent."""
    if has_instructblip_names(state):
        state = to_blip2rt_names(state)
    lavis = is_lavis_state_dict(state)
    if lavis:
        state = lavis_to_blip2rt(state)
        # LAVIS trained (and computes) ln_vision with torch's default eps, not the ViT's
        model.config.vision_config.ln_vision_eps = LAVIS_LN_VISION_EPS
        model.vision_model.post_layernorm.eps = LAVIS_LN_VISION_EPS
    # A training stage's checkpoint holds what that stage trains (LAVIS's too: the frozen ViT and LLM
    # are not in it); over a base, everything else stays the base's.
    stage = checkpoint_stage(source, state)
    # InstructBLIP (transformers', LAVIS's) and VQA fine-tuning: the instruction enters the Q-Former
    reads_question = stage in parts.QUESTION_IN_QFORMER or (stage is None and reads_instruction(state))
    if reads_question and not model.config.has_text_embeddings:
        raise CheckpointError(f"{source} is an instruction-aware model (InstructBLIP, or fine-tuned with the question "
                              "in the Q-Former), which needs the Q-Former's text embeddings; load it with an "
                              "InstructBLIP config.json or over a model trained in stage 1")
    allow = model.frozen_prefixes() if over_base else ()
    if over_base and stage is not None:
        trained = set(model.trainable_names(stage))
        allow += tuple(n for n in model.state_dict() if n not in trained)  # tied names too
    # a model without the Q-Former text path (stage 2) cannot hold a stage-1 checkpoint's text parts
    load_weights(model, state, source, allow_missing_prefixes=allow, drop_text_only=not model.config.with_text_heads)
    if reads_question:
        model.config.question_in_qformer = True


def _attach_tokenizers(model: Blip2, folder: Path) -> None:
    if has_tokenizer_files(folder):
        tok = load_tokenizer(folder)
        if model.config.with_llm:
            model.tokenizer = tok
        else:
            model.qformer_tokenizer = tok
    if has_tokenizer_files(folder / QFORMER_TOKENIZER_DIR):
        model.qformer_tokenizer = load_tokenizer(folder / QFORMER_TOKENIZER_DIR)


def _cast_trainable(model: Blip2, dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        return
    frozen = {id(p) for p in model.frozen_parameters()}
    for p in model.parameters():
        if id(p) not in frozen:
            p.data = p.data.to(dtype)


def save_pretrained(model: Blip2, folder: str | Path) -> None:
    """config.json + model.safetensors (tied weights once) + tokenizer files: what from_pretrained reads."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save(folder)
    save_model(model, str(folder / "model.safetensors"))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(folder)
    if model.qformer_tokenizer is not None:
        model.qformer_tokenizer.save_pretrained(folder / QFORMER_TOKENIZER_DIR if model.config.with_llm else folder)
