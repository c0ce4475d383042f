"""The light layout (a whole model): pages written from the theme's shell, examples on demand from
compact data files, layer tables and a search index sharded by word (issue 11)."""

from __future__ import annotations

import gzip
import html
import json
import re
import struct
from html.parser import HTMLParser
from pathlib import Path

import h5py
import numpy as np
import pytest

from mkdocs_gluscope import light
from mkdocs_gluscope.store import ActivationsFile
from sites import build_site, write_project
from synthetic import stage_early_list, write_synthetic

UNTRUSTED = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "{{ 7*7 }}", "[x](javascript:alert(1))"]
VOCAB = ["<s>"] + [f" w{i}" for i in range(1, 40)] + [" (", "Appl", "ause", ")"] + UNTRUSTED


def demo_like(path: Path) -> Path:
    """2 layers x 6 neurons; every document has "(Appl|ause)" at positions 4-6, and neuron 1.4 peaks
    on "ause" in every example of its gate+_in+ hook_post list."""
    docs = [[0, 1 + d % 30, 2, 40, 41, 42, 43] + [1 + (5 * d + 3 * t) % 39 for t in range(20)] + [44 + d % 4]
            for d in range(16)]
    write_synthetic(path, layers=2, d_mlp=6, k=4, before=3, after=1, vocab=VOCAB, docs=docs,
                    titles=[UNTRUSTED[d % 4] + f" {1790 + d}" for d in range(16)], model="<b>m</b>")
    with h5py.File(path, "a") as f:
        pos = f["top/pos"][...]
        pos[1, 4, 0, 0] = 5
        f["top/pos"][...] = pos
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("light")
    demo_like(root / "data" / "act.h5")
    (root / "docs").mkdir()
    (root / "docs" / "about.md").write_text("# About\n\nSee [the applause neuron](neurons/L1/N4.md).\n")
    return build_site(root, {"activations": "data/act.h5", "neurons": "all", "layout": "light"},
                      nav=[{"Home": "index.md"}, {"About": "about.md"}, {"Neurons": "neurons/index.md"}])


def read(site: Path, rel: str) -> str:
    return (site / rel).read_text(encoding="utf-8")


def parse_examples(blob: bytes) -> dict:
    """light.encode_examples' layout, read as gluscope.js reads it."""
    raw = gzip.decompress(blob)
    assert raw[:4] == light.EXAMPLES_MAGIC
    header = "<4HI2H4f2H"
    C, H, k, W, U, centre, counted_from, gate_counted, in_counted, gate_other, in_other, code_range, wide = \
        struct.unpack_from(header, raw, 4)
    o = 4 + struct.calcsize(header)

    def take(dtype, n):
        nonlocal o
        a = np.frombuffer(raw, dtype=dtype, count=n, offset=o)
        o += a.nbytes
        return a

    out = {"k": k, "scales": take("<f4", C * H * 4).reshape(C, H, 4), "values": take("<f4", C * H * k).reshape(C, H, k),
           "example": take("<i2", C * H * k).reshape(C, H, k)}
    place = "<u2" if wide == 2 else "<u4"
    out["doc"], out["pos"] = take(place, U), take(place, U)
    # The rule gluscope.js applies: a window position is counted from counted_from on.
    counted = out["pos"][:, None].astype(np.int64) + np.arange(W) - centre >= counted_from
    out["gate"] = light.decode_windows(take("i1", U * W).reshape(U, W), counted, gate_counted, gate_other)
    out["in"] = light.decode_windows(take("i1", U * W).reshape(U, W), counted, in_counted, in_other)
    out["counted"] = counted
    assert o == len(raw) and code_range == light.CODE_RANGE
    return out


