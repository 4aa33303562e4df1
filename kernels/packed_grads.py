"""Per-part views of one packed projection whose grads land in one packed tensor, with no copy where the
fused attention writes them.

The Q-Former projects several tensors with one GEMM: q, k and v of a self-attention, and k and v of
every cross-attention layer (one GEMM over the image tokens). Each attention then reads its parts as
strided views. Under autograd, `unbind`'s backward stacks the parts' grads into the packed shape: a
copy of every byte of them, per layer and again for the layers (at the paper's shapes and B = 128,
about 600 MB each way for the image K/V).

`split_packed(packed)` returns the same views, as one autograd node. Its backward owns one grad
tensor of the packed shape. The fused attention's backward asks `grad_slot` for the grad of each
part it reads: where the part came from `split_packed`, it gets that part's slice of the shared
grad tensor, and its kernel writes there. The node's backward then finds its parts' grads already
in place and returns the tensor as it is. A part whose grad came from elsewhere (the torch path, a
sum of two uses) is copied into its slice; a part with no grad gets zeros. Under torch.compile, or
without grad, it is a plain `unbind`.
"""

from __future__ import annotations

import weakref

import torch

# (data_ptr, storage_offset, shape, strides) of a part -> (its split's shared state, part index)
_PARTS: dict[tuple, tuple["_Shared", int]] = {}
# parts whose grads the backward found written in place, and those it copied or zero-filled (for tests
# and profiling: a fused step should copy none)
COUNTS = {"in_place": 0, "copied": 0, "zeroed": 0}


class _Shared:
    """One split's grad tensor, allocated by whichever backward needs it first."""

    __slots__ = ("shape", "dtype", "device", "grad", "keys", "__weakref__")

    def __init__(self, packed: torch.Tensor):
        self.shape, self.dtype, self.device = packed.shape, packed.dtype, packed.device
        self.grad: torch.Tensor | None = None
        self.keys: list[tuple] = []

    def slot(self, index: int) -> torch.Tensor:
        if self.grad is None:
            self.grad = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self.grad.select(2, index)

    def forget(self) -> None:
        for key in self.keys:
            entry = _PARTS.get(key)
            if entry is not None and entry[0] is self:
                del _PARTS[key]
        self.keys.clear()


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


class _SplitPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, packed):
        shared = _Shared(packed)
        parts = packed.unbind(2)
        for i, part in enumerate(parts):
            key = _key(part)
            _PARTS[key] = (shared, i)
            shared.keys.append(key)
        ctx.shared = shared
        ctx.set_materialize_grads(False)  # an unused part's grad comes as None: zero-filled in place, not copied
        # the parts' keys hold until this node's backward, or until its graph is freed without one: the
        # packed tensor is saved with it meanwhile, so its memory (the keys' addresses) cannot go to
        # another tensor while they hold
        ctx.save_for_backward(packed)
        weakref.finalize(ctx, shared.forget)
        return parts

    @staticmethod
    def backward(ctx, *grads):
        shared = ctx.shared
        for i, g in enumerate(grads):
            slot = shared.slot(i)
            if g is None:
                slot.zero_()
                COUNTS["zeroed"] += 1
            elif g.data_ptr() != slot.data_ptr() or g.stride() != slot.stride():  # not written in place
                slot.copy_(g)
                COUNTS["copied"] += 1
            else:
                COUNTS["in_place"] += 1
        # the saved packed tensor is freed after this backward, so its parts' keys go now; a second backward
        # (retain_graph) finds none, and gets its grads copied into a new tensor
        shared.forget()
        out, shared.grad = shared.grad, None
        return out


def split_packed(packed: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """packed (B, L, P, H, d) -> P views (B, L, H, d): `packed.unbind(2)`, whose backward gathers the grads
    in one packed tensor without a copy where the fused attention wrote them (module docstring)."""
    if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and packed.requires_grad):
        return packed.unbind(2)
    return _SplitPacked.apply(packed)


def grad_slot(part: torch.Tensor) -> torch.Tensor:
    """Where the grad of `part` goes: its slice of the packed grad tensor if `part` came from
    `split_packed` (and its graph has not been freed), else a new tensor of its shape."""
    entry = _PARTS.get(_key(part)) if _PARTS else None
    if entry is None:
        return torch.empty(part.shape, dtype=part.dtype, device=part.device)
    shared, index = entry
    return shared.slot(index)
