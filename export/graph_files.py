"""Writing an ONNX graph to an export folder: its weights inline, or past `EXTERNAL_OVER` bytes in
`<graph>.onnx.data` beside it (protobuf cannot hold a file over 2 GB). No torch import."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

EXTERNAL_OVER = 1800 * 1024**2


def weight_bytes(model) -> int:
    """Bytes of a graph's initializers, as stored (quantised weights: packed ints and scales)."""
    import onnx

    return sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in model.graph.initializer)


def save_graph(model, path: Path, external_over: int = EXTERNAL_OVER) -> int:
    """Writes `model` to `path`, replacing the graph and any data file there; returns its weight bytes.
    The files are written in a folder beside it, then moved in: onnx appends to an existing data file."""
    import onnx

    size = weight_bytes(model)
    external = size > external_over
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        onnx.save(model, str(Path(tmp) / path.name), save_as_external_data=external, all_tensors_to_one_file=True,
                  location=path.name + ".data" if external else None)
        for old in (path, path.with_name(path.name + ".data")):
            old.unlink(missing_ok=True)
        for f in Path(tmp).iterdir():
            shutil.move(str(f), str(path.parent / f.name))
    return size
