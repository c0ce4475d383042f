"""Building MkDocs sites in a temporary folder, as ``mkdocs build --strict`` would."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from pathlib import Path
from typing import Any, Iterator

import yaml


def write_project(root: Path, plugin: dict[str, Any], *, nav: list | None = None, extra: dict | None = None) -> Path:
    docs = root / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "index.md").write_text("# Home\n\nA test site.\n", encoding="utf-8")
    config: dict[str, Any] = {
        "site_name": "GLUScope test",
        "docs_dir": "docs",
        "site_dir": "site",
        "theme": {"name": "material", "font": False},  # no web fonts: the tests run offline
        "plugins": ["search", {"gluscope": plugin}],
    }
    if nav is not None:
        config["nav"] = nav
    config.update(extra or {})
    path = root / "mkdocs.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def build(config_file: Path, *, strict: bool = True) -> Path:
    """Build like the ``mkdocs build --strict`` command; returns the site folder."""
    from mkdocs.commands.build import build as mkdocs_build
    from mkdocs.config import load_config

    config = load_config(str(config_file), strict=strict)
    config.plugins.on_startup(command="build", dirty=False)
    try:
        mkdocs_build(config)
    finally:
        config.plugins.on_shutdown()
    return Path(config.site_dir)


def build_site(root: Path, plugin: dict[str, Any], **kwargs: Any) -> Path:
    return build(write_project(root, plugin, **kwargs))


@contextlib.contextmanager
def serve_folder(folder: Path, log: list | None = None) -> Iterator[str]:
    """Serve ``folder`` over HTTP on a free loopback port, honouring single ``Range`` requests as static
    hosts do (a light site's pages read their data so); yields the base URL. ``log`` collects
    ``(path, status, bytes sent)`` of every request."""
    handler = functools.partial(_QuietHandler, directory=str(folder), log=log)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Python's file server with ``Range: bytes=A-B``, ``A-`` and ``-N`` (206 and Content-Range)."""

    def __init__(self, *args: Any, log: list | None = None, **kwargs: Any) -> None:
        self.log = log
        super().__init__(*args, **kwargs)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send_head(self):  # type: ignore[override]
        import os
        import re

        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        path = self.translate_path(self.path)
        if not match or os.path.isdir(path) or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        first, last = match.groups()
        if first == "":
            start, stop = max(0, size - int(last or 0)), size
        else:
            start, stop = int(first), min(size, int(last) + 1 if last else size)
        if start >= size or stop <= start:
            self.send_error(416)
            return None
        f = open(path, "rb")
        f.seek(start)
        self._range = stop - start
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        self.send_header("Content-Length", str(stop - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return f

    def copyfile(self, source, outputfile):  # type: ignore[override]
        length = getattr(self, "_range", None)
        if length is None:
            return super().copyfile(source, outputfile)
        sent = 0
        while sent < length:
            chunk = source.read(min(65536, length - sent))
            if not chunk:
                break
            outputfile.write(chunk)
            sent += len(chunk)

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        if self.log is not None:
            import os

            sent = getattr(self, "_range", None)
            if sent is None:
                path = self.translate_path(self.path)
                if os.path.isdir(path):
                    path = os.path.join(path, "index.html")
                sent = os.path.getsize(path) if os.path.isfile(path) and str(code) == "200" else 0
            self.log.append((self.path, int(code) if str(code).isdigit() else 0, sent))
