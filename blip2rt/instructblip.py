"""InstructBLIP (Dai et al. 2023) in blip2rt: the BLIP-2 architecture whose Q-Former also reads the
instruction, as a model with `question_in_qformer` and no stage-1 heads (Blip2Config.is_instructblip).

The two names for the same tensors, transformers' InstructBlipForConditionalGeneration and blip2rt's:

    qformer.embeddings.layernorm.*             qformer.layernorm.*        (over [queries ; text])
    qformer.embeddings.word_embeddings.*       embeddings.word_embeddings.*
    qformer.embeddings.position_embeddings.*   embeddings.position_embeddings.*
    everything else                            the same name

Reading is `to_blip2rt_names` (the loaders call it on any state dict with transformers' names).
Writing is `save_instructblip`: a folder that transformers' InstructBlipForConditionalGeneration and
InstructBlipProcessor load, from any blip2rt model with the question in its Q-Former (a loaded
InstructBLIP, or a model blip2rt fine-tuned for VQA). transformers' InstructBLIP vision tower is
EVA's: a DINOv2 encoder's layer scale is folded into the linear layer before it, and position
embeddings stored for another grid are written interpolated to the model's image size, which is
what blip2rt computes at that size. The stage-1 heads (ITC, ITM, ITG), which InstructBLIP has no
place for, are left out.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch

from . import parts
from .errors import CheckpointError, InputError

IMAGE_TOKEN = "<image>"  # transformers' InstructBLIP placeholder for the soft prompt's positions

_TO_BLIP2RT = ((re.compile(r"^qformer\.embeddings\.layernorm\."), "qformer.layernorm."),
               (re.compile(r"^qformer\.embeddings\.(word_embeddings|position_embeddings)\."), r"embeddings.\1."))
_TO_HF = ((re.compile(r"^qformer\.layernorm\."), "qformer.embeddings.layernorm."),
          (re.compile(r"^embeddings\.(word_embeddings|position_embeddings)\."), r"qformer.embeddings.\1."))
_BUFFERS = re.compile(r"^qformer\.embeddings\.position_ids$")


def has_instructblip_names(state: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict names the Q-Former's embeddings as transformers' InstructBLIP does."""
    return any(k.startswith("qformer.embeddings.") for k in state)


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return key


def to_blip2rt_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' InstructBLIP names -> blip2rt's (the position-id buffer is dropped)."""
    return {_rename(k, _TO_BLIP2RT): v for k, v in state.items() if not _BUFFERS.match(k)}


def reads_instruction(state: dict[str, torch.Tensor]) -> bool:
    """Whether weights (in blip2rt names) are an instruction-aware model's: the Q-Former's text
    embeddings beside a language projection, and none of stage 1's heads. InstructBLIP from
    transformers or LAVIS, and blip2rt's own VQA fine-tuning checkpoints, look so; a BLIP-2
    generation checkpoint has no text embeddings, and a stage-1 or whole blip2rt model has the heads."""
    has = {parts.part_of(k) for k in state if _known(k)}
    return {"text_embeddings", "language_projection"} <= has and not has & parts.STAGE1_HEADS


def _known(key: str) -> bool:
    try:
        parts.part_of(key)
        return True
    except KeyError:
        return False


# ---- writing a transformers InstructBLIP folder --------------------------------------------

def instructblip_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' InstructBLIP names, in EVA's vision form (see the
    module docstring): every tensor a fresh contiguous copy, heads of stage 1 left out."""
    cfg = model.config
    vc = cfg.vision_config
    out = {}
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if parts.part_of(name) in parts.STAGE1_HEADS:
                continue
            if re.search(r"\.layer_scale[12]$", name):
                continue  # folded below
            out[_rename(name, _TO_HF)] = t.detach().clone().contiguous()
        emb = model.vision_model.embeddings
        grid = vc.image_size // vc.patch_size
        out["vision_model.embeddings.position_embedding"] = emb.positions_for(grid, grid).detach().clone()
        for i, block in enumerate(model.vision_model.encoder.layers):
            pre = f"vision_model.encoder.layers.{i}."
            # x + s * (W h + b) == x + (diag(s) W) h + s * b
            for scale, linear in ((block.layer_scale1, "self_attn.projection"), (block.layer_scale2, "mlp.fc2")):
                if scale is None:
                    continue
                s = scale.detach().to(out[pre + linear + ".weight"].dtype)
                out[pre + linear + ".weight"] = out[pre + linear + ".weight"] * s[:, None]
                out[pre + linear + ".bias"] = out[pre + linear + ".bias"] * s
    return out


