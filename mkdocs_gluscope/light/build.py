"""Building a light site in two cached stages, and placing them in the site.

1. **data** (:func:`build_data`): from the activations file, every listed neuron's data file, the
   corpus files its examples come from, each layer's table, the word index and the site's facts
   (``site.json``). Workers (one process per CPU, forked) take a run of neurons each, read them a
   data file's worth at a time (:meth:`ActivationsFile.neurons`) and return what the parent needs
   (table rows, referenced documents, a sorted run of search postings on disk); nothing per neuron
   is held before they fork, and the parent holds one layer's table rows at a time per layer.
2. **pages** (:func:`build_pages`): from the layer tables and the theme's page (:mod:`.theme`), every
   neuron page and the sitemaps that list them.

Each stage writes into a folder of the cache named by a hash of everything its output depends on
(the activations file's identity, the options, the code, and for pages the theme's page), so
``mkdocs serve`` after an edit of a hand-written page rebuilds neither: :func:`place` links the
cached files into the site (hard links for ``mkdocs build``, symbolic links for ``mkdocs serve``,
whose site folder is new on every start and may be on another file system).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from mkdocs_gluscope.distributions import BAND_EDGES, DENSITY_EDGES, HIST_EDGES
from mkdocs_gluscope.light import data as ldata
from mkdocs_gluscope.light import page as lpage
from mkdocs_gluscope.light import search as lsearch
from mkdocs_gluscope.pick import layer_case_scales
from mkdocs_gluscope.render import EARLY_TITLE, LEVELS, COLOR_PERCENTILE, RARE_SHARE, display_name, provenance_rows
from mkdocs_gluscope.store import (CASES, EARLY_POSITIONS, HOOKS, SHARED, ActivationsFile, early_end,
                                   first_counted_position, neuron_id)

Group = tuple  # (layer, expert or None)
#: Neurons per worker task: a few data files, so tasks finish evenly.
TASK_NEURONS = 256


def groups_of(keys: Iterable[tuple]) -> dict[Group, np.ndarray]:
    """Listed neurons by (layer, expert): sorted neuron indices, dense layers first in each layer."""
    found: dict[Group, list[int]] = {}
    for key in keys:
        found.setdefault((key[0], key[2] if len(key) == 3 else None), []).append(key[1])
    order = sorted(found, key=lambda g: (g[0], g[1] is not None, g[1] == SHARED, 0 if g[1] in (None, SHARED) else g[1]))
    return {g: np.unique(np.asarray(found[g], dtype=np.int64)) for g in order}


def group_key(layer: int, neuron: int, expert: int | str | None) -> tuple:
    return (layer, neuron) if expert is None else (layer, neuron, expert)


def places(neurons: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each listed neuron's data file part and row group: files hold the listed neurons of
    ``NEURONS_PER_FILE`` consecutive indices, in order."""
    part = neurons // ldata.NEURONS_PER_FILE
    starts = np.concatenate([[0], np.flatnonzero(np.diff(part)) + 1])
    row = np.arange(len(neurons)) - np.repeat(starts, np.diff(np.concatenate([starts, [len(neurons)]])))
    return part, row


def table_name(group: Group) -> str:
    """A table's file under ``gluscope/layers/``: ``L3``, ``L3-E12``, ``L3-S``."""
    layer, expert = group
    return f"L{layer}" if expert is None else f"L{layer}-" + ("S" if expert == SHARED else f"E{int(expert)}")


def code_version() -> str:
    """A hash of this package's code and templates: a new version rebuilds the cache."""
    h = hashlib.sha256()
    root = resources.files("mkdocs_gluscope")
    for path in sorted(Path(str(root)).rglob("*")):
        if path.suffix in (".py", ".html") and "__pycache__" not in path.parts:
            h.update(path.relative_to(str(root)).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def digest(content: Any) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:20]


def file_identity(path: str) -> list:
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


# -- stage 1: data ----------------------------------------------------------------------------------

@dataclass
class Task:
    activations: str
    group: Group
    neurons: np.ndarray
    out: str
    examples: int | None
    scales: tuple[float, ...] | None
    index: int


#: What every worker reads of the file and derives from it, loaded by the parent before it forks (the
#: children share these pages of memory): the file's identity -> (what its check found, vocab, WordFinder).
_SHARED: dict[str, tuple] = {}


