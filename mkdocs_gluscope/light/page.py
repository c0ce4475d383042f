"""What a light site's own pages hold: a neuron page's few hundred bytes, its layer's table row, the
neurons' index and layer pages, and the sitemap entries.

A neuron page is a stub (:func:`neuron_stub`): the title, links to its neighbours, its layer and the
index, one line with each case's share of tokens and top word (what a reader or a search engine sees
without JavaScript), and the place of its data. In the browser ``stub.js`` puts it into the theme's
page (:mod:`.theme`) and ``gluscope.js`` draws the rest from the data file: the summary, the
distributions, every example list, the samples.
"""

from __future__ import annotations

import html
import posixpath
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from mkdocs_gluscope.render import label_parts, md_text, parts_html, score_text, word_labels
from mkdocs_gluscope.store import CASES, SHARED, NeuronData, neuron_id

#: Rows per page of a layer table (in the browser, and the static first page without JavaScript).
PAGE_ROWS = 100

Key = tuple  # (layer, neuron) or (layer, neuron, expert)


def folder(key: Key) -> str:
    """A neuron's folder below ``url_prefix``: ``L3``, or ``L3/E12`` / ``L3/S`` for an expert's."""
    if len(key) == 2:
        return f"L{key[0]}"
    return f"L{key[0]}/" + ("S" if key[2] == SHARED else f"E{int(key[2])}")


def page_path(prefix: str, key: Key, directory_urls: bool) -> str:
    """The neuron page's file inside the site."""
    base = f"{prefix}/{folder(key)}/N{key[1]}"
    return base + "/index.html" if directory_urls else base + ".html"


def page_url(prefix: str, key: Key, directory_urls: bool) -> str:
    """The neuron page's URL relative to the site root."""
    base = f"{prefix}/{folder(key)}/N{key[1]}"
    return base + "/" if directory_urls else base + ".html"


def relative(from_url: str, to_url: str) -> str:
    """``to_url`` relative to the page at ``from_url`` (both relative to the site root)."""
    here = from_url if from_url.endswith("/") else posixpath.dirname(from_url) + "/"
    rel = _relpath(to_url.rstrip("/") or ".", here.rstrip("/") or ".")
    return rel + ("/" if to_url.endswith("/") and rel != "." else "") if rel != "." else "./"


def _relpath(path: str, start: str) -> str:
    """``posixpath.relpath`` of two relative paths, without its ``os.getcwd()`` per call (a tenth of
    a whole-model site's pages stage); paths that climb above the root take ``relpath`` itself."""
    a, b = posixpath.normpath(start), posixpath.normpath(path)
    if a.startswith("..") or b.startswith("..") or a.startswith("/") or b.startswith("/"):
        return posixpath.relpath(path, start)
    start_parts = [x for x in a.split("/") if x and x != "."]
    path_parts = [x for x in b.split("/") if x and x != "."]
    i = 0
    while i < min(len(start_parts), len(path_parts)) and start_parts[i] == path_parts[i]:
        i += 1
    parts = [".."] * (len(start_parts) - i) + path_parts[i:]
    return "/".join(parts) if parts else "."


def layer_row(data: NeuronData, words: Any) -> list:
    """One row of a layer table: neuron, the four case shares (percent, 4 digits) and the top word of
    each case (around the peak of its strongest hook_post example) as ``[before, peak, after]`` labels, or
    None: text the browser sets with textContent. ``words``: a :class:`search.WordFinder`."""
    ids = data.window_tokens[:, 0, 0]  # [C, W]
    centre = data.context_before
    starts, stops = words.extents(ids, centre)
    tops = [list(word_labels(words.word(ids[c], centre, int(starts[c]), int(stops[c]))))
            if data.top_doc[c, 0, 0] >= 0 and ids[c, centre] >= 0 else None for c in range(len(CASES))]
    row = [data.neuron, *[float(f"{100 * f:.4g}") for f in data.frequency], *tops]
    if data.explanations is not None:
        row += [case_label(e) for e in data.explanations]
    return row


def case_label(expl: Any) -> list | None:
    """A case's explanation as a table row holds it: ``[parts, score]`` (:func:`render.label_parts`,
    the score to 2 digits or None where not scored), None where the case has no label."""
    if not expl.label:
        return None
    return [label_parts(expl.label), round(expl.score, 2) if expl.scored else None]


def label_line(labels: Sequence[list | None]) -> str:
    """Each case's label and score as one line of HTML (a neuron page, a layer table's cell)."""
    shown = []
    for c, entry in enumerate(labels):
        if entry is None:
            continue
        parts, score = entry
        shown.append(f'<span class="gs-case{c}">{html.escape(CASES[c])}</span> <bdi class="gs-label">{parts_html(parts)}'
                     f'</bdi> <span class="gs-score">{score_text(score)}</span>')
    return " · ".join(shown)


@dataclass(frozen=True)
class Place:
    """Where a neuron page's data is: its file below the data folder and its row group."""

    file: str
    row: int


