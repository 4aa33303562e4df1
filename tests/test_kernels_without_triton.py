"""The torch path where Triton cannot be imported (macOS, Windows, or a Linux install without it):
the model builds, trains both stages (dropout on) and captions, and Triton is never imported."""

import subprocess
import sys

CODE = r"""
import sys
sys.modules["triton"] = None  # `import triton` now raises ImportError, as where it is not installed
import torch
import blip2rt
from blip2rt.errors import InputError
from blip2rt.training.stage1 import Stage1Batch, Stage1Objective
from blip2rt.training.stage2 import Stage2Batch, Stage2Objective

m = blip2rt.from_pretrained("tiny", device="cpu")  # kernels="auto"
assert m.kernel_backend == "torch", m.kernel_backend
try:
    blip2rt.from_pretrained("tiny", device="cpu", kernels="triton")
    raise SystemExit("kernels='triton' without Triton was accepted")
except InputError as e:
    assert "triton package" in str(e), e
m.train()
pixels = torch.randn(2, 3, 56, 56)
tok = m.qformer_tokenizer
enc = tok(["a red circle", "a big square"], padding="max_length", max_length=16, return_tensors="pt")
s1 = Stage1Objective(m, tok.convert_tokens_to_ids("[DEC]"), tok.pad_token_id)
losses = s1(Stage1Batch(enc["input_ids"], enc["attention_mask"], pixel_values=pixels))
losses["loss"].backward()
assert torch.isfinite(losses["loss"]) and m.query_tokens.grad is not None
ids = m.tokenizer(["a red circle", "a big square"], return_tensors="pt")  # equal lengths: no padding
out = Stage2Objective(m)(Stage2Batch(ids["input_ids"], ids["attention_mask"], ids["input_ids"], pixel_values=pixels))
out["loss"].backward()
assert torch.isfinite(out["loss"])
m.eval()
print(m.caption(pixels, max_new_tokens=3))
loaded = [name for name in sys.modules if name.split(".")[0] == "triton" and sys.modules[name] is not None]
assert not loaded, loaded
"""


def test_the_torch_path_runs_with_triton_unimportable():
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
