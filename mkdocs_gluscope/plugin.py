"""The ``gluscope`` MkDocs plugin: one page per listed neuron, generated from an activations file.

```yaml
plugins:
  - search
  - gluscope:
      activations: data/demo.h5
      neurons: ["29.1034", "3.*"]
```

Glue only: :mod:`mkdocs_gluscope.pages` decides what a hand-picked list's (full) pages hold,
:mod:`mkdocs_gluscope.light` what a whole model's site holds. Neuron and layer pages stay out of the
navigation (a thousand nav entries make every page huge); ``{url_prefix}/`` lists them. Two
instances (``gluscope`` twice, each with its own ``url_prefix``) publish two files in one site.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
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

from mkdocs_gluscope.activations import UnknownActivation, activation
from mkdocs_gluscope.errors import GluscopeError, printable
from mkdocs_gluscope.neurons import NeuronSpecError, neuron_specs, parse_neuron_ids
from mkdocs_gluscope.pages import (
    ASSET_DIR,
    ASSETS,
    PAGE_ASSETS,
    PageOptionError,
    SitePages,
    asset_text,
    check_examples,
    check_url_prefix,
)
from mkdocs_gluscope.probe_server import ProbeError, ProbeServer
from mkdocs_gluscope.store import HOOKS, ActivationsFile, FormatError

log = logging.getLogger("mkdocs.plugins.gluscope")

DEFAULT_MISSING_HINT = "gluscope collect --model MODEL --dataset DATA --out FILE"
#: More listed neurons than this make ``layout: auto`` choose the light layout.
AUTO_LIGHT = 2000


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


class DataUrl(c.OptionallyRequired[str]):
    """An ``http(s)://`` URL of a folder, or a path relative to the site's root; kept with one trailing ``/``."""

    def run_validation(self, value: object) -> str:
        if not isinstance(value, str) or not value.strip() or value.strip() != value or "\\" in value:
            raise c.ValidationError(f"{value!r}; expected the URL of the folder that holds the data files, such as "
                                    "'https://huggingface.co/datasets/USER/REPO/resolve/main/' or a path in the site")
        if not re.match(r"^https?://[^/\s]+", value) and (value.startswith("/") or ".." in value.split("/")
                                                         or ":" in value.split("/")[0]):
            raise c.ValidationError(f"{value!r}; expected an http(s) URL or a relative path inside the site "
                                    "(no leading '/', no '..')")
        return value.rstrip("/") + "/"


