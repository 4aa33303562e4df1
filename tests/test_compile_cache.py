"""torch.compile's disk caches keyed on the fused ops' code (blip2rt.kernels.compile_cache): a changed
backward formula must not be replayed from a warm cache."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blip2rt.kernels import compile_cache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_tag():
    before = torch.compiler.config.cache_key_tag
    yield
    torch.compiler.config.cache_key_tag = before


def test_importing_the_kernels_tags_torch_compile_caches_with_their_digest():
    assert (compile_cache.TAG_PREFIX + compile_cache.source_digest()) in torch.compiler.config.cache_key_tag.split("|")


def test_the_digest_follows_every_kernel_source(tmp_path):
    copy = tmp_path / "kernels"
    shutil.copytree(compile_cache.KERNELS_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert compile_cache.source_digest(copy) == compile_cache.source_digest()
    for name in ("post_ln_residual.py", "dispatch.py"):
        path = copy / name
        original = path.read_bytes()
        path.write_bytes(original + b"\n# one more line\n")
        assert compile_cache.source_digest(copy) != compile_cache.source_digest(), name
        path.write_bytes(original)
    (copy / "new_op.py").write_text("")
    assert compile_cache.source_digest(copy) != compile_cache.source_digest()


def test_a_users_tag_is_kept_and_an_older_digest_replaced(tmp_path, restore_tag):
    ours = compile_cache.TAG_PREFIX + compile_cache.source_digest()
    torch.compiler.config.cache_key_tag = f"mine|{compile_cache.TAG_PREFIX}0123456789abcdef"
    assert compile_cache.tag_compile_caches() == f"mine|{ours}"
    assert compile_cache.tag_compile_caches() == f"mine|{ours}"  # once only


SCRIPT = """
import sys
import torch
from blip2rt.kernels import compile_cache

scale, source_dir = float(sys.argv[1]), sys.argv[2]
compile_cache.tag_compile_caches(source_dir)


@torch.library.custom_op("blip2rt_test::scaled_grad", mutates_args=())
def scaled_grad(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@scaled_grad.register_fake
def _(x):
    return torch.empty_like(x)


scaled_grad.register_autograd(lambda ctx, grad: scale * grad)
x = torch.ones(3, requires_grad=True)
torch.compile(lambda t: torch.ops.blip2rt_test.scaled_grad(t) * 2)(x).sum().backward()
print(x.grad[0].item())
"""


@pytest.mark.slow
def test_a_changed_backward_formula_is_compiled_again_not_replayed(tmp_path):
    """Two processes share one inductor cache; the second registers another backward formula for the same
    op. With the digest of the code that holds the formula in the tag, the second compiles its own."""
    sources = tmp_path / "ops"
    sources.mkdir()
    env = dict(__import__("os").environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))

    def grad(scale: float) -> float:
        (sources / "op.py").write_text(f"SCALE = {scale}\n")  # the formula's code, as a kernels file would hold it
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(scale), str(sources)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return float(proc.stdout.strip().splitlines()[-1])

    assert grad(1.0) == 2.0
    assert grad(3.0) == 6.0