def neuron_stub(title: str, content: str, *, site_name: str, stub_js: str, shell: str) -> str:
    """A whole neuron page: ``title`` and ``content`` (:func:`neuron_content`), and ``stub.js`` (whose
    URL, and the shell's, are relative to the page)."""
    return (f'<!doctype html><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<title>{title} - {html.escape(site_name)}</title><link rel="icon" href="data:,">'
            f'<script src="{stub_js}" data-shell="{shell}"></script>{content}\n')


def shell_name(key: Key) -> str:
    """The shell of a neuron page's depth, below ``url_prefix``: a dense layer's and an expert's."""
    return "gluscope-shell/" + ("neuron.html" if len(key) == 2 else "expert-neuron.html")


def neuron_content(key: Key, row: Sequence, place: Place, *, links: dict[str, str], root: str) -> str:
    """The article of a neuron page. ``row``: its :func:`layer_row`; ``links``: URLs relative to the page
    (``index``, ``layer``, ``expert``, ``prev``/``next`` with ``prev_id``/``next_id``); ``root``: the
    URL of ``url_prefix`` relative to the page."""
    nid = neuron_id(*key)
    nav = [f'<a href="{links["index"]}">All neurons</a>', f'<a href="{links["layer"]}">Layer {key[0]}</a>']
    if "expert" in links:
        nav.append(f'<a href="{links["expert"]}">Expert {html.escape(nid.rsplit(".", 1)[0])}</a>')
    if "prev" in links:
        nav.append(f'<a href="{links["prev"]}">← {links["prev_id"]}</a>')
    if "next" in links:
        nav.append(f'<a href="{links["next"]}">{links["next_id"]} →</a>')
    gist = []
    for c, case in enumerate(CASES):
        word = row[5 + c]
        # a <bdi>: the word's bidirectional text cannot reorder the facts around it (as render.top_words_html)
        shown = f" <bdi>{md_text(''.join(word).strip())}</bdi>" if word and "".join(word).strip() else ""
        gist.append(f'<span class="gs-case{c}">{html.escape(case)}</span> {row[1 + c]:.3g}%{shown}')
    share = " of its expert's tokens" if len(key) == 3 else ""
    labels = label_line(row[9:13]) if len(row) > 9 else ""
    return (f'<h1 id="neuron">Neuron {nid}</h1><p class="gs-nav">{" · ".join(nav)}</p>'
            f'<p class="gs-gist">Share of tokens{share} and top word by case: {" · ".join(gist)}</p>'
            + (f'<p class="gs-labels">Explained as: {labels}</p>' if labels else "") +
            f'<div class="gs-light" data-root="{root}" data-file="{place.file}" data-row="{place.row}" data-id="{nid}"></div>')


def neighbour_links(before: Key | None, key: Key, after: Key | None, prefix: str, directory_urls: bool) -> dict[str, str]:
    """The links of a neuron's page, ``before`` and ``after`` it the listed neurons beside it (see
    :func:`neuron_content`)."""
    here = page_url(prefix, key, directory_urls)
    index = f"{prefix}/" if directory_urls else f"{prefix}/index.html"
    layer = f"{prefix}/L{key[0]}/" if directory_urls else f"{prefix}/L{key[0]}/index.html"
    links = {"index": relative(here, index), "layer": relative(here, layer)}
    if len(key) == 3:
        expert = f"{prefix}/{folder(key)}/" + ("" if directory_urls else "index.html")
        links["expert"] = relative(here, expert)
    for name, other in (("prev", before), ("next", after)):
        if other is not None:
            links[name] = relative(here, page_url(prefix, other, directory_urls))
            links[name + "_id"] = neuron_id(*other)
    return links


def root_of(prefix: str, key: Key, directory_urls: bool) -> str:
    """URL of the ``url_prefix`` folder relative to a neuron page."""
    return relative(page_url(prefix, key, directory_urls), f"{prefix}/")


#: URLs a sitemap file holds (the protocol's limit).
SITEMAP_URLS = 50_000


def sitemap(urls: Iterable[str], base: str) -> str:
    """A sitemap listing ``urls`` (relative to the site) under ``base``."""
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">\n'
            + "".join(f"<url><loc>{html.escape(base + u)}</loc></url>\n" for u in urls) + "</urlset>\n")


def index_markdown(attrs: dict[str, Any], n_tokens: int, counts: dict[int, int], experts: dict[int, int]) -> str:
    """The neurons' front page of a light site: what was recorded, and one line per layer."""
    from mkdocs_gluscope.render import display_name

    lines = [
        "# Neurons", "",
        f"{sum(counts.values()) + sum(experts.values()):,} neurons of "
        f"**{md_text(display_name(attrs.get('model') or 'the model'))}**, recorded over {n_tokens:,} tokens of "
        f"{md_text(display_name(attrs.get('dataset') or 'the corpus'))}. Each layer's page lists its neurons: sort "
        "them by a case's share of tokens, filter by it or by a word, and page through. The search box at the top "
        "of every page finds a neuron by its id (`28.473`) or by a word its strongest examples peak on "
        "(`applause`), in any language.", "",
        "| layer | neurons |", "|---|---|"]
    for layer in sorted(set(counts) | set(experts)):
        parts = []
        if counts.get(layer):
            parts.append(f"{counts[layer]:,}")
        if experts.get(layer):
            parts.append(f"{experts[layer]:,} in experts")
        lines.append(f"| [Layer {layer}](L{layer}/index.md) | {', '.join(parts)} |")
    return "\n".join(lines + [""])


