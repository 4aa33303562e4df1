"""front_end.PromptLayout, the one owner of the LLM's input layout, against transformers' Blip2.

Each row of the table lays out prompts of unequal lengths as blip2rt does ([BOS ;] soft prompt ;
prompt, the prompt padded on its own) and compares what the LLM computes with what transformers'
Blip2ForConditionalGeneration computes from the inputs its processor would give it: the image
placeholders and the text as one sequence, padded as a whole on the tokenizer's side (so its padding
sits before the soft prompt where blip2rt's sits after it). Equal next-token logits (generation) or
an equal loss (training) mean the masks and the positions agree, whatever the placement.
"""

import numpy as np
import pytest
import torch

import blip2rt
from blip2rt.front_end import PromptLayout, left_padded_positions, pad_rows
from hf_reference import IMAGE_TOKEN, NUM_QUERIES, TEXT_VOCAB
from test_bos_before_soft_prompt import bos_first_folder

LENGTHS = [3, 7, 5]

# (family, BOS before the soft prompt, what is compared)
TABLE = [
    ("opt", False, "generate"),  # decoder-only, prompts left-padded, BOS from the tokenizer
    ("llama", False, "generate"),
    ("llama", True, "generate"),  # the BOS before the soft prompt: the tokenizer's BOS leaves the prompt
    ("t5", False, "generate"),  # encoder-decoder: the encoder's prompt right-padded, EOS from the tokenizer
    ("opt", False, "train"),  # decoder-only training: prompt + caption right-padded, the prompt given
    ("llama", False, "train"),
    ("llama", True, "train"),
]


def tokenizer_rows(cfg, seed: int) -> list[list[int]]:
    """Token rows of unequal length as each family's tokenizer gives them: OPT and Llama put their
    BOS first, T5 its EOS last."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, TEXT_VOCAB - 2, (n,), generator=g).tolist() for n in LENGTHS]
    if cfg.is_encoder_decoder:
        return [r + [cfg.eos_token_id] for r in rows]
    return [[cfg.bos_token_id] + r for r in rows]


def hf_sequence(rows, cfg, bos_first: bool, left: bool):
    """transformers' processor layout: [BOS ;] Q image placeholders ; text as one sequence per row,
    padded as a whole: (ids, mask) (B, L) and each row's offset of the text."""
    seqs = []
    for r in rows:
        head = [cfg.bos_token_id] if bos_first else []
        text = r[1:] if bos_first else r
        seqs.append(head + [IMAGE_TOKEN] * NUM_QUERIES + text)
    ids, mask = pad_rows(seqs, cfg.pad_token_id, left=left)
    return torch.from_numpy(ids), torch.from_numpy(mask)


def model_for(family, bos_first, request, tmp_path):
    ref = request.getfixturevalue(f"hf_{family}")
    folder = bos_first_folder(ref, tmp_path) if bos_first else ref.folder
    m = blip2rt.from_pretrained(folder, device="cpu", dtype="fp32", kernels="torch").eval()
    cfg = ref.model.config.text_config
    layout = PromptLayout(cfg.is_encoder_decoder, cfg.bos_token_id, cfg.pad_token_id, bos_first)
    assert m.config.bos_before_soft_prompt == bos_first
    return m, ref, cfg, layout


@pytest.mark.parametrize("family,bos_first,what", TABLE)
def test_the_layout_computes_what_transformers_computes(family, bos_first, what, request, tmp_path):
    m, ref, cfg, layout = model_for(family, bos_first, request, tmp_path)
    rows = tokenizer_rows(cfg, seed=len(family) + bos_first)
    px = torch.randn(len(rows), 3, 28, 28, generator=torch.Generator().manual_seed(7))
    if what == "generate":
        check_generation_inputs(m, ref, cfg, layout, rows, px, bos_first)
    else:
        check_training_inputs(m, ref, cfg, layout, rows, px, bos_first)