def test_every_neuron_gets_a_light_page_in_the_theme(site):
    pages = sorted(site.glob("neurons/L*/N*/index.html"))
    assert len(pages) == 12
    page = read(site, "neurons/L1/N4/index.html")
    assert "<title>Neuron 1.4 - GLUScope test</title>" in page and '<h1 id="neuron-14">Neuron 1.4</h1>' in page
    assert 'href="#neuron-14"' in page  # the theme's skip link points at the page's own title
    assert "assets/stylesheets/main." in page and 'class="md-header' in page  # Material's look
    assert "gluscope-shell" not in page and not (site / "neurons" / light.SHELL_DIR).exists()
    assert '<form class="gs-header-search" action="../../../neurons/"' in page
    # Neighbours, layer and index, as URLs (these pages bypass MkDocs' link rewriting).
    assert 'href="../N3/"' in page and 'href="../N5/"' in page and 'href="../../"' in page and 'href="../"' in page
    # A hand-written page's link to a neuron's Markdown path reaches its page.
    assert 'href="../neurons/L1/N4/"' in read(site, "about/index.html")
    # Neuron pages stay out of Material's search index and the sitemap; the index pages are in it.
    index = json.loads(read(site, "search/search_index.json"))
    assert not any(d["location"].startswith("neurons/L1/N") for d in index["docs"])
    # The figures and projections (about 60 KB of SVG a page) stay on the full layout's pages:
    # a whole model's site must fit GitHub Pages.
    assert 'id="distributions"' not in page and 'class="gs-hist"' not in page and 'id="vocabulary"' not in page


def test_a_page_holds_the_strongest_example_of_its_two_rarest_cases(site):
    page = read(site, "neurons/L1/N4/index.html")
    with ActivationsFile(site.parent / "data" / "act.h5") as f:
        n = f.neuron(1, 4, windows=False)
    rare = sorted(range(4), key=lambda c: (n.count[c], c))[:2]
    blocks = page.split('<details class="gs-case-block"')[1:]
    assert [block.startswith(" open>") for block in blocks] == [c in rare for c in range(4)]
    assert page.count('class="gs-ex"') == 2
    for c in rare:
        assert f'data-doc="{n.top_doc[c, 0, 0]}" data-pos="{n.top_pos[c, 0, 0]}"' in page
    assert page.count('class="gs-lazy"') == 4 and 'data-src="&#46;&#46;/&#46;&#46;/&#46;&#46;/gluscope/x/L1/N4&#46;bin"' in page


def test_the_data_file_holds_every_example_within_three_percent(site):
    with ActivationsFile(site.parent / "data" / "act.h5") as f:
        n = f.neuron(0, 2)  # (1.4's staged positions do not match its windows; a collection's always do)
    d = parse_examples((site / "gluscope/x/L0/N2.bin").read_bytes())
    first: dict[tuple[int, int], tuple[int, int, int]] = {}  # an example shared by lists is stored once
    for c, h, j in np.ndindex(4, 4, d["k"]):
        u = d["example"][c, h, j]
        assert (u >= 0) == (n.top_doc[c, h, j] >= 0)
        if u < 0:
            continue
        assert (d["doc"][u], d["pos"][u]) == (n.top_doc[c, h, j], n.top_pos[c, h, j])
        assert d["values"][c, h, j] == np.float32(n.top_value[c, h, j])
        at = first.setdefault((int(n.top_doc[c, h, j]), int(n.top_pos[c, h, j])), (c, h, j))
        for got, want in ((d["gate"][u], n.top_gate[at]), (d["in"][u], n.top_in[at])):
            assert np.array_equal(np.isnan(got), np.isnan(want))
            big = max(np.nanmax(np.abs(n.top_gate)), np.nanmax(np.abs(n.top_in)))
            ok = ~np.isnan(want) & (np.abs(want) > big * 2.0 ** -9)
            assert np.allclose(got[ok], want[ok], rtol=0.029), (got, want)
    assert len(d["doc"]) == len(first)


def test_value_codes_keep_sign_zero_and_nan():
    values = np.array([0.0, np.nan, 3.0, -3.0, 1e-9, -0.0123, 2.9999, 1e6])
    decoded = light.decode_values(light.encode_values(values, 3.0), 3.0)
    assert decoded[0] == 0 and np.isnan(decoded[1]) and decoded[2] == 3.0 and decoded[3] == -3.0
    assert decoded[4] == 0  # below the smallest step
    assert decoded[5] == pytest.approx(-0.0123, rel=0.029) and decoded[7] == 3.0  # clipped to the largest