def open_shared(path: str) -> tuple[ActivationsFile, lsearch.WordFinder]:
    """The activations file, opened once per process and checked once per build: a worker forked after
    the parent's :func:`open_shared` reuses the parent's check and corpus (checking a 7B model's file reads
    its whole corpus, seconds per task otherwise)."""
    key = json.dumps(file_identity(path))  # a file rewritten under `mkdocs serve` is checked again
    if key in _SHARED:
        checked, vocab, words = _SHARED[key]
        f = ActivationsFile(path, checked=checked)
        f._vocab = vocab
        return f, words
    f = ActivationsFile(path)
    _SHARED.clear()  # one file's at a time
    _SHARED[key] = (f.checked, f.vocab, lsearch.WordFinder(f.vocab))
    return f, _SHARED[key][2]


def _data_task(task: Task) -> dict[str, Any]:
    from mkdocs_gluscope.context import light_context
    from mkdocs_gluscope.render import telling_case

    layer, expert = task.group
    out = Path(task.out)
    rows: list[list] = []
    posting_list: list = []
    written = tail = 0
    f, words = open_shared(task.activations)
    with f:
        vocab = lambda t: f.vocab[t]  # noqa: E731
        docs = np.zeros(f.n_docs, dtype=bool)
        first, last = int(task.neurons[0]), int(task.neurons[-1])
        # One read per dataset for the task's neurons, unless they are too few of the range they span.
        dense = last - first < 2 * len(task.neurons)
        block = f.neurons(layer, first, last + 1, expert=expert, tokens=False) if dense else None
        part, _ = places(task.neurons)
        for p in np.unique(part):
            file_rows = []
            listed = task.neurons[part == p]
            if not dense:
                first = int(listed[0])
                block = f.neurons(layer, first, int(listed[-1]) + 1, expert=expert, tokens=False)
            # The token ids of the hook_post lists' windows: what the words of the tables and the index
            # come from (the browser reads every other window's tokens from the corpus files), a file's at once.
            datas = [block[int(n) - first] for n in listed]
            ids = f.window_tokens(np.stack([d.top_doc[:, :1] for d in datas]), np.stack([d.top_pos[:, :1] for d in datas]))
            for data, window_tokens in zip(datas, ids):
                data.window_tokens = window_tokens
                shown = ldata.Shown.of(data, task.examples)
                context = light_context(data, vocab) if expert is None else None
                file_rows.append(ldata.neuron_row(data, shown, telling_case(data, task.scales),
                                                  "" if context is None else ldata.dumps(context)))
                rows.append(lpage.layer_row(data, words))
                posting_list.extend(lsearch.postings(data, words, data.window_tokens[:, 0], task.scales))
                posting_list.extend(lsearch.label_postings(data))
                top = data.top_doc[..., :shown.top]
                docs[top[top >= 0]] = True
                for ex, n_shown in ((data.samples, shown.samples), (data.bands, shown.bands)):
                    if ex is not None:
                        used = ex.doc[..., :n_shown]
                        docs[used[used >= 0]] = True
            name, _ = ldata.neuron_file(layer, int(listed[0]), expert)
            size, footer = ldata.write_neuron_file(file_rows, out / "data" / name)
            written, tail = written + size, max(tail, footer)
    run = lsearch.write_sorted(posting_list, out / "tmp" / f"postings-{task.index:06d}.txt")
    table = out / "tmp" / f"rows-{task.index:06d}.json"
    table.write_text(ldata.dumps(rows), encoding="utf-8")
    return {"group": task.group, "rows": str(table), "docs": np.packbits(docs), "bytes": written, "tail": tail,
            "run": str(run)}


def _corpus_task(args: tuple[str, str, list[int]]) -> tuple[int, int]:
    activations, out, parts = args
    written = tail = 0
    f, _ = open_shared(activations)
    with f:
        vocab = ldata.vocab_array(f.vocab)
        for p in parts:
            start, stop = p * ldata.DOCS_PER_FILE, min((p + 1) * ldata.DOCS_PER_FILE, f.n_docs)
            docs = range(start, stop)
            size, footer = ldata.write_corpus_file(list(docs), f.doc_titles(start, stop), [f.document(d) for d in docs],
                                                   vocab, Path(out) / "data" / ldata.corpus_file(start))
            written, tail = written + size, max(tail, footer)
    return written, tail


def _pool(workers: int):
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork").Pool(workers)
    return None


