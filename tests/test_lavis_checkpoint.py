"""LAVIS-named state dicts, made here from transformers' weights, load and give transformers' outputs."""

import copy

import pytest
import torch
from transformers.models.bert.configuration_bert import BertConfig
from transformers.models.bert.modeling_bert import BertLMPredictionHead

import blip2rt
from hf_reference import QFORMER, hf_itm_logits
from test_parity_transformers import pixels, qformer_batch


def hf_to_lavis(sd: dict, llm_prefix: str = "opt") -> dict:
    """The LAVIS name of every transformers Blip2 tensor, written out independently of blip2rt."""
    out = {}
    for k, v in sd.items():
        if k.startswith("vision_model.encoder.layers."):
            n, rest = k[len("vision_model.encoder.layers."):].split(".", 1)
            base = f"visual_encoder.blocks.{n}."
            if rest == "self_attn.qkv.bias":
                d = v.shape[0] // 3
                out[base + "attn.q_bias"], out[base + "attn.v_bias"] = v[:d].clone(), v[2 * d:].clone()
                continue
            rest = (rest.replace("layer_norm1", "norm1").replace("layer_norm2", "norm2")
                    .replace("self_attn.projection", "attn.proj").replace("self_attn.qkv", "attn.qkv"))
            out[base + rest] = v
        elif k == "vision_model.embeddings.class_embedding":
            out["visual_encoder.cls_token"] = v
        elif k == "vision_model.embeddings.position_embedding":
            out["visual_encoder.pos_embed"] = v
        elif k.startswith("vision_model.embeddings.patch_embedding."):
            out["visual_encoder.patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("vision_model.post_layernorm."):
            out["ln_vision." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("qformer.layernorm."):
            out["Qformer.bert.embeddings.LayerNorm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("qformer.encoder.layer."):
            rest = k[len("qformer.encoder.layer."):]
            rest = rest.replace("attention.attention.", "attention.self.")  # also crossattention.attention.
            out["Qformer.bert.encoder.layer." + rest] = v
        elif k.startswith("embeddings."):
            out["Qformer.bert." + k] = v
        elif k.startswith("language_projection."):
            out[f"{llm_prefix}_proj." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("language_model."):
            out[f"{llm_prefix}_model." + k[len("language_model."):]] = v
        elif k.startswith("vision_projection."):
            out["vision_proj." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("text_projection."):
            out["text_proj." + k.rsplit(".", 1)[1]] = v
        elif k == "query_tokens" or k.startswith("itm_head."):
            out[k] = v
        else:
            raise AssertionError(f"no LAVIS name for {k}")
    return out


def test_full_lavis_state_dict_matches_transformers(hf_opt, tmp_path):
    lavis = hf_to_lavis(hf_opt.model.state_dict())
    lavis["Qformer.bert.embeddings.position_ids"] = torch.arange(40)[None]  # a buffer LAVIS saves
    path = tmp_path / "blip2_opt.pth"
    torch.save({"model": lavis, "epoch": 3}, path)
    m = blip2rt.from_pretrained(path, config=_config_only(hf_opt.folder, tmp_path), device="cpu")
    px = pixels(2, seed=11)
    lavis_like = copy.deepcopy(hf_opt.model)  # transformers' model, with ln_vision as LAVIS builds it
    lavis_like.vision_model.post_layernorm.eps = 1e-5
    with torch.no_grad():
        want = lavis_like.get_image_features(px).pooler_output
    torch.testing.assert_close(m.image_features(px), want, atol=1e-5, rtol=1e-5)
    ids = torch.tensor([[2, 17, 33, 41, 5]])
    with torch.no_grad():
        hf_ids = torch.cat([torch.full((1, 4), 98), ids], 1)
        want_gen = hf_opt.model.generate(pixel_values=px[:1], input_ids=hf_ids, max_new_tokens=6, min_new_tokens=6)
    assert torch.equal(m.generate(px[:1], ids, max_new_tokens=6, min_new_tokens=6), want_gen[:, hf_ids.shape[1]:])


def test_a_lavis_checkpoint_computes_ln_vision_as_lavis_and_a_hf_folder_as_transformers(hf_opt, tmp_path):
    """LAVIS builds ln_vision with torch's default eps (1e-5); transformers' port uses the ViT's 1e-6."""
    import torch.nn.functional as F

    path = tmp_path / "blip2_opt.pth"
    torch.save({"model": hf_to_lavis(hf_opt.model.state_dict())}, path)
    from_lavis = blip2rt.from_pretrained(path, config=_config_only(hf_opt.folder, tmp_path), device="cpu")
    from_hf = blip2rt.from_pretrained(hf_opt.folder, device="cpu")
    px = pixels(2, seed=5)
    with torch.no_grad():
        frozen = from_hf.vision_model.encode(px)  # the same frozen ViT in both
        ln = hf_opt.model.vision_model.post_layernorm
        lavis_tokens = F.layer_norm(frozen, frozen.shape[-1:], ln.weight, ln.bias, 1e-5)
        hf_tokens = F.layer_norm(frozen, frozen.shape[-1:], ln.weight, ln.bias, 1e-6)
        assert (lavis_tokens - hf_tokens).abs().max() > 1e-6  # the two eps are told apart at this size
        torch.testing.assert_close(from_lavis.image_embeds(px), lavis_tokens, atol=1e-7, rtol=0)
        torch.testing.assert_close(from_hf.image_embeds(px), hf_tokens, atol=1e-7, rtol=0)
    from_lavis.save_pretrained(tmp_path / "saved")  # the eps travels with the model
    reloaded = blip2rt.from_pretrained(tmp_path / "saved", device="cpu")
    assert reloaded.vision_model.post_layernorm.eps == 1e-5 and from_hf.vision_model.post_layernorm.eps == 1e-6


def _config_only(folder, tmp_path):
    """A folder with the config.json alone: the .pth must bring every weight."""
    d = tmp_path / "config_only"
    d.mkdir()
    (d / "config.json").write_text((folder / "config.json").read_text())
    return d


def lavis_stage1(hf_retrieval, temp=0.0421):
    sd = hf_to_lavis(hf_retrieval.model.state_dict())
    g = torch.Generator().manual_seed(3)
    h, v = QFORMER["hidden_size"], QFORMER["vocab_size"]
    sd["temp"] = torch.tensor(temp)
    sd["Qformer.cls.predictions.transform.dense.weight"] = torch.randn(h, h, generator=g) * 0.2
    sd["Qformer.cls.predictions.transform.dense.bias"] = torch.randn(h, generator=g) * 0.1
    sd["Qformer.cls.predictions.transform.LayerNorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
    sd["Qformer.cls.predictions.transform.LayerNorm.bias"] = 0.1 * torch.randn(h, generator=g)
    sd["Qformer.cls.predictions.bias"] = 0.1 * torch.randn(v, generator=g)
    # LAVIS ties the decoder to the word embeddings, and its state dict holds both names.
    sd["Qformer.cls.predictions.decoder.weight"] = sd["Qformer.bert.embeddings.word_embeddings.weight"]
    sd["Qformer.cls.predictions.decoder.bias"] = sd["Qformer.cls.predictions.bias"]
    return sd


def test_lavis_stage1_loads_temp_and_itg_head(hf_retrieval, tmp_path):
    sd = lavis_stage1(hf_retrieval)
    path = tmp_path / "blip2_pretrained.pth"
    torch.save({"model": sd}, path)
    m = blip2rt.from_pretrained(path, config=_config_only(hf_retrieval.folder, tmp_path), device="cpu")
    assert m.temp.item() == pytest.approx(0.0421)

    # ITG head against transformers' BERT prediction head with the same weights
    bert_head = BertLMPredictionHead(BertConfig(hidden_size=QFORMER["hidden_size"], vocab_size=QFORMER["vocab_size"],
                                                hidden_act="gelu", layer_norm_eps=1e-12)).eval()
    bert_head.transform.dense.weight.data = sd["Qformer.cls.predictions.transform.dense.weight"]
    bert_head.transform.dense.bias.data = sd["Qformer.cls.predictions.transform.dense.bias"]
    bert_head.transform.LayerNorm.weight.data = sd["Qformer.cls.predictions.transform.LayerNorm.weight"]
    bert_head.transform.LayerNorm.bias.data = sd["Qformer.cls.predictions.transform.LayerNorm.bias"]
    bert_head.decoder.weight.data = sd["Qformer.cls.predictions.decoder.weight"]
    bert_head.decoder.bias.data = sd["Qformer.cls.predictions.bias"]  # transformers 5 reads the decoder's bias
    x = torch.randn(2, 5, QFORMER["hidden_size"])
    with torch.no_grad():
        torch.testing.assert_close(m.itg_head(x), bert_head(x), atol=1e-5, rtol=1e-5)
    assert m.itg_head.decoder.weight is m.embeddings.word_embeddings.weight  # still tied after loading

    # retrieval outputs equal transformers'
    px = pixels(2, seed=5)
    ids, mask = qformer_batch(2, 6)
    want = hf_itm_logits(hf_retrieval, px, ids, mask)
    with torch.no_grad():
        torch.testing.assert_close(m.itm_logits(m.image_embeds(px), ids, mask), want, atol=1e-5, rtol=1e-5)


def test_lavis_trainable_only_overlays_base_folder(hf_opt, tmp_path):
    """LAVIS saves only trainable weights; the frozen ViT and LLM come from the base folder."""
    full = hf_to_lavis(hf_opt.model.state_dict())
    trainable = {k: v.clone() for k, v in full.items() if not k.startswith(("visual_encoder.", "opt_model."))}
    trainable["opt_proj.bias"] += 0.5  # a change only the overlay can bring
    path = tmp_path / "stage2.pth"
    torch.save({"model": trainable}, path)
    m = blip2rt.from_pretrained(path, config=hf_opt.folder, device="cpu")
    px = pixels(1, seed=2)
    with torch.no_grad():
        want = hf_opt.model.get_image_features(px).pooler_output + 0.5
    torch.testing.assert_close(m.image_features(px), want, atol=1e-5, rtol=1e-5)


def test_lavis_trainable_only_without_base_is_refused(hf_opt, tmp_path):
    full = hf_to_lavis(hf_opt.model.state_dict())
    trainable = {k: v for k, v in full.items() if not k.startswith(("visual_encoder.", "opt_model."))}
    path = tmp_path / "stage2.pth"
    torch.save({"model": trainable}, path)
    with pytest.raises(blip2rt.CheckpointError, match=r"is missing 'vision_model\.embeddings"):
        blip2rt.from_pretrained(path, config=_config_only(hf_opt.folder, tmp_path), device="cpu")


def test_stage1_checkpoint_initialises_generation_model(hf_opt, hf_retrieval, tmp_path):
    """A stage-1 (retrieval) checkpoint over a generation model: the Q-Former loads, text-only parts drop."""
    sd = {k: v for k, v in lavis_stage1(hf_retrieval).items() if not k.startswith("visual_encoder.")}
    path = tmp_path / "stage1.pth"
    torch.save({"model": sd}, path)
    m = blip2rt.from_pretrained(path, config=hf_opt.folder, device="cpu")
    assert not hasattr(m, "itm_head")
    got = m.qformer.encoder.layer[0].attention.attention.query.weight
    want = hf_retrieval.model.qformer.encoder.layer[0].attention.attention.query.weight
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(m.query_tokens, hf_retrieval.model.query_tokens, rtol=0, atol=0)