def test_search_shards_find_whole_words_and_layer_tables_list_every_neuron(site):
    shard = json.loads(read(site, f"gluscope/search/{light.shard_key('applause')}.json"))
    assert [1, 4, 0] == shard["applause"][0][:3]  # layer 1, neuron 4, gate+_in+: the word a reader types
    assert "ause" not in shard  # the piece alone is no word
    table = json.loads(read(site, "gluscope/layers/L1.json"))
    assert [r[0] for r in table["rows"]] == list(range(6))
    assert table["rows"][4][5] == ["Appl", "ause", ""]  # top word of gate+_in+, peak piece apart
    layer_page = read(site, "neurons/L1/index.html")
    assert 'data-src="../../gluscope/layers/L1.json"' in layer_page and layer_page.count('<tr>') == 7
    script = read(site, "gluscope/site.js")
    assert '"prefix":"neurons"' in script and "earlyTitle" in script
    assert light.shard_key("Ápp") == "_p" and light.shard_key("a") == "a_"


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
        body = page[page.index("<article"):page.index("</article>")]
        assert "<script>alert" not in body and "<img" not in body and "{{ 7*7 }}" not in body
    assert "img" not in tags and not any(link.startswith("javascript:") for link in links)
    assert "<b>m</b>" in html.unescape(read(site, "neurons/L1/N4/index.html"))  # shown, as text


def test_layout_auto_chooses_light_above_the_threshold(tmp_path, monkeypatch):
    demo_like(tmp_path / "data" / "act.h5")
    monkeypatch.setattr(light, "AUTO_LIGHT", 5)
    site = build_site(tmp_path, {"activations": "data/act.h5", "neurons": ["0.*"]})
    assert (site / "gluscope/x/L0/N0.bin").exists() and not (site / "gluscope/x/L1").exists()
    assert "gs-lazy" in read(site, "neurons/L0/N3/index.html")


@pytest.mark.parametrize("value", [-1, 5, True, "two"])
def test_inline_cases_must_be_0_to_4(value, tmp_path, caplog):
    from mkdocs.config import load_config
    from mkdocs.exceptions import Abort

    demo_like(tmp_path / "data" / "act.h5")
    with pytest.raises(Abort):
        load_config(str(write_project(tmp_path, {"activations": "data/act.h5", "neurons": "all", "inline_cases": value})))
    assert "inline_cases" in caplog.text and "from 0 to 4" in caplog.text


def test_search_ranks_a_strong_neuron_before_many_weak_examples():
    # As in the demo: 0.754's common case peaks on "applause" in 8 examples at 2.3; 28.473 in one at 41.
    shards = light.search_shards([("applause", 0, 754, 2, 8, 2.3), ("applause", 28, 473, 0, 1, 41.0),
                                  ("applaud", 3, 3, 1, 2, -0.5)])
    assert [p[:2] for p in shards["ap"]["applause"]] == [[28, 473], [0, 754]]
    assert shards["ap"]["applaud"] == [[3, 3, 1, 2, -0.5]]


def test_light_pages_without_directory_urls(tmp_path):
    demo_like(tmp_path / "data" / "act.h5")
    site = build_site(tmp_path, {"activations": "data/act.h5", "neurons": ["1.*"], "layout": "light"},
                      extra={"use_directory_urls": False})
    page = read(site, "neurons/L1/N4.html")
    assert 'href="N3.html"' in page and 'href="N5.html"' in page and 'href="index.html"' in page
    assert 'href="../index.html"' in page and 'action="../../neurons/index.html"' in page
    assert 'src="../../assets/gluscope/gluscope.js"' in page
    assert 'data-src="&#46;&#46;/&#46;&#46;/gluscope/x/L1/N4&#46;bin"' in page
    assert '"suffix":".html"' in read(site, "gluscope/site.js")
    assert 'href="N4.html"' in read(site, "neurons/L1/index.html")


def test_a_bos_outlier_leaves_every_counted_window_value_readable(tmp_path):
    """8-bit codes reach 2^-10 of their scale: a BOS 5,000 times the ordinary values made them all "≈ 0"
    when the scale was the window's largest |value|. Counted positions now have their own scale."""
    from mkdocs_gluscope.render import list_scales

    path = write_synthetic(tmp_path / "act.h5", layers=1, d_mlp=2, k=4, before=3, after=1)
    stage_early_list(path, positions=[1, 2, 3, 5], bos=5000.0, sink=1.0)  # 0.0's gate+_in+ hook_post list
    with ActivationsFile(path) as f:
        data = f.neuron(0, 0)
    d = parse_examples(light.encode_examples(data, 4, list_scales(data, 4)[2]))
    for j in range(4):
        u = d["example"][0, 0, j]
        for got, want in ((d["gate"][u], data.top_gate[0, 0, j]), (d["in"][u], data.top_in[0, 0, j])):
            inside = ~np.isnan(want)
            assert np.allclose(got[inside], want[inside], rtol=0.029), (j, got, want)
            assert (want[d["counted"][u] & inside] == 1.0).all() and (want[~d["counted"][u] & inside] == 5000).all()