def _map(pool, fn, items: list) -> Iterable:
    if pool is None:
        return map(fn, items)
    return pool.imap_unordered(fn, items)


@dataclass
class DataOptions:
    activations: str
    examples: int | None
    workers: int


def _edges(edges: np.ndarray) -> list:
    """Bin edges for JSON, which has no infinity: ``"inf"`` and ``"-inf"`` stand for them."""
    return [float(x) if np.isfinite(x) else ("inf" if x > 0 else "-inf") for x in edges]


def site_facts(f: ActivationsFile, shown: ldata.Shown, groups: dict[Group, np.ndarray]) -> dict[str, Any]:
    """``site.json``: what every page of the site needs besides its own data (read once by the browser)."""
    attrs = f.attrs
    return {
        "format": "gluscope-light", "version": 1,
        "cases": list(CASES), "hooks": list(HOOKS), "k": f.k, "shown": [shown.top, shown.samples, shown.bands],
        "contextBefore": f.context_before, "contextAfter": f.context_after,
        "countedFrom": first_counted_position(attrs), "early": early_end(attrs), "earlyPositions": EARLY_POSITIONS,
        "earlyTitle": EARLY_TITLE, "nTokens": f.n_tokens, "actFn": str(attrs.get("act_fn", "silu")),
        "levels": LEVELS, "colorPercentile": COLOR_PERCENTILE, "rareShare": RARE_SHARE,
        "provenance": provenance_rows({**attrs, "n_tokens": f.n_tokens}),
        "model": display_name(attrs.get("model") or ""),
        "histEdges": _edges(HIST_EDGES) if f.has_distributions else None,
        "densityEdges": _edges(DENSITY_EDGES) if f.has_distributions else None,
        "bandEdges": _edges(BAND_EDGES) if f.has_distributions else None,
        "neuronsPerFile": ldata.NEURONS_PER_FILE, "docsPerFile": ldata.DOCS_PER_FILE,
        "codeSteps": ldata.CODE_STEPS, "codeOctaves": ldata.CODE_OCTAVES, "nanCode": ldata.NAN_CODE,
        "countSteps": ldata.COUNT_STEPS,
        "summary": [list(p) for p in ldata.SUMMARY_PARTS],
        "tables": {table_name(g): len(n) for g, n in groups.items()},
    }


