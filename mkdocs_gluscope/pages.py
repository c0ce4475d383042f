"""The set of generated pages for a list of neurons: paths, Markdown, examples, document shards.

:class:`SitePages` is what the MkDocs plugin and ``gluscope pages`` share. Paths are relative to
the docs folder: ``neurons/index.md``, ``neurons/L{layer}/index.md``, ``neurons/L{layer}/N{neuron}.md``,
and ``gluscope/docs/{shard}.json`` (the documents that examples come from, fetched when a reader
expands one).
"""

from __future__ import annotations

import html
import os
import posixpath
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

from mkdocs_gluscope.activations import UnknownActivation, activation
from mkdocs_gluscope.neurons import parse_neuron_ids
from mkdocs_gluscope.pick import layer_case_scales
from mkdocs_gluscope.render import (
    VISIBLE,
    PageContext,
    display_name,
    examples_html,
    fill_page,
    index_rows,
    json_text,
    md_text,
    neuron_markdown,
    token_html,
)
from mkdocs_gluscope.store import SHARED, ActivationsFile, NeuronData, neuron_id
from mkdocs_gluscope.words import js_constants

DOCS_PER_SHARD = 64
#: The pages' stylesheet and scripts (ES modules: gluscope.js imports the rules it shares with Python
#: from rules.js, whose constants come from words-data.js; light.js draws a light site's neuron pages).
ASSETS = ("gluscope.css", "gluscope.js", "rules.js", "figures.js", "light.js", "stub.js", "words-data.js")
#: What a page's head names (the rest is imported by these).
PAGE_ASSETS = ("gluscope.css", "gluscope.js")
ASSET_DIR = "assets/gluscope"


def asset_text(name: str) -> str:
    """An asset as the site serves it; ``words-data.js`` is written from the Python rules' constants
    (:func:`words.js_constants`, and :data:`render.VISIBLE`: one table for Python and JavaScript)."""
    if name == "words-data.js":
        return js_constants() + f"export const VISIBLE = {json_text(VISIBLE, ascii=True)};\n"
    return resources.files("mkdocs_gluscope").joinpath("assets", name).read_text(encoding="utf-8")


class PageOptionError(ValueError):
    """A page option (``url_prefix``, ``examples``) that cannot be used; the message says what would do."""


_PREFIX_PART = re.compile(r"[A-Za-z0-9_.-]+")


def check_url_prefix(prefix: object) -> str:
    """``prefix`` as a folder path relative to the docs folder, without a trailing slash.

    Pages are written at ``{prefix}/...`` inside the site and the prefix goes into URLs, HTML
    attributes and scripts: only path-safe characters (ASCII letters, digits, ``-``, ``_``, ``.``) in
    folder names separated by ``/``, and no ``.`` or ``..`` folder, which would write the pages
    somewhere else (or over other pages)."""
    if isinstance(prefix, str):
        parts = prefix[:-1].split("/") if prefix.endswith("/") else prefix.split("/")
        if all(_PREFIX_PART.fullmatch(part) and part not in (".", "..") for part in parts):
            return "/".join(parts)
    raise PageOptionError(
        f"url_prefix: {prefix!r}; expected a relative path inside the site: folder names of ASCII letters, digits, "
        "'-', '_' and '.' separated by '/' (e.g. 'neurons' or 'model/neurons'), with no '.' or '..' folder")


def check_examples(examples: object) -> int | None:
    """``examples`` per list: a whole number, 1 or more, or None for all k in the file."""
    if examples is None or (isinstance(examples, int) and not isinstance(examples, bool) and examples >= 1):
        return examples
    raise PageOptionError(f"examples: {examples!r}; expected a whole number, 1 or more (or none for all k)")


Key = tuple  # (layer, neuron) or (layer, neuron, expert): see mkdocs_gluscope.neurons


