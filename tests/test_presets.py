"""Presets carry the published shapes: checked key for key against transformers' Blip2 built from
the same config (on the meta device, so no memory is spent), and against the paper's shapes and parameter count."""

import pytest
import torch
from transformers import Blip2Config as HFBlip2Config
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

import blip2rt
from blip2rt.config import Blip2Config

PAPER = ["blip2-opt-2.7b", "blip2-opt-6.7b", "blip2-flan-t5-xl", "blip2-flan-t5-xxl", "blip2-itm-vit-g"]
OURS_ONLY = ("temp", "itg_head.")  # LAVIS-only parts the transformers classes do not have


def hf_model_for(cfg: Blip2Config):
    d = cfg.to_hf_dict()
    hf_cfg = HFBlip2Config(vision_config=d["vision_config"], qformer_config=d["qformer_config"],
                           text_config=d.get("text_config"), num_query_tokens=d["num_query_tokens"],
                           image_text_hidden_size=d["image_text_hidden_size"])
    if cfg.with_llm:
        return Blip2ForConditionalGeneration(hf_cfg)
    hf_cfg.qformer_config.use_qformer_text_input = True
    return Blip2ForImageTextRetrieval(hf_cfg)


@pytest.mark.parametrize("name", PAPER)
def test_preset_matches_transformers_shapes(name):
    cfg = blip2rt.preset_config(name)
    with torch.device("meta"):
        ours = blip2rt.Blip2(cfg)
        ref = hf_model_for(cfg)
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items() if not k.startswith(OURS_ONLY)}
    b = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert a == b


@pytest.mark.parametrize("name", PAPER)
def test_preset_has_the_paper_shapes(name):
    cfg = blip2rt.preset_config(name)
    v, q = cfg.vision_config, cfg.qformer_config
    # EVA-CLIP ViT-g/14 with its last layer dropped; BERT-base Q-Former; 32 queries
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (1408, 39, 16, 6144)
    assert v.num_patches + 1 == 257 and v.head_dim == 88
    assert (q.hidden_size, q.num_hidden_layers, q.num_attention_heads, q.cross_attention_frequency) == (768, 12, 12, 2)
    assert cfg.num_query_tokens == 32 and q.vocab_size == 30523
    width = {"blip2-opt-2.7b": 2560, "blip2-opt-6.7b": 4096, "blip2-flan-t5-xl": 2048, "blip2-flan-t5-xxl": 4096}
    if name in width:
        t = cfg.text_config
        assert t.get("hidden_size", t.get("d_model")) == width[name]
    else:
        assert not cfg.with_llm and cfg.with_text_heads


def test_opt_2_7b_parameter_count():
    with torch.device("meta"):
        m = blip2rt.Blip2(blip2rt.preset_config("blip2-opt-2.7b"))
    n = sum(p.numel() for p in m.parameters())
    assert 3.74e9 < n < 3.75e9  # the 3.74B of the published Salesforce/blip2-opt-2.7b checkpoint


def test_config_json_roundtrip(tmp_path):
    cfg = blip2rt.preset_config("blip2-flan-t5-xl")
    cfg.save(tmp_path)
    back = Blip2Config.from_json_file(tmp_path / "config.json")
    assert back == cfg
    assert back.is_encoder_decoder


def test_bad_config_file_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(blip2rt.CheckpointError, match="is not valid JSON"):
        blip2rt.from_pretrained(tmp_path)


def test_the_parts_no_checkpoint_fills_are_drawn_from_the_seed():
    """Two loads give the same model whatever torch's global generator holds, and leave it as it was;
    another seed gives other weights; seed=None draws from the global generator."""
    def weights(m):
        return {k: v.clone() for k, v in m.state_dict().items() if v.is_floating_point()}

    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = weights(blip2rt.from_pretrained("tiny", device="cpu"))
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(7)
    b = weights(blip2rt.from_pretrained("tiny", device="cpu"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = weights(blip2rt.from_pretrained("tiny", device="cpu", seed=1))
    differ = [k for k in a if not torch.equal(a[k], other[k])]
    assert "language_projection.weight" in differ and any(".crossattention." in k for k in differ), differ

    torch.manual_seed(5)
    c = weights(blip2rt.from_pretrained("tiny", device="cpu", seed=None))
    torch.manual_seed(5)
    d = weights(blip2rt.from_pretrained("tiny", device="cpu", seed=None))
    assert all(torch.equal(c[k], d[k]) for k in c)
    assert not torch.equal(c["language_projection.weight"], a["language_projection.weight"])


@pytest.mark.parametrize("name", ["instructblip-vicuna-7b", "instructblip-flan-t5-xl"])
def test_instructblip_presets_match_transformers_shapes(name):
    """Key for key (in transformers' InstructBLIP names) against InstructBlipForConditionalGeneration
    built from the same shapes, on the meta device."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    from blip2rt.instructblip import instructblip_state_dict

    cfg = blip2rt.preset_config(name)
    assert cfg.is_instructblip and cfg.image_token_index < cfg.text_config["vocab_size"]
    d = cfg.to_hf_dict()
    hf_cfg = InstructBlipConfig(vision_config=d["vision_config"], qformer_config=d["qformer_config"],
                                text_config=d["text_config"], num_query_tokens=d["num_query_tokens"],
                                image_token_index=cfg.image_token_index)
    with torch.device("meta"):
        ours = blip2rt.Blip2(cfg)
        ref = InstructBlipForConditionalGeneration(hf_cfg)
        a = {k: tuple(v.shape) for k, v in instructblip_state_dict(ours).items()}
    b = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    assert a == b
    if name == "instructblip-vicuna-7b":
        n = sum(p.numel() for p in ours.parameters())
        assert 7.9e9 < n < 7.95e9, n  # ViT-g 1.0B, Q-Former 0.19B, LLaMA-7B 6.74B
