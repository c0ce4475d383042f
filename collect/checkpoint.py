"""Checkpoints of a collection run: the statistics of whole batches, the options and the corpus
fingerprint they belong to, written atomically (in a background thread during the run) and read
back by ``--resume``, which refuses a checkpoint of other options or another corpus."""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path
from typing import Any

import torch

from collect.config import CollectConfig, RunFacts
from collect.stats import HOST_TABLES, LayerStats
from mkdocs_gluscope.errors import GluscopeError


def checkpoint_fingerprint(config: CollectConfig, facts: RunFacts) -> dict[str, Any]:
    return {**config.fingerprint(), **{f"resolved_{k}": v for k, v in dataclasses.asdict(facts).items()}}


def save_checkpoint(path: Path, config: CollectConfig, batches_done: int,
                    states: dict[int | str, LayerStats] | dict[int | str, dict[str, torch.Tensor]],
                    facts: RunFacts, routed: dict[str, torch.Tensor] | None = None) -> None:
    """Write a checkpoint atomically: ``batches_done`` batches of the plan, whatever the number of
    processes that did them (so a run resumes with another torchrun size, or none); ``routed``: the
    tokens routed so far to each recorded expert (by :func:`expert_key`)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({
        "fingerprint": checkpoint_fingerprint(config, facts),
        "batches_done": batches_done,
        "states": {layer: {k: v.cpu() for k, v in (s.to_dict() if isinstance(s, LayerStats) else s).items()}
                   for layer, s in states.items()},
        "routed": {key: v.cpu() for key, v in (routed or {}).items()},  # expert keys: tokens routed so far
    }, tmp)
    os.replace(tmp, path)


def load_checkpoint(config: CollectConfig, device: torch.device, facts: RunFacts, *, windows_on_host: bool = False
                    ) -> tuple[int, dict[int | str, LayerStats], dict[str, torch.Tensor]] | None:
    """The checkpoint's batches done, statistics on ``device`` (with ``windows_on_host``, the GPU's
    path, their top-k windows in host memory: :meth:`LayerStats.windows_on_host`) and routed counts;
    None where there is none."""
    path = config.checkpoint_path
    if not path.exists():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    expected = checkpoint_fingerprint(config, facts)
    if saved["fingerprint"] != expected:
        differ = sorted(k for k in expected if saved["fingerprint"].get(k) != expected[k])
        what = ", ".join("the corpus (its tokens differ: the dataset files changed)" if k == "resolved_corpus_sha256"
                         else "dtype (auto resolved otherwise here)" if k == "resolved_dtype" else k
                         for k in differ)
        raise GluscopeError(
            f"checkpoint {str(path)!r} was made with other options or input ({what}); rerun with "
            "the same options and dataset, or delete it to start over")
    # Dense layers by number; experts by their key (expert_key), a string.
    def placed(tensors: dict[str, torch.Tensor]) -> LayerStats:
        return LayerStats.from_dict({name: t if windows_on_host and name in HOST_TABLES else t.to(device)
                                     for name, t in tensors.items()}).windows_on_host(windows_on_host)

    states = {(int(key) if str(key).isdigit() else key): placed(t) for key, t in saved["states"].items()}
    return int(saved["batches_done"]), states, dict(saved.get("routed", {}))


class CheckpointWriter:
    """Writes checkpoints in a background thread: the state is first copied to the host (into
    pinned memory, behind the work already queued on the device, so the GPU does not wait), and
    the thread waits for that copy, then writes. One checkpoint at a time."""

    def __init__(self) -> None:
        self._thread: Any = None
        self._error: BaseException | None = None
        self._pinned: dict[tuple[int | str, str], torch.Tensor] = {}  # reused: pinning GBs takes seconds

    def _to_host(self, key: tuple[int | str, str], t: torch.Tensor) -> torch.Tensor:
        """A host copy that later in-place updates of ``t`` do not change; from a GPU asynchronous,
        into pinned memory (complete once an event recorded after it has passed)."""
        if not t.is_cuda:
            return t.clone()
        host = self._pinned.get(key)
        if host is None or host.shape != t.shape or host.dtype != t.dtype:
            host = self._pinned[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    def save(self, path: Path, config: CollectConfig, batches_done: int, states: dict[int | str, LayerStats],
             facts: RunFacts, routed: dict[str, torch.Tensor] | None = None, *, wait: bool = False) -> None:
        self.wait()  # the previous checkpoint is written: its host buffers can take this one
        host = {layer: {name: self._to_host((layer, name), t) for name, t in s.to_dict().items()}
                for layer, s in states.items()}
        host_routed = {key: self._to_host((key, "routed"), t) for key, t in (routed or {}).items()}
        copied = torch.cuda.Event() if any(t.is_cuda for s in states.values() for t in s.to_dict().values()) else None
        if copied is not None:
            copied.record()

        def write() -> None:
            try:
                if copied is not None:
                    copied.synchronize()
                save_checkpoint(path, config, batches_done, host, facts, host_routed)
            except BaseException as e:  # reported by wait(), on the main thread
                self._error = e

        self._thread = threading.Thread(target=write, name="gluscope-checkpoint", daemon=True)
        self._thread.start()
        if wait:
            self.wait()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
