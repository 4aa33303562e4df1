"""The fused kernels' dropout seeds, kept on the device: nothing is read back to the host per call.

Each device holds one (2,) int64 tensor: a base seed and a count of the draws so far. A fused call
with dropout takes `draw(device)`: a (1,) int64 tensor holding this call's seed, a function of the
base and the count, made by a few device ops that also advance the count. The kernels load their
seed from it; the residual LayerNorm's backward reloads the same tensor, so it draws the forward's
mask again (the attention's forward keeps its mask as bits for its backward instead).

Why on the device: a seed drawn on the host (`.item()`) waits for the device, and a CUDA graph would
bake that one seed into every replay, so every replay would drop the same activations. Here the
draw is part of the captured work, as torch's own CUDA generator advances its offset under graph
capture: each replay draws the next seed.

The state is seeded from torch's CPU generator on first use (so `torch.manual_seed` fixes it), and
the trainer's checkpoints save and restore it (`state_dict` / `load_state_dict`), so a resumed run
draws the masks an uninterrupted one would.
"""

from __future__ import annotations

import torch

# Weyl-sequence increment (2^31 / golden ratio, odd): call seeds walk every residue mod 2^31
_STRIDE = 1327217885
_MOD = 2**31 - 1  # tl.rand takes a 31-bit seed
_STATES: dict[torch.device, torch.Tensor] = {}


def _key(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def state(device: torch.device | str) -> torch.Tensor:
    """The device's (2,) int64 state: [base seed, draws so far]."""
    device = _key(device)
    if device not in _STATES:
        base = torch.randint(0, _MOD, (1,), dtype=torch.int64)  # the CPU generator: manual_seed fixes it
        _STATES[device] = torch.cat([base, torch.zeros(1, dtype=torch.int64)]).to(device)
    return _STATES[device]


def draw(device: torch.device | str) -> torch.Tensor:
    """This call's seed, (1,) int64 on `device`, and the state advanced: device work only. On a GPU
    that is one small kernel (`draw_kernel`); elsewhere a few torch ops, which give the same seeds."""
    s = state(device)
    if s.is_cuda:
        return draw_in_kernel(s)
    seed = (s[:1] + (s[1:] % _MOD) * _STRIDE) % _MOD  # the count reduced first: no int64 overflow
    s[1:] += 1
    return seed


_DRAWS: dict[torch.device, object] = {}  # launch.Planned per device


def draw_in_kernel(s: torch.Tensor) -> torch.Tensor:
    """`draw` as one launch: a call's seed from the (2,) state, and the count advanced (on the CPU,
    in Triton's interpreter: the tests compare it with the torch ops)."""
    planned = _DRAWS.get(s.device)
    if planned is None:
        from .dropout_draw import draw_kernel
        from .launch import Planned

        planned = _DRAWS[s.device] = Planned(draw_kernel, (1,), dict(STRIDE=_STRIDE, MOD=_MOD, num_warps=1))
    seed = torch.empty(1, dtype=torch.int64, device=s.device)
    planned(s, seed)
    return seed


def fixed(seed: int, device: torch.device | str) -> torch.Tensor:
    """A given seed as the kernels take it (tests and the keep-mask helpers fix the mask this way)."""
    return torch.tensor([int(seed) % _MOD], dtype=torch.int64, device=device)


def call_seed(seed: int | torch.Tensor | None, device: torch.device | str) -> torch.Tensor:
    """What a fused call passes its kernels: a drawn seed (None), a given one (an int), or a seed
    tensor as it is."""
    if seed is None:
        return draw(device)
    if isinstance(seed, torch.Tensor):
        return seed
    return fixed(seed, device)


def state_dict() -> dict[str, torch.Tensor]:
    """Every device's state, on the CPU, by device name: what a checkpoint keeps."""
    return {str(d): s.detach().cpu().clone() for d, s in _STATES.items()}


def load_state_dict(saved: dict[str, torch.Tensor]) -> None:
    """Restores states saved by `state_dict` (for the devices this machine has), and forgets the
    others, which then start afresh from torch's CPU generator (itself restored by the caller)."""
    _STATES.clear()
    for name, s in saved.items():
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            continue
        _STATES[_key(device)] = s.to(device=device, dtype=torch.int64).clone()


def reset() -> None:
    """Forget every state (the next draw seeds afresh from torch's CPU generator)."""
    _STATES.clear()
