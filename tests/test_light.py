"""The light layout (a whole model, issue 17): neuron pages as stubs in the theme's page, data files in
Parquet read by range requests, a word index in any language ranked by specificity, layer tables,
sitemaps, the cache that keeps ``mkdocs serve`` quick, and two plugin instances in one site."""

from __future__ import annotations

import html
import json
import random
import re
from html.parser import HTMLParser
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from mkdocs_gluscope import words
from mkdocs_gluscope.light import data as ldata
from mkdocs_gluscope.light import search as lsearch
from mkdocs_gluscope.store import ActivationsFile
from sites import build, build_site, write_project
from synthetic import write_synthetic

UNTRUSTED = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "{{ 7*7 }}", "[x](javascript:alert(1))"]
# Words of several scripts, each a token: Chinese pieces, a decomposed "café", an emoji-led word.
WORDS = ["中华", "人民", "共和国", " cafe\u0301", " 😀party", " Darmstadt", " arms"]
VOCAB = ["<s>"] + [f" w{i}" for i in range(1, 40)] + [" (", "Appl", "ause", ")"] + UNTRUSTED + WORDS
ID = {t: i for i, t in enumerate(VOCAB)}


def stage(f: h5py.File, layer: int, neuron: int, case: int, where: list[tuple[int, int]], values: list[float]) -> None:
    """The case's hook_post list of a neuron: these (document, position) examples with these values."""
    for name, new in (("top/doc", [d for d, _ in where]), ("top/pos", [p for _, p in where]), ("top/value", values)):
        data = f[name][...]
        data[layer, neuron, case, 0, :len(where)] = new
        f[name][...] = data


def quiet(f: h5py.File, layer: int, neuron: int, keep: int = 0) -> None:
    """A neuron's hook_post lists of every case but ``keep`` at a thousandth of their values: its strong
    activations are those of that case."""
    data = f["top/value"][...]
    for c in range(4):
        if c != keep:
            data[layer, neuron, c, 0] *= 0.001
    f["top/value"][...] = data


def demo_like(path: Path) -> Path:
    """2 layers x 6 neurons of k = 4; every document reads "(Appl|ause)" at positions 4-7, then the words
    of WORDS at 8-14. Neuron 1.4's strong activations are all on "ause" (its gate+_in+ list, the other
    lists quiet); 1.3 peaks on it once, harder, among three other strong words; 1.2's are all on it but
    weak for the layer. 0.1 peaks on "人民", 0.2 on "café", 0.3 on "😀party", 0.4 on "Darmstadt" and
    0.5 on "arms"."""
    docs = [[0, 1 + d % 30, 2, 3, ID[" ("], ID["Appl"], ID["ause"], ID[")"]] + [ID[w] for w in WORDS]
            + [1 + (5 * d + 3 * t) % 39 for t in range(12)] + [44 + d % 4] for d in range(16)]
    write_synthetic(path, layers=2, d_mlp=6, k=4, before=3, after=1, vocab=VOCAB, docs=docs,
                    titles=[UNTRUSTED[d % 4] + f" {1790 + d}" for d in range(16)], model="<b>m</b>")
    with h5py.File(path, "a") as f:
        stage(f, 1, 4, 0, [(d, 6) for d in range(4)], [8.0, 7.9, 7.8, 7.7])
        stage(f, 1, 3, 0, [(5, 6), (6, 2), (7, 3), (8, 1)], [9.0, 8.5, 8.5, 8.5])
        stage(f, 1, 2, 0, [(d, 6) for d in range(9, 13)], [0.5, 0.4, 0.3, 0.2])
        for neuron in (2, 3, 4):
            quiet(f, 1, neuron)
        for neuron, word in ((1, "人民"), (2, " cafe\u0301"), (3, " 😀party"), (4, " Darmstadt"), (5, " arms")):
            stage(f, 0, neuron, 0, [(d, 8 + WORDS.index(word)) for d in range(4)], [9.0, 8.5, 8.0, 7.5])
            quiet(f, 0, neuron)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("light")
    demo_like(root / "data" / "act.h5")
    (root / "docs").mkdir()
    (root / "docs" / "about.md").write_text("# About\n\nSee [the applause neuron](neurons/L1/N4.md).\n")
    return build_site(root, {"activations": "data/act.h5", "neurons": "all", "layout": "light"},
                      nav=[{"Home": "index.md"}, {"About": "about.md"}, {"Neurons": "neurons/index.md"}],
                      extra={"site_url": "https://example.org/gs/"})


