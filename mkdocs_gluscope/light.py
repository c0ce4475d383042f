"""Whole-model sites: every neuron as a light page, written straight into the built site.

Why not MkDocs' page pipeline: measured on this project's 2-core machine (AMD EPYC), a page of a
few lines costs MkDocs + Material 1.2 ms of CPU (3,000 pages out of the nav, one core, median of 3
builds) but 9.8 KB of theme around it (navigation, search box, icons), so 46,080 neuron pages would hold
450 MB of theme before any content (of a 1 GB budget), and MkDocs renders pages one at a time. With every example
inline a page is 270 KB (12 GB for SmolLM2). Here MkDocs renders one *shell* page (header, palette,
CSS and scripts are the theme's own, from the site's own config), and this module puts each
neuron's content into that shell, leaving out what a neuron page does not need (3 KB of theme), in
one process per CPU. The page holds the strongest examples of its rarest cases (useful without
JavaScript); the rest of its examples live in a compact data file that ``gluscope.js`` fetches when
a reader opens a case or a list. Measured: bench/site_scale.py.

Files written (paths relative to the site; ``P`` is ``url_prefix``):

- ``P/L{l}/N{n}/index.html`` (or ``P/L{l}/N{n}.html``): the neuron page.
- ``gluscope/x/L{l}/N{n}.bin``: the neuron's examples, gzip-compressed binary (:func:`encode_examples`).
- ``gluscope/act.bin``: act(x) for each of the 65,536 float16 values x, gzip-compressed, so the browser
  colors by act(gate) from the one activation table (:mod:`.activations`) rather than a formula of its own.
- ``gluscope/layers/L{l}.json``: the layer's table (frequencies and top words) that the layer page
  sorts, filters and pages in the browser.
- ``gluscope/search/{key}.json``: the search index, one shard per :func:`shard_key` (the first two
  characters of a word), fetched when a query needs it.
"""

from __future__ import annotations

import gzip
import html
import multiprocessing
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from mkdocs_gluscope.activations import act_values
from mkdocs_gluscope.render import (
    EARLY_TITLE,
    PLACEHOLDER_MARK,
    PageContext,
    counted_windows,
    example_word,
    fill_page,
    json_text,
    list_scales,
    neuron_markdown,
    shown_examples,
    word_key,
    word_labels,
)
from mkdocs_gluscope.store import CASES, EARLY_POSITIONS, HOOKS, ActivationsFile, NeuronData, first_counted_position

#: Cases whose strongest color-hook example a light page holds: its rarest ones (the rest load on demand).
DEFAULT_INLINE_CASES = 2
#: Whole words per case in a light page's "Top words" (search covers more: SEARCH_EXAMPLES).
TOP_WORDS = 3
#: Rows per page of a layer table (in the browser, and the static first page without JavaScript).
PAGE_ROWS = 100
#: Examples of each case's hook_post list whose words a neuron is found by.
SEARCH_EXAMPLES = 8
#: Neurons kept per word in the search index (the strongest first, search_shards): a word on which
#: thousands of neurons peak (" the") finds the strongest hundred, and keeps its shard small.
SEARCH_POSTINGS = 100
#: More listed neurons than this make ``layout: auto`` choose the light layout.
AUTO_LIGHT = 2000
EXAMPLES_MAGIC = b"GSX2"
SHELL_TITLE = "GLUSCOPE-SHELL-TITLE"
SHELL_CONTENT = "GLUSCOPE-SHELL-CONTENT"
SHELL_SLUG = SHELL_TITLE.lower()  # the id the shell's title gets
SHELL_DIR = "gluscope-shell"
#: The page MkDocs and the theme render once; every neuron page is this page with its own title and content.
SHELL_MARKDOWN = f"""---
search:
  exclude: true
hide:
  - toc
---

# {SHELL_TITLE}

{SHELL_CONTENT}
"""
#: Where a light site tells ``gluscope.js`` its page URLs and ids (on every page: the search box is).
SITE_SCRIPT = "gluscope/site.js"


#: A light site's document files hold about this many tokens: an example loaded on demand fetches the
#: file of its document, so small files keep a list of 16 examples from 16 documents to a few hundred KB.
SHARD_TOKENS = 4096


def docs_per_shard(f: ActivationsFile) -> int:
    return max(1, round(SHARD_TOKENS * f.n_docs / max(len(f.tokens), 1)))


