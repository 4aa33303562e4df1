"""ONNX export and the ONNX Runtime pipeline. Not built yet."""
