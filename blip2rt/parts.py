"""The named parts of a BLIP-2 model, by parameter name, and which of them each training stage
trains: the one place that says what is frozen, trainable or used by the Q-Former's text path.
`Blip2.part_of`, `Blip2.trainable_names` and the checkpoint loaders all read it.

    vision_encoder       the frozen image encoder (all of the ViT but ln_vision)
    ln_vision            the LayerNorm on the ViT's output (BLIP-2 trains it with the Q-Former)
    query_tokens         the learned queries
    qformer              the Q-Former's layers, but for their text feed-forward
    qformer_text_ffn     each layer's feed-forward for text positions (`intermediate` / `output`)
    text_embeddings      the Q-Former's word and position embeddings
    retrieval_heads      ITC projections, ITC temperature, ITM head
    itg_head             the ITG language-model head (its decoder is tied to the word embeddings)
    language_projection  Q-Former output -> the LLM's width (the soft prompt)
    llm                  the frozen language model

InstructBLIP has every part but the two heads (STAGE1_HEADS): its Q-Former reads the instruction
through the text embeddings and the text feed-forward. transformers names the text embeddings and
the Q-Former's embedding LayerNorm under `qformer.embeddings.` (blip2rt.instructblip maps them).
"""

from __future__ import annotations

import re

# The text-only feed-forward of a Q-Former layer (not the attention outputs, not the query FFN).
_TEXT_FFN = re.compile(r"^qformer\.encoder\.layer\.(\d+)\.(intermediate|output)\.")
_PREFIXES = (  # (part, parameter-name prefixes); the text FFN is told apart first
    ("vision_encoder", ("vision_model.embeddings.", "vision_model.encoder.")),
    ("ln_vision", ("vision_model.post_layernorm.",)),
    ("query_tokens", ("query_tokens",)),
    ("qformer", ("qformer.",)),
    ("text_embeddings", ("embeddings.",)),
    ("retrieval_heads", ("vision_projection.", "text_projection.", "itm_head.", "temp")),
    ("itg_head", ("itg_head.",)),
    ("language_projection", ("language_projection.",)),
    ("llm", ("language_model.",)),
)
PARTS = ("vision_encoder", "ln_vision", "query_tokens", "qformer", "qformer_text_ffn", "text_embeddings",
         "retrieval_heads", "itg_head", "language_projection", "llm")
FROZEN = frozenset({"vision_encoder", "llm"})
# What only the Q-Former's text path uses: absent from a model built without it (stage 2).
TEXT_ONLY = frozenset({"qformer_text_ffn", "text_embeddings", "retrieval_heads", "itg_head"})
# Stage 1's heads. InstructBLIP is every other part: the Q-Former reads the instruction through its
# text embeddings and text FFN, and has no heads (blip2rt.instructblip).
STAGE1_HEADS = frozenset({"retrieval_heads", "itg_head"})

STAGE1, STAGE2, VQA = 1, 2, 3
STAGE_NAMES = {STAGE1: "stage1", STAGE2: "stage2", VQA: "vqa"}  # as `blip2rt train NAME` and checkpoints say
# the stages whose model reads the question (or instruction) in its Q-Former
QUESTION_IN_QFORMER = frozenset({VQA})
STAGE_PARTS = {
    # representation learning: ITC, ITM and ITG, the text path included
    STAGE1: frozenset({"ln_vision", "query_tokens", "qformer", "qformer_text_ffn", "text_embeddings",
                       "retrieval_heads", "itg_head"}),
    # generative learning: no text in the Q-Former
    STAGE2: frozenset({"ln_vision", "query_tokens", "qformer", "language_projection"}),
    # VQA fine-tuning (BLIP-2 §4.2): the question enters the Q-Former, so its text path trains too,
    # but for the last layer's text FFN, whose output nothing reads. The ViT stays frozen here (the
    # paper also tunes it), and so does the LLM; the retrieval and ITG heads are not used.
    VQA: frozenset({"ln_vision", "query_tokens", "qformer", "qformer_text_ffn", "text_embeddings",
                    "language_projection"}),
}


def part_of(name: str) -> str:
    """The part a parameter (or state-dict key) belongs to."""
    if _TEXT_FFN.match(name):
        return "qformer_text_ffn"
    for part, prefixes in _PREFIXES:
        if name.startswith(prefixes):
            return part
    raise KeyError(f"{name!r} belongs to no part of a BLIP-2 model")


def prefixes(parts) -> tuple[str, ...]:
    """The parameter-name prefixes of these parts (the Q-Former text FFN, found by pattern, has none)."""
    return tuple(p for part, ps in _PREFIXES if part in parts for p in ps)


def is_text_only(name: str) -> bool:
    try:
        return part_of(name) in TEXT_ONLY
    except KeyError:
        return False


def trains_in(name: str, stage: int, num_layers: int) -> bool:
    """Whether `stage` trains this parameter (num_layers: the Q-Former's)."""
    part = part_of(name)
    if part not in STAGE_PARTS[stage]:
        return False
    if stage == VQA and part == "qformer_text_ffn":
        return int(_TEXT_FFN.match(name).group(1)) != num_layers - 1
    return True


def stage_number(name: str) -> int:
    """1, 2 or 3 for a stage's name ("stage1", "stage2", "vqa")."""
    for number, n in STAGE_NAMES.items():
        if n == name:
            return number
    raise KeyError(f"no training stage is named {name!r}; the stages are {', '.join(STAGE_NAMES.values())}")