def site_script(prefix: str, directory_urls: bool, layers: Sequence[int], d_mlp: int, per_shard: int) -> str:
    """``window.GLUSCOPE``: what the search box needs to link a neuron id to its page, the rows of a
    layer table page, and the start-of-document note of examples loaded on demand (once per site
    rather than in every page)."""
    info = {"prefix": prefix, "suffix": "/" if directory_urls else ".html", "layers": list(layers), "dMlp": d_mlp,
            "pageRows": PAGE_ROWS, "docsPerShard": per_shard, "earlyTitle": EARLY_TITLE.replace("{n}", str(EARLY_POSITIONS))}
    return f"window.GLUSCOPE = {json_text(info)};\n"


def shard_key(word: str) -> str:
    """Search shard of a word (as :func:`render.word_key` gives it): its first two characters, each
    ASCII letter or digit as itself and anything else as ``_``, so every key is a safe file name.
    ``gluscope.js`` computes the same key from a query."""
    chars = [c if ("a" <= c <= "z" or "0" <= c <= "9") else "_" for c in word[:2]]
    return "".join(chars).ljust(2, "_")


#: Window values on demand are 8-bit codes: a sign and 127 logarithmic steps over this many powers of
#: two below the neuron's largest |value| (steps of 5.6%, so a color is off by at most one of its 10 levels
#: and a tooltip shows 2 significant digits). float16 would make the data files 2.2 times as large, and a
#: whole model's site then no longer fits in GitHub Pages' 1 GB (measured: bench/site_scale.py).
CODE_RANGE = 10


def encode_values(values: np.ndarray, largest: float) -> np.ndarray:
    """``values`` as int8 codes: 0 for 0 (and anything below the smallest step), -128 for NaN, else
    ``sign * (1 + round(126 * (log2(|v| / largest) + CODE_RANGE) / CODE_RANGE))`` clipped to 1..127
    (an infinity, or a value beyond ``largest``, is 127)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        steps = np.rint(126 * (np.log2(np.abs(values) / largest) + CODE_RANGE) / CODE_RANGE) + 1
    magnitude = np.where(np.isnan(steps) | (steps < 1), 0, np.minimum(steps, 127))
    codes = (np.sign(np.nan_to_num(values)) * magnitude).astype(np.int8)
    return np.where(np.isnan(values), np.int8(-128), codes)


def decode_values(codes: np.ndarray, largest: float | np.ndarray) -> np.ndarray:
    """The values codes stand for (what ``gluscope.js`` computes from them); ``largest`` broadcasts."""
    codes = codes.astype(np.float64)
    values = np.sign(codes) * largest * np.exp2((np.abs(codes) - 1) * CODE_RANGE / 126 - CODE_RANGE)
    return np.where(codes == -128, np.nan, np.where(codes == 0, 0.0, values))


def largest_magnitude(values: np.ndarray) -> float:
    """The scale of a set of codes: the largest finite ``|value|``, or 1 where there is none."""
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def encode_windows(windows: np.ndarray, counted: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Windows ``[U, W]`` as codes, counted positions on the scale of the largest counted ``|value|``
    and the others (the BOS, skipped positions: often attention-sink outliers) on their own: a BOS
    value 1,000 times the rest would otherwise turn every counted value into "≈ 0"."""
    windows = windows.astype(np.float64)
    counted_scale, other_scale = largest_magnitude(windows[counted]), largest_magnitude(windows[~counted])
    codes = np.where(counted, encode_values(windows, counted_scale), encode_values(windows, other_scale))
    return counted_scale, other_scale, codes.astype(np.int8)


def decode_windows(codes: np.ndarray, counted: np.ndarray, counted_scale: float, other_scale: float) -> np.ndarray:
    """What :func:`encode_windows` codes stand for."""
    return decode_values(codes, np.where(counted, counted_scale, other_scale))


