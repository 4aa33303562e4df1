"""InstructBLIP on blip2rt's fast paths, each against the plain PyTorch path of the same model with the
instruction in the Q-Former: the fused Q-Former kernels, the static-cache decoder, the ONNX export in
ONNX Runtime (fp32, and the LLM in int4), and the CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import blip2rt
from hf_reference import with_tiny_tokenizers
from test_instructblip_parity import SIZE
from test_parity_transformers import pixels

QUESTIONS = ["what is it?", "is it red?", "how many shapes are there?", "which one"]


@pytest.fixture(scope="module")
def instruct_llama(hf_instruct_llama, tmp_path_factory):
    folder = with_tiny_tokenizers(hf_instruct_llama, tmp_path_factory.mktemp("instruct_llama"))
    return folder, blip2rt.from_pretrained(folder, device="cpu", kernels="torch")


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    root, paths = tmp_path_factory.mktemp("instruct_images"), []
    rng = np.random.default_rng(0)
    for i in range(4):
        p = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_the_fused_qformer_kernels_take_the_instruction(instruct_llama):
    """kernels="triton" (Triton's interpreter on the CPU): the soft prompt and the greedy tokens."""
    folder, m = instruct_llama
    fused = blip2rt.from_pretrained(folder, device="cpu", kernels="triton")
    assert fused.kernel_backend == "triton"
    px = pixels(2, SIZE, seed=50)
    qids, qmask = m.question_ids(QUESTIONS[:2])
    assert qmask[0].sum() != qmask[1].sum()
    with torch.no_grad():
        torch.testing.assert_close(fused.image_features(px, qids, qmask), m.image_features(px, qids, qmask),
                                   atol=2e-5, rtol=1e-5)
    ids, mask = m.encode_prompts(["Question: " + q + " Answer:" for q in QUESTIONS[:2]])
    gen = dict(max_new_tokens=6, min_new_tokens=6, num_beams=1)
    want = m.generate(px, ids, mask, qformer_input_ids=qids, qformer_attention_mask=qmask, **gen)
    assert torch.equal(fused.generate(px, ids, mask, qformer_input_ids=qids, qformer_attention_mask=qmask, **gen), want)


def test_the_static_cache_decoder_takes_the_instruction(instruct_llama, image_files):
    _, m = instruct_llama
    gen = dict(num_beams=1, max_new_tokens=7, min_new_tokens=7)
    want = m.answer(image_files, QUESTIONS, **gen)
    assert m.answer(image_files, QUESTIONS, static_cache=True, **gen) == want
    qids, qmask = m.question_ids(QUESTIONS)
    px = m._pixels(image_files)
    ids, mask = m.encode_prompts([f"Question: {q} Answer:" for q in QUESTIONS])
    static = m.generate(px, ids, mask, qformer_input_ids=qids, qformer_attention_mask=qmask, static_cache=True, **gen)
    dynamic = m.generate(px, ids, mask, qformer_input_ids=qids, qformer_attention_mask=qmask, **gen)
    assert torch.equal(static, dynamic) and len(set(static.flatten().tolist())) > 2


@pytest.fixture(scope="module")
def llama_export(instruct_llama, tmp_path_factory):
    from blip2rt.export import export_model

    _, m = instruct_llama
    out = tmp_path_factory.mktemp("instruct_llama_onnx")
    export_model(m, out)
    return out


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
def test_onnx_runtime_answers_with_pytorchs_tokens(instruct_llama, llama_export, image_files, num_beams):
    """The vision graph takes the instruction's Q-Former ids; ORT's tokens equal PyTorch's."""
    from blip2rt.export import OrtBlip2

    _, m = instruct_llama
    rt = OrtBlip2(llama_export, providers=["CPUExecutionProvider"])
    assert rt.question_in_qformer
    qids_rt, qmask_rt = rt.question_ids(QUESTIONS)
    qids, qmask = m.question_ids(QUESTIONS)
    np.testing.assert_array_equal(qids_rt, qids.numpy())
    np.testing.assert_array_equal(qmask_rt, qmask.numpy())
    px = m._pixels(image_files)
    np.testing.assert_allclose(rt.image_features(px.numpy(), qids_rt, qmask_rt),
                               m.image_features(px, qids, qmask).detach().numpy(), atol=1e-4, rtol=1e-4)
    gen = dict(num_beams=num_beams, max_new_tokens=6, min_new_tokens=6)
    ids, mask = m.encode_prompts([f"Question: {q} Answer:" for q in QUESTIONS])
    want = m.generate(px, ids, mask, qformer_input_ids=qids, qformer_attention_mask=qmask, **gen).numpy()
    got = rt.generate(px.numpy(), ids.numpy(), mask.numpy(), qformer_input_ids=qids_rt, qformer_attention_mask=qmask_rt,
                      **gen)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(want)) > 2
    assert rt.answer(image_files, QUESTIONS, **gen) == m.answer(image_files, QUESTIONS, **gen)
    assert rt.caption(image_files, prompt="a photo of", **gen) == m.caption(image_files, prompt="a photo of", **gen)


