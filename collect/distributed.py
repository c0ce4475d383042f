"""One collection on several processes, launched by torchrun (torch.distributed's launcher).

``torchrun --nproc-per-node N gluscope collect ...`` (or several nodes, with torchrun's
rendezvous) starts N copies of the command with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set.
Each rank takes every N-th batch of the plan; at checkpoints and at the end the ranks' statistics
are merged exactly into rank 0 with :func:`collect.stats.merge_stats` (documents are indexed by
the whole corpus, so lists combine as one run's would), and rank 0 writes the one file. NCCL on
GPUs, gloo on CPUs. There is no launcher of our own: torchrun (and a cluster's scheduler around
it) starts, restarts and stops the processes.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from collect.stats import LayerStats, merge_stats


@dataclass(frozen=True)
class World:
    """This process's place in the collection: rank 0 of 1 for a plain run."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init(device: str) -> tuple[World, str]:
    """Join the process group when torchrun started this process (idempotent), and the device this
    rank runs on: ``cuda:LOCAL_RANK`` where a GPU is asked for (or ``auto`` finds one)."""
    if not launched_by_torchrun():
        if dist.is_available() and dist.is_initialized():
            return World(dist.get_rank(), dist.get_world_size()), device
        return World(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if wants_cuda and device in ("auto", "cuda"):
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        backend = "nccl" if wants_cuda else "gloo"
        kwargs: dict[str, Any] = {"timeout": datetime.timedelta(hours=2)}  # rank 0 writes the file alone
        if wants_cuda:
            torch.cuda.set_device(torch.device(device))
            kwargs["device_id"] = torch.device(device)
        dist.init_process_group(backend, **kwargs)
    return World(dist.get_rank(), dist.get_world_size()), device


def finish(world: World) -> None:
    """Leave the process group (after rank 0 has written the file)."""
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def any_rank(world: World, flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag, true where it is true on any rank (one small all-reduce): every rank must agree
    on when to checkpoint and when to stop."""
    if world.size == 1:
        return flags
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


def broadcast_object(world: World, value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_equal(world: World, value: Any) -> bool:
    if world.size == 1:
        return True
    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value)
    return all(v == values[0] for v in values)


def _pack(state: LayerStats) -> torch.Tensor:
    """One layer's statistics as one byte buffer: one message per layer, whatever the dtypes
    (gloo has no int16)."""
    return torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in state.to_dict().values()])


def _unpack(buffer: torch.Tensor, like: LayerStats) -> LayerStats:
    tensors, offset = {}, 0
    for name, t in like.to_dict().items():
        size = t.numel() * t.element_size()
        tensors[name] = buffer[offset:offset + size].view(t.dtype).view(t.shape)
        offset += size
    return LayerStats.from_dict(tensors)


def merge_into_rank0(world: World, states: dict[int, LayerStats], empty: Any) -> dict[int, LayerStats]:
    """Every rank's statistics merged into rank 0 along a binary tree (log2 N rounds of
    point-to-point messages, one layer at a time so that memory grows by about one layer's
    statistics). Rank 0 gets the merge; every other rank gets fresh empty statistics from
    ``empty(layer)``, since what it had is now counted in rank 0's."""
    if world.size == 1:
        return states
    step = 1
    sent = False
    while step < world.size:
        if not sent and world.rank % (2 * step) == step:
            for layer in sorted(states, key=str):  # dense layers by number, experts by key: one order
                dist.send(_pack(states[layer]), dst=world.rank - step)
            sent = True
        elif not sent and world.rank % (2 * step) == 0 and world.rank + step < world.size:
            for layer in sorted(states, key=str):  # dense layers by number, experts by key: one order
                like = states[layer]
                buffer = torch.empty(like.nbytes(), dtype=torch.uint8, device=like.count.device)
                dist.recv(buffer, src=world.rank + step)
                states[layer] = merge_stats(like, _unpack(buffer, like))
        step *= 2
    if world.rank != 0:
        states = {layer: empty(layer) for layer in states}
    return states


def add_into_rank0(world: World, counts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Integer counts (the tokens routed to each recorded expert) summed into rank 0, as
    :func:`merge_into_rank0` merges the statistics: every other rank starts again from zero, since
    what it had is now counted in rank 0's."""
    if world.size == 1:
        return counts
    for key in sorted(counts):
        dist.reduce(counts[key], dst=0, op=dist.ReduceOp.SUM)
        if world.rank != 0:
            counts[key] = torch.zeros_like(counts[key])
    return counts