def read(site: Path, rel: str) -> str:
    return (site / rel).read_text(encoding="utf-8")


def row_of(site: Path, page: str) -> tuple[dict, dict]:
    """A neuron page's data row (read as any Parquet reader would) and the site's facts."""
    found = re.search(r'data-file="([^"]+)" data-row="(\d+)"', read(site, page))
    table = pq.ParquetFile(site / "neurons/data" / found.group(1))
    row = table.read_row_group(int(found.group(2))).to_pylist()[0]
    return row, json.loads(read(site, "neurons/gluscope/site.json"))


def test_every_neuron_gets_a_stub_page_that_the_theme_page_takes_in(site):
    pages = sorted(site.glob("neurons/L*/N*/index.html"))
    assert len(pages) == 12 and max(p.stat().st_size for p in pages) < 1200  # a 7B model's 352,256 fit 1 GB
    page = read(site, "neurons/L1/N4/index.html")
    assert "<title>Neuron 1.4 - GLUScope test</title>" in page and '<h1 id="neuron">Neuron 1.4</h1>' in page
    assert '<script src="../../../assets/gluscope/stub.js" data-shell="../../gluscope-shell/neuron.html">' in page
    # Neighbours, layer and index, as URLs (these pages bypass MkDocs' link rewriting).
    assert 'href="../N3/"' in page and 'href="../N5/"' in page and 'href="../../"' in page and 'href="../"' in page
    assert "Applause" in page  # the top word of its case, for readers and search engines without JavaScript
    # The theme's page, rendered once from the plugin's template (a block override), with its markers.
    shell = read(site, "neurons/gluscope-shell/neuron.html")
    assert shell.count("GLUSCOPE:CONTENT") == 1 and "<title>GLUSCOPE:TITLE - GLUScope test</title>" in shell
    assert 'class="md-header' in shell and "md-search__input" in shell  # the theme's own header and search box
    # Every module a page imports is preloaded by the shell: fetched at once, not an import at a time.
    vendor = sorted(p.relative_to(site / "assets/gluscope").as_posix() for p in (site / "assets/gluscope/vendor").rglob("*.js"))
    assert len(vendor) > 10 and all(f'rel="modulepreload" href="../../../assets/gluscope/{m}"' in shell for m in vendor)
    # A hand-written page's link to a neuron's Markdown path reaches its page.
    assert 'href="../neurons/L1/N4/"' in read(site, "about/index.html")
    # The theme's index holds the index and layer pages, not 12 (or 352,256) neuron pages.
    index = json.loads(read(site, "search/search_index.json"))
    assert not any(d["location"].startswith("neurons/L1/N") for d in index["docs"])


def test_sitemap_lists_every_neuron_page_and_not_the_shell(site):
    sitemap = read(site, "sitemap.xml")
    assert "<sitemapindex" in sitemap and "https://example.org/gs/sitemap-pages.xml" in sitemap
    assert "https://example.org/gs/neurons/sitemap-neurons-0.xml" in sitemap
    neurons = read(site, "neurons/sitemap-neurons-0.xml")
    assert neurons.count("<loc>") == 12 and "https://example.org/gs/neurons/L1/N4/" in neurons
    pages = read(site, "sitemap-pages.xml")
    assert "https://example.org/gs/about/" in pages and "gluscope-shell" not in sitemap + neurons + pages


