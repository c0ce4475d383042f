"""The ``gluscope`` MkDocs plugin: one page per listed neuron, generated from an activations file.

```yaml
plugins:
  - search
  - gluscope:
      activations: data/demo.h5
      neurons: ["29.1034", "3.*"]
```

Glue only: :mod:`mkdocs_gluscope.pages` decides what the pages hold. Neuron and layer pages stay
out of the navigation (a thousand nav entries make every page huge); ``neurons/`` lists them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mkdocs.config import base
from mkdocs.config import config_options as c
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.plugins import BasePlugin
from mkdocs.structure.files import File, Files, InclusionLevel
from mkdocs.structure.pages import Page

from mkdocs_gluscope.neurons import NeuronSpecError
from mkdocs_gluscope.pages import ASSET_DIR, ASSETS, SitePages, asset_text
from mkdocs_gluscope.render import EXAMPLES_PLACEHOLDER
from mkdocs_gluscope.store import HOOKS, ActivationsFile, FormatError

log = logging.getLogger("mkdocs.plugins.gluscope")


class GluscopeConfig(base.Config):
    activations = c.Type(str)
    """Path of the activations file, relative to ``mkdocs.yml`` (written by ``gluscope collect``)."""

    neurons = c.Type((list, str, int, float), default=[])
    """Neurons to publish: ``"LAYER.NEURON"`` ids (zero-based), ``"LAYER.*"`` for a whole layer,
    or ``all``."""

    url_prefix = c.Type(str, default="neurons")
    """Folder of the generated pages: ``{url_prefix}/L{layer}/N{neuron}/``."""

    examples = c.Optional(c.Type(int))
    """Examples shown per (case, hook) list; default: all k in the file."""

    color_hook = c.Choice(HOOKS, default="hook_post")
    """Hook that colors the example tokens when a page opens (readers can switch on the page)."""

    missing_hint = c.Type(str, default="gluscope collect --model MODEL --dataset DATA --out FILE")
    """Command named in the error when the activations file does not exist."""


class GluscopePlugin(BasePlugin[GluscopeConfig]):
    def __init__(self) -> None:
        self.site: SitePages | None = None
        self.path: Path | None = None
        self._pages: dict[str, tuple[int, int]] = {}

    def on_config(self, config: MkDocsConfig) -> MkDocsConfig:
        base_dir = Path(config.config_file_path or ".").resolve().parent
        path = (base_dir / self.config.activations).resolve()
        if not path.exists():
            raise PluginError(
                f"gluscope: activations file {self.config.activations!r} not found (looked at {path}); "
                f"make it with: {self.config.missing_hint}")
        if self.config.examples is not None and self.config.examples < 1:
            raise PluginError(f"gluscope: examples: {self.config.examples}; expected 1 or more")
        if self.site is not None:
            self.site.file.close()  # a rebuild under `mkdocs serve` rereads the file
        try:
            activations = ActivationsFile(path)
        except FormatError as e:
            raise PluginError(f"gluscope: activations: {e}") from None
        try:
            self.site = SitePages(activations, self.config.neurons, url_prefix=self.config.url_prefix,
                                  examples=self.config.examples, color_hook=self.config.color_hook)
        except NeuronSpecError as e:
            activations.close()
            raise PluginError(f"gluscope: neurons: {e}") from None
        if not self.site.neurons:
            log.warning("no neurons listed under plugins.gluscope.neurons; only the index page is built")
        self.path = path
        for name in ASSETS:
            target = config.extra_css if name.endswith(".css") else config.extra_javascript
            if f"{ASSET_DIR}/{name}" not in [str(x) for x in target]:
                target.append(f"{ASSET_DIR}/{name}")
        return config

    def on_files(self, files: Files, *, config: MkDocsConfig) -> Files:
        site = self.site
        assert site is not None
        self._pages = {}
        directory_urls = config.use_directory_urls
        files.append(File.generated(config, site.index_path, content=site.index_markdown(directory_urls=directory_urls)))
        for layer in site.layers:
            files.append(File.generated(config, site.layer_path(layer), inclusion=InclusionLevel.NOT_IN_NAV,
                                        content=site.layer_markdown(layer, directory_urls=directory_urls)))
        for layer, neuron in site.neurons:
            src = site.neuron_path(layer, neuron)
            self._pages[src] = (layer, neuron)
            files.append(File.generated(config, src, inclusion=InclusionLevel.NOT_IN_NAV,
                                        content=site.neuron_markdown(layer, neuron)))
        for src, text in site.doc_shards().items():
            files.append(File.generated(config, src, content=text))
        for name in ASSETS:
            files.append(File.generated(config, f"{ASSET_DIR}/{name}", content=asset_text(name)))
        return files

    def on_post_page(self, output: str, *, page: Page, config: MkDocsConfig) -> str:
        key = self._pages.get(page.file.src_uri)
        if key is None or self.site is None:
            return output
        site_root = "../" * page.url.count("/")
        return output.replace(EXAMPLES_PLACEHOLDER, self.site.examples_html(*key, site_root=site_root), 1)

    def on_serve(self, server: Any, *, config: MkDocsConfig, builder: Any) -> Any:
        if self.path is not None:
            server.watch(str(self.path))  # a new collection run rebuilds the site
        return server

    def on_shutdown(self) -> None:
        if self.site is not None:
            self.site.file.close()
            self.site = None
