"""Reading weights into a Blip2 model: Hugging Face Blip2 folders and LAVIS `.pth` state dicts.

Nothing is unpickled beyond tensors and plain containers: safetensors, or
`torch.load(weights_only=True)`. Every load is checked whole before anything is copied: a
missing, unexpected or mis-shaped tensor raises CheckpointError naming the key and the shape
the model expects.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import torch

from .errors import CheckpointError
from .parts import STAGE1, STAGE_NAMES, VQA, is_text_only, prefixes, stage_number

log = logging.getLogger(__name__)

# Parts that Hugging Face's conversion of LAVIS checkpoints drops; they keep their init if absent.
OPTIONAL_PREFIXES = ("temp", "itg_head.")


# ---- reading files -----------------------------------------------------------------------

STAGE_KEY = "blip2rt_stage"  # safetensors metadata of a training checkpoint: the stage that wrote it ("vqa", ...)
# what VQA fine-tuning checkpoints wrote before they recorded their stage
QUESTION_IN_QFORMER_KEY = "blip2rt_question_in_qformer"


def tensor_file_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file ({} for anything else)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises several kinds; the reason is in the message
        raise CheckpointError(f"weights file {path} is not a readable safetensors file ({e})") from None


def checkpoint_stage(path: str | Path, state: dict[str, torch.Tensor] | None = None) -> int | None:
    """The training stage (parts.STAGE1, STAGE2 or VQA) whose trainable weights a file holds: as its
    metadata records it; for files written before stages were recorded, a VQA checkpoint by its
    old mark and a stage-1 one by its keys (`state`: the Q-Former's text path, no language
    projection). None for weights that no stage wrote (a whole model, LAVIS, transformers)."""
    meta = tensor_file_metadata(path) if Path(path).is_file() else {}
    if STAGE_KEY in meta:
        try:
            return stage_number(meta[STAGE_KEY])
        except KeyError as e:
            raise CheckpointError(f"{path}: {e.args[0]}") from None
    if meta.get(QUESTION_IN_QFORMER_KEY) == "true":
        return VQA
    if state is not None and any(is_text_only(k) for k in state) and not any(
            k.startswith(prefixes({"language_projection"})) for k in state):
        return STAGE1
    return None


def stage_metadata(stage: int) -> dict[str, str]:
    """The metadata a checkpoint of `stage` carries."""
    return {STAGE_KEY: STAGE_NAMES[stage]}


def read_tensor_file(path: str | Path) -> dict[str, torch.Tensor]:
    """One weights file: *.safetensors, or a torch pickle read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"weights file {path} is not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"refusing to unpickle {path}: it holds objects other than tensors and plain "
                              f"containers ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"weights file {path} is not a readable torch checkpoint ({e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # LAVIS: {"model": sd, "optimizer": ...}
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path} is not a state dict of tensors: key {bad[0]!r} holds a "
                              f"{type(obj[bad[0]]).__name__}")
    return obj