def test_the_data_file_holds_every_example_within_its_code_steps(site):
    row, facts = row_of(site, "neurons/L0/N2/index.html")
    with ActivationsFile(site.parent / "data" / "act.h5") as f:
        n = f.neuron(0, 2)
    C, H, k, W = 4, 4, facts["shown"][0], 5
    assert row["neuron"] == 2 and row["summary"][:4] == n.count.tolist()  # the summary is exact
    values = np.asarray(row["values"], dtype=np.float64)
    largest = values[-8:].reshape(4, 2)
    place = np.asarray(row["place"])
    U = len(place) // 2
    codes = np.frombuffer(row["window"], dtype=np.int8).reshape(2, U, W)
    slots = np.asarray(row["lists"])
    first: dict[int, tuple] = {}  # the windows of an example stored once: its first list's
    for c, h, j in np.ndindex(C, H, k):
        u = slots[(c * H + h) * k + j]
        assert (u >= 0) == (n.top_doc[c, h, j] >= 0)
        if u < 0:
            continue
        assert (place[u], place[U + u]) == (n.top_doc[c, h, j], n.top_pos[c, h, j])
        assert values[(c * H + h) * k + j] == np.float32(n.top_value[c, h, j])
        at = first.setdefault(int(u), (c, h, j))
        for w, want in enumerate((n.top_gate[at], n.top_in[at])):
            got = ldata.decode_windows(codes[w, u], largest[c, w])
            assert np.array_equal(np.isnan(got), np.isnan(want))
            ok = ~np.isnan(want) & (np.abs(want) > largest[c, w] * 2.0 ** -7)
            assert np.allclose(got[ok], want[ok], rtol=0.062), (got, want)
    counts = ldata.decode_counts(np.frombuffer(row["dist"], dtype=np.uint8))
    hist = counts[:C * H * 22].reshape(C, H, 22)
    assert np.allclose(hist, n.hist, rtol=0.05, atol=0.5)  # the figures' counts, to three digits


def test_value_and_count_codes_keep_sign_zero_and_nan():
    values = np.array([0.0, np.nan, 3.0, -3.0, 1e-9, -0.0321, 2.9999, 1e6])
    decoded = ldata.decode_windows(ldata.encode_windows(values, 3.0), 3.0)
    assert decoded[0] == 0 and np.isnan(decoded[1]) and decoded[2] == 3.0 and decoded[3] == -3.0
    assert decoded[4] == 0  # below the smallest step
    assert decoded[5] == pytest.approx(-0.0321, rel=0.062) and decoded[7] == 3.0  # clipped to the largest
    counts = np.array([0, 1, 2, 3, 999, 123_456, 21_000_000])
    assert ldata.decode_counts(ldata.encode_counts(counts))[:3].tolist() == [0, 1, 2]
    assert np.allclose(ldata.decode_counts(ldata.encode_counts(counts)), counts, rtol=0.05)


def terms_of(site: Path, term: str) -> list:
    firsts = json.loads(read(site, "neurons/gluscope/search/firsts.json"))
    shard = json.loads(read(site, f"neurons/gluscope/search/{words.shard_of(term, firsts)}.json"))
    return shard.get(term, [])


def test_search_ranks_neurons_by_how_much_of_their_strong_activations_a_word_is(site):
    ranked = [p[0] for p in terms_of(site, "applause")]
    # 1.4's strong activations are all on the word; 1.3's strongest is too, at 9, but it is a quarter of
    # them; 1.2's are all on it, at a twentieth of the strength the layer's neurons reach.
    assert ranked.index("1.4") < ranked.index("1.3") < ranked.index("1.2")
    first = terms_of(site, "applause")[0]
    assert first[:2] == ["1.4", 0] and first[3] > 0.99  # [id, case, score, share, peak]
    # An example that peaks on "Appl" is found by what the model had read there, "appl".
    assert not terms_of(site, "ause") and all(p[0] != "1.4" for p in terms_of(site, "appl"))
    # Every language: Chinese by bigrams, a decomposed word under its composed key, an emoji-led word.
    assert terms_of(site, "人民")[0][0] == "0.1" and terms_of(site, "华人")[0][0] == "0.1"
    assert terms_of(site, "café")[0][0] == "0.2" and terms_of(site, "😀party")[0][0] == "0.3"