def build_data(options: DataOptions, groups: dict[Group, np.ndarray], out: Path, log=None) -> dict[str, Any]:
    """Stage 1 into ``out`` (``out/site``: what goes under ``url_prefix/gluscope``; ``out/data``: the
    data folder). Returns totals."""
    tmp = out / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    f, _ = open_shared(options.activations)  # before the workers fork: they share what it read
    with f:
        n_docs = f.n_docs
        # A routed expert's scales are those of its layer's routed experts together (pick's sets):
        # computed once per set, not once per expert.
        def set_of(layer: int, expert: int | str | None) -> tuple:
            return layer, expert if expert in (None, SHARED) else "routed"

        by_set: dict[tuple, tuple[float, ...]] = {}
        for g in groups:
            if set_of(*g) not in by_set:
                by_set[set_of(*g)] = tuple(float(x) for x in layer_case_scales(f, *g))
        scales = {g: by_set[set_of(*g)] for g in groups}
        first = next(iter(groups.items()), None)
        shown = (ldata.Shown.of(f.neuron(first[0][0], int(first[1][0]), windows=False, expert=first[0][1]),
                                options.examples) if first else ldata.Shown(0, 0, 0))
        facts = site_facts(f, shown, groups)
        act = ldata.act_table(str(f.attrs.get("act_fn", "silu")))
    tasks = []
    for g, neurons in groups.items():
        part, _ = places(neurons)
        # Tasks of about TASK_NEURONS neurons that end where a data file ends: each file has one writer.
        bounds = [0]
        for start in (np.flatnonzero(np.diff(part)) + 1).tolist():
            if start - bounds[-1] >= TASK_NEURONS:
                bounds.append(start)
        bounds.append(len(neurons))
        for a, b in zip(bounds, bounds[1:]):
            tasks.append(Task(options.activations, g, neurons[a:b], str(out), options.examples, scales[g], len(tasks)))
    rows: dict[Group, list[str]] = {g: [] for g in groups}  # each group's table rows, in files of its tasks
    docs = np.zeros(n_docs, dtype=bool)
    runs: list[Path] = []
    totals = {"neurons": int(sum(len(n) for n in groups.values())), "data_bytes": 0}
    tails = {"neurons": 8, "corpus": 8}
    pool = _pool(options.workers)
    try:
        for done, result in enumerate(_map(pool, _data_task, tasks), 1):
            rows[result["group"]].append(result["rows"])
            docs |= np.unpackbits(result["docs"], count=n_docs).astype(bool)
            runs.append(Path(result["run"]))
            totals["data_bytes"] += result["bytes"]
            tails["neurons"] = max(tails["neurons"], result["tail"])
            if log and done % max(1, len(tasks) // 10) == 0:
                log(f"gluscope: data of {done}/{len(tasks)} parts written")
        parts = np.unique(np.flatnonzero(docs) // ldata.DOCS_PER_FILE).tolist()
        chunks = [(options.activations, str(out), parts[i:i + 64]) for i in range(0, len(parts), 64)]
        totals["corpus_bytes"] = 0
        corpus = _map(pool, _corpus_task, chunks)  # the workers write the corpus while this writes the tables
        site = out / "site"
        (site / "layers").mkdir(parents=True, exist_ok=True)
        for g, parts in rows.items():  # one table in memory at a time
            table = sorted((r for part in parts for r in json.loads(Path(part).read_text(encoding="utf-8"))),
                           key=lambda r: r[0])
            (site / "layers" / f"{table_name(g)}.json").write_text(
                ldata.dumps({"layer": g[0], "expert": g[1], "rows": table}), encoding="utf-8")
        for size, tail in corpus:
            totals["corpus_bytes"] += size
            tails["corpus"] = max(tails["corpus"], tail)
        # The word index: a range of terms per worker.
        totals.update(lsearch.write_shards(sorted(runs), site / "search", pool, options.workers if pool else 1))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    (site / "act.bin").write_bytes(act)
    # A page's first request to a data file is for its tail: the largest footer of its kind, no more.
    (site / "site.json").write_text(ldata.dumps({**facts, "tails": tails}), encoding="utf-8")
    shutil.rmtree(tmp, ignore_errors=True)
    return totals


# -- stage 2: pages ---------------------------------------------------------------------------------

@dataclass
class PageOptions:
    prefix: str
    directory_urls: bool
    site_url: str  # the site's URL for sitemaps ("/" without site_url)
    site_name: str


def build_pages(options: PageOptions, groups: dict[Group, np.ndarray], tables: Path, shells: dict[str, str],
                out: Path, workers: int = 1) -> dict[str, Any]:
    """Stage 2 into ``out`` (paths as in the site): every neuron page, the shells (``shells``: their
    names below ``url_prefix`` and text) and ``{prefix}/sitemap-neurons-N.xml``. The pages are
    written a group (layer or expert) per task on ``workers`` processes: making a folder and a file
    per page is most of the stage."""
    tasks: list[PageTask] = []
    listed = list(groups.items())
    for i, (g, neurons) in enumerate(listed):
        before = group_key(listed[i - 1][0][0], int(listed[i - 1][1][-1]), listed[i - 1][0][1]) if i else None
        after = group_key(listed[i + 1][0][0], int(listed[i + 1][1][0]), listed[i + 1][0][1]) if i + 1 < len(listed) else None
        tasks.append(PageTask(options, g, neurons, str(tables), str(out), before, after))
    written = sizes = 0
    pool = _pool(min(workers, len(tasks)))
    try:
        for pages, page_bytes in _map(pool, _pages_task, tasks):
            written, sizes = written + pages, sizes + page_bytes
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    urls = [lpage.page_url(options.prefix, group_key(g[0], n, g[1]), options.directory_urls)
            for g, neurons in listed for n in neurons.tolist()]
    sitemaps: list[str] = []
    for start in range(0, len(urls), lpage.SITEMAP_URLS):
        name = f"{options.prefix}/sitemap-neurons-{len(sitemaps)}.xml"
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(lpage.sitemap(urls[start:start + lpage.SITEMAP_URLS], options.site_url), encoding="utf-8")
        sitemaps.append(name)
    for name, text in shells.items():
        path = out / options.prefix / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return {"pages": written, "page_bytes": sizes, "sitemaps": sitemaps}


@dataclass
class PageTask:
    options: PageOptions
    group: Group
    neurons: np.ndarray
    tables: str
    out: str
    before: tuple | None  # the neuron before the group's first (the previous group's last), for its links
    after: tuple | None  # the neuron after the group's last


def _pages_task(task: PageTask) -> tuple[int, int]:
    """One group's pages: (pages, bytes)."""
    options, g, out = task.options, task.group, Path(task.out)
    table = json.loads((Path(task.tables) / f"{table_name(g)}.json").read_text(encoding="utf-8"))["rows"]
    _, row_in = places(task.neurons)
    keys = [group_key(g[0], n, g[1]) for n in task.neurons.tolist()]
    sizes = 0
    for i, key in enumerate(keys):
        before = keys[i - 1] if i else task.before
        after = keys[i + 1] if i + 1 < len(keys) else task.after
        links = lpage.neighbour_links(before, key, after, options.prefix, options.directory_urls)
        root = lpage.root_of(options.prefix, key, options.directory_urls)
        place = lpage.Place(ldata.neuron_file(g[0], key[1], g[1])[0], int(row_in[i]))
        content = lpage.neuron_content(key, table[i], place, links=links, root=root)
        up = root + "../" * (options.prefix.count("/") + 1)
        text = lpage.neuron_stub(f"Neuron {neuron_id(*key)}", content, site_name=options.site_name,
                                 stub_js=f"{up}assets/gluscope/stub.js", shell=root + lpage.shell_name(key)).encode("utf-8")
        path = out / lpage.page_path(options.prefix, key, options.directory_urls)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text)
        sizes += len(text)
    return len(keys), sizes


# -- the cache and placing it in the site -----------------------------------------------------------

def cached(root: Path, name: str, make) -> tuple[Path, bool]:
    """``root/name`` made by ``make(folder)`` unless it exists (complete: made in a temporary folder,
    then renamed); returns (folder, whether it was made now)."""
    final = root / name
    if final.is_dir():
        return final, False
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=name + ".", dir=root))
    try:
        make(work)
        work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final, True


