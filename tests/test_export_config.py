"""export.export_config.ExportConfig: the one writer and reader of blip2rt_export.json. A round trip,
an export of the older format read through its upgrade, and what is refused, with what to do."""

import json

import pytest

import blip2rt
from blip2rt.errors import CheckpointError
from blip2rt.export import OrtBlip2, export_model
from blip2rt.export.export_config import CONFIG_FILE, VERSION, ExportConfig
from blip2rt.images import CLIP_MEAN, CLIP_STD

# what format 1 (the exports before ExportConfig) could leave out: the keys later exports added
ADDED_AFTER_V1 = ("bos_before_soft_prompt", "image_mean", "image_std", "question_in_qformer", "llm_weights")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    out = tmp_path_factory.mktemp("export_config")
    model = blip2rt.from_pretrained("tiny", device="cpu")
    export_model(model, out, static_graph=False)
    return out


def as_v1(data: dict, drop=ADDED_AFTER_V1) -> dict:
    v1 = {k: v for k, v in data.items() if k not in drop and k != "format_version"}
    return {"format": 1, **v1}


def test_round_trip(export, tmp_path):
    cfg = ExportConfig.read(export)
    assert cfg.version == VERSION and json.loads((export / CONFIG_FILE).read_text())["format_version"] == VERSION
    cfg.write(tmp_path)
    assert ExportConfig.read(tmp_path) == cfg
    # what the runtime asks of it
    assert cfg.past_names[:2] == ["past.0.key", "past.0.value"] and len(cfg.past_names) == 2 * cfg.num_layers
    assert cfg.present_names[0] == "present.0.key" and cfg.cross_names[0] == "cross.0.key"
    assert cfg.llm_graphs == ["prefill", "decode"] and cfg.llm_weights == {"format": "fp32"}
    assert cfg["vocab_size"] == cfg.vocab_size and cfg.get("no such key", 3) == 3 and "graphs" in cfg
    layout = cfg.prompt_layout
    assert (layout.bos_token_id, layout.pad_token_id, layout.encoder_decoder) == (
        cfg.bos_token_id, cfg.tokenizer_pad_id, cfg.encoder_decoder)


def test_a_format_1_export_is_upgraded_and_runs_alike(export, tmp_path):
    import shutil

    old = tmp_path / "v1"
    shutil.copytree(export, old)
    data = json.loads((export / CONFIG_FILE).read_text())
    (old / CONFIG_FILE).write_text(json.dumps(as_v1(data)))
    cfg = ExportConfig.read(old)
    assert cfg.version == VERSION
    assert (cfg.bos_before_soft_prompt, cfg.question_in_qformer) == (False, False)
    assert (cfg.image_mean, cfg.image_std) == (list(CLIP_MEAN), list(CLIP_STD))
    assert cfg.llm_weights == {"format": data["dtype"]}
    # this export had the values the upgrade assumes, so it runs as before
    assert data["image_mean"] == list(CLIP_MEAN) and not data["bos_before_soft_prompt"]
    px = [str(tmp_path / "x.png")]
    from PIL import Image
    Image.new("RGB", (30, 40), (200, 40, 40)).save(px[0])
    gen = dict(num_beams=1, max_new_tokens=5)
    assert OrtBlip2(old).caption(px, **gen) == OrtBlip2(export).caption(px, **gen)


def test_what_cannot_be_read_is_refused_with_what_to_do(export, tmp_path):
    data = json.loads((export / CONFIG_FILE).read_text())

    def refused(content) -> str:
        (tmp_path / CONFIG_FILE).write_text(json.dumps(content))
        with pytest.raises(CheckpointError) as e:
            ExportConfig.read(tmp_path)
        return str(e.value)

    assert "format 3" in refused({**data, "format_version": 3}) and "blip2rt export" in refused(
        {**data, "format_version": 3})
    assert "lacks vocab_size" in refused({k: v for k, v in data.items() if k != "vocab_size"})
    assert "does not know (frobnicate)" in refused({**data, "frobnicate": 1})
    t5_v1 = as_v1({**data, "encoder_decoder": True, "graphs": {"vision": "v.onnx", "encoder": "e.onnx",
                                                                "decoder": "d.onnx"}})
    assert "no decoder_with_past graph" in refused(t5_v1) and "export it again" in refused(t5_v1)
    assert "format None" in refused({k: v for k, v in data.items() if k != "format_version"})
    (tmp_path / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match="not a blip2rt export folder"):
        ExportConfig.read(tmp_path)
