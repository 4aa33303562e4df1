"""The one JSON reader: a missing file, a folder and malformed JSON each get their own clear error."""

import pytest

from blip2rt.errors import Blip2rtError, CheckpointError
from blip2rt.json_files import read_json


def test_valid_missing_folder_and_malformed(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"a": [1, 2]}')
    assert read_json(good, "config file") == {"a": [1, 2]}
    with pytest.raises(Blip2rtError, match=r"annotation file .*nope\.json does not exist"):
        read_json(tmp_path / "nope.json", "annotation file")
    with pytest.raises(CheckpointError, match="is a folder, not a JSON file"):
        read_json(tmp_path, "export config", CheckpointError)
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": ')
    with pytest.raises(Blip2rtError, match=r"bad\.json is not valid JSON \(Expecting value"):
        read_json(bad, "benchmark run")
