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
import os
from pathlib import Path
from typing import Any

from mkdocs.config import base
from mkdocs.config import config_options as c
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.plugins import BasePlugin
from mkdocs.structure.files import File, Files, InclusionLevel
from mkdocs.structure.pages import Page

from mkdocs_gluscope.activations import UnknownActivation
from mkdocs_gluscope.neurons import NeuronSpecError, neuron_specs
from mkdocs_gluscope.pages import ASSET_DIR, ASSETS, PageOptionError, SitePages, asset_text, check_examples, check_url_prefix
from mkdocs_gluscope.render import EXAMPLES_PLACEHOLDER
from mkdocs_gluscope.store import HOOKS, ActivationsFile, FormatError

log = logging.getLogger("mkdocs.plugins.gluscope")

DEFAULT_MISSING_HINT = "gluscope collect --model MODEL --dataset DATA --out FILE"


# Option types: MkDocs checks every option when it loads mkdocs.yml, and reports a bad one as
# "Plugin 'gluscope' option 'NAME': MESSAGE" before anything is built.

class ActivationsPath(c.File):
    """``c.File(exists=True)``: a path relative to ``mkdocs.yml``, made absolute. A path that does not
    exist names the command that makes the file (the ``missing_hint`` option); a folder is refused."""

    def __init__(self) -> None:
        super().__init__(exists=False)  # existence is checked below, with a message that helps
        self.hint = DEFAULT_MISSING_HINT

    def pre_validation(self, config: base.Config, key_name: str) -> None:
        super().pre_validation(config, key_name)
        # Options are validated one by one; read the hint as the user wrote it.
        self.hint = str(config.get("missing_hint") or DEFAULT_MISSING_HINT)

    def run_validation(self, value: object) -> str:
        written = value
        path = super().run_validation(value)
        if os.path.isdir(path):
            raise c.ValidationError(
                f"{written!r} is a folder (looked at {path}); expected the activations file (.h5) written by "
                f"gluscope collect, e.g. made with: {self.hint}")
        if not os.path.isfile(path):
            raise c.ValidationError(f"activations file {written!r} not found (looked at {path}); make it with: {self.hint}")
        return path


class NeuronIds(c.BaseConfigOption[list]):
    """A list of quoted neuron ids (or one, e.g. ``all``); YAML numbers are refused, never reinterpreted."""

    def __init__(self) -> None:
        super().__init__()
        self.default = []

    def run_validation(self, value: object) -> list:
        try:
            return neuron_specs(value)
        except NeuronSpecError as e:
            raise c.ValidationError(str(e)) from None


class _Checked(c.BaseConfigOption):
    """An option whose rule is a function of :mod:`mkdocs_gluscope.pages`, shared with ``gluscope pages``."""

    def __init__(self, check: Any, default: Any = None) -> None:
        super().__init__()
        self.check = check
        self.default = default

    def run_validation(self, value: object) -> Any:
        try:
            return self.check(value)
        except PageOptionError as e:
            raise c.ValidationError(str(e)) from None


class GluscopeConfig(base.Config):
    missing_hint = c.Type(str, default=DEFAULT_MISSING_HINT)
    """Command named in the error when the activations file does not exist (e.g. the command that
    makes it for this project)."""

    activations = ActivationsPath()
    """Required. Path of the activations file written by ``gluscope collect``, relative to
    ``mkdocs.yml``. A missing file or a folder fails the build at config load, naming the path."""

    neurons = NeuronIds()
    """Neurons to publish, as quoted strings: ``"LAYER.NEURON"`` (zero-based), ``"LAYER.*"`` for a
    whole layer, ``"LAYER.eEXPERT.NEURON"`` / ``"LAYER.eEXPERT.*"`` for an expert's neurons
    (``"LAYER.s.NEURON"`` for the shared expert), or ``all``. Quote them: unquoted, YAML reads ``1.10`` as the number 1.1, and numbers
    are refused rather than guessed at. Default: none (only the index page)."""

    url_prefix = _Checked(check_url_prefix, default="neurons")
    """Folder of the generated pages inside the site: ``{url_prefix}/L{layer}/N{neuron}/``. A relative
    path of folder names separated by ``/`` (no leading ``/``, ``..``, ``.``, backslash or drive).
    Default: ``neurons``."""

    examples = _Checked(check_examples)
    """Examples shown per (case, hook) list: a whole number, 1 or more. Default: all k in the file."""

    color_hook = c.Choice(HOOKS, default="hook_post")
    """Hook that colors the example tokens when a page opens (readers can switch on the page):
    ``hook_post``, ``hook_pre_linear``, ``hook_pre`` or ``swish``. Default: ``hook_post``."""


class GluscopePlugin(BasePlugin[GluscopeConfig]):
    def __init__(self) -> None:
        self.site: SitePages | None = None
        self.path: Path | None = None
        self._pages: dict[str, tuple] = {}  # page source -> neuron key

    def on_config(self, config: MkDocsConfig) -> MkDocsConfig:
        path = Path(self.config.activations)  # validated at load: an existing file, absolute
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
        except UnknownActivation as e:
            activations.close()
            raise PluginError(f"gluscope: activations file {path}: {e}") from None
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
        for layer, expert in site.experts:
            files.append(File.generated(config, site.expert_path(layer, expert), inclusion=InclusionLevel.NOT_IN_NAV,
                                        content=site.expert_markdown(layer, expert, directory_urls=directory_urls)))
        for key in site.neurons:
            src = site.neuron_path(*key)
            self._pages[src] = key
            files.append(File.generated(config, src, inclusion=InclusionLevel.NOT_IN_NAV,
                                        content=site.neuron_markdown(*key)))
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
