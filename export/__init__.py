"""ONNX export and the ONNX Runtime pipeline.

- `export_model(model, out_dir)` (PyTorch side) writes the graphs, tokenizer and manifest;
- `OrtBlip2(export_dir)` (deployment side) runs them with onnxruntime, numpy and tokenizers only.
Names load on first use, so importing OrtBlip2 never imports torch or blip2rt's model code.
"""

from importlib import import_module

_LAZY = {"OrtBlip2": ".ort_runtime", "export_model": ".onnx_export", "check_export": ".check"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'blip2rt.export' has no attribute {name!r}")