def test_search_shards_are_ranges_of_about_equal_size(tmp_path):
    rng = random.Random(3)
    runs = []
    for r in range(3):
        items = [("".join(rng.choice("abcdefgh人民😀é") for _ in range(rng.randint(1, 6))), -rng.random(), -rng.random(),
                  -1.0, f"{r}.{i}", i % 4) for i in range(4000)]
        runs.append(lsearch.write_sorted(items, tmp_path / f"run{r}.jsonl"))
    lsearch.SHARD_BYTES, old = 8192, lsearch.SHARD_BYTES
    try:
        counts = lsearch.write_shards(runs, tmp_path / "search")
    finally:
        lsearch.SHARD_BYTES = old
    firsts = json.loads((tmp_path / "search/firsts.json").read_text(encoding="utf-8"))
    sizes = [(tmp_path / f"search/{i}.json").stat().st_size for i in range(len(firsts))]
    assert counts["shards"] == len(firsts) > 10 and max(sizes) <= 8192 + 2000  # no shard holds more than its share
    for i, first in enumerate(firsts):
        shard = json.loads((tmp_path / f"search/{i}.json").read_text(encoding="utf-8"))
        assert all(words.shard_of(term, firsts) == i for term in shard) and (not i or first in shard)
        assert all(len(p) <= lsearch.POSTINGS for p in shard.values())


@pytest.mark.parametrize("parts", [1, 3], ids=["one-range", "three-ranges"])
def test_search_index_keeps_each_terms_best_postings_in_rank_order(tmp_path, parts):
    """The merge of sorted runs equals sorting every posting at once: each term's POSTINGS best, in
    rank order, whatever characters the term holds (tab, line end, backslash, control, emoji) and
    with -0.0 and 0.0 ranks, ties broken by neuron id and case; in one range of terms or several
    (each merged by its own task: how the build uses its workers)."""
    rng = random.Random(5)
    alphabet = ["a", "b", "\t", "\n", "\\", "\x01", "\x1f", "\x00", " ", "é", "😀", "人"]
    ranks = [0.0, -0.0, -0.5, -0.25, -1.0, -1e-300, -3.0]
    everything, runs = [], []
    for r in range(4):
        items = [("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3))), rng.choice(ranks), rng.choice(ranks),
                  rng.choice(ranks), f"{rng.randint(0, 30)}.{rng.randint(0, 9)}", rng.randint(0, 3)) for _ in range(3000)]
        items = list({(t, n, c): (t, a, b, p, n, c) for t, a, b, p, n, c in items}.values())  # a (term, neuron, case) once
        everything += items
        runs.append(lsearch.write_sorted(items, tmp_path / f"run{r}.txt"))
    lsearch.POSTINGS, old = 7, lsearch.POSTINGS
    try:
        counts = lsearch.write_shards(runs, tmp_path / "search", parts=parts)
    finally:
        lsearch.POSTINGS = old
    expected: dict[str, list] = {}
    for t, a, b, p, n, c in sorted(everything):
        if len(expected.setdefault(t, [])) < 7:
            expected[t].append([n, c, -a, -b, -p])
    firsts = json.loads((tmp_path / "search/firsts.json").read_text(encoding="utf-8"))
    found: dict[str, list] = {}
    for i in range(len(firsts)):
        found.update(json.loads((tmp_path / f"search/{i}.json").read_text(encoding="utf-8")))
    assert list(found) == list(expected) and found == expected
    assert firsts[0] == "" and all(words.shard_of(t, firsts) == i for i in range(len(firsts))
                                   for t in json.loads((tmp_path / f"search/{i}.json").read_text(encoding="utf-8")))
    assert counts["terms"] == len(expected) and not list((tmp_path / "search").glob("range-*"))