def _table(label: str, table: str, rows: Sequence[list], up: str, directory_urls: bool) -> list[str]:
    """The first rows of a table of neurons as HTML (what a reader sees without JavaScript), which
    ``gluscope.js`` replaces with a sortable, filterable, paged table of all its rows
    (``{url_prefix}/gluscope/layers/{table}.json``, ``up`` leads there from the page)."""
    suffix = "/" if directory_urls else ".html"
    lines: list[str] = []
    if rows:
        head = "<th>neuron</th>" + "".join(f'<th class="gs-case gs-case{c}">{html.escape(case)}&nbsp;%</th>'
                                            for c, case in enumerate(CASES)) + "<th>top word of each case</th>"
        labelled = len(rows[0]) > 9  # the file has explanations: a column of each case's label and score
        if labelled:
            head = head[:-len("</th>")] + "; below, the label of each case (score)</th>"
        body = []
        for row in rows[:PAGE_ROWS]:
            words = "".join(
                f'<code class="gs-top gs-case{c}">' + (md_text(w[0]) + f'<span class="gs-peak">{md_text(w[1])}</span>'
                                                       + md_text(w[2]) if w else "–") + "</code>"
                for c, w in enumerate(row[5:9]))
            body.append(f'<tr><td><a href="N{row[0]}{suffix}">{label}.{row[0]}</a></td>'
                        + "".join(f"<td>{x:.3g}</td>" for x in row[1:5]) + f'<td class="gs-tops">{words}</td></tr>')
            if labelled and any(row[9:13]):  # the labels on a line of their own, the table's width
                body.append(f'<tr class="gs-label-row"><td class="gs-labels" colspan="6">{label_line(row[9:13])}</td></tr>')
        lines += [f'<div class="gs-layer" data-src="{up}gluscope/layers/{table}.json" data-suffix="{suffix}" '
                  f'data-label="{html.escape(label)}">',
                  '<div class="md-typeset__scrollwrap" data-search-exclude><table class="gs-table gs-index">'
                  f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>", "</div>", ""]
        # Raw links: MkDocs knows no neuron page (a 7B model's 352,256 File objects would take 300 MB).
        lines += ['<p class="gs-jump">Jump to neuron: ' + " · ".join(
            f'<a href="N{row[0]}{suffix}">{row[0]}</a>' for row in rows[::PAGE_ROWS]) + "</p>", ""]
    return lines


def layer_markdown(layer: int, rows: Sequence[list], directory_urls: bool,
                   experts: Sequence[tuple[str, str, int, float]] = ()) -> str:
    """A layer page: the table of its neurons (:func:`_table`), then its experts (label, folder,
    neurons, routing frequency) in a mixture-of-experts layer."""
    lines = [f"# Layer {layer}", "", "[All neurons](../index.md)" + (f" · {len(rows):,} neurons" if rows else ""), ""]
    lines += _table(str(layer), f"L{layer}", rows, "../", directory_urls)
    if experts:
        lines += ["## Experts", "", "| expert | neurons | routing frequency |", "|---|---|---|"]
        lines += [f"| [{label}]({sub}/index.md) | {n:,} | {100 * share:.3g}% |" for label, sub, n, share in experts]
        lines.append("")
    return "\n".join(lines)


def expert_markdown(layer: int, expert: int | str, rows: Sequence[list], routed: int, n_tokens: int,
                    directory_urls: bool) -> str:
    """An expert's page: its routing, then the table of its neurons (shares of the tokens routed to it)."""
    label = neuron_id(layer, 0, expert).rsplit(".", 1)[0]
    what = ("the shared expert: it sees every token" if expert == SHARED else
            f"routed {routed:,} of {n_tokens:,} counted tokens ({100 * routed / max(n_tokens, 1):.3g}%)")
    table = f"L{layer}-" + ("S" if expert == SHARED else f"E{int(expert)}")
    return "\n".join([f"# Expert {label}", "", f"[All neurons](../../index.md) · [Layer {layer}](../index.md) · "
                      f"{len(rows):,} neurons", "", f"Layer {layer}'s expert {label.split('.')[1]}, {what}. Its neurons' "
                      "statistics are over the tokens routed to it; the percentages below are shares of those tokens.", "",
                      *_table(label, table, rows, "../../", directory_urls)])


def site_script(info: dict, dumps: Callable[[Any], str]) -> str:
    """``{url_prefix}/site.js``: registers this plugin instance with ``gluscope.js`` on every page (the
    search box searches every instance); ``base`` is the URL of ``url_prefix``, from the script's own."""
    return ("(window.GLUSCOPE_SITES = window.GLUSCOPE_SITES || []).push(Object.assign("
            f'{{base: new URL(".", document.currentScript.src).href}}, {dumps(info)}));\n')
