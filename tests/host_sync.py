"""A dispatch mode that fails on every op that makes the host wait for the device: what a training
step must not do, on a GPU, and what a CUDA graph cannot hold. On the CPU these ops cost nothing,
but they dispatch all the same, so the CPU tests catch them."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# ops whose result the host reads (a Python number or bool), or whose output size depends on the data
SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.unique_dim, aten._unique2,
           aten.unique_consecutive, aten.is_nonzero, aten.equal, aten.allclose}


class HostSyncError(AssertionError):
    pass


class NoHostSync(TorchDispatchMode):
    """`with NoHostSync():` raises HostSyncError naming the first op that would sync (`.item()`,
    `bool(t)`, `float(t)`, `nonzero`, data-dependent shapes, a copy to the CPU from a device)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if func.overloadpacket in SYNCING:
            raise HostSyncError(f"host sync: {func} (item(), bool(), float(), nonzero or a data-dependent shape)")
        if func.overloadpacket in (aten.index, aten.index_put, aten.index_put_):  # a bool mask: its nonzero
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
                raise HostSyncError(f"host sync: {func} with a boolean mask (its shape depends on the data)")
        if func.overloadpacket in (aten._to_copy, aten.copy_):
            src = args[1] if func.overloadpacket is aten.copy_ else args[0]
            dst = kwargs.get("device") if func.overloadpacket is aten._to_copy else args[0].device
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and torch.device(dst or src.device).type == "cpu":
                raise HostSyncError(f"host sync: {func} copies from {src.device} to the CPU")
        return func(*args, **kwargs)
