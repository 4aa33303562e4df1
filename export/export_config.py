"""The export format: what `blip2rt export` writes beside its graphs, and the one place that writes
and reads it.

An export folder holds the graphs named in `graphs`, the LLM's `tokenizer.json`, the embedding
table `embed_tokens.npy` (decoder-only LLMs, for the decode step's input), the Q-Former's
`qformer_tokenizer.json` (exports whose soft prompt reads the question), `blip2rt_export.json` (this
config) and `manifest.json` (versions, every graph's I/O, what was fused or quantised: for people,
not read back).

Versions: 1, exports before this module, carried "format": 1 and left out keys that later exports
added (the BOS before the soft prompt, the image normalisation, the question in the Q-Former, the
LLM weights' precision). `read` upgrades them in one step (`_upgrade_v1`); what cannot be upgraded
(a T5 export without its decoder-with-past graph) is refused with the command that re-exports it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from blip2rt.errors import CheckpointError
from blip2rt.front_end import PromptLayout
from blip2rt.images import CLIP_MEAN, CLIP_STD
from blip2rt.json_files import read_json

VERSION = 2
CONFIG_FILE = "blip2rt_export.json"
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
QFORMER_TOKENIZER_FILE = "qformer_tokenizer.json"
EMBEDDINGS_FILE = "embed_tokens.npy"
REEXPORT = "export it again with `blip2rt export --model MODEL --out FOLDER`"


def kv_names(prefix: str, layers: int) -> list[str]:
    """The graphs' cache I/O names, e.g. past.0.key, past.0.value, past.1.key, ..."""
    return [f"{prefix}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


@dataclass
class ExportConfig:
    """blip2rt_export.json: what the runtime needs to run an export without the model's code."""

    dtype: str  # "fp32" | "fp16": the graphs' activations (and weights, unless quantised)
    image_size: int
    image_mean: list[float]
    image_std: list[float]
    num_query_tokens: int
    encoder_decoder: bool
    model_type: str  # the LLM's (transformers' model_type)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    bos_token_id: int | None
    bos_before_soft_prompt: bool
    eos_token_id: int | list[int] | None
    pad_token_id: int  # what finished rows are padded with
    decoder_start_token_id: int | None
    tokenizer_prepend_ids: list[int]  # what transformers' tokenizer adds around tokenizer.json's output
    tokenizer_append_ids: list[int]
    tokenizer_pad_id: int  # what prompts are padded with
    question_in_qformer: bool
    graphs: dict[str, str]  # key (vision, prefill, decode, static_lm, encoder, decoder, ...) -> file name
    llm_weights: dict = field(default_factory=dict)  # {"format": "fp32" | "fp16" | "int8" | "int4", ...}
    max_positions: int | None = None  # the LLM's position ids stay below this (None: no table bounds them)
    version: int = VERSION

    def __post_init__(self):
        if not self.llm_weights:
            self.llm_weights = {"format": self.dtype}

    # -- what the config implies ----------------------------------------------------------------

    @property
    def past_names(self) -> list[str]:
        return kv_names("past", self.num_layers)

    @property
    def present_names(self) -> list[str]:
        return kv_names("present", self.num_layers)

    @property
    def cross_names(self) -> list[str]:
        return kv_names("cross", self.num_layers)

    @property
    def eos_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos or [])

    @property
    def prompt_layout(self) -> PromptLayout:
        return PromptLayout(self.encoder_decoder, self.bos_token_id, self.tokenizer_pad_id,
                            self.bos_before_soft_prompt)

    @property
    def llm_graphs(self) -> list[str]:
        """The graph keys that run the LLM (what quantisation rewrites)."""
        return [key for key in self.graphs if key not in ("vision", "reorder_kv")]

    def __getitem__(self, key: str):
        """Read access by the JSON's key names, as callers of the plain dict had it."""
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default=None):
        return getattr(self, key) if key in self.keys() else default

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    @staticmethod
    def keys() -> list[str]:
        return [f.name for f in dataclasses.fields(ExportConfig)]

    # -- the file ------------------------------------------------------------------------------

    def write(self, folder: str | Path) -> Path:
        """blip2rt_export.json in `folder`, written whole (a temporary file renamed over it)."""
        path = Path(folder) / CONFIG_FILE
        data = dataclasses.asdict(self)
        data["format_version"] = data.pop("version")
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, folder: str | Path) -> ExportConfig:
        """The config of the export in `folder`; an older format upgraded, a newer or broken one
        refused with a message that says what to do."""
        folder = Path(folder)
        path = folder / CONFIG_FILE
        if not path.is_file():
            raise CheckpointError(f"{folder} is not a blip2rt export folder (no {CONFIG_FILE}); write one with "
                                  "`blip2rt export`")
        data = read_json(path, "export config", CheckpointError)
        version = data.pop("format_version", None) or data.pop("format", None)
        if version == 1:
            data = _upgrade_v1(data, folder)
        elif version != VERSION:
            raise CheckpointError(f"{path} is export format {version!r}; this blip2rt reads formats 1 and {VERSION}: "
                                  f"use the blip2rt that wrote it, or {REEXPORT}")
        known = set(cls.keys()) - {"version"}
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name in known and f.default is dataclasses.MISSING and f.name not in data)
        if missing:
            raise CheckpointError(f"{path} lacks {', '.join(missing)}: not a complete blip2rt export; {REEXPORT}")
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"{path} has keys this blip2rt does not know ({', '.join(unknown)}); {REEXPORT}")
        return cls(**data)


def _upgrade_v1(data: dict, folder: Path) -> dict:
    """Format 1 -> 2: the keys later exports added, with the values the exports before them had."""
    if data.get("encoder_decoder") and "decoder_with_past" not in data.get("graphs", {}):
        raise CheckpointError(f"{folder} was exported by an older blip2rt (no decoder_with_past graph); {REEXPORT}")
    data = dict(data)
    data.setdefault("bos_before_soft_prompt", False)
    data.setdefault("image_mean", list(CLIP_MEAN))  # exports before it normalised as CLIP does
    data.setdefault("image_std", list(CLIP_STD))
    data.setdefault("question_in_qformer", False)
    if not data.get("llm_weights"):
        data["llm_weights"] = {"format": data.get("dtype", "fp32")}
    return data
