"""Generation defaults shared by the PyTorch model and the ONNX Runtime pipeline (no torch import)."""

CAPTION_DEFAULTS = dict(num_beams=5, max_new_tokens=30, min_new_tokens=8)  # BLIP-2: beam 5, length 8-30
VQA_DEFAULTS = dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)
VQA_PROMPT = "Question: {} Answer:"
DEFAULT_MAX_NEW_TOKENS = 30
