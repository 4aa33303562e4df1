"""Bad checkpoints give a clear error that names the key and the shape; no code is unpickled."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import blip2rt
from test_parity_transformers import pixels


def copy_folder(ref, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(ref.folder, dst)
    return dst


def test_missing_key_is_named_with_its_shape(hf_opt, tmp_path):
    d = copy_folder(hf_opt, tmp_path)
    sd = load_file(d / "model.safetensors")
    key = "qformer.encoder.layer.2.crossattention.attention.key.weight"
    shape = tuple(sd.pop(key).shape)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(blip2rt.CheckpointError) as e:
        blip2rt.from_pretrained(d, device="cpu")
    assert key in str(e.value) and str(shape) in str(e.value) and "missing" in str(e.value)


def test_misshaped_key_is_named_with_both_shapes(hf_opt, tmp_path):
    d = copy_folder(hf_opt, tmp_path)
    sd = load_file(d / "model.safetensors")
    sd["query_tokens"] = torch.zeros(1, 5, 32)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(blip2rt.CheckpointError, match=r"'query_tokens' has shape \(1, 5, 32\), expected \(1, 4, 32\)"):
        blip2rt.from_pretrained(d, device="cpu")


def test_unexpected_key_is_named(hf_opt, tmp_path):
    d = copy_folder(hf_opt, tmp_path)
    sd = load_file(d / "model.safetensors")
    sd["qformer.encoder.layer.1.crossattention.attention.key.weight"] = torch.zeros(32, 32)  # layer 1 has none
    save_file(sd, d / "model.safetensors")
    with pytest.raises(blip2rt.CheckpointError, match=r"unexpected tensor 'qformer\.encoder\.layer\.1\.crossattention"):
        blip2rt.from_pretrained(d, device="cpu")


class WritesAFile:
    """Unpickling this would create `path`: open(path, "w") runs at load time."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_with_code_is_refused_and_never_runs(hf_opt, tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"query_tokens": torch.zeros(1, 4, 32)}, "payload": WritesAFile(marker)}, path)
    import pickle

    pickle.loads(pickle.dumps(WritesAFile(tmp_path / "control"))).close()  # the payload works when unpickled
    assert (tmp_path / "control").exists()
    with pytest.raises(blip2rt.CheckpointError, match="refusing to unpickle"):
        blip2rt.from_pretrained(path, config=hf_opt.folder, device="cpu")
    assert not marker.exists()


def test_state_dict_with_non_tensor_values_is_refused(hf_opt, tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"query_tokens": torch.zeros(1, 4, 32), "note": "hello"}, path)
    with pytest.raises(blip2rt.CheckpointError, match="key 'note' holds a str"):
        blip2rt.from_pretrained(path, config=hf_opt.folder, device="cpu")


def test_corrupt_safetensors_is_refused(hf_opt, tmp_path):
    d = copy_folder(hf_opt, tmp_path)
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(blip2rt.CheckpointError, match="not a readable safetensors file"):
        blip2rt.from_pretrained(d, device="cpu")


def test_folder_without_config_or_weights(hf_opt, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(blip2rt.CheckpointError, match="config.json does not exist"):
        blip2rt.from_pretrained(empty, device="cpu")
    d = copy_folder(hf_opt, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(blip2rt.CheckpointError, match="no weights"):
        blip2rt.from_pretrained(d, device="cpu")


def test_bare_weights_file_needs_a_config(hf_opt, tmp_path):
    with pytest.raises(blip2rt.CheckpointError, match="pass config="):
        blip2rt.from_pretrained(hf_opt.folder / "model.safetensors", device="cpu")


def test_unknown_preset_lists_the_presets():
    with pytest.raises(blip2rt.CheckpointError, match="presets: blip2-opt-2.7b"):
        blip2rt.from_pretrained("blip2-opt-99b")


def test_sharded_folder_loads(hf_opt, tmp_path):
    d = tmp_path / "sharded"
    hf_opt.model.save_pretrained(d, max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").exists()
    assert len(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]) > 10
    m = blip2rt.from_pretrained(d, device="cpu")
    px = pixels(2)
    with torch.no_grad():
        want = hf_opt.model.get_image_features(px).pooler_output
    torch.testing.assert_close(m.image_features(px), want, atol=1e-5, rtol=1e-5)


def test_frozen_parts_in_bf16_trainable_in_fp32(hf_opt):
    m = blip2rt.from_pretrained(hf_opt.folder, device="cpu", dtype="bf16")
    assert m.vision_model.encoder.layers[0].self_attn.qkv.weight.dtype == torch.bfloat16
    assert m.language_model.dtype == torch.bfloat16
    for name in ("query_tokens", "vision_model.post_layernorm.weight", "language_projection.weight",
                 "qformer.encoder.layer.0.attention.attention.query.weight"):
        assert m.get_parameter(name).dtype == torch.float32, name
    assert not any(p.requires_grad for p in m.frozen_parameters())
    assert m.query_tokens.requires_grad
    px = pixels(2)
    with torch.no_grad():
        want = hf_opt.model.get_image_features(px).pooler_output
    got = m.image_features(px)
    # bf16 ViT: error bounded by bf16's 8-bit mantissa through 2 layers, relative to the output scale
    assert (got - want).abs().max() < 0.05 * want.abs().max()