def encode_examples(data: NeuronData, k: int, scales: dict[str, np.ndarray]) -> bytes:
    """All examples of one neuron's lists as gzip-compressed little-endian binary.

    Layout: ``GSX2``; uint16 C, H, k, W; uint32 U (distinct examples); uint16 centre (the example's
    place in its window, ``context_before``) and counted_from (:func:`store.first_counted_position`);
    float32 scales of the gate codes and the in codes at counted positions, then at the others
    (:func:`encode_windows`: position w of example u is counted when ``pos[u] + w - centre >=
    counted_from``); uint16 :data:`CODE_RANGE`; uint16 bytes of each doc and pos (2 when every one is
    below 65,536, else 4); float32 color scales [C,H,4 hooks]; float32 values [C,H,k] (NaN: empty);
    int16 example [C,H,k] (-1: empty); uint doc [U]; uint pos [U]; int8 gate codes [U,W]; int8 in codes
    [U,W] (:func:`encode_values`). An example that several lists share is stored once (within a gate+
    case the gate and act(gate) lists are the same examples)."""
    C, H = len(CASES), len(HOOKS)
    W = data.top_gate.shape[-1]
    doc = np.ascontiguousarray(data.top_doc[..., :k]).ravel()
    pos = np.ascontiguousarray(data.top_pos[..., :k]).ravel()
    valid = np.flatnonzero(doc >= 0)
    pairs = doc[valid].astype(np.int64) << 32 | pos[valid].astype(np.int64)
    unique, first, inverse = np.unique(pairs, return_index=True, return_inverse=True)
    example = np.full(doc.shape, -1, dtype="<i2")
    example[valid] = inverse.ravel()
    source = valid[first]
    counted_from = first_counted_position(data.attrs)
    counted = counted_windows(data, pos[source])  # [U, W], the rule of the page's colors
    gate_counted, gate_other, gate_codes = encode_windows(data.top_gate[..., :k, :].reshape(-1, W)[source], counted)
    in_counted, in_other, in_codes = encode_windows(data.top_in[..., :k, :].reshape(-1, W)[source], counted)
    values = np.where(data.top_doc[..., :k] >= 0, data.top_value[..., :k], np.nan).astype("<f4")
    scale = np.stack([scales[h] for h in HOOKS], axis=-1).astype("<f4")  # [C, H, hooks]
    place = np.concatenate([doc[source], pos[source]])
    wide = "<u2" if place.size == 0 or place.max() < 1 << 16 else "<u4"
    raw = b"".join([
        EXAMPLES_MAGIC, struct.pack("<4HI2H4f2H", C, H, k, W, len(unique), data.context_before, counted_from,
                                    gate_counted, in_counted, gate_other, in_other, CODE_RANGE,
                                    np.dtype(wide).itemsize),
        scale.tobytes(), values.tobytes(), example.tobytes(), place.astype(wide).tobytes(),
        gate_codes.tobytes(), in_codes.tobytes()])
    return gzip.compress(raw, compresslevel=6, mtime=0)


def act_table(act_fn: str) -> bytes:
    """act(x) rounded to float16 for every float16 bit pattern x (gzip-compressed), the values
    :func:`render.page_windows` gives for float16 windows."""
    x = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view("<f2").astype(np.float64)
    with np.errstate(all="ignore"):
        return gzip.compress(act_values(x, act_fn).astype("<f2").tobytes(), compresslevel=9, mtime=0)


def drop_element(page: str, start: str) -> str:
    """``page`` without the element whose start tag begins with ``start`` (nested ones of the same
    tag name included); unchanged if there is none."""
    at = page.find(start)
    if at < 0:
        return page
    tag = re.match(r"<(\w+)", start).group(1)
    if tag in ("link", "meta", "input"):  # void elements: the start tag is all
        return page[:at] + page[page.index(">", at) + 1:]
    depth, pos = 0, at
    for match in re.compile(rf"<(/?){tag}\b[^>]*>").finditer(page, at):
        depth += -1 if match.group(1) else 1
        if depth == 0:
            pos = match.end()
            break
    return page[:at] + page[pos:]


#: Parts of the theme's page a neuron page leaves out, 3 of its 6 KB (at 46,080 pages, 140 MB of a 1 GB site):
#: the navigation sidebars and the drawer button (the table of contents is hidden, the navigation is a level
#: up), the search box and the theme's script (the search box lives on every other page; a neuron page
#: has a small form that opens it there with the query), and a canonical link (it would name the shell).
#: Material's instant navigation from the other pages still swaps a neuron page's content in.
SHELL_DROP = ('<div class="md-sidebar md-sidebar--primary"', '<div class="md-sidebar md-sidebar--secondary"',
              '<label class="md-header__button md-icon" for="__drawer"', '<link rel="canonical"',
              '<label class="md-header__button md-icon" for="__search"', '<div class="md-search"',
              '<script id="__config"', '<input class="md-toggle" data-md-toggle="drawer"',
              '<input class="md-toggle" data-md-toggle="search"', '<label class="md-overlay" for="__drawer"')