def check_generation_inputs(m, ref, cfg, layout, rows, px, bos_first):
    ids, mask = layout.prompt_ids(rows)
    left = not cfg.is_encoder_decoder
    # the prompt alone is padded on the generation side: decoder-only text ends at the last column
    assert (mask[:, -1] == 1).all() if left else (mask[:, 0] == 1).all()
    for row, got, keep in zip(rows, ids, mask):
        assert got[keep == 1].tolist() == (row[1:] if bos_first else row)
    with torch.no_grad():
        embeds, full, _ = m._llm_inputs(px, torch.from_numpy(ids), torch.from_numpy(mask))
        assert torch.equal(full, layout.full_mask(NUM_QUERIES, torch.from_numpy(mask)))
        assert full.shape[1] == layout.prefix_length(NUM_QUERIES) + ids.shape[1]
        hf_ids, hf_mask = hf_sequence(rows, cfg, bos_first, left=left)
        assert torch.equal(full.sum(1), hf_mask.sum(1))  # the same tokens kept in every row
        want = ref.model.generate(pixel_values=px, input_ids=hf_ids, attention_mask=hf_mask, max_new_tokens=1,
                                  do_sample=False, num_beams=1, output_logits=True,
                                  return_dict_in_generate=True).logits[0]
        lm = m.language_model
        if cfg.is_encoder_decoder:
            start = torch.full((len(rows), 1), cfg.decoder_start_token_id)
            got = lm(inputs_embeds=embeds, attention_mask=full, decoder_input_ids=start).logits[:, -1]
        else:
            got = lm(inputs_embeds=embeds, attention_mask=full, position_ids=layout.positions(full)).logits[:, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def check_training_inputs(m, ref, cfg, layout, rows, px, bos_first):
    given = [2, 0, 4]  # a prompt of 2 and of 4 ids, and none (the BOS alone is given then)
    laid = [layout.training_row(r, g, g > 0) for r, g in zip(rows, given)]
    ids, mask, labels = layout.teacher_forced([r for r, _ in laid], [g for _, g in laid])
    assert (mask[:, 0] == 1).all()  # right-padded
    hf_ids, hf_mask = hf_sequence(rows, cfg, bos_first, left=False)
    hf_labels = hf_ids.masked_fill(hf_mask == 0, -100)
    prefix = int(bos_first) + NUM_QUERIES
    hf_labels[:, :prefix] = -100
    for i, g in enumerate(given):
        hf_labels[i, prefix: prefix + g - int(bos_first and g > 0)] = -100
    assert (labels != -100).sum() == (hf_labels != -100).sum()
    with torch.no_grad():
        got = m(px, torch.from_numpy(ids), torch.from_numpy(mask), labels=torch.from_numpy(labels)).loss
        want = ref.model(pixel_values=px, input_ids=hf_ids, attention_mask=hf_mask, labels=hf_labels).loss
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_positions_follow_transformers_rule_on_numpy_and_torch():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 1, 1]])
    want = [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4], [1, 0, 1, 1, 2]]
    np.testing.assert_array_equal(left_padded_positions(mask), want)
    assert torch.equal(left_padded_positions(torch.from_numpy(mask)), torch.tensor(want))


def test_the_default_prompt_and_the_bos_rule():
    plain = PromptLayout(False, 5, 0)
    first = PromptLayout(False, 5, 0, bos_before_soft_prompt=True)
    t5 = PromptLayout(True, 5, 0, bos_before_soft_prompt=True)  # an encoder never takes a BOS first
    np.testing.assert_array_equal(plain.default_ids(2), [[5], [5]])
    assert first.default_ids(2).shape == (2, 0) and first.bos_first and not t5.bos_first
    assert first.prefix_length(4) == 5 and plain.prefix_length(4) == 4
    ids, mask = first.prompt_ids([[5, 7, 8], [9]])
    np.testing.assert_array_equal(ids, [[7, 8], [0, 9]])
    np.testing.assert_array_equal(mask, [[1, 1], [0, 1]])
    # training: the BOS the tokenizer adds goes where it is first; a BOS is given where it adds none
    assert first.training_row([5, 7, 8], 2, True) == ([7, 8], 1)
    assert plain.training_row([7, 8], 0, False) == ([5, 7, 8], 1)
    assert plain.training_row([5, 7, 8], 0, False) == ([5, 7, 8], 0)
    assert plain.training_row([7, 8], 1, True) == ([7, 8], 1)
    ids, mask, labels = plain.teacher_forced([[5, 7, 8], [5, 9]], [1, 1])
    np.testing.assert_array_equal(labels, [[-100, 7, 8], [-100, 9, -100]])
    text = plain.text_inputs(None, 3, [[101, 4, 102], [101, 102]], question_pad=0)
    np.testing.assert_array_equal(text.input_ids, [[5]] * 3)
    np.testing.assert_array_equal(text.qformer_input_ids, [[101, 4, 102], [101, 102, 0]])
    np.testing.assert_array_equal(text.qformer_attention_mask, [[1, 1, 1], [1, 1, 0]])
