"""The `blip2rt` command line: outputs, --help, and exit code 2 with one line on bad input."""

import json

import pytest
import torch
from PIL import Image

from blip2rt.cli import main


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 160, 0)]):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (40, 40), colour).save(p)
        paths.append(str(p))
    return paths


def test_caption_json(images, capsys):
    assert main(["caption", "--model", "tiny", "--json", "--num-beams", "1", "--max-new-tokens", "4",
                 "--batch-size", "2", *images]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in out] == images
    assert all(isinstance(r["caption"], str) for r in out)


def test_vqa_text_lines(images, capsys):
    assert main(["vqa", "--model", "tiny", "--question", "what colour?", "--num-beams", "1", images[0]]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(images[0] + "\t")


def test_static_cache_captions_equal_and_onnx_says_which_graphs(images, tmp_path, capsys):
    torch.manual_seed(0)
    from blip2rt import from_pretrained

    from_pretrained("tiny").save_pretrained(tmp_path / "tiny")
    common = ["--json", "--num-beams", "1", "--max-new-tokens", "6", *images]
    runs = {}
    for name, extra in (("torch", []), ("torch-static", ["--static-cache"])):
        assert main(["caption", "--model", str(tmp_path / "tiny"), *extra, *common]) == 0
        runs[name] = json.loads(capsys.readouterr().out)
    assert main(["export", "--model", str(tmp_path / "tiny"), "--out", str(tmp_path / "onnx")]) == 0
    assert "static_lm" in capsys.readouterr().out
    for name, extra, graphs in (("onnx", [], "dynamic"), ("onnx-static", ["--static-cache"], "static")):
        assert main(["caption", "--model", str(tmp_path / "onnx"), "--backend", "onnx", *extra, *common]) == 0
        captured = capsys.readouterr()
        runs[name] = json.loads(captured.out)
        assert f"onnx runtime: {graphs} graphs" in captured.err
    assert all(run == runs["torch"] for run in runs.values()), runs


def test_retrieve_ranks_every_text(images, capsys):
    assert main(["retrieve", "--model", "tiny", "--json", "--text", "red", "--text", "blue", "--text", "green",
                 images[0]]) == 0
    ranking = json.loads(capsys.readouterr().out)[0]["ranking"]
    assert sorted(r["text"] for r in ranking) == ["blue", "green", "red"]
    assert [r["score"] for r in ranking] == sorted((r["score"] for r in ranking), reverse=True)


@pytest.mark.parametrize("argv, reason", [
    (["caption", "--model", "tiny", "missing.png"], "image missing.png does not exist"),
    (["caption", "--model", "no-such-model", "IMG"], "is not a path that exists nor a preset"),
    (["caption", "--model", "tiny", "--device", "cuda:7", "IMG"], "CUDA is not available"),
    (["caption", "--model", "tiny", "--batch-size", "0", "IMG"], "--batch-size must be at least 1"),
    (["caption", "--model", "tiny", "--static-cache", "IMG"], "num_beams=5 needs static_cache=False"),
    (["caption", "--model", "tiny", "--compile", "--num-beams", "1", "IMG"], "give --static-cache too"),
])
def test_bad_input_exits_2_with_one_line(argv, reason, images, capsys):
    argv = [images[0] if a == "IMG" else a for a in argv]
    if "cuda:7" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and reason in err


def test_corrupt_image_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    assert main(["caption", "--model", "tiny", str(bad)]) == 2
    assert "bad.png" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["caption", "vqa", "retrieve", "demo"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: blip2rt " + command in capsys.readouterr().out
