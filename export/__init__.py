"""ONNX export and the ONNX Runtime pipeline.

- `export_model(model, out_dir)` (PyTorch side) writes the graphs, tokenizer and manifest;
- `OrtBlip2(export_dir)` (deployment side) runs them with onnxruntime, numpy and tokenizers only.
Names load on first use, so importing OrtBlip2 never imports torch or blip2rt's model code.
"""

from blip2rt.lazy import lazy_attributes

_LAZY = {"OrtBlip2": ".ort_runtime", "export_model": ".onnx_export", "check_export": ".check"}

__all__ = list(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY)
