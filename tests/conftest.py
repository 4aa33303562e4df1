"""Test setup: Triton's interpreter on CPU-only machines, and tiny transformers Blip2 references.

TRITON_INTERPRET must be set before any @triton.jit function runs, so it is set here, first.
"""

import os
import sys
from pathlib import Path

# `python -m pytest` puts the repository root on sys.path, which would make our `kernels/` folder
# importable as a top-level `kernels` package, and transformers probes that name (its Hub kernels
# loader). blip2rt.kernels is reached through the installed package only.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from hf_reference import build_hf_folder  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def _hf_reference(kind: str):
    """A session fixture: a tiny transformers Blip2 of this kind, saved to a folder."""

    @pytest.fixture(scope="session")
    def fixture(tmp_path_factory):
        return build_hf_folder(tmp_path_factory.mktemp(f"hf_{kind}"), kind)

    return fixture


hf_opt = _hf_reference("opt")
hf_llama = _hf_reference("llama")
hf_t5 = _hf_reference("t5")
hf_retrieval = _hf_reference("retrieval")


def _hf_instructblip(kind: str):
    """A session fixture: a tiny transformers InstructBLIP of this LLM family, saved to a folder."""

    @pytest.fixture(scope="session")
    def fixture(tmp_path_factory):
        from hf_reference import build_instructblip_folder

        return build_instructblip_folder(tmp_path_factory.mktemp(f"hf_instruct_{kind}"), kind)

    return fixture


hf_instruct_llama = _hf_instructblip("llama")
hf_instruct_t5 = _hf_instructblip("t5")