def test_word_finder_agrees_with_the_word_rules():
    rng = random.Random(9)
    vocab = VOCAB + ["", " ", "\n", "x", "东京", "タワー", "1", "-", "ü"]
    finder = lsearch.WordFinder(vocab)
    ids = np.array([[rng.choice([-1] + list(range(len(vocab)))) if rng.random() < 0.1 else rng.randrange(len(vocab))
                     for _ in range(9)] for _ in range(3000)])
    ids[:, 4] = np.where(ids[:, 4] < 0, 1, ids[:, 4])
    starts, stops = finder.extents(ids, 4)
    for row, start, stop in zip(ids, starts, stops):
        tokens = [vocab[t] if t >= 0 else None for t in row]
        assert finder.word(row, 4, int(start), int(stop)) == words.word_around(tokens, 4)
        assert finder.terms(row, 4, int(start), int(stop)) == words.index_terms(tokens, 4)
    # The build's path: many windows at once ([neurons, slots, W], some left out), by a finder whose cache is
    # empty, so every key it slices is checked against the rules.
    fresh, grid = lsearch.WordFinder(vocab), ids.reshape(1000, 3, 9)
    which = np.array([rng.random() < 0.8 for _ in range(3000)]).reshape(1000, 3)
    found = fresh.terms_of(grid, 4, starts.reshape(1000, 3), stops.reshape(1000, 3), which)
    assert found == [words.index_terms([vocab[t] if t >= 0 else None for t in row], 4) for row in grid[which]]


def test_layer_tables_list_every_neuron_with_its_top_words(site):
    table = json.loads(read(site, "neurons/gluscope/layers/L1.json"))
    assert [r[0] for r in table["rows"]] == list(range(6))
    assert table["rows"][4][5] == ["Appl", "ause", ""]  # top word of gate+_in+, peak piece apart
    layer_page = read(site, "neurons/L1/index.html")
    assert 'data-src="../gluscope/layers/L1.json"' in layer_page and layer_page.count("<tr>") == 7
    script = read(site, "neurons/site.js")
    assert '"prefix":"neurons"' in script and '"L1":[1,null,6,6]' in script


def test_untrusted_text_stays_text_in_light_pages(site):
    tags: list[str] = []
    links: list[str] = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.append(tag)
            links.extend(v for k, v in attrs if k in ("href", "src", "action") and v)

    for rel in ("neurons/L0/N0/index.html", "neurons/L1/N4/index.html", "neurons/L1/index.html", "neurons/index.html"):
        page = read(site, rel)
        Collect().feed(page)
        assert "<script>alert" not in page and "<img" not in page and "{{ 7*7 }}" not in page
    assert "img" not in tags and not any(link.startswith("javascript:") for link in links)
    assert "<b>m</b>" in html.unescape(read(site, "neurons/index.html"))  # shown, as text


def test_layout_auto_chooses_light_above_the_threshold(tmp_path, monkeypatch):
    from mkdocs_gluscope import plugin

    demo_like(tmp_path / "data" / "act.h5")
    monkeypatch.setattr(plugin, "AUTO_LIGHT", 5)
    site = build_site(tmp_path, {"activations": "data/act.h5", "neurons": ["0.*"]})
    assert (site / "neurons/data/neurons/L0/0.parquet").exists() and not (site / "neurons/data/neurons/L1").exists()
    assert "stub.js" in read(site, "neurons/L0/N3/index.html")


def test_removed_inline_cases_option_says_why(tmp_path, caplog):
    from mkdocs.config import load_config
    from mkdocs.exceptions import Abort

    demo_like(tmp_path / "data" / "act.h5")
    with pytest.raises(Abort):
        load_config(str(write_project(tmp_path, {"activations": "data/act.h5", "neurons": "all", "inline_cases": 2})))
    assert "inline_cases" in caplog.text and "was removed" in caplog.text


def test_light_pages_without_directory_urls(tmp_path):
    demo_like(tmp_path / "data" / "act.h5")
    site = build_site(tmp_path, {"activations": "data/act.h5", "neurons": ["1.*"], "layout": "light"},
                      extra={"use_directory_urls": False})
    page = read(site, "neurons/L1/N4.html")
    assert 'href="N3.html"' in page and 'href="N5.html"' in page and 'href="index.html"' in page
    assert 'href="../index.html"' in page and 'data-root="../"' in page
    assert 'src="../../assets/gluscope/stub.js" data-shell="../gluscope-shell/neuron.html"' in page
    assert '"suffix":".html"' in read(site, "neurons/site.js")
    assert 'href="N4.html"' in read(site, "neurons/L1/index.html")