def shell_parts(page: str, search_url: str) -> tuple[str, str, str]:
    """A built shell page split around its title and its article's content: ``(head, between, tail)``
    with the neuron page being ``head + title + between + content + tail``. Indentation and blank
    lines go (a tenth of every page; the shell has no ``<pre>``). ``search_url``: where the page's
    search form sends its query (``?q=``), relative to the page."""
    for start in SHELL_DROP:
        page = drop_element(page, start)
    page = re.sub(r'<script src="[^"]*/assets/javascripts/bundle\.[0-9a-f]+\.min\.js"></script>', "", page)
    form = (f'<form class="gs-header-search" action="{html.escape(search_url)}" method="get" role="search">'
            '<input type="search" name="q" placeholder="Search neurons" aria-label="Search neurons"></form>')
    header_end = page.find("</nav>", page.find('<header class="md-header'))
    if header_end >= 0:
        page = page[:header_end] + form + page[header_end:]
    start = re.search(r'<article class="md-content__inner md-typeset">', page)
    end = page.rfind("</article>")
    if not start or end < 0 or SHELL_TITLE not in page[:start.start()]:
        raise ValueError("the theme's page has no <article class=\"md-content__inner md-typeset\"> with a <title>; "
                         "the light layout needs the material theme")
    before = re.sub(r"\n\s*", "\n", page[:start.end()])
    after = re.sub(r"\n\s*", "\n", page[end:])
    head, between = before.split(SHELL_TITLE, 1)
    return head, between.replace(SHELL_TITLE, ""), after


@dataclass
class LightJob:
    """What one worker needs to write a share of the pages (plain data: it crosses a process fork)."""

    activations: str
    neurons: list[tuple[int, int]]  # this worker's share, in listed order
    links: dict[tuple[int, int], tuple[tuple[str, str] | None, tuple[str, str] | None]]
    site_dir: str
    prefix: str
    directory_urls: bool
    shell: tuple[str, str, str]
    markdown_extensions: list[Any]
    mdx_configs: dict[str, Any]
    examples: int | None
    color_hook: str
    inline_cases: int
    results: dict[str, Any] = field(default_factory=dict)


def page_file(prefix: str, layer: int, neuron: int, directory_urls: bool) -> str:
    return f"{prefix}/L{layer}/N{neuron}/index.html" if directory_urls else f"{prefix}/L{layer}/N{neuron}.html"


def neuron_link(layer: int, neuron: int, from_layer: int, directory_urls: bool) -> str:
    """URL of a neuron page relative to another neuron page of layer ``from_layer``."""
    target = f"N{neuron}/" if directory_urls else f"N{neuron}.html"
    up = "../" if directory_urls else ""
    return up + target if layer == from_layer else f"{up}../L{layer}/{target}"