class GluscopeConfig(base.Config):
    enabled = c.Type(bool, default=True)
    """Set to false to build the site without this plugin's pages (e.g. ``enabled: !ENV [GLUSCOPE, true]``
    to skip a whole model's pages while writing the rest of the site)."""

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
    ``/``, no ``.`` or ``..`` folder). Every file the plugin writes for its pages lives under it, so two
    instances with different prefixes publish two files in one site. Default: ``neurons``."""

    examples = _Checked(check_examples)
    """Examples shown per list (top-k lists, random samples, band samples): a whole number, 1 or more.
    Default: all that the file holds."""

    color_hook = c.Choice(HOOKS, default="hook_post")
    """Hook that colors the example tokens when a page opens (readers can switch on the page):
    ``hook_post``, ``hook_pre_linear``, ``hook_pre`` or ``swish``. Default: ``hook_post``."""

    layout = c.Choice(("auto", "full", "light"), default="auto")
    """``full``: every example inline in each page, pages built by MkDocs and indexed by Material's
    search (for a hand-picked list). ``light``: for a whole model, each page is a few hundred bytes in the
    theme and draws its data (summary, distributions, examples, samples) from Parquet files read by HTTP
    range requests; layer pages sort, filter and page their neurons, and the search box finds neurons by
    id and by word. ``auto`` (default): ``light`` above 2,000 listed neurons, else ``full``."""

    data_url = c.Optional(DataUrl())
    """Light layout: where the pages read their data files (``neurons/``, ``corpus/``), e.g. a dataset
    repository's ``https://huggingface.co/datasets/USER/REPO/resolve/main/``; the files are then written
    to ``data_dir`` for you to upload there. Default: inside the site, at ``{url_prefix}/data/``."""

    data_dir = c.Optional(c.Dir(exists=False))
    """Light layout with ``data_url``: the folder the data files are written to (relative to
    ``mkdocs.yml``). Default: ``site-data/{url_prefix}`` beside ``mkdocs.yml``."""

    cache = c.Type(bool, default=True)
    """Light layout: keep what was built in ``cache_dir`` and reuse it while the activations file, the
    options and the theme stay the same (``mkdocs serve`` after editing a page then rewrites no neuron page)."""

    cache_dir = c.Type(str, default=".cache/plugin/gluscope")
    """Light layout: the cache folder, relative to ``mkdocs.yml`` (add it to ``.gitignore``)."""

    workers = c.Optional(c.Type(int))
    """Light layout: processes that write the data files and the pages. Default: one per CPU this build may use."""

    probe_model = c.Optional(c.Type(str))
    """``mkdocs serve`` only: the model the file was collected from (a hub name, a folder or GGUF file,
    relative to ``mkdocs.yml`` if it exists there). Each full neuron page then offers a text box that
    runs the reader's own text through it (``gluscope probe``) on this machine: the plugin starts a
    probe server on 127.0.0.1 that answers this site's pages only. Needs the ``[collect]`` extra. A
    built site (``mkdocs build``) never has the box. Default: none."""

    inline_cases = c.Deprecated(
        message="The option '{}' was removed: a light page holds no examples of its own (a 7B model's site "
                "would not fit 1 GB); its examples, distributions and samples load from its data file.",
        removed=True)


def _module(path: str) -> c.ExtraScriptValue:
    script = c.ExtraScriptValue(path)
    script.type = "module"
    return script


class GluscopePlugin(BasePlugin[GluscopeConfig]):
    supports_multiple_instances = True

    def __init__(self) -> None:
        self.site: SitePages | None = None
        self.path: Path | None = None
        self._pages: dict[str, tuple] = {}  # page source -> neuron key
        self.light = False
        self.groups: dict | None = None  # light layout: (layer, expert) -> neuron indices
        self._serve = False
        self._data: Path | None = None  # light layout: the data stage's folder
        self._temporary: Path | None = None
        self._env: Any = None
        self._nav: Any = None
        self._files: Files | None = None
        self._vendor_modules: list[str] = []  # light layout: the Parquet reader's modules, preloaded by the shell
        self.probe: ProbeServer | None = None  # full pages of mkdocs serve with probe_model: the text box's model

    # -- configuration ------------------------------------------------------------------------
    def on_startup(self, *, command: str, dirty: bool) -> None:
        self._serve = command == "serve"

    def on_config(self, config: MkDocsConfig) -> MkDocsConfig | None:
        if not self.config.enabled:
            return config
        path = Path(self.config.activations)  # validated at load: an existing file, absolute
        self.close()
        with file_errors():
            activations = ActivationsFile(path)
        with activations:
            try:
                activation(str(activations.attrs.get("act_fn", "silu")))
                keys = parse_neuron_ids(self.config.neurons, activations.layers, activations.d_mlp,
                                        activations.experts_index())
            except NeuronSpecError as e:
                raise PluginError(f"gluscope: neurons: {printable(e)}") from None
            except UnknownActivation as e:
                raise PluginError(f"gluscope: activations file {path}: {printable(e)}") from None
        layout = self.config.layout
        self.light = layout == "light" or (layout == "auto" and len(keys) > AUTO_LIGHT)
        self.path = path
        if not keys:
            log.warning("no neurons listed under plugins.gluscope.neurons; only the index page is built")
        if self.light:
            from mkdocs_gluscope.light.build import groups_of
            from mkdocs_gluscope.light.theme import template_dir

            self.groups = groups_of(keys)
            del keys
            if template_dir() not in config.theme.dirs:
                config.theme.dirs.append(template_dir())  # gluscope/neuron.html, under any custom_dir
            config.extra_javascript.insert(0, f"{self.prefix}/site.js")  # before the modules that read it
        else:
            with file_errors():
                self.site = SitePages(ActivationsFile(path), [self._id(k) for k in keys], url_prefix=self.config.url_prefix,
                                      examples=self.config.examples, color_hook=self.config.color_hook)
            if self.config.probe_model and self._serve:
                try:
                    if self.probe is None:  # one server for every rebuild of this serve session
                        self.probe = ProbeServer.start(self._probe_model(config), self.site.file.attrs, config.dev_addr)
                except ProbeError as e:
                    self.close()
                    raise PluginError(f"gluscope: probe_model: {printable(e)}") from None
                self.site.probe_url = self.probe.url
        for name in PAGE_ASSETS:
            target = config.extra_css if name.endswith(".css") else config.extra_javascript
            if f"{ASSET_DIR}/{name}" not in [str(x) for x in target]:
                target.append(f"{ASSET_DIR}/{name}" if name.endswith(".css") else _module(f"{ASSET_DIR}/{name}"))
        return config

    @staticmethod
    def _id(key: tuple) -> str:
        from mkdocs_gluscope.store import neuron_id

        return neuron_id(*key)

    @property
    def prefix(self) -> str:
        return self.config.url_prefix

    # -- files --------------------------------------------------------------------------------
    def on_files(self, files: Files, *, config: MkDocsConfig) -> Files | None:
        if not self.config.enabled:
            return files
        with file_errors():
            return self._add_files(files, config)

    def _add_files(self, files: Files, config: MkDocsConfig) -> Files:
        self._pages = {}
        self._files = files
        for name in ASSETS:
            if files.get_file_from_path(f"{ASSET_DIR}/{name}") is None:
                files.append(File.generated(config, f"{ASSET_DIR}/{name}", content=asset_text(name)))
        if self.light:
            return self._light_files(files, config)
        site = self.site
        assert site is not None
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
        return files

    def _cache_root(self, config: MkDocsConfig) -> Path:
        return Path(config.config_file_path or ".").parent / self.config.cache_dir / self.prefix.replace("/", "--")

    def _light_files(self, files: Files, config: MkDocsConfig) -> Files:
        """The data stage (cached), then the index, layer and expert pages from its tables, and site.js."""
        from mkdocs_gluscope.light import build as lbuild
        from mkdocs_gluscope.light import page as lpage
        from mkdocs_gluscope.light.data import dumps

        from mkdocs_gluscope.light.vendor import vendor_files

        assert self.groups is not None and self.path is not None
        groups = self.groups
        try:
            vendored = vendor_files()
        except GluscopeError as e:
            raise PluginError(f"gluscope: layout light: {e}") from None
        self._vendor_modules = sorted(name for name in vendored if name.endswith(".js"))
        for name, content in vendored.items():
            if files.get_file_from_path(f"{ASSET_DIR}/{name}") is None:
                files.append(File.generated(config, f"{ASSET_DIR}/{name}", content=content))
        options = lbuild.DataOptions(str(self.path), self.config.examples, self.config.workers or _cpus())
        key = lbuild.digest({"file": lbuild.file_identity(str(self.path)), "neurons": self.config.neurons,
                             "examples": self.config.examples, "code": lbuild.code_version()})
        if self.config.cache:
            root = self._cache_root(config)
        else:
            root = self._temporary = Path(config.site_dir).parent / f".gluscope-build-{os.getpid()}"
        start = time.perf_counter()
        try:
            self._data, made = lbuild.cached(root, f"data-{key}", lambda out: self._report(
                lbuild.build_data(options, groups, out, log=log.info), start))
        except GluscopeError as e:
            raise PluginError(f"gluscope: {e}") from None
        if not made:
            log.info(f"gluscope: reusing {self._data} (the activations file and the options are unchanged)")
        tables = self._data / "site" / "layers"
        with lbuild.open_shared(str(self.path))[0] as f:  # checked once per build
            counts = {g[0]: len(n) for g, n in groups.items() if g[1] is None}
            in_experts: dict[int, int] = {}
            for g, n in groups.items():
                if g[1] is not None:
                    in_experts[g[0]] = in_experts.get(g[0], 0) + len(n)
            files.append(File.generated(config, f"{self.prefix}/index.md",
                                        content=lpage.index_markdown(f.attrs, f.n_tokens, counts, in_experts)))
            for layer in sorted({g[0] for g in groups}):
                rows = (_read_json(tables / f"{lbuild.table_name((layer, None))}.json")["rows"]
                        if (layer, None) in groups else [])
                experts = [(self._id((layer, 0, g[1])).rsplit(".", 1)[0], lpage.folder((layer, 0, g[1])).split("/")[1],
                            len(n), f.routed[(layer, g[1])] / max(f.n_tokens, 1))
                           for g, n in groups.items() if g[0] == layer and g[1] is not None]
                files.append(File.generated(config, f"{self.prefix}/L{layer}/index.md", inclusion=InclusionLevel.NOT_IN_NAV,
                                            content=lpage.layer_markdown(layer, rows, config.use_directory_urls, experts)))
                for g, n in groups.items():
                    if g[0] == layer and g[1] is not None:
                        rows = _read_json(tables / f"{lbuild.table_name(g)}.json")["rows"]
                        sub = lpage.folder((layer, 0, g[1]))
                        files.append(File.generated(
                            config, f"{self.prefix}/{sub}/index.md", inclusion=InclusionLevel.NOT_IN_NAV,
                            content=lpage.expert_markdown(layer, g[1], rows, f.routed[(layer, g[1])], f.n_tokens,
                                                          config.use_directory_urls)))
        data = self.config.data_url or "data/"
        if not re.match(r"^https?://", data) and self.config.data_url:
            data = "../" * (self.prefix.count("/") + 1) + data  # relative to the site root: make it relative to ours
        with lbuild.open_shared(str(self.path))[0] as f:
            full = {g: (f.d_mlp if g[1] is None else f.expert_neurons(g[1])) for g in groups}
        tails = _read_json(self._data / "site" / "site.json")["tails"]  # what a page fetches first of a data file
        files.append(File.generated(config, f"{self.prefix}/site.js", content=lpage.site_script({
            "prefix": self.prefix, "suffix": "/" if config.use_directory_urls else ".html", "data": data, "tails": tails,
            # table -> [layer, expert, neurons listed, neurons it has]: ids of a whole table need no lookup
            "tables": {lbuild.table_name(g): [g[0], g[1], len(n), full[g]] for g, n in groups.items()}}, dumps)))
        self._link_neuron_pages(files, config)
        return files

    def _report(self, totals: dict, start: float) -> None:
        log.info(f"gluscope: wrote the data of {totals['neurons']:,} neurons ({totals['data_bytes'] / 1e6:.0f} MB, corpus "
                 f"{totals['corpus_bytes'] / 1e6:.0f} MB) and a word index of {totals['terms']:,} terms in "
                 f"{totals['shards']:,} shards in {time.perf_counter() - start:.1f} s")

    def _link_neuron_pages(self, files: Files, config: MkDocsConfig) -> None:
        """Hand-written pages may link a neuron's page by its Markdown path (``neurons/L5/N1480.md``):
        MkDocs resolves such links to files it knows, so the neuron pages that a page links get a
        File (excluded from the build: the plugin writes them); the others stay unknown to MkDocs."""
        from mkdocs_gluscope.light.page import folder

        assert self.groups is not None
        listed = {g: set(n.tolist()) for g, n in self.groups.items()}
        pattern = re.compile(r"L(\d+)/(?:(E\d+|S)/)?N(\d+)\.md")
        seen: set[tuple] = set()
        for file in list(files.documentation_pages()):
            if not file.abs_src_path or not os.path.isfile(file.abs_src_path):
                continue
            text = Path(file.abs_src_path).read_text(encoding="utf-8", errors="replace")
            for match in pattern.finditer(text):
                layer, label, neuron = int(match.group(1)), match.group(2), int(match.group(3))
                expert = None if label is None else "s" if label == "S" else int(label[1:])
                if neuron in listed.get((layer, expert), ()) and (layer, neuron, expert) not in seen:
                    seen.add((layer, neuron, expert))
                    key = (layer, neuron) if expert is None else (layer, neuron, expert)
                    src = f"{self.prefix}/{folder(key)}/N{neuron}.md"
                    if files.get_file_from_path(src) is None:
                        files.append(File.generated(config, src, inclusion=InclusionLevel.EXCLUDED, content=""))

    # -- pages --------------------------------------------------------------------------------
    def on_nav(self, nav: Any, *, config: MkDocsConfig, files: Files) -> Any:
        self._nav = nav
        return nav

    def on_env(self, env: Any, *, config: MkDocsConfig, files: Files) -> Any:
        self._env = env
        return env

    def on_post_page(self, output: str, *, page: Page, config: MkDocsConfig) -> str | None:
        key = self._pages.get(page.file.src_uri)
        if key is None or self.site is None:
            return output
        site_root = "../" * page.url.count("/")
        with file_errors():
            return self.site.fill_page(output, *key, site_root=site_root)

    def on_post_build(self, *, config: MkDocsConfig) -> None:
        if not self.config.enabled or not self.light or self._data is None:
            return
        from mkdocs_gluscope.light import build as lbuild
        from mkdocs_gluscope.light import page as lpage
        from mkdocs_gluscope.light.theme import ThemeError, render_shell

        assert self.groups is not None
        start = time.perf_counter()
        # The theme's page at each depth of neuron page (a dense layer's, an expert's): one file each.
        shells: dict[str, str] = {}
        for g, n in self.groups.items():
            key = lbuild.group_key(g[0], int(n[0]), g[1])
            name = lpage.shell_name(key)
            if name not in shells:
                try:
                    shells[name] = render_shell(config, self._env, self._nav, self._files,
                                                lpage.page_url(self.prefix, key, config.use_directory_urls),
                                                self._vendor_modules)
                except ThemeError as e:
                    raise PluginError(f"gluscope: layout light: {e}") from None
        site_url = config.site_url or "/"
        options = lbuild.PageOptions(self.prefix, config.use_directory_urls, site_url, config.site_name)
        key = lbuild.digest({"data": self._data.name, "shells": shells, "prefix": self.prefix,
                             "urls": config.use_directory_urls, "site": site_url, "name": config.site_name})
        holder: dict = {}
        pages, made = lbuild.cached(self._data.parent, f"pages-{key}", lambda out: holder.update(
            lbuild.build_pages(options, self.groups, self._data / "site" / "layers", shells, out,
                               self.config.workers or _cpus())))
        site_dir = Path(config.site_dir)
        symlink = self._serve
        lbuild.place(pages, site_dir, symlink)
        lbuild.place(self._data / "site", site_dir / self.prefix / "gluscope", symlink)
        data_target = (site_dir / self.prefix / "data" if not self.config.data_url else
                       Path(self.config.data_dir or Path(config.config_file_path or ".").parent / "site-data" / self.prefix))
        lbuild.place(self._data / "data", data_target, symlink and not self.config.data_url)
        sitemaps = sorted((p.relative_to(pages).as_posix() for p in (pages / self.prefix).glob("sitemap-neurons-*.xml")),
                          key=lambda name: int(name.rsplit("-", 1)[1][:-len(".xml")]))
        lbuild.add_sitemaps(site_dir, site_url if site_url.endswith("/") else site_url + "/", sitemaps)
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = None
        else:
            lbuild.prune(self._data.parent, [self._data.name, pages.name])
        what = (f"wrote {holder['pages']:,} neuron pages ({holder['page_bytes'] / 1e6:.1f} MB)" if made
                else "reused the neuron pages (the theme's page is unchanged)")
        log.info(f"gluscope: {what} and placed them{' and the data' if not self.config.data_url else ''} in the site "
                 f"in {time.perf_counter() - start:.1f} s" + (f"; data files in {data_target} for {self.config.data_url}"
                                                               if self.config.data_url else ""))

    def on_serve(self, server: Any, *, config: MkDocsConfig, builder: Any) -> Any:
        if self.path is not None:
            server.watch(str(self.path))  # a new collection run rebuilds the site
        return server

    def _probe_model(self, config: MkDocsConfig) -> str:
        model = str(self.config.probe_model)
        local = Path(config.config_file_path or ".").parent / model
        return str(local.resolve()) if local.exists() else model

    def close(self) -> None:
        if self.site is not None:
            self.site.file.close()
            self.site = None

    def on_shutdown(self) -> None:
        self.close()
        if self.probe is not None:
            self.probe.stop()
            self.probe = None


def _read_json(path: Path) -> Any:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
