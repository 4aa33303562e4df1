"""The deployment install: blip2rt with --no-deps plus onnxruntime, numpy, tokenizers and Pillow in a
fresh venv (README's recipe) runs every ORT path of an export (dynamic and static graphs, answer()
with and without the question in the Q-Former, int4 weights), and torch is never imported. With
FastAPI and uvicorn beside them (the serve extra), `blip2rt serve` starts and answers a request."""

import json
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
SERVE_DEPS = ["fastapi", "uvicorn"]  # the serve extra

CODE = r"""
import json
import sys

from blip2rt.export import OrtBlip2

export, vqa_export, int4_export, photo = sys.argv[1:5]
cpu = ["CPUExecutionProvider"]
gen = dict(num_beams=1, max_new_tokens=4)
out = {}
rt = OrtBlip2(export, providers=cpu, static_cache=False)
out["dynamic caption"] = rt.caption([photo], **gen)
out["dynamic search"] = rt.last_search
rt = OrtBlip2(export, providers=cpu, static_cache=True)
out["static caption"] = rt.caption([photo, photo], **gen)
out["static search"] = rt.last_search
out["answer"] = rt.answer([photo], ["what is in the picture?"], **gen)
vqa = OrtBlip2(vqa_export, providers=cpu)
out["question in the Q-Former"] = vqa.question_in_qformer
out["conditioned answer"] = vqa.answer([photo, photo], ["what colour is it?", "is there a circle?"], **gen)
int4 = OrtBlip2(int4_export, providers=cpu)
out["int4 weights"] = int4.llm_weights["format"]
out["int4 caption"] = int4.caption([photo], **gen)
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "triton", "safetensors"})
assert not heavy, heavy
try:
    import torch  # noqa: F401
    raise SystemExit("torch is installed in the deployment venv")
except ImportError:
    pass
print(json.dumps(out))
"""


def run(cmd, **kw):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert done.returncode == 0, f"{cmd}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def expected(export: Path, vqa_export: Path, int4_export: Path, photo: str) -> dict:
    """What the same calls give in this (full) install."""
    cpu = ["CPUExecutionProvider"]
    gen = dict(num_beams=1, max_new_tokens=4)
    static = OrtBlip2(export, providers=cpu, static_cache=True)
    vqa = OrtBlip2(vqa_export, providers=cpu)
    return {"dynamic caption": OrtBlip2(export, providers=cpu, static_cache=False).caption([photo], **gen),
            "dynamic search": "dynamic",
            "static caption": static.caption([photo, photo], **gen), "static search": "static",
            "answer": static.answer([photo], ["what is in the picture?"], **gen),
            "question in the Q-Former": True,
            "conditioned answer": vqa.answer([photo, photo], ["what colour is it?", "is there a circle?"], **gen),
            "int4 weights": "int4",
            "int4 caption": OrtBlip2(int4_export, providers=cpu).caption([photo], **gen)}


@pytest.mark.slow
def test_the_runtime_installs_and_runs_every_path_without_torch(tmp_path):
    """Dynamic and static-graph captions, answer() with the question in the LLM's prompt and in the
    Q-Former's graph, and an int4 export's caption: in the torch-free venv, equal to this install's."""
    from blip2rt.export.quantize import quantize_export

    out = tmp_path / "export"
    export_model(blip2rt.from_pretrained("tiny", device="cpu"), out)
    vqa_model = blip2rt.from_pretrained("tiny", device="cpu", seed=1)
    vqa_model.config.question_in_qformer = True
    export_model(vqa_model, tmp_path / "vqa_export")
    quantize_export(out, "int4", to=tmp_path / "int4_export")
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
    exports = [str(out), str(tmp_path / "vqa_export"), str(tmp_path / "int4_export")]
    got = json.loads(run([str(py), "-c", CODE, *exports, str(photo)], env=env, cwd=tmp_path).strip().splitlines()[-1])
    assert got == expected(*map(Path, exports), str(photo))

    run(pip + ["-c", str(REPO / "constraints" / "cpu.txt"), *SERVE_DEPS], env=env)
    answer = serve_one_request(venv / "bin" / "blip2rt", exports[0], photo, env, tmp_path)
    want = OrtBlip2(exports[0], providers=["CPUExecutionProvider"]).answer(
        [str(photo)], ["what is in the picture?"], num_beams=1, max_new_tokens=5, min_new_tokens=1)
    assert answer == want[0]


def serve_one_request(blip2rt_cli: Path, export: str, photo: Path, env: dict, cwd: Path) -> str:
    """`blip2rt serve EXPORT` in the venv; one chat completion over loopback; then SIGTERM."""
    import base64
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(blip2rt_cli), "serve", export, "--port", str(port), "--provider", "cpu"],
                            env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                urllib.request.urlopen(url + "/health", timeout=1).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        image = "data:image/png;base64," + base64.b64encode(photo.read_bytes()).decode()
        body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is in the picture?"},
                                                          {"type": "image_url", "image_url": {"url": image}}]}],
                "max_tokens": 5}
        req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            reply = json.loads(r.read())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return reply["choices"][0]["message"]["content"]
