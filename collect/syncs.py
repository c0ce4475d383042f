"""Counting host syncs: the operations that make the host wait for the device.

On a GPU every one of them stalls the Python loop until the device has caught up, so collection
allows one per batch (:mod:`collect.batch`). :class:`SyncCounter` counts them on any device, a CPU
included, which lets the tests run the GPU's code path on a CPU and assert that no change brings
one back: a value read to the host (``item``, ``bool``, ``int``, ``tolist``), ``nonzero`` and
boolean-mask indexing (their output size depends on the values), ``unique``, and copies from the
device to the host (the host waits for them), except ``non_blocking`` copies into pinned memory
(queued behind the device's work, as the window writes of :class:`collect.stats.WindowWrites`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: Operations whose result the host must wait for.
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.nonzero.out, aten.masked_select.default,
            aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
            aten.unique_dim_consecutive.default}


def is_sync(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether one aten call makes the host wait for the device."""
    if func in SYNC_OPS:
        return True
    if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(i is not None and i.dtype == torch.bool for i in indices)
    if func is aten._to_copy.default:
        device = kwargs.get("device")
        return device is not None and torch.device(device).type == "cpu" and args[0].device.type != "cpu"
    if func is aten.copy_.default:  # a non_blocking copy into pinned memory is queued: the host does not wait
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        return args[0].device.type == "cpu" and args[1].device.type != "cpu" and not (
            non_blocking and args[0].is_pinned())
    return False


class _Dispatch(TorchDispatchMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if is_sync(func, args, kwargs):
            self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **kwargs)


class _Functions(TorchFunctionMode):
    """``tolist`` reads a CPU tensor's memory without an aten call: counted here."""

    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.Tensor.tolist:
            self.counts["tolist"] += 1
        return func(*args, **(kwargs or {}))


class SyncCounter:
    """``with SyncCounter() as syncs: ...`` counts the host syncs made inside, by operation
    (``syncs.counts``) and in all (``syncs.total``)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self._modes = (_Functions(self.counts), _Dispatch(self.counts))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> "SyncCounter":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