def test_a_rebuild_with_an_unchanged_file_and_theme_rewrites_no_neuron_page(tmp_path, caplog):
    demo_like(tmp_path / "data" / "act.h5")
    config = write_project(tmp_path, {"activations": "data/act.h5", "neurons": "all", "layout": "light"})
    site = build(config)
    page = site / "neurons/L1/N4/index.html"
    before = (page.stat().st_ino, page.stat().st_mtime_ns)
    (tmp_path / "docs" / "index.md").write_text("# Home\n\nA test site, edited.\n", encoding="utf-8")
    caplog.clear()
    with caplog.at_level("INFO"):
        build(config)
    assert (page.stat().st_ino, page.stat().st_mtime_ns) == before  # the cache's file, linked again
    assert "reusing" in caplog.text and "reused the neuron pages" in caplog.text
    assert "edited" in read(site, "index.html")
    # A new theme page (another site name) makes new pages from the same data.
    config.write_text(config.read_text().replace("GLUScope test", "Another name"), encoding="utf-8")
    caplog.clear()
    with caplog.at_level("INFO"):
        build(config)
    assert "reusing" in caplog.text and "wrote 12 neuron pages" in caplog.text
    assert "<title>Neuron 1.4 - Another name</title>" in read(site, "neurons/L1/N4/index.html")


def test_a_theme_without_the_blocks_fails_with_one_clear_error(tmp_path, caplog):
    demo_like(tmp_path / "data" / "act.h5")
    (tmp_path / "overrides").mkdir()
    (tmp_path / "overrides" / "main.html").write_text("<html><body>{{ page.content }}</body></html>", encoding="utf-8")
    config = write_project(tmp_path, {"activations": "data/act.h5", "neurons": ["1.*"], "layout": "light"},
                           extra={"theme": {"name": "material", "font": False, "custom_dir": "overrides"}})
    from mkdocs.exceptions import Abort

    with pytest.raises(Abort):
        build(config)
    assert "gluscope: layout light: the theme's page has no GLUSCOPE:TITLE marker(s): its template has no block " \
           "'htmltitle'" in caplog.text


def test_two_models_share_one_site_and_a_switch_turns_one_off(tmp_path):
    demo_like(tmp_path / "data" / "a.h5")
    write_synthetic(tmp_path / "data" / "b.h5", layers=1, d_mlp=5, k=3, seed=8)
    config = write_project(tmp_path, {"activations": "data/a.h5", "neurons": "all", "layout": "light",
                                      "url_prefix": "models/a"})
    import yaml

    text = yaml.safe_load(config.read_text())
    text["plugins"].append({"gluscope": {"activations": "data/b.h5", "neurons": "all", "layout": "light",
                                         "url_prefix": "models/b"}})
    text["plugins"].append({"gluscope": {"activations": "data/b.h5", "neurons": "all", "url_prefix": "off",
                                         "enabled": False}})
    config.write_text(yaml.safe_dump(text))
    site = build(config)
    assert (site / "models/a/L1/N4/index.html").exists() and (site / "models/b/L0/N4/index.html").exists()
    assert (site / "models/a/data/neurons/L1/0.parquet").exists() and (site / "models/b/data/neurons/L0/0.parquet").exists()
    page = read(site, "index.html")
    assert 'src="models/a/site.js"' in page and 'src="models/b/site.js"' in page and "off/" not in page
    sitemap = read(site, "sitemap.xml")
    assert "models/a/sitemap-neurons-0.xml" in sitemap and "models/b/sitemap-neurons-0.xml" in sitemap
    assert not (site / "off").exists()


def test_data_url_puts_the_data_files_outside_the_site(tmp_path):
    demo_like(tmp_path / "data" / "act.h5")
    site = build_site(tmp_path, {"activations": "data/act.h5", "neurons": ["1.*"], "layout": "light",
                                 "data_url": "https://huggingface.co/datasets/u/r/resolve/main", "data_dir": "upload"})
    assert not (site / "neurons/data").exists() and (tmp_path / "upload/neurons/L1/0.parquet").is_file()
    assert (tmp_path / "upload/corpus/0.parquet").is_file()
    assert '"data":"https://huggingface.co/datasets/u/r/resolve/main/"' in read(site, "neurons/site.js")


