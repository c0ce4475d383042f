"""One collection on several processes, launched by torchrun (torch.distributed's launcher).

``torchrun --nproc-per-node N gluscope collect ...`` (or several nodes, with torchrun's
rendezvous) starts N copies of the command with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set.
Each rank takes every N-th batch of the plan; at checkpoints and at the end the ranks' statistics
are merged exactly into rank 0 with :func:`collect.stats.merge_stats` (documents are indexed by
the whole corpus, so lists combine as one run's would), and rank 0 writes the one file. NCCL on
GPUs, gloo on CPUs. There is no launcher of our own: torchrun (and a cluster's scheduler around
it) starts, restarts and stops the processes.

A failing rank stops every rank within seconds (:class:`FailFast`): otherwise the others would wait
in their next collective until the process group's timeout (hours), while the failed rank's card
sits idle. The last checkpoint written stays, for ``--resume``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

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
    """Leave the process group. No barrier: after the statistics' last merge only rank 0 has work
    left (writing the file), and a rank waiting for it in a collective could only hang if it failed;
    torchrun waits for every process anyway."""
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


#: How often a rank looks whether another one failed, and how long it then lets the failed rank end
#: first, so that torchrun names that rank as the root cause (seconds).
FAIL_POLL_S, FAIL_GRACE_S = 0.5, 2.0
#: How long a failed rank waits for the others to finish what they must before it ends (seconds):
#: torchrun stops every other process as soon as one ends, so the failed rank ends last but one.
FAIL_ACK_TIMEOUT_S = 15.0


class FailFast:
    """Every rank stops within seconds when one fails, with that rank's message.

    A rank that leaves :meth:`guard` by an exception (anything but a clean, agreed stop such as
    :class:`collect.interrupt.Interrupted`) prints ``gluscope: error: rank R failed (...)`` and writes
    ``RANK<TAB>message`` under a key of torchrun's key-value store, the first failure only. Every rank
    runs a watchdog thread that polls that key; on another rank's failure it runs the ``on_abort``
    callbacks (e.g. finishing a checkpoint that is being written), acknowledges under a key of its own
    and ends the process with status 1 a moment later, wherever the main thread is waiting (a
    collective cannot be interrupted otherwise). The failed rank waits for those acknowledgements
    (at most :data:`FAIL_ACK_TIMEOUT_S`) before it ends: torchrun stops every other process as soon
    as one ends, which would cut a checkpoint being finished, and it names the rank that ended first
    as the root cause. The store is torchrun's (``MASTER_ADDR``, ``MASTER_PORT``), through a
    connection of its own, keyed by the run and restart so that a restarted group does not read an
    earlier failure."""

    def __init__(self, world: World, clean: tuple[type[BaseException], ...] = ()) -> None:
        self.world = world
        self.clean = clean
        self.on_abort: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._store: Any = None
        run = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        self._key = f"gluscope/failed/{run}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"

    def _connect(self) -> Any:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             wait_for_workers=False, timeout=datetime.timedelta(seconds=60))

    def _failure(self) -> tuple[int, str] | None:
        if not self._store.check([self._key]):
            return None
        rank, _, message = self._store.get(self._key).decode("utf-8", "replace").partition("\t")
        return int(rank), message

    def _watch(self) -> None:
        while not self._stop.wait(FAIL_POLL_S):
            try:
                failure = self._failure()
            except Exception:  # the store went away: the group is ending
                return
            if failure is None or failure[0] == self.world.rank:
                continue
            rank, _message = failure
            print(f"gluscope: rank {self.world.rank} stops because rank {rank} failed (the last checkpoint is "
                  "kept: rerun with --resume)", file=sys.stderr, flush=True)
            for callback in self.on_abort:
                with contextlib.suppress(BaseException):
                    callback()
            with contextlib.suppress(Exception):
                self._store.set(self._ack_key(self.world.rank), "1")
            self._stop.wait(FAIL_GRACE_S)
            os._exit(1)

    def _ack_key(self, rank: int) -> str:
        return f"{self._key}/stopped/{rank}"

    def _await_the_others(self) -> None:
        """Until every other rank has acknowledged the failure, or :data:`FAIL_ACK_TIMEOUT_S`."""
        others = [self._ack_key(r) for r in range(self.world.size) if r != self.world.rank]
        deadline = time.monotonic() + FAIL_ACK_TIMEOUT_S
        with contextlib.suppress(Exception):  # the store went away: the group is ending anyway
            while time.monotonic() < deadline and not self._store.check(others):
                time.sleep(FAIL_POLL_S / 5)

    @contextlib.contextmanager
    def guard(self) -> Iterator["FailFast"]:
        if self.world.size == 1 or "MASTER_ADDR" not in os.environ:
            yield self
            return
        self._store = self._connect()
        watchdog = threading.Thread(target=self._watch, name="gluscope-fail-fast", daemon=True)
        watchdog.start()
        try:
            yield self
        except self.clean:
            raise
        except BaseException as error:
            message = " ".join(str(error).split())[:500] or type(error).__name__
            print(f"gluscope: error: rank {self.world.rank} failed ({type(error).__name__}: {message}); every "
                  "rank stops (the last checkpoint is kept: rerun with --resume)", file=sys.stderr, flush=True)
            # The first failure wins: compare_set writes only where the key does not exist yet.
            self._store.compare_set(self._key, "", f"{self.world.rank}\t{type(error).__name__}: {message}")
            self._await_the_others()
            raise
        finally:
            self._stop.set()


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
    """One layer's statistics as one byte buffer on the device: one message per layer, whatever the
    dtypes (gloo has no int16); the windows join it from host memory on the GPU's path."""
    device = state.count.device
    return torch.cat([t.to(device).contiguous().view(-1).view(torch.uint8) for t in state.to_dict().values()])


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
                states[layer] = merge_stats(like, _unpack(buffer, like))  # windows back where like's live
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