def write_pages(job: LightJob) -> dict[str, Any]:
    """Write the pages and example data files of ``job.neurons``; returns each layer's table rows,
    the search postings and the bytes written."""
    import markdown

    from mkdocs_gluscope.pages import SitePages

    configs = dict(job.mdx_configs)
    if "toc" in configs:  # no permalink anchors: 300 bytes a page
        configs["toc"] = {**configs["toc"], "permalink": False}
    md = markdown.Markdown(extensions=job.markdown_extensions, extension_configs=configs)
    site_dir = Path(job.site_dir)
    rows: dict[int, list[list]] = {}
    postings: list[tuple[str, int, int, int, int, float]] = []
    written = {"pages": 0, "page_bytes": 0, "data_bytes": 0}
    made_dirs: set[Path] = set()
    head, between, tail = job.shell
    depth = job.prefix.count("/") + 3  # P/L{l}/N{n}/index.html (or P/L{l}/N{n}.html, one level fewer and no dir)
    root = "../" * (depth - (0 if job.directory_urls else 1))
    with ActivationsFile(job.activations) as f:
        site = SitePages(f, [f"{layer}.{neuron}" for layer, neuron in job.neurons], url_prefix=job.prefix,
                         examples=job.examples, color_hook=job.color_hook)
        for layer, neuron in job.neurons:
            data = f.neuron(layer, neuron)
            k = shown_examples(data, job.examples)
            prev_link, next_link = job.links[(layer, neuron)]
            ctx = PageContext(
                vocab_html=site.vocab_html, vocab_text=site.vocab_text, doc_title=site.doc_title, site_root=root,
                examples=job.examples, color_hook=job.color_hook, prev_link=prev_link, next_link=next_link,
                index_link="../../" if job.directory_urls else "../index.html",
                layer_link="../" if job.directory_urls else "index.html", inline_cases=job.inline_cases,
                data_url=f"{root}gluscope/x/L{layer}/N{neuron}.bin", top_words=TOP_WORDS,
                case_scales=site.case_scales(layer))
            computed = list_scales(data, k)
            body = fill_page(convert(md, neuron_markdown(data, ctx)), data, ctx, computed)
            anchor = re.search(r'<h1 id="([^"]*)"', body)  # the theme's "skip to content" link
            middle = between.replace("#" + SHELL_SLUG, "#" + anchor.group(1)) if anchor else between
            page = (head + f"Neuron {data.id}" + middle + body + tail).encode("utf-8")
            path = site_dir / page_file(job.prefix, layer, neuron, job.directory_urls)
            blob = encode_examples(data, k, computed[2])
            data_path = site_dir / f"gluscope/x/L{layer}/N{neuron}.bin"
            for folder in (path.parent, data_path.parent):
                if folder not in made_dirs:
                    folder.mkdir(parents=True, exist_ok=True)
                    made_dirs.add(folder)
            path.write_bytes(page)
            data_path.write_bytes(blob)
            written["pages"] += 1
            written["page_bytes"] += len(page)
            written["data_bytes"] += len(blob)
            rows.setdefault(layer, []).append(layer_row(data, site.vocab_text))
            postings.extend(search_postings(data, site.vocab_text))
    return {"rows": rows, "postings": postings, "written": written}


_HTML_LINE = re.compile(r"^<.*$", re.MULTILINE)
#: Where a raw HTML line waits while Markdown runs: a number between two render.PLACEHOLDER_MARK, which
#: no corpus text can spell (render.md_text escapes the mark) and which Markdown passes through as text.
_BLOCK = PLACEHOLDER_MARK + "{}" + PLACEHOLDER_MARK
_BLOCK_BACK = re.compile(f"(?:<p>)?{PLACEHOLDER_MARK}(\\d+){PLACEHOLDER_MARK}(?:</p>)?")


def convert(md: Any, text: str) -> str:
    """``text`` through Python-Markdown with its lines of raw HTML (summary table, provenance, the
    examples placeholder) set aside first: parsing them was two thirds of a page's build time."""
    blocks: list[str] = []

    def keep(match: re.Match) -> str:
        blocks.append(match.group(0))
        return _BLOCK.format(len(blocks) - 1)

    md.reset()
    html = md.convert(_HTML_LINE.sub(keep, text))
    return _BLOCK_BACK.sub(lambda m: blocks[int(m.group(1))], html)


def layer_row(data: NeuronData, vocab_text) -> list:
    """One row of a layer table: neuron, the four case frequencies (percent, 4 digits), and the top
    word of each case as ``[before, peak, after]`` labels (or None): text the browser sets with textContent."""
    words = []
    for c in range(len(CASES)):
        if data.top_doc[c, 0, 0] >= 0 and data.window_tokens[c, 0, 0, data.context_before] >= 0:
            words.append(list(word_labels(example_word(data, vocab_text, c, 0, 0))))
        else:
            words.append(None)
    return [data.neuron, *[float(f"{100 * f:.4g}") for f in data.frequency], *words]


def search_postings(data: NeuronData, vocab_text) -> list[tuple[str, int, int, int, int, float]]:
    """``(word, layer, neuron, case, examples, value)``: each whole word that the first
    :data:`SEARCH_EXAMPLES` examples of a case's hook_post list peak on, how many of them do, and
    the most extreme value among them."""
    out = []
    for c in range(len(CASES)):
        found: dict[str, list] = {}
        for j in range(min(SEARCH_EXAMPLES, data.top_doc.shape[-1])):
            if data.top_doc[c, 0, j] < 0:
                break
            if data.window_tokens[c, 0, j, data.context_before] < 0 or not np.isfinite(data.top_value[c, 0, j]):
                continue  # no token, or no finite value to rank the neuron by (JSON has no NaN)
            key = word_key(example_word(data, vocab_text, c, 0, j))
            if not key:
                continue
            entry = found.setdefault(key, [0, float(data.top_value[c, 0, j])])
            entry[0] += 1
        out.extend((key, data.layer, data.neuron, c, n, value) for key, (n, value) in found.items())
    return out