class SitePages:
    """Pages of ``neurons`` (ids as in :func:`parse_neuron_ids`) from one activations file.

    A neuron is named by its key, ``(layer, neuron)`` or, for an expert's neuron,
    ``(layer, neuron, expert)``; methods take it spread out (``site.neuron_path(*key)``)."""

    def __init__(self, activations: ActivationsFile, neurons: str | Iterable[str], *, url_prefix: str = "neurons",
                 examples: int | None = None, color_hook: str = "hook_post") -> None:
        self.file = activations
        act_name = str(activations.attrs.get("act_fn", "silu"))
        activation(act_name)  # every page computes act(gate): an unknown one fails before any page is written
        self.neurons: list[Key] = parse_neuron_ids(neurons, activations.layers, activations.d_mlp,
                                                   activations.experts_index())
        self.prefix = check_url_prefix(url_prefix)
        self.examples = check_examples(examples)
        self.color_hook = color_hook
        self._position = {n: i for i, n in enumerate(self.neurons)}
        self._vocab_html: dict[int, str] = {}
        self._summaries: dict[Key, NeuronData] = {}
        #: Where a full page's text box posts its text (a probe server of ``mkdocs serve``); None: no box.
        self.probe_url: str | None = None

    # -- paths --------------------------------------------------------------------------------
    @staticmethod
    def _folder(layer: int, expert: int | str | None = None) -> str:
        """A layer's folder, or an expert's inside it (``E3``, ``S`` for the shared expert)."""
        if expert is None:
            return f"L{layer}"
        return f"L{layer}/" + ("S" if expert == SHARED else f"E{int(expert)}")

    def neuron_path(self, layer: int, neuron: int, expert: int | str | None = None) -> str:
        return f"{self.prefix}/{self._folder(layer, expert)}/N{neuron}.md"

    def layer_path(self, layer: int) -> str:
        return f"{self.prefix}/L{layer}/index.md"

    def expert_path(self, layer: int, expert: int | str) -> str:
        return f"{self.prefix}/{self._folder(layer, expert)}/index.md"

    @property
    def index_path(self) -> str:
        return f"{self.prefix}/index.md"

    @property
    def layers(self) -> list[int]:
        return sorted({key[0] for key in self.neurons})

    @property
    def experts(self) -> list[tuple[int, int | str]]:
        """(layer, expert) of every expert with a listed neuron, routed experts first in each layer."""
        found = {(key[0], key[2]) for key in self.neurons if len(key) == 3}
        return sorted(found, key=lambda le: (le[0], le[1] == SHARED, 0 if le[1] == SHARED else le[1]))

    # -- shared lookups -----------------------------------------------------------------------
    def vocab_html(self, token: int) -> str:
        cached = self._vocab_html.get(token)
        if cached is None:
            cached = self._vocab_html[token] = token_html(self.file.vocab[token])
        return cached

    def vocab_text(self, token: int) -> str:
        return self.file.vocab[token]

    @lru_cache(maxsize=None)
    def doc_title(self, doc: int) -> str | None:
        return self.file.doc_title(doc)

    def case_scales(self, layer: int, expert: int | str | None = None) -> tuple[float, ...]:
        """The layer's scale of each case, as ``gluscope pick`` scores (read once per layer; for an
        expert's neuron, the scale among the layer's routed experts, or of its shared expert)."""
        kind = None if expert is None else SHARED if expert == SHARED else 0  # every routed expert: one scale
        return self._case_scales(layer, kind)

    @lru_cache(maxsize=None)
    def _case_scales(self, layer: int, kind: int | str | None) -> tuple[float, ...]:
        return tuple(float(x) for x in layer_case_scales(self.file, layer, kind))

    def context(self, *key: Any, site_root: str = "") -> PageContext:
        i = self._position[tuple(key)]
        here = posixpath.dirname(self.neuron_path(*key))

        def rel(path: str) -> str:
            return posixpath.relpath(path, here)

        def link(j: int) -> tuple[str, str] | None:
            if not 0 <= j < len(self.neurons):
                return None
            other = self.neurons[j]
            return neuron_id(*_id_parts(other)), rel(self.neuron_path(*other))

        expert = key[2] if len(key) == 3 else None

        def neuron_link(neuron: str) -> str | None:
            """A related neuron's page (``LAYER.NEURON``), where the site has one."""
            other = tuple(int(x) for x in neuron.split("."))
            return rel(self.neuron_path(*other)) if other in self._position else None

        return PageContext(
            vocab_html=self.vocab_html, vocab_text=self.vocab_text, doc_title=self.doc_title,
            site_root=site_root, examples=self.examples, color_hook=self.color_hook,
            prev_link=link(i - 1), next_link=link(i + 1), index_link=rel(self.index_path),
            layer_link=rel(self.layer_path(key[0])),
            expert_link=None if expert is None else rel(self.expert_path(key[0], expert)),
            case_scales=self.case_scales(key[0], expert), neuron_link=neuron_link,
            probe_url=self.probe_url if expert is None else None)

    # -- content ------------------------------------------------------------------------------
    def neuron_data(self, layer: int, neuron: int, expert: int | str | None = None) -> NeuronData:
        """Everything, windows included (for the examples)."""
        return self.file.neuron(layer, neuron, expert=expert)

    def neuron_summary(self, layer: int, neuron: int, expert: int | str | None = None) -> NeuronData:
        """All but the windows, read once: the page's Markdown and the index tables share it."""
        key = (layer, neuron) if expert is None else (layer, neuron, expert)
        if key not in self._summaries:
            self._summaries[key] = self.file.neuron(layer, neuron, windows=False, expert=expert)
        return self._summaries[key]

    def neuron_markdown(self, *key: Any, data: NeuronData | None = None) -> str:
        data = data or self.neuron_summary(*key)
        return neuron_markdown(data, self.context(*key))

    def examples_html(self, *key: Any, site_root: str, data: NeuronData | None = None) -> str:
        data = data or self.neuron_data(*key)
        return examples_html(data, self.context(*key, site_root=site_root))

    def fill_page(self, page: str, *key: Any, site_root: str, data: NeuronData | None = None) -> str:
        """``page`` with its placeholders (examples, distributions, samples, bands) replaced."""
        data = data or self.neuron_data(*key)
        return fill_page(page, data, self.context(*key, site_root=site_root))

    def _table(self, neurons: Sequence[Key], url) -> str:
        entries = [(self.neuron_summary(*key), url(*key)) for key in neurons]
        return index_rows(entries, self.vocab_text)

    def _url(self, from_path: str, directory_urls: bool):
        """URLs of neuron pages relative to the page at ``from_path`` (a Markdown path)."""
        here = posixpath.dirname(from_path)
        suffix = "/" if directory_urls else ".html"

        def url(*key: Any) -> str:
            return posixpath.relpath(self.neuron_path(*key), here)[: -len(".md")] + suffix

        return url

    def index_markdown(self, *, directory_urls: bool = True) -> str:
        a = self.file.attrs
        layer_links = " · ".join(f"[{layer}](L{layer}/index.md)" for layer in self.layers)
        dense = [key for key in self.neurons if len(key) == 2]
        lines = [
            "# Neurons", "",
            f"{len(self.neurons)} neurons of **{md_text(display_name(a.get('model') or 'the model'))}**, recorded "
            f"over {self.file.n_tokens:,} tokens of {md_text(display_name(a.get('dataset') or 'the corpus'))}. "
            "Click a column "
            "header to sort; the percentages are each case's share of all counted tokens, the top words "
            "those of each case's strongest hook_post example (the whole word, its peak token underlined).", "",
            f"Layers: {layer_links}", ""]
        if dense or not self.experts:
            lines += [self._table(dense, self._url(self.index_path, directory_urls)), ""]
        if self.experts:
            lines += ["## Experts", "", "Mixture-of-experts layers: each expert's neurons have their own pages. "
                      "An expert neuron's percentages are shares of the tokens routed to its expert.", "",
                      self._experts_table(self.experts, self.index_path), ""]
        return "\n".join(lines)

    def _experts_table(self, experts: Sequence[tuple[int, int | str]], from_path: str) -> str:
        """One row per expert: its routing frequency and a link to its index page."""
        here = posixpath.dirname(from_path)
        rows = []
        for layer, expert in experts:
            routed = self.file.routed[(layer, expert)]
            share = routed / max(self.file.n_tokens, 1)
            listed = sum(1 for key in self.neurons if len(key) == 3 and key[0] == layer and key[2] == expert)
            label = neuron_id(layer, 0, expert).rsplit(".", 1)[0]
            link = posixpath.relpath(self.expert_path(layer, expert), here)
            kind = "shared (every token)" if expert == SHARED else "routed"
            rows.append(f'<tr><td data-sort="{layer:04d}"><a href="{html.escape(link)}">{html.escape(label)}</a></td>'
                        f"<td>{kind}</td><td data-sort=\"{share:.6f}\">{100 * share:.3g}%</td>"
                        f"<td>{routed:,}</td><td>{listed}</td></tr>")
        return ('<div class="md-typeset__scrollwrap"><table class="gs-table gs-sortable gs-experts"><thead><tr>'
                "<th>expert</th><th>kind</th><th>routing frequency</th><th>tokens routed</th><th>neurons listed</th>"
                f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")

    def layer_markdown(self, layer: int, *, directory_urls: bool = True) -> str:
        listed = [key for key in self.neurons if key[0] == layer and len(key) == 2]
        experts = [(lay, e) for lay, e in self.experts if lay == layer]
        lines = [f"# Layer {layer}", "", "[All neurons](../index.md)", ""]
        if listed or not experts:
            lines += [self._table(listed, self._url(self.layer_path(layer), directory_urls)), ""]
        if experts:
            lines += ["## Experts", "", self._experts_table(experts, self.layer_path(layer)), ""]
        return "\n".join(lines)

    def expert_markdown(self, layer: int, expert: int | str, *, directory_urls: bool = True) -> str:
        """An expert's index: its routing and a table of its listed neurons."""
        path = self.expert_path(layer, expert)
        listed = [key for key in self.neurons if len(key) == 3 and key[0] == layer and key[2] == expert]
        routed = self.file.routed[(layer, expert)]
        share = routed / max(self.file.n_tokens, 1)
        label = neuron_id(layer, 0, expert).rsplit(".", 1)[0]
        what = ("the shared expert: it sees every token" if expert == SHARED else
                f"routed {routed:,} of {self.file.n_tokens:,} counted tokens ({100 * share:.3g}%)")
        return "\n".join([
            f"# Expert {label}", "",
            f"[All neurons]({posixpath.relpath(self.index_path, posixpath.dirname(path))}) · "
            f"[Layer {layer}](../index.md)", "",
            f"Layer {layer}'s expert {label.split('.')[1]}, {what}. Its neurons' statistics are over the tokens "
            "routed to it; the percentages below are shares of those tokens.", "",
            self._table(listed, self._url(path, directory_urls)), ""])

    def doc_shards(self, docs_per_shard: int = DOCS_PER_SHARD) -> dict[str, str]:
        """``gluscope/docs/{shard}.json`` for every document an example of a listed neuron
        comes from: ``{doc: {"title": ..., "tokens": [display strings]}}``, ``docs_per_shard``
        documents per file (a light site picks it so a file holds about 4,096 tokens)."""
        docs: set[int] = set()
        for key in self.neurons:
            docs.update(int(d) for d in self.neuron_summary(*key).top_doc.ravel() if d >= 0)
        shards: dict[int, dict[str, dict]] = {}
        vocab = self.file.vocab
        for doc in sorted(docs):
            tokens = [vocab[t] for t in self.file.document(doc)]
            shards.setdefault(doc // docs_per_shard, {})[str(doc)] = {"title": self.doc_title(doc), "tokens": tokens}
        return {f"gluscope/docs/{shard}.json": json_text(content)
                for shard, content in shards.items()}


def _id_parts(key: Key) -> tuple:
    """``neuron_id`` arguments of a key: (layer, neuron) or (layer, neuron, expert)."""
    return tuple(key)


def write_markdown_pages(activations: str | os.PathLike, neurons: Sequence[str], out: str | os.PathLike, *,
                         examples: int | None = None, color_hook: str = "hook_post") -> list[Path]:
    """Write every page as a Markdown file with the examples inlined as HTML, plus the CSS/JS
    assets and document shards the pages use, under ``out`` (a docs folder of any generator)."""
    from mkdocs_gluscope.errors import GluscopeError
    from mkdocs_gluscope.store import FormatError

    out = Path(out)
    try:
        check_examples(examples)  # before opening the file: the cheapest mistake to report
        f = ActivationsFile(activations)
    except (FileNotFoundError, FormatError, PageOptionError) as e:
        raise GluscopeError(str(e)) from None
    written: list[Path] = []

    def write(rel: str, text: str) -> None:
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)

    with f:
        try:
            site = SitePages(f, neurons, examples=examples, color_hook=color_hook)
        except ValueError as e:  # a neuron id, an option, or an activation the file names
            raise GluscopeError(f"{f.path}: {e}" if isinstance(e, UnknownActivation) else str(e)) from None
        head = "".join(f'<link rel="stylesheet" href="{{root}}{ASSET_DIR}/{a}">' if a.endswith(".css") else
                       f'<script type="module" src="{{root}}{ASSET_DIR}/{a}"></script>' for a in PAGE_ASSETS)
        for key in site.neurons:
            rel = site.neuron_path(*key)
            root = "../" * rel.count("/")
            data = site.neuron_data(*key)
            page = site.fill_page(site.neuron_markdown(*key, data=data), *key, site_root=root, data=data)
            write(rel, page + "\n" + head.replace("{root}", html.escape(root)) + "\n")
        write(site.index_path, site.index_markdown(directory_urls=False))
        for layer in site.layers:
            write(site.layer_path(layer), site.layer_markdown(layer, directory_urls=False))
        for layer, expert in site.experts:
            write(site.expert_path(layer, expert), site.expert_markdown(layer, expert, directory_urls=False))
        for rel, text in site.doc_shards().items():
            write(rel, text)
        for name in ASSETS:
            write(f"{ASSET_DIR}/{name}", asset_text(name))
    return written

