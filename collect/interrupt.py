"""Stopping a run cleanly: the first Ctrl-C or SIGTERM asks the loop to stop after the batch in
flight and write a checkpoint (:class:`Interrupted` then carries the exit status a shell expects)."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from mkdocs_gluscope.errors import GluscopeError


class Interrupted(GluscopeError):
    """Ctrl-C or SIGTERM: the run stopped at a batch boundary and left a checkpoint."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """128 + the signal, as a shell reports a process killed by it: 130 for Ctrl-C, 143 for
        SIGTERM (what batch schedulers send before they kill a preempted job)."""
        return 128 + int(self.signum)


class StopOnSignal:
    """The first Ctrl-C or SIGTERM asks the loop to stop after the batch in flight; a second one
    aborts. SIGTERM is how clusters preempt a job (Slurm, Kubernetes): it gets the same
    checkpoint, and the grace period before SIGKILL must cover one batch."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signum: int = signal.SIGINT
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopOnSignal":
        if threading_is_main():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\ngluscope: {name}: stopping after this batch to write a checkpoint (again to abort)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)


def threading_is_main() -> bool:
    return threading.current_thread() is threading.main_thread()