def moe_file(path: Path) -> Path:
    """A dense layer 0 and mixture-of-experts layers 1 (3 routed experts and a shared one) and 2 (2
    routed), 6 neurons each; expert 1.e2's neuron 4 peaks on "applause" in its gate+_in+ list."""
    docs = [[0, 1 + d % 30, 2, 3, ID[" ("], ID["Appl"], ID["ause"], ID[")"]] + [ID[w] for w in WORDS]
            + [1 + (5 * d + 3 * t) % 39 for t in range(12)] for d in range(16)]
    write_synthetic(path, layers=1, d_mlp=6, k=4, before=3, after=1, vocab=VOCAB, docs=docs, layer_ids=[0],
                    experts={1: 3, 2: 2}, shared=[1], seed=6)
    with h5py.File(path, "a") as f:
        g = f["experts"]
        for name, new in (("top/doc", [0, 1, 2, 3]), ("top/pos", [6, 6, 6, 6]), ("top/value", [9.0, 8.9, 8.8, 8.7])):
            data = g[name][...]
            data[2, 4, 0, 0, :4] = new  # row 2: layer 1, expert 2
            if name == "top/value":
                data[2, 4, 1:, 0] *= 0.001  # its strong activations are those of gate+_in+
            g[name][...] = data
    return path


def test_expert_neurons_get_pages_tables_and_data(tmp_path):
    moe_file(tmp_path / "data" / "act.h5")
    site = build_site(tmp_path, {"activations": "data/act.h5", "neurons": "all", "layout": "light"})
    with ActivationsFile(tmp_path / "data" / "act.h5") as f:
        routed = f.routed[(1, 2)]
    page = read(site, "neurons/L1/E2/N4/index.html")
    assert "<title>Neuron 1.e2.4 - GLUScope test</title>" in page and 'data-file="neurons/L1/E2/0.parquet"' in page
    assert "of its expert's tokens" in page and 'href="../../E2/"' not in page and 'href="../"' in page  # its expert
    assert 'data-shell="../../../gluscope-shell/expert-neuron.html"' in page
    assert (site / "neurons/gluscope-shell/expert-neuron.html").exists() and (site / "neurons/L1/S/N5/index.html").exists()
    row = pq.ParquetFile(site / "neurons/data/neurons/L1/E2/0.parquet").read_row_group(4).to_pylist()[0]
    assert row["neuron"] == 4 and row["summary"][-1] == routed  # frequencies are shares of the routed tokens
    layer = read(site, "neurons/L1/index.html")
    assert "1.e2" in layer and "1.s" in layer and "routing frequency" in layer
    expert = read(site, "neurons/L1/E2/index.html")
    assert f"routed {routed:,} of" in expert and 'data-src="../../gluscope/layers/L1-E2.json"' in expert
    assert "1.e2.5" in expert  # the expert's table lists its neurons
    script = read(site, "neurons/site.js")
    assert '"L1-E2":[1,2,6,6]' in script and '"L1-S":[1,"s",6,6]' in script and '"L0":[0,null,6,6]' in script
    assert terms_of(site, "applause")[0][:2] == ["1.e2.4", 0]


def test_window_codes_are_scaled_by_counted_positions_only(tmp_path):
    """A huge value at the BOS (an attention sink, outside the statistics) does not flatten the codes of
    every other token of the case: they keep their 6% resolution."""
    from synthetic import stage_early_list

    path = write_synthetic(tmp_path / "act.h5", layers=1, d_mlp=2, k=8, before=5, after=2, seed=5,
                           docs=[[0] + [(d + t) % 50 + 1 for t in range(40)] for d in range(12)])
    stage_early_list(path, positions=[1, 2, 3, 4, 5, 6, 7, 20], bos=5000.0, sink=2.0)
    with ActivationsFile(path) as f:
        data = f.neuron(0, 0)
        row = ldata.neuron_row(data, ldata.Shown.of(data, None), None)
    U = len(row["place"]) // 2
    codes = np.frombuffer(row["window"], dtype=np.int8).reshape(2, U, 8)
    largest = np.asarray(row["values"][-8:]).reshape(4, 2)
    assert largest[0, 0] < 10  # not the BOS's 5000
    staged = ldata.decode_windows(codes[0, np.asarray(row["lists"][:8])], largest[0, 0])  # the staged list
    # gate is 1 on its ordinary tokens (its values at BOS and the sink are 5000 and 2; NaN outside)
    ordinary = staged[np.isfinite(staged) & (staged < 1.9)]
    assert ordinary.size > 30 and np.allclose(ordinary, 1.0, rtol=0.062), staged