def _check_savable(model) -> None:
    cfg = model.config
    if not (cfg.with_llm and cfg.question_in_qformer and hasattr(model, "embeddings")):
        raise InputError("only a model with an LLM and the question in its Q-Former saves as InstructBLIP "
                         "(an InstructBLIP checkpoint, or a model fine-tuned with `blip2rt train vqa`)")
    vc = cfg.vision_config
    ln_eps = vc.layer_norm_eps if vc.ln_vision_eps is None else vc.ln_vision_eps
    if ln_eps != vc.layer_norm_eps:
        raise InputError(f"this model's ln_vision uses eps {ln_eps} and its ViT {vc.layer_norm_eps}; transformers' "
                         "InstructBLIP has one eps for both, so the folder would compute a different model")
    if not vc.qkv_bias:
        raise InputError("transformers' InstructBLIP vision tower needs qkv biases, and this ViT has none")


def _image_token(model, tokenizer) -> int:
    """The placeholder id: the config's, else "<image>" in the LLM's tokenizer (added if absent)."""
    if model.config.image_token_index is not None:
        return int(model.config.image_token_index)
    if tokenizer is None:
        raise InputError("saving as InstructBLIP needs the LLM's tokenizer, to add the <image> placeholder token")
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        from transformers import AddedToken

        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def _grow_vocab(state: dict[str, torch.Tensor], text_config: dict, rows: int) -> None:
    """Pads the LLM's input (and output) embeddings with zero rows up to `rows`: the placeholder's
    input row is never read (the soft prompt replaces it), and its output logit is 0."""
    for key in [k for k in state if k.startswith("language_model.") and
                k.endswith(("embed_tokens.weight", "shared.weight", "lm_head.weight"))]:
        t = state[key]
        if t.shape[0] < rows:
            state[key] = torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])])
    text_config["vocab_size"] = max(rows, text_config.get("vocab_size", 0))


def save_instructblip(model, folder: str | Path) -> Path:
    """Writes `model` as a transformers InstructBLIP folder: config.json, model.safetensors, and the
    processor (the LLM's tokenizer with the <image> placeholder, the Q-Former's tokenizer in
    qformer_tokenizer/, the image preprocessing). transformers' `InstructBlipForConditionalGeneration`
    and blip2rt's `from_pretrained` both load it."""
    from safetensors.torch import save_file
    from transformers import InstructBlipConfig

    _check_savable(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    vc, qc = cfg.vision_config, cfg.qformer_config
    tokenizer = copy.deepcopy(model.tokenizer) if model.tokenizer is not None else None
    image_token = _image_token(model, tokenizer)
    state = instructblip_state_dict(model)
    text_config = copy.deepcopy(cfg.text_config)
    rows = model.language_model.get_input_embeddings().weight.shape[0]
    if image_token >= rows:
        _grow_vocab(state, text_config, image_token + 1)
    hf = InstructBlipConfig(
        vision_config=dict(hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size,
                           num_hidden_layers=vc.num_hidden_layers, num_attention_heads=vc.num_attention_heads,
                           image_size=vc.image_size, patch_size=vc.patch_size, hidden_act=vc.hidden_act,
                           layer_norm_eps=vc.layer_norm_eps, qkv_bias=True,
                           image_mean=list(vc.image_mean), image_std=list(vc.image_std)),
        qformer_config=dict(vocab_size=qc.vocab_size, hidden_size=qc.hidden_size,
                            num_hidden_layers=qc.num_hidden_layers, num_attention_heads=qc.num_attention_heads,
                            intermediate_size=qc.intermediate_size, hidden_act=qc.hidden_act,
                            hidden_dropout_prob=qc.hidden_dropout_prob,
                            attention_probs_dropout_prob=qc.attention_probs_dropout_prob,
                            max_position_embeddings=qc.max_position_embeddings, layer_norm_eps=qc.layer_norm_eps,
                            pad_token_id=qc.pad_token_id, cross_attention_frequency=qc.cross_attention_frequency,
                            encoder_hidden_size=vc.hidden_size),
        text_config=text_config, num_query_tokens=cfg.num_query_tokens, image_token_index=image_token,
        initializer_range=cfg.initializer_range)
    hf.architectures = ["InstructBlipForConditionalGeneration"]
    # blip2rt's own layout rule, which transformers ignores: where the LLM's BOS goes (see the README)
    hf.blip2rt_bos_before_soft_prompt = cfg.bos_before_soft_prompt
    hf.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None and model.qformer_tokenizer is not None:
        _save_processor(tokenizer, model.qformer_tokenizer, cfg, folder)
    elif tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def _save_processor(tokenizer, qformer_tokenizer, cfg, folder: Path) -> None:
    from transformers import BlipImageProcessor, InstructBlipProcessor

    vc = cfg.vision_config
    images = BlipImageProcessor(size={"height": vc.image_size, "width": vc.image_size}, image_mean=list(vc.image_mean),
                                image_std=list(vc.image_std), do_convert_rgb=True)
    InstructBlipProcessor(image_processor=images, tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer,
                          num_query_tokens=cfg.num_query_tokens).save_pretrained(folder)

