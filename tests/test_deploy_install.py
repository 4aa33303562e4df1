"""The deployment install: blip2rt with --no-deps plus onnxruntime, numpy, tokenizers and Pillow in a
fresh venv (README's recipe) captions with an exported model, and torch is never imported."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import blip2rt
from blip2rt.export import OrtBlip2, export_model

REPO = Path(__file__).resolve().parents[1]
RUNTIME_DEPS = ["onnxruntime", "numpy", "tokenizers", "pillow"]  # README's deployment recipe

CODE = r"""
import sys
import numpy as np
from PIL import Image
from blip2rt.export import OrtBlip2

export, photo = sys.argv[1], sys.argv[2]
rt = OrtBlip2(export, providers=["CPUExecutionProvider"])
print(repr(rt.caption([photo], num_beams=1, max_new_tokens=4)))
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "triton", "safetensors"})
assert not heavy, heavy
try:
    import torch  # noqa: F401
    raise SystemExit("torch is installed in the deployment venv")
except ImportError:
    pass
"""


def run(cmd, **kw):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert done.returncode == 0, f"{cmd}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_the_runtime_installs_and_captions_without_torch(tmp_path):
    out = tmp_path / "export"
    export_model(blip2rt.from_pretrained("tiny", device="cpu"), out)
    photo = tmp_path / "photo.png"
    from PIL import Image
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(photo)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    run(pip + ["-c", str(REPO / "constraints" / "cpu.txt"), *RUNTIME_DEPS], env=env)
    run(pip + ["--no-deps", str(REPO)], env=env, cwd=tmp_path)
    got = run([str(py), "-c", CODE, str(out), str(photo)], env=env, cwd=tmp_path)

    # the same caption as the runtime in this (full) install
    want = OrtBlip2(out, providers=["CPUExecutionProvider"]).caption([str(photo)], num_beams=1, max_new_tokens=4)
    assert got.strip() == repr(want)