def prune(root: Path, keep: Sequence[str]) -> None:
    """Remove the cache's other folders (an older file or other options)."""
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()


def place(src: Path, dst: Path, symlink: bool) -> int:
    """Put the tree ``src`` into ``dst`` (merging with folders already there): each file as a hard link
    (a copy where the file systems differ), or with ``symlink`` each entry that ``dst`` lacks as one
    symbolic link. Returns the entries made."""
    made = 0
    dst.mkdir(parents=True, exist_ok=True)
    with os.scandir(src) as entries:
        for entry in entries:
            target = dst / entry.name
            if entry.is_dir(follow_symlinks=False):
                if symlink and not target.exists():
                    os.symlink(entry.path, target, target_is_directory=True)
                    made += 1
                else:
                    made += place(Path(entry.path), target, symlink)
                continue
            if target.exists() or target.is_symlink():
                target.unlink()
            if symlink:
                os.symlink(entry.path, target)
            else:
                try:
                    os.link(entry.path, target)
                except OSError:
                    shutil.copy2(entry.path, target)
            made += 1
    return made


def add_sitemaps(site_dir: Path, base: str, sitemaps: Sequence[str]) -> None:
    """List ``sitemaps`` (paths in the site) in ``sitemap.xml``: MkDocs' own sitemap becomes
    ``sitemap-pages.xml`` and ``sitemap.xml`` a sitemap index of it and of these (a second plugin
    instance adds its own); ``sitemap.xml.gz`` follows."""
    import gzip
    import html as _html

    path = site_dir / "sitemap.xml"
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8")
    if "<sitemapindex" not in text:
        (site_dir / "sitemap-pages.xml").write_text(text, encoding="utf-8")
        entries = ["sitemap-pages.xml"]
    else:
        import re

        entries = [_html.unescape(m)[len(base):] for m in re.findall(r"<loc>([^<]*)</loc>", text)]
    entries += [s for s in sitemaps if s not in entries]
    index = ('<?xml version="1.0" encoding="UTF-8"?>\n<sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">\n'
             + "".join(f"<sitemap><loc>{_html.escape(base + e)}</loc></sitemap>\n" for e in entries) + "</sitemapindex>\n")
    path.write_text(index, encoding="utf-8")
    gz = site_dir / "sitemap.xml.gz"
    if gz.exists():
        gz.write_bytes(gzip.compress(index.encode("utf-8"), mtime=0))
