"""Tokenizers: the LLM's and the Q-Former's (BERT WordPiece + [DEC]), read from checkpoint folders.

A Hugging Face Blip2 folder holds one tokenizer at its root: the LLM's for
Blip2ForConditionalGeneration, BERT's for Blip2ForImageTextRetrieval. A model with both keeps
the Q-Former's in `qformer_tokenizer/`. The `tiny` preset has character-level tokenizers built
here, so the no-weights pipeline can run end to end without any file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .errors import CheckpointError, InputError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model")
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"
QFORMER_MAX_TEXT_TOKENS = 32  # the Q-Former's text is truncated here (BLIP-2 pre-training's length)

_TINY_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 .,?!'-:")
_TINY_LLM_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
_TINY_QFORMER_SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[DEC]"]
TINY_VOCAB_SIZE = len(_TINY_CHARS) + 5


def has_tokenizer_files(folder: str | Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any((folder / f).exists() for f in TOKENIZER_FILES)


def load_tokenizer(folder: str | Path):
    """transformers' AutoTokenizer on a local folder; a clear error if it cannot be read."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many types here; the reason is in the message
        raise CheckpointError(f"could not load the tokenizer in {folder}: {e}") from None



def _char_tokenizer(specials: list[str], template: str, template_specials: list[tuple[str, int]]):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(specials + _TINY_CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[3]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=template_specials)
    return tok


def tiny_llm_tokenizer():
    """Character-level tokenizer of the `tiny` preset's LLM: <s> prepended, like Llama/OPT."""
    from transformers import PreTrainedTokenizerFast

    tok = _char_tokenizer(_TINY_LLM_SPECIALS, "<s> $A", [("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", mask_token="<mask>")


def tiny_qformer_tokenizer():
    """Character-level stand-in for BERT WordPiece: [CLS] text [SEP], with [DEC] as bos."""
    from transformers import PreTrainedTokenizerFast

    tok = _char_tokenizer(_TINY_QFORMER_SPECIALS, "[CLS] $A [SEP]", [("[CLS]", 1), ("[SEP]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                   unk_token="[UNK]", bos_token="[DEC]")


def qformer_text_ids(tokenizer, texts):
    """The Q-Former's WordPiece ids and mask (B, T) of texts, right-padded and truncated at
    QFORMER_MAX_TEXT_TOKENS; or of an already tokenized mapping (input_ids, attention_mask). torch."""
    import torch

    if isinstance(texts, Mapping):
        ids = torch.as_tensor(texts["input_ids"])
        mask = torch.as_tensor(texts["attention_mask"]) if "attention_mask" in texts else torch.ones_like(ids)
        return ids, mask
    if isinstance(texts, str):
        texts = [texts]
    if tokenizer is None:
        raise InputError("this model has no Q-Former tokenizer; pass texts as a tokenized mapping "
                         "(input_ids, attention_mask) or load a checkpoint folder with tokenizer files")
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=QFORMER_MAX_TEXT_TOKENS,
                    return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]