def test_the_static_kv_graph_answers_with_pytorchs_tokens(instruct_llama, llama_export, image_files):
    from blip2rt.export import OrtBlip2

    _, m = instruct_llama
    rt = OrtBlip2(llama_export, providers=["CPUExecutionProvider"], static_cache=True)
    gen = dict(num_beams=1, max_new_tokens=6, min_new_tokens=6)
    assert rt.answer(image_files, QUESTIONS, **gen) == m.answer(image_files, QUESTIONS, **gen)


def test_the_int4_llm_export_takes_the_instruction(instruct_llama, image_files, tmp_path):
    """The LLM's weights in int4 (GGUF blocks in MatMulNBits, the head in 8 bits) over a LLaMA whose
    weights already lie on those grids, as a GGUF checkpoint's do: nothing is lost, so the export's
    own check (which feeds the Q-Former instruction ids) and the answers equal PyTorch's."""
    import copy

    from blip2rt.export import OrtBlip2, check_export, export_model
    from blip2rt.export.quantize import quantize_export
    from test_quantized_export import snap_to_block_grid_

    m = copy.deepcopy(instruct_llama[1])
    lm = m.language_model
    head = lm.get_output_embeddings()
    with torch.no_grad():
        for layer in lm.modules():
            if isinstance(layer, torch.nn.Linear):
                snap_to_block_grid_(layer.weight, 8 if layer is head else 4)
    export_model(m, tmp_path / "fp32")
    quantize_export(tmp_path / "fp32", "int4", to=tmp_path / "int4", accuracy_level=1)
    rt = OrtBlip2(tmp_path / "int4", providers=["CPUExecutionProvider"])
    assert rt.llm_weights["format"] == "int4" and rt.question_in_qformer
    diffs = check_export(m, tmp_path / "int4")
    assert diffs["soft_prompt"] < 1e-4 and diffs["top1_agreement"] == 1.0 and diffs["greedy_tokens_equal"] == 1.0, diffs
    gen = dict(num_beams=1, max_new_tokens=6, min_new_tokens=6)
    assert rt.answer(image_files, QUESTIONS, **gen) == m.answer(image_files, QUESTIONS, **gen)


def test_t5_instructblip_exports_and_answers_with_pytorchs_tokens(hf_instruct_t5, tmp_path, image_files):
    from blip2rt.export import OrtBlip2, export_model

    folder = with_tiny_tokenizers(hf_instruct_t5, tmp_path / "t5")
    m = blip2rt.from_pretrained(folder, device="cpu", kernels="torch")
    export_model(m, tmp_path / "onnx")
    rt = OrtBlip2(tmp_path / "onnx", providers=["CPUExecutionProvider"])
    gen = dict(num_beams=3, max_new_tokens=5, min_new_tokens=5)
    assert rt.answer(image_files, QUESTIONS, **gen) == m.answer(image_files, QUESTIONS, **gen)


def test_the_cli_puts_the_instruction_into_the_qformer(instruct_llama, llama_export, image_files, capsys):
    from blip2rt.cli import main

    folder, m = instruct_llama
    flags = ["--num-beams", "1", "--max-new-tokens", "5", "--min-new-tokens", "5", "--json"]
    question = QUESTIONS[2]
    for model, backend in ((folder, "torch"), (llama_export, "onnx")):
        assert main(["vqa", "--model", str(model), "--backend", backend, "--question", question, *flags,
                     *image_files]) == 0
        got = [r["answer"] for r in json.loads(capsys.readouterr().out)]
        assert got == m.answer(image_files, question, num_beams=1, max_new_tokens=5, min_new_tokens=5)
        assert main(["caption", "--model", str(model), "--backend", backend, "--prompt", "a photo of", *flags,
                     *image_files]) == 0
        got = [r["caption"] for r in json.loads(capsys.readouterr().out)]
        assert got == m.caption(image_files, prompt="a photo of", num_beams=1, max_new_tokens=5, min_new_tokens=5)
    # and the instruction is what decides: another question, another soft prompt
    qa, qb = m.question_ids([QUESTIONS[0]]), m.question_ids([QUESTIONS[2]])
    px = m._pixels(image_files[:1])
    assert (m.image_features(px, *qa) - m.image_features(px, *qb)).abs().max() > 1e-2
