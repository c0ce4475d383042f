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
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on a free loopback port; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass
