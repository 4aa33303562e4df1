"""Stage 2 sees the sequence generation continues: with no prompt, Blip2 generates from the
LLM's BOS after the soft prompt, so a tokenizer that adds no BOS itself (Llama-style GGUF
tokenizers such as SmolLM2's) gets it prepended, unpredicted; one that adds it is left alone."""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from blip2rt.training.data import Sample, Stage2Collate

VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "a": 3, "red": 4, "circle": 5, "photo": 6, "of": 7}


def _tokenizer(adds_bos: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _samples():
    out = []
    for i, caption in enumerate(["a red circle", "a circle"]):
        s = Sample(index=i, caption=caption, image_id=i, seed=0)
        s.frozen_features = torch.zeros(3, 4)
        out.append(s)
    return out


def test_bos_is_prepended_and_not_predicted_when_the_tokenizer_omits_it():
    b = Stage2Collate(_tokenizer(False), False, 16, "", " </s>", bos_token_id=1)(_samples()).objective_inputs
    assert b.input_ids.tolist() == [[1, 3, 4, 5, 2], [1, 3, 5, 2, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert b.labels.tolist() == [[-100, 3, 4, 5, 2], [-100, 3, 5, 2, -100]]


def test_a_tokenizer_that_adds_bos_gets_no_second_one():
    b = Stage2Collate(_tokenizer(True), False, 16, "", " </s>", bos_token_id=1)(_samples()).objective_inputs
    assert b.input_ids.tolist() == [[1, 3, 4, 5, 2], [1, 3, 5, 2, 0]]


def test_with_a_prompt_generation_starts_from_the_prompt_so_no_bos():
    b = Stage2Collate(_tokenizer(False), False, 16, "a photo of ", " </s>", bos_token_id=1)(_samples()).objective_inputs
    assert b.input_ids[0].tolist() == [3, 6, 7, 3, 4, 5, 2]
    assert b.labels[0].tolist() == [-100, -100, -100, 3, 4, 5, 2]


def test_with_the_bos_before_the_soft_prompt_the_text_starts_without_it():
    """Blip2Config.bos_before_soft_prompt: the model puts the BOS first, so the text has none, from
    either tokenizer, and its first token is predicted (from the soft prompt's last position)."""
    for adds_bos in (False, True):
        b = Stage2Collate(_tokenizer(adds_bos), False, 16, "", " </s>", bos_token_id=1,
                          bos_before_soft_prompt=True)(_samples()).objective_inputs
        assert b.input_ids.tolist() == [[3, 4, 5, 2], [3, 5, 2, 0]]
        assert b.labels.tolist() == [[3, 4, 5, 2], [3, 5, 2, -100]]
    b = Stage2Collate(_tokenizer(True), False, 16, "a photo of ", " </s>", bos_token_id=1,
                      bos_before_soft_prompt=True)(_samples()).objective_inputs
    assert b.input_ids[0].tolist() == [3, 6, 7, 3, 4, 5, 2]
    assert b.labels[0].tolist() == [-100, -100, -100, 3, 4, 5, 2]
