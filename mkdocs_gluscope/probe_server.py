"""The probe server behind a served site's text box: a child process, started and stopped here.

The model runs in its own process (``python -m collect.probe``, the ``[collect]`` extra: torch), so
the site's package never imports torch. It listens on 127.0.0.1 only, on a free port it prints
first, and lets only the served site's own origin read its answers (CORS); the page posts its
request as ``text/plain``, which needs no preflight.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Mapping

#: Seconds a model may take to load before the site gives up on it.
START_TIMEOUT = 600.0
_READY = "gluscope-probe listening on "


class ProbeError(RuntimeError):
    """The probe server did not start; the message says why (the child's own error line)."""


def site_origins(dev_addr: Any) -> list[str]:
    """The origins a page of ``mkdocs serve --dev-addr`` has: its address, and ``localhost`` for a
    loopback one."""
    host, port = str(getattr(dev_addr, "host", "127.0.0.1")), int(getattr(dev_addr, "port", 8000))
    hosts = [host] + (["localhost", "127.0.0.1"] if host in ("127.0.0.1", "localhost") else [])
    return [f"http://{h}:{port}" for h in dict.fromkeys(hosts)]


@dataclass
class ProbeServer:
    process: subprocess.Popen
    url: str  # where a page posts its text: http://127.0.0.1:PORT/probe

    @classmethod
    def start(cls, model: str, attrs: Mapping[str, Any], dev_addr: Any, *, timeout: float = START_TIMEOUT
              ) -> "ProbeServer":
        """Start ``python -m collect.probe`` for ``model`` with the file's ``bos`` and ``refactor_glu``
        (``attrs``), so its values are those the file's collection recorded; wait until it listens."""
        command = [sys.executable, "-m", "collect.probe", "--model", model, "--bos", str(attrs.get("bos", "auto"))]
        if not attrs.get("refactor_glu", True):
            command.append("--no-refactor-glu")
        for origin in site_origins(dev_addr):
            command += ["--origin", origin]
        log = tempfile.TemporaryFile(mode="w+")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(process.stdout.readline() if process.stdout else ""),
                         daemon=True).start()
        try:
            first = lines.get(timeout=timeout)
        except queue.Empty:
            process.kill()
            raise ProbeError(f"the probe model {model!r} did not load within {timeout:.0f} s") from None
        if not first.startswith(_READY):
            process.wait(timeout=30)
            log.seek(0)
            text = log.read().strip().splitlines()
            reason = next((line.split("error: ", 1)[1] for line in reversed(text) if "gluscope: error: " in line),
                          text[-1] if text else f"exit status {process.returncode}")
            raise ProbeError(f"the probe server for {model!r} did not start: {reason}")
        log.close()
        process.stderr = None
        return cls(process, f"http://127.0.0.1:{int(first[len(_READY):])}/probe")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