def read_hf_folder(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder: single or sharded safetensors (or pytorch_model.bin)."""
    folder = Path(folder)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid shard index ({e})") from None
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(read_tensor_file(folder / shard))
            missing = sorted(set(weight_map) - set(state))
            if missing:
                raise CheckpointError(f"{index} lists {missing[0]!r}, which no shard holds")
            return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return read_tensor_file(folder / name)
    raise CheckpointError(f"{folder} has no weights (expected model.safetensors, a sharded index, or pytorch_model.bin)")


# ---- LAVIS names -------------------------------------------------------------------------

_LAVIS_RENAMES = [
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.weight$", r"vision_model.encoder.layers.\1.self_attn.qkv.weight"),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
    (r"^ln_vision\.", "vision_model.post_layernorm."),
    (r"^Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.layernorm."),
    (r"^Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.", r"embeddings.\1."),
    (r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.",
     r"qformer.encoder.layer.\1.\2.attention."),
    (r"^Qformer\.bert\.encoder\.layer\.(\d+)\.", r"qformer.encoder.layer.\1."),
    (r"^Qformer\.cls\.predictions\.transform\.", "itg_head.transform."),
    (r"^Qformer\.cls\.predictions\.decoder\.weight$", "itg_head.decoder.weight"),
    (r"^Qformer\.cls\.predictions\.(decoder\.)?bias$", "itg_head.bias"),
    (r"^vision_proj\.", "vision_projection."),
    (r"^text_proj\.", "text_projection."),
    (r"^(opt_proj|t5_proj|llm_proj)\.", "language_projection."),
    (r"^(opt_model|t5_model|llm_model)\.", "language_model."),
]
_LAVIS_DROPPED = re.compile(r"(^|\.)position_ids$|^visual_encoder\.blocks\.\d+\.attn\.relative_position")


# LAVIS builds ln_vision as nn.LayerNorm(vision width): torch's default eps, where transformers' port
# (and the ViT's own norms) use 1e-6.
LAVIS_LN_VISION_EPS = 1e-5


def is_lavis_state_dict(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("Qformer.", "visual_encoder.", "ln_vision.")) for k in state)


def lavis_to_blip2rt(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames a LAVIS BLIP-2 state dict to blip2rt (= Hugging Face) names."""
    out: dict[str, torch.Tensor] = {}
    q_bias: dict[str, torch.Tensor] = {}
    v_bias: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _LAVIS_DROPPED.search(key):
            continue
        m = re.match(r"^visual_encoder\.blocks\.(\d+)\.attn\.(q|v)_bias$", key)
        if m:
            (q_bias if m.group(2) == "q" else v_bias)[m.group(1)] = value
            continue
        new = key
        for pattern, repl in _LAVIS_RENAMES:
            new, n = re.subn(pattern, repl, key)
            if n:
                break
        out[new] = value
    for layer, q in q_bias.items():
        if layer not in v_bias:
            raise CheckpointError(f"LAVIS checkpoint has visual_encoder.blocks.{layer}.attn.q_bias but no v_bias")
        # EVA: q and v biases, none on k; stored fused as [q ; 0 ; v], as transformers does.
        out[f"vision_model.encoder.layers.{layer}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v_bias[layer]])
    return out


# ---- copying into the model --------------------------------------------------------------

def _alias_groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """Every state-dict key -> all keys naming the same tensor (tied weights)."""
    by_tensor: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
    groups = {}
    for names in by_tensor.values():
        for n in names:
            groups[n] = names
    return groups


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                 allow_missing_prefixes: tuple[str, ...] = (), drop_text_only: bool = False) -> list[str]:
    """Checks `state` against the model, then copies it in (cast to each parameter's dtype).

    Returns the optional keys that were absent. Raises CheckpointError, naming keys and shapes,
    on anything missing, unexpected or mis-shaped, before copying anything.
    """
    expected = model.state_dict(keep_vars=True)
    aliases = _alias_groups(model)
    state = dict(state)
    if drop_text_only:
        dropped = [k for k in state if is_text_only(k) and k not in expected]  # blip2rt.parts.TEXT_ONLY
        for k in dropped:
            del state[k]
        if dropped:
            log.info("%s: dropped %d text-only Q-Former tensors this model does not have", source, len(dropped))

    unexpected = sorted(k for k in state if k not in expected and k not in aliases)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{source} has unexpected tensor {unexpected[0]!r}{more}, which this model does not have")
    for k, v in state.items():
        target = expected.get(k)
        if target is None:
            target = expected[next(a for a in aliases[k] if a in expected)]
        if tuple(v.shape) != tuple(target.shape):
            raise CheckpointError(f"{source}: {k!r} has shape {tuple(v.shape)}, expected {tuple(target.shape)}")

    missing, optional_missing = [], []
    for k in expected:
        if k in state or any(a in state for a in aliases.get(k, ())):
            continue
        if k.startswith(OPTIONAL_PREFIXES):
            optional_missing.append(k)
        elif not k.startswith(allow_missing_prefixes):
            missing.append(k)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source} is missing {missing[0]!r}{more}, expected with shape "
                              f"{tuple(expected[missing[0]].shape)}")

    with torch.no_grad():
        for k, v in state.items():
            target = expected.get(k)
            if target is None:
                target = expected[next(a for a in aliases[k] if a in expected)]
            target.copy_(v.to(target.dtype))
    if optional_missing:
        log.info("%s: %d optional tensors absent (kept at init): %s", source, len(optional_missing),
                 ", ".join(sorted({k.split(".")[0] for k in optional_missing})))
    return optional_missing

