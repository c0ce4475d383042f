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

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from mkdocs.config import base
from mkdocs.config import config_options as c
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.plugins import BasePlugin
from mkdocs.structure.files import File, Files, InclusionLevel
from mkdocs.structure.pages import Page

from mkdocs_gluscope import light
from mkdocs_gluscope.activations import UnknownActivation
from mkdocs_gluscope.errors import printable
from mkdocs_gluscope.neurons import NeuronSpecError, neuron_specs
from mkdocs_gluscope.pages import (
    ASSET_DIR,
    ASSETS,
    PageOptionError,
    SitePages,
    asset_text,
    check_examples,
    check_inline_cases,
    check_url_prefix,
)

from mkdocs_gluscope.probe_server import ProbeError, ProbeServer
from mkdocs_gluscope.store import HOOKS, ActivationsFile, FormatError

log = logging.getLogger("mkdocs.plugins.gluscope")

DEFAULT_MISSING_HINT = "gluscope collect --model MODEL --dataset DATA --out FILE"


@contextlib.contextmanager
def file_errors() -> Iterator[None]:
    """A file that cannot be used (refused when opened, or damaged where a neuron is read) fails the
    build with its one line: a PluginError, which MkDocs reports without a traceback."""
    try:
        yield
    except FormatError as e:
        raise PluginError(f"gluscope: activations: {printable(e)}") from None


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
    path of folder names of ASCII letters, digits, ``-``, ``_`` and ``.`` separated by ``/`` (no leading
    ``/``, no ``.`` or ``..`` folder). Default: ``neurons``."""

    examples = _Checked(check_examples)
    """Examples shown per (case, hook) list: a whole number, 1 or more. Default: all k in the file."""

    color_hook = c.Choice(HOOKS, default="hook_post")
    """Hook that colors the example tokens when a page opens (readers can switch on the page):
    ``hook_post``, ``hook_pre_linear``, ``hook_pre`` or ``swish``. Default: ``hook_post``."""

    layout = c.Choice(("auto", "full", "light"), default="auto")
    """``full``: every example inline in each page, pages built by MkDocs and indexed by Material's
    search (for a hand-picked list). ``light``: for a whole model, each page holds the first examples
    of each case's color-hook list and loads the rest on demand from a compact data file; pages are
    written from one theme shell after the build, layer pages sort, filter and page their neurons in
    the browser, and the search box finds neurons by id and by the words their examples peak on through
    an index sharded by word. ``auto`` (default): ``light`` above 2,000 listed neurons, else ``full``."""

    inline_cases = _Checked(check_inline_cases, default=light.DEFAULT_INLINE_CASES)
    """Light layout: the page itself holds the strongest color-hook example of this many of the neuron's
    rarest cases (those with examples), so it is useful without JavaScript; every other example loads
    when a reader opens its list. A whole number from 0 to 4. Default: 2 (a 1 GB site budget allows
    about two colored examples per page at 46,080 neurons; bench/site_scale.py)."""

    workers = c.Optional(c.Type(int))
    """Light layout: processes that write the neuron pages. Default: one per CPU this build may use."""

    probe_model = c.Optional(c.Type(str))
    """``mkdocs serve`` only: the model the file was collected from (a hub name, a folder or GGUF file,
    relative to ``mkdocs.yml`` if it exists there). Each full neuron page then offers a text box that
    runs the reader's own text through it (``gluscope probe``) on this machine: the plugin starts a
    probe server on 127.0.0.1 that answers this site's pages only. Needs the ``[collect]`` extra. A
    built site (``mkdocs build``) never has the box. Default: none."""


class GluscopePlugin(BasePlugin[GluscopeConfig]):
    def __init__(self) -> None:
        self.site: SitePages | None = None
        self.path: Path | None = None
        self._pages: dict[str, tuple] = {}  # page source -> neuron key
        self.light = False
        self._shell: tuple[str, str, str] | None = None
        self.command = "build"
        self.probe: ProbeServer | None = None

    def on_startup(self, *, command: str, dirty: bool) -> None:
        self.command = command  # the text box needs a running model: mkdocs serve only

    def on_config(self, config: MkDocsConfig) -> MkDocsConfig:
        path = Path(self.config.activations)  # validated at load: an existing file, absolute
        if self.site is not None:
            self.site.file.close()  # a rebuild under `mkdocs serve` rereads the file
        with file_errors():
            activations = ActivationsFile(path)
        try:
            self.site = SitePages(activations, self.config.neurons, url_prefix=self.config.url_prefix,
                                  examples=self.config.examples, color_hook=self.config.color_hook)
            if self.config.probe_model and self.command == "serve":
                if self.probe is None:  # one server for every rebuild of this serve session
                    self.probe = ProbeServer.start(self._probe_model(config), activations.attrs, config.dev_addr)
                self.site.probe_url = self.probe.url
        except NeuronSpecError as e:
            activations.close()
            raise PluginError(f"gluscope: neurons: {printable(e)}") from None
        except UnknownActivation as e:
            activations.close()
            raise PluginError(f"gluscope: activations file {path}: {printable(e)}") from None
        except ProbeError as e:
            activations.close()
            raise PluginError(f"gluscope: probe_model: {printable(e)}") from None
        if not self.site.neurons:
            log.warning("no neurons listed under plugins.gluscope.neurons; only the index page is built")
        self.path = path
        layout = self.config.layout
        self.light = layout == "light" or (layout == "auto" and len(self.site.neurons) > light.AUTO_LIGHT)
        if self.light and any(len(key) == 3 for key in self.site.neurons):
            # The light layout (mkdocs_gluscope.light) names neurons by (layer, neuron) only.
            self.site = None
            activations.close()
            raise PluginError("gluscope: the light layout does not support expert neurons yet; list them in the "
                              "full layout (layout: full)")
        for name in ASSETS:
            target = config.extra_css if name.endswith(".css") else config.extra_javascript
            if f"{ASSET_DIR}/{name}" not in [str(x) for x in target]:
                target.append(f"{ASSET_DIR}/{name}")
        if self.light and light.SITE_SCRIPT not in [str(x) for x in config.extra_javascript]:
            config.extra_javascript.insert(0, light.SITE_SCRIPT)  # before gluscope.js, which reads it
        return config

    def on_files(self, files: Files, *, config: MkDocsConfig) -> Files:
        with file_errors():
            return self._files(files, config)

    def _files(self, files: Files, config: MkDocsConfig) -> Files:
        site = self.site
        assert site is not None
        self._pages = {}
        directory_urls = config.use_directory_urls
        if self.light:
            return self._light_files(files, config)
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

    def _light_files(self, files: Files, config: MkDocsConfig) -> Files:
        """Index and layer pages, the theme shell of the neuron pages, documents, assets, site.js."""
        site = self.site
        assert site is not None
        directory_urls = config.use_directory_urls
        files.append(File.generated(config, site.index_path, content=site.light_index_markdown(directory_urls)))
        for layer in site.layers:
            files.append(File.generated(config, site.layer_path(layer), inclusion=InclusionLevel.NOT_IN_NAV,
                                        content=site.light_layer_markdown(layer, directory_urls)))
        files.append(File.generated(config, self._shell_src, inclusion=InclusionLevel.NOT_IN_NAV,
                                    content=light.SHELL_MARKDOWN))
        # Neuron pages are written after the build (on_post_build); as excluded files MkDocs still
        # resolves a hand-written page's link to "neurons/L5/N1480.md" to the page's URL.
        for layer, neuron in site.neurons:
            files.append(File.generated(config, site.neuron_path(layer, neuron), inclusion=InclusionLevel.EXCLUDED,
                                        content=""))
        per_shard = light.docs_per_shard(site.file)
        for src, text in site.doc_shards(per_shard).items():
            files.append(File.generated(config, src, content=text))
        for name in ASSETS:
            files.append(File.generated(config, f"{ASSET_DIR}/{name}", content=asset_text(name)))
        files.append(File.generated(config, light.SITE_SCRIPT, content=light.site_script(
            site.prefix, directory_urls, site.file.layers, site.file.d_mlp, per_shard)))
        return files

    @property
    def _shell_src(self) -> str:
        assert self.site is not None
        return f"{self.site.prefix}/{light.SHELL_DIR}/shell.md"

    def on_post_page(self, output: str, *, page: Page, config: MkDocsConfig) -> str:
        if self.light and page.file.src_uri == self._shell_src:
            try:
                index = "/" if config.use_directory_urls else "/index.html"  # the neurons' index page
                search_url = "../" * page.url.count("/") + self.site.prefix + index
                self._shell = light.shell_parts(output, search_url)
            except ValueError as e:
                raise PluginError(f"gluscope: layout light: {e}") from None
            return output
        key = self._pages.get(page.file.src_uri)
        if key is None or self.site is None:
            return output
        site_root = "../" * page.url.count("/")
        with file_errors():
            return self.site.fill_page(output, *key, site_root=site_root)

    def on_post_build(self, *, config: MkDocsConfig) -> None:
        if not self.light or self.site is None:
            return
        if self._shell is None:
            raise PluginError("gluscope: layout light: the shell page was not built")
        site = self.site
        start = time.perf_counter()
        with file_errors():
            totals = light.build_light(
                activations=str(self.path), neurons=site.neurons, site_dir=config.site_dir, prefix=site.prefix,
                directory_urls=config.use_directory_urls, shell=self._shell,
                markdown_extensions=list(config.markdown_extensions), mdx_configs=dict(config.mdx_configs),
                examples=site.examples, color_hook=site.color_hook, inline_cases=self.config.inline_cases,
                act_fn=str(site.file.attrs.get("act_fn", "silu")), workers=self.config.workers)
        shutil.rmtree(Path(config.site_dir) / site.prefix / light.SHELL_DIR, ignore_errors=True)
        log.info(f"gluscope: wrote {totals['pages']:,} neuron pages ({totals['page_bytes'] / 1e6:.0f} MB) and their "
                 f"example data ({totals['data_bytes'] / 1e6:.0f} MB) in {time.perf_counter() - start:.1f} s")

    def on_serve(self, server: Any, *, config: MkDocsConfig, builder: Any) -> Any:
        if self.path is not None:
            server.watch(str(self.path))  # a new collection run rebuilds the site
        return server

    def _probe_model(self, config: MkDocsConfig) -> str:
        model = str(self.config.probe_model)
        local = Path(config.config_file_path or ".").parent / model
        return str(local.resolve()) if local.exists() else model

    def on_shutdown(self) -> None:
        if self.probe is not None:
            self.probe.stop()
            self.probe = None
        if self.site is not None:
            self.site.file.close()
            self.site = None