def search_shards(postings: Iterable[tuple[str, int, int, int, int, float]]) -> dict[str, dict[str, list]]:
    """``{shard key: {word: [[layer, neuron, case, examples, value], ...]}}``, at most
    :data:`SEARCH_POSTINGS` neurons per word, strongest first: examples on the word times the most
    extreme value among them. (Examples alone put first the many neurons whose common case peaks on
    the word at a tenth of a unit; the demo's applause neuron 28.473 fires at 41 on one.)"""
    words: dict[str, list] = {}
    for word, layer, neuron, case, n, value in postings:
        words.setdefault(word, []).append((n * abs(value), n, layer, neuron, case, value))
    shards: dict[str, dict[str, list]] = {}
    for word, entries in words.items():
        entries.sort(key=lambda e: (-e[0], -e[1], e[2], e[3]))
        shards.setdefault(shard_key(word), {})[word] = [
            [layer, neuron, case, n, float(f"{value:.4g}")] for _, n, layer, neuron, case, value in entries[:SEARCH_POSTINGS]]
    return shards


def split_jobs(neurons: Sequence[tuple[int, int]], workers: int) -> list[list[tuple[int, int]]]:
    """Contiguous shares (a worker reads neighbouring chunks of the file)."""
    size = -(-len(neurons) // max(workers, 1)) if neurons else 0
    return [list(neurons[i:i + size]) for i in range(0, len(neurons), size)] if size else []


def build_light(*, activations: str, neurons: Sequence[tuple[int, int]], site_dir: str, prefix: str,
                directory_urls: bool, shell: tuple[str, str, str], markdown_extensions: list,
                mdx_configs: dict, examples: int | None, color_hook: str, inline_cases: int, act_fn: str,
                workers: int | None = None) -> dict[str, Any]:
    """Write every light page, data file, layer table, search shard and the act table into ``site_dir``.
    Pages are written by ``workers`` processes (default: the CPUs this process may use)."""
    if not workers:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    links: dict[tuple[int, int], tuple] = {}
    for i, (layer, neuron) in enumerate(neurons):
        prev_link = next_link = None
        if i > 0:
            pl, pn = neurons[i - 1]
            prev_link = (f"{pl}.{pn}", neuron_link(pl, pn, layer, directory_urls))
        if i + 1 < len(neurons):
            nl, nn = neurons[i + 1]
            next_link = (f"{nl}.{nn}", neuron_link(nl, nn, layer, directory_urls))
        links[(layer, neuron)] = (prev_link, next_link)
    jobs = [LightJob(activations=activations, neurons=share, links={key: links[key] for key in share},
                     site_dir=site_dir, prefix=prefix, directory_urls=directory_urls, shell=shell,
                     markdown_extensions=markdown_extensions, mdx_configs=mdx_configs, examples=examples,
                     color_hook=color_hook, inline_cases=inline_cases)
            for share in split_jobs(neurons, workers * 4)]  # several shares per worker: even finishing times
    if workers > 1 and len(jobs) > 1 and "fork" in multiprocessing.get_all_start_methods():
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(write_pages, jobs, chunksize=1)
    else:
        results = [write_pages(job) for job in jobs]
    site = Path(site_dir)
    rows: dict[int, list] = {}
    postings: list = []
    totals = {"pages": 0, "page_bytes": 0, "data_bytes": 0}
    for result in results:
        for layer, layer_rows in result["rows"].items():
            rows.setdefault(layer, []).extend(layer_rows)
        postings.extend(result["postings"])
        for key in totals:
            totals[key] += result["written"][key]
    (site / "gluscope/layers").mkdir(parents=True, exist_ok=True)
    for layer, layer_rows in rows.items():
        layer_rows.sort(key=lambda r: r[0])
        _write_json(site / f"gluscope/layers/L{layer}.json", {"layer": layer, "cases": list(CASES), "rows": layer_rows})
    (site / "gluscope/search").mkdir(parents=True, exist_ok=True)
    shards = search_shards(postings)
    for key, content in shards.items():
        _write_json(site / f"gluscope/search/{key}.json", content)
    (site / "gluscope/act.bin").write_bytes(act_table(act_fn))
    totals["shards"] = len(shards)
    return totals


def _write_json(path: Path, content: Any) -> None:
    path.write_text(json_text(content), encoding="utf-8")