def test_the_data_stage_checks_the_file_once(tmp_path, monkeypatch):
    """Opening a file checks all of it (a 7B model's: its whole corpus, seconds): the data stage's tasks
    reuse the first check (a forked worker, the parent's) rather than checking again for each task."""
    from mkdocs_gluscope import schema
    from mkdocs_gluscope.light import build as lbuild

    path = write_synthetic(tmp_path / "act.h5", layers=2, d_mlp=40, k=3, seed=2)
    checked: list[str] = []
    check = schema.check_file
    monkeypatch.setattr(schema, "check_file", lambda f, where: checked.append(where) or check(f, where))
    monkeypatch.setattr(lbuild, "TASK_NEURONS", 16)
    monkeypatch.setattr(lbuild, "_SHARED", {})
    groups = lbuild.groups_of([(layer, n) for layer in range(2) for n in range(40)])
    totals = lbuild.build_data(lbuild.DataOptions(str(path), None, 1), groups, tmp_path / "out")
    assert totals["neurons"] == 80 and len(list((tmp_path / "out/data/neurons").rglob("*.parquet"))) == 6
    assert len(checked) == 1, checked


def label_one(path: Path, layer: int, neuron: int, case: int, label: str, score: float) -> Path:
    """Explain every neuron of ``path`` (the file-only explainer), then give one case a label of our own."""
    from mkdocs_gluscope.explain_run import explain_file
    from mkdocs_gluscope.explanations import read_arrays, write_explanations

    explain_file(path, "all", workers=1, progress=False, log=lambda m: None)
    with ActivationsFile(path) as f:
        arrays = read_arrays(f, "", f.row(layer))
        n = f.d_mlp
    arrays["label"][neuron, case], arrays["score"][neuron, case] = label, score
    arrays["listed"] = np.arange(n) == neuron
    write_explanations(path, {("", layer): arrays}, {"score_model": "synthetic"})
    return path


def test_explanations_show_in_light_tables_pages_and_search(tmp_path):
    """A file with explanations: each case's label and score in the layer table's rows (and its static
    first page), on the neuron's page, and each word of a label in the search index, ranked by score."""
    label_one(demo_like(tmp_path / "data" / "act.h5"), 1, 2, 3, "` marmalade` after ` once`", 0.87)
    site = build_site(tmp_path, {"activations": "data/act.h5", "neurons": "all", "layout": "light"})
    rows = json.loads(read(site, "neurons/gluscope/layers/L1.json"))["rows"]
    assert rows[2][12] == [["", " marmalade", " after ", " once", ""], 0.87]  # quoted tokens at odd indices
    assert all(len(r) == 13 for r in rows) and any(r[9] for r in rows)  # the explainer labelled the others
    stub = read(site, "neurons/L1/N2/index.html")
    assert "<code> marmalade</code> after <code> once</code>" in stub and "score 0.87" in stub
    layer_page = read(site, "neurons/L1/index.html")
    assert "the label of each case (score)" in layer_page and '<tr class="gs-label-row">' in layer_page
    assert "<code> marmalade</code>" in layer_page
    first = terms_of(site, "marmalade")[0]
    assert first == ["1.2", 3, 0.87, -1, 0] and terms_of(site, "once")[0][:2] == ["1.2", 3]
    # A file without explanations keeps the rows it had (no label columns).
    plain = build_site(tmp_path / "plain", {"activations": str(demo_like(tmp_path / "plain.h5")), "neurons": "all",
                                             "layout": "light"})
    assert all(len(r) == 9 for r in json.loads(read(plain, "neurons/gluscope/layers/L1.json"))["rows"])
    assert not terms_of(plain, "marmalade")
