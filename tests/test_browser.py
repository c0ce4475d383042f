"""A built site in a real browser: headless Chromium (Debian's package) driven by Playwright."""

from __future__ import annotations

import shutil

import pytest

from sites import build_site, serve_folder
from synthetic import stage_early_list, write_synthetic

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium package is not installed"),
]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-site")
    vocab = ["<s>"] + [f" w{i}" for i in range(1, 60)] + [" zygomorphic", "\n", " <b>bold</b>"]
    docs = [[0] + [(7 * d + 3 * t) % 62 + 1 for t in range(30)] for d in range(16)]
    for doc in docs:
        doc[5] = 60  # the rare word appears in every document
    titles = [f"{1790 + 4 * d} · President {d}" for d in range(16)]
    write_synthetic(root / "data" / "act.h5", layers=2, d_mlp=6, k=4, before=5, after=2, vocab=vocab, docs=docs,
                    titles=titles, seed=3)
    return build_site(root, {"activations": "data/act.h5", "neurons": ["1.2", "0.4", "1.5"]})


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def open_first_list(page):
    """Open the first case and its first list, as a reader would (the page may have opened them
    already); returns that list."""
    first_list = page.locator(".gs-case-block").first.locator(".gs-list").first
    for block in (page.locator(".gs-case-block").first, first_list):
        if not block.evaluate("e => e.open"):
            block.locator("> summary").click()
    return first_list


def test_neuron_page_in_chromium(site, browser, output_dir):
    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("pageerror", lambda e: errors.append(str(e)))
    with serve_folder(site) as base:
        page.goto(base + "neurons/")
        page.get_by_role("link", name="1.2", exact=True).click()
        page.wait_for_url("**/neurons/L1/N2/")
        assert page.locator("h1").inner_text() == "Neuron 1.2"

        open_first_list(page)
        tokens = page.locator(".gs-case-block").first.locator(".gs-list").first.locator(".gs-toks > span")
        assert tokens.count() > 0
        colors = tokens.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)")
        assert any(c not in ("rgba(0, 0, 0, 0)", "transparent") for c in colors), colors
        assert page.locator(".gs-x").first.is_visible()

        # Hovering a token shows its values and case.
        tokens.nth(2).hover()
        tip = page.locator(".gs-tip")
        tip.wait_for(state="visible")
        text = tip.inner_text()
        for word in ("gate", "in", "act(gate)", "post", "case", "position"):
            assert word in text, text

        # Recolor by another hook: the classes change.
        before = tokens.evaluate_all("els => els.map(e => e.className)")
        page.select_option(".gs-hook-select", "hook_pre")
        after = tokens.evaluate_all("els => els.map(e => e.className)")
        assert before != after

        # Expand an example to its whole document.
        page.locator(".gs-doc-btn").first.click()
        doc = page.locator(".gs-doc").first
        doc.wait_for(state="visible")
        page.wait_for_function("() => document.querySelector('.gs-doc-head') !== null")
        assert "President" in doc.inner_text() and "zygomorphic" in doc.inner_text()
        page.screenshot(path=str(output_dir / "neuron-page.png"), full_page=True)

        # Sort the index by a case frequency.
        page.goto(base + "neurons/")
        first_before = page.locator("table.gs-sortable tbody tr td a").first.inner_text()
        page.locator("table.gs-sortable th").nth(4).click()
        page.locator("table.gs-sortable th").nth(4).click()
        order = page.locator("table.gs-sortable tbody tr td:nth-child(5)").evaluate_all(
            "els => els.map(e => parseFloat(e.dataset.sort))")
        assert order == sorted(order, reverse=True) or order == sorted(order)
        assert first_before
    assert not errors, errors


def test_neuron_page_opens_with_tokens_plots_and_wide_rows(site, browser, output_dir):
    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("pageerror", lambda e: errors.append(str(e)))
    with serve_folder(site) as base:
        page.goto(base + "neurons/L1/N2/")
        page.wait_for_load_state("load")
        # Tokens show without any click: the most telling case and its list are open.
        first = page.locator(".gs-examples").first.locator(".gs-toks > span:visible").first
        assert first.is_visible()
        assert page.locator(".gs-samples .gs-toks > span:visible").first.is_visible()
        # The plots: the color hook's histograms (one per case) and the density, with hover titles.
        hists = page.locator(".gs-tab-panel[data-hook='hook_post'] svg.gs-hist")
        assert hists.count() == 4 and all(hists.nth(c).is_visible() for c in range(4))
        assert not page.locator(".gs-tab-panel[data-hook='hook_pre'] svg.gs-hist").first.is_visible()
        assert page.locator("svg.gs-density").is_visible()
        box = page.locator("svg.gs-density").bounding_box()
        assert box["width"] > 150 and box["height"] > 150
        assert "|post|" in hists.first.locator("rect title").first.text_content()
        # A tab switches the histograms without JavaScript's help; the hook control switches them too.
        page.locator("label[for='gs-hist-2']").click()
        assert page.locator(".gs-tab-panel[data-hook='hook_pre'] svg.gs-hist").first.is_visible()
        page.select_option(".gs-hook-select", "hook_pre_linear")
        assert page.locator(".gs-tab-panel[data-hook='hook_pre_linear'] svg.gs-hist").first.is_visible()
        page.select_option(".gs-hook-select", "hook_post")
        # No peak frame splits across a line break: each is one box, on every visible row.
        boxes = page.locator(".gs-toks .gs-x").evaluate_all(
            "els => els.filter(e => e.offsetParent).map(e => e.getClientRects().length)")
        assert boxes and all(n == 1 for n in boxes), boxes
        # Example rows use the content's width.
        content = page.locator(".md-content__inner").evaluate("e => e.getBoundingClientRect().width")
        rows = page.locator(".gs-ex").evaluate_all(
            "els => els.filter(e => e.offsetParent).map(e => e.getBoundingClientRect().width)")
        toks = page.locator(".gs-toks").evaluate_all(
            "els => els.filter(e => e.offsetParent).map(e => e.getBoundingClientRect().width)")
        assert content > 900, content  # wider than Material's default column next to two sidebars
        assert min(rows) > 0.85 * content and min(toks) > 0.5 * content, (content, min(rows), min(toks))
        page.screenshot(path=str(output_dir / "neuron-page-opened.png"), full_page=True)
    assert not errors, errors


def test_search_finds_a_neuron_by_a_top_token(site, browser, output_dir):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    with serve_folder(site) as base:
        page.goto(base)
        page.wait_for_load_state("networkidle")  # the search index is loaded by a worker
        page.locator("label.md-search__icon, .md-search__input").first.click()
        page.locator(".md-search__input").press_sequentially("zygomorphic", delay=30)
        results = page.locator(".md-search-result__item")
        results.first.wait_for(state="visible", timeout=15000)
        assert "Neuron" in page.locator(".md-search-result").inner_text()
        page.screenshot(path=str(output_dir / "search.png"))
        page.locator(".md-search__input").fill("")
        page.locator(".md-search__input").press_sequentially("Neuron 0.4", delay=30)
        page.wait_for_function(
            "() => [...document.querySelectorAll('.md-search-result__item')].some(e => e.innerText.includes('0.4'))",
            timeout=15000)


@pytest.fixture(scope="module")
def relu_site(tmp_path_factory):
    """A ReLU model's file whose first list starts at the document start, with a huge BOS and one sink."""
    root = tmp_path_factory.mktemp("relu-site")
    docs = [[0] + [(d + t) % 50 + 1 for t in range(40)] for d in range(12)]
    path = write_synthetic(root / "data" / "act.h5", layers=1, d_mlp=2, k=8, before=5, after=2, docs=docs,
                           act_fn="relu", seed=5)
    stage_early_list(path, positions=[1, 2, 3, 4, 5, 6, 7, 20])
    return build_site(root, {"activations": "data/act.h5", "neurons": ["0.0", "0.1"]})


def test_relu_page_hover_and_recolor_follow_the_page_data(relu_site, browser, output_dir):
    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("pageerror", lambda e: errors.append(str(e)))
    with serve_folder(relu_site) as base:
        page.goto(base + "neurons/L0/N1/")
        open_first_list(page)
        tokens = page.locator(".gs-case-block").first.locator(".gs-toks > span")
        seen_negative = 0
        for n in range(min(tokens.count(), 12)):
            tokens.nth(n).hover()
            values = dict(line.split(" ", 1) for line in page.locator(".gs-tip").inner_text().splitlines())
            if values["gate"] == "–":
                continue
            gate, act = float(values["gate"]), float(values["act(gate)"])
            assert act == pytest.approx(max(gate, 0.0), rel=1e-2, abs=1e-3), values  # ReLU, not SiLU
            seen_negative += gate < 0
        assert seen_negative

        # Recoloring back to hook_post gives the server's colors: one rule, in Python and in JS.
        page.goto(base + "neurons/L0/N0/")
        first_list = open_first_list(page)
        spans = page.locator(".gs-examples .gs-toks > span")
        initial = spans.evaluate_all("els => els.map(e => e.className)")
        page.select_option(".gs-hook-select", "hook_pre")
        assert spans.evaluate_all("els => els.map(e => e.className)") != initial
        page.select_option(".gs-hook-select", "hook_post")
        assert spans.evaluate_all("els => els.map(e => e.className)") == initial
        # The staged list: ordinary tokens are strongly colored although the BOS and a sink are huge.
        staged = first_list.locator(".gs-toks > span").evaluate_all("els => els.map(e => e.className)")
        strong = [c for c in staged if "gs-nc" not in c and int(c.split()[0][1:]) >= 5]
        assert len(strong) > len(staged) / 2, staged
        assert first_list.locator(".gs-early").count() == 7
        first_list.locator(".gs-ex").first.scroll_into_view_if_needed()
        page.screenshot(path=str(output_dir / "start-of-document.png"), full_page=True)
    assert not errors, errors


# -- A whole model (light layout, issues 11 and 17) --------------------------------------------------------

@pytest.fixture(scope="module")
def light_site(tmp_path_factory):
    """2 layers x 150 neurons in the light layout, with test_light's words of several scripts staged:
    1.4 peaks on "applause", 0.1 on "人民", 0.2 on a decomposed "café", 0.3 on "😀party", 0.4 on
    "Darmstadt" and 0.5 on "arms"."""
    import h5py

    from test_light import ID, VOCAB, WORDS, stage

    root = tmp_path_factory.mktemp("light-site")
    docs = [[0, 1 + d % 30, 2, 3, ID[" ("], ID["Appl"], ID["ause"], ID[")"]] + [ID[w] for w in WORDS]
            + [1 + (5 * d + 3 * t) % 39 for t in range(12)] + [44 + d % 4] for d in range(24)]
    path = write_synthetic(root / "data" / "act.h5", layers=2, d_mlp=150, k=6, before=5, after=2, vocab=VOCAB, docs=docs,
                           titles=[f"{1790 + 4 * d} · President {d}" for d in range(24)], seed=4)
    from test_light import quiet

    with h5py.File(path, "a") as f:
        stage(f, 1, 4, 0, [(d, 6) for d in range(6)], [9.0, 8.9, 8.8, 8.7, 8.6, 8.5])
        quiet(f, 1, 4)
        for neuron, word in ((1, "人民"), (2, " cafe\u0301"), (3, " 😀party"), (4, " Darmstadt"), (5, " arms")):
            stage(f, 0, neuron, 0, [(d, 8 + WORDS.index(word)) for d in range(6)], [9.0, 8.5, 8.0, 7.5, 7.2, 7.1])
            quiet(f, 0, neuron)
    return build_site(root, {"activations": "data/act.h5", "neurons": "all", "layout": "light"})


def wait_ready(page):
    page.wait_for_selector(".gs-light[data-ready='2']", timeout=15000)


def test_light_page_shows_its_summary_figures_examples_and_samples(light_site, browser, output_dir):
    from mkdocs_gluscope.render import HOOK_LABELS, _extreme
    from mkdocs_gluscope.store import HOOKS, ActivationsFile, early_end

    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.on("pageerror", lambda e: errors.append(str(e)))
    with serve_folder(light_site) as base:
        page.goto(base + "neurons/L1/N4/")
        wait_ready(page)
        # The theme's own page (header, search box) around the neuron's content.
        assert page.locator(".md-header .md-search__input").count() == 1 and page.locator("h1").inner_text() == "Neuron 1.4"
        assert page.locator(".gs-summary table").is_visible()
        hists = page.locator(".gs-tab-panel[data-hook='hook_post'] svg.gs-hist")
        assert hists.count() == 4 and all(hists.nth(c).is_visible() for c in range(4))
        box = page.locator("svg.gs-density").bounding_box()
        assert box["width"] > 250 and box["height"] > 250  # large enough to read
        # Tick labels do not collide and are legible (11 px type, not 7).
        labels = hists.first.locator("text").evaluate_all(
            "els => els.map(e => { const r = e.getBoundingClientRect(); return [r.left, r.right, r.top, r.height]; })")
        ticks = sorted(l for l in labels if l[2] > box["y"] * 0 and l[3] > 0)
        assert min(l[3] for l in labels) >= 10
        row_of = {}
        for left, right, top, height in ticks:
            row_of.setdefault(round(top), []).append((left, right))
        for spans in row_of.values():
            spans.sort()
            assert all(a[1] <= b[0] + 0.5 for a, b in zip(spans, spans[1:])), spans
        # The opened list: its examples, colored, with tooltips that say the values are approximate.
        rows = page.locator(".gs-examples.gs-top details.gs-list[open] .gs-ex")
        rows.first.wait_for()
        assert rows.count() == 6
        tokens = rows.first.locator(".gs-toks > span")
        colors = tokens.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)")
        assert any(c not in ("rgba(0, 0, 0, 0)", "transparent") for c in colors), colors
        rows.first.locator(".gs-x").hover()  # the peak (the staged windows hold values there)
        tip = page.locator(".gs-tip")
        tip.wait_for(state="visible")
        assert "≈" in tip.inner_text() and "within 6%" in tip.inner_text()
        before = tokens.evaluate_all("els => els.map(e => e.className)")
        page.select_option(".gs-hook-select", "hook_pre")
        assert tokens.evaluate_all("els => els.map(e => e.className)") != before
        page.select_option(".gs-hook-select", "hook_post")
        assert "President" in rows.first.locator(".gs-doc-btn").inner_text()
        rows.first.locator(".gs-doc-btn").click()
        page.locator(".gs-doc-head").first.wait_for()
        assert "tokens" in page.locator(".gs-doc-head").first.inner_text()
        # Every list's summary, as the full layout's render._extreme writes it.
        with ActivationsFile(light_site.parent / "data" / "act.h5") as f:
            data = f.neuron(1, 4, windows=False)
            expected = [f"{HOOK_LABELS[h]}: most extreme {_extreme(data, c, i, early_end(f.attrs))}"
                        for c in range(4) for i, h in enumerate(HOOKS)]
        assert page.locator(".gs-top .gs-list > summary").all_text_contents() == expected
        page.screenshot(path=str(output_dir / "light-neuron-page.png"), full_page=True)
        # Random and band samples load as they come into view.
        page.locator(".gs-samples").scroll_into_view_if_needed()
        page.locator(".gs-samples .gs-ex").first.wait_for(timeout=10000)
        assert page.locator(".gs-samples .gs-ex").first.is_visible()
        page.locator(".gs-bands").scroll_into_view_if_needed()
        page.locator(".gs-bands .gs-ex").first.wait_for(timeout=10000)
        page.locator(".gs-dists").screenshot(path=str(output_dir / "light-distributions.png"))
        page.locator(".gs-samples").screenshot(path=str(output_dir / "light-samples.png"))
    assert not errors, errors


def search(page, text):
    page.locator(".md-search__input").fill("")
    page.locator(".md-search__input").press_sequentially(text, delay=20)
    page.wait_for_function("t => { const h = document.querySelector('.gs-search-head'); return h && h.dataset.query === t; }",
                           arg=text, timeout=15000)
    return page.locator(".gs-search-item").all_inner_texts()


def test_the_theme_search_box_finds_neurons_in_any_language_and_by_id(light_site, browser, output_dir):
    import unicodedata

    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("pageerror", lambda e: errors.append(str(e)))
    with serve_folder(light_site) as base:
        page.goto(base)
        page.wait_for_load_state("networkidle")
        page.locator("label.md-search__icon, .md-search__input").first.click()
        found = search(page, "applause")
        assert found[0].startswith("Neuron 1.4") and "gate+_in+" in found[0] and "100%" in found[0]
        assert search(page, "人民")[0].startswith("Neuron 0.1")  # Chinese, by bigrams
        assert search(page, "人民共和")[0].startswith("Neuron 0.1")
        assert search(page, unicodedata.normalize("NFC", "café"))[0].startswith("Neuron 0.2")  # stored decomposed
        assert search(page, "😀party")[0].startswith("Neuron 0.3")  # emoji-led
        assert search(page, "darmstadt")[0].startswith("Neuron 0.4")
        page.screenshot(path=str(output_dir / "search-words.png"))
        # By id: the exact id first, then the ids it begins: 1.140 .. 1.149.
        assert search(page, "1.14") == ["Neuron 1.14"] + [f"Neuron 1.14{n}" for n in range(10)]
        # The theme's search box reaches a light page.
        page.locator(".gs-search-item a").first.click()
        page.wait_for_url("**/neurons/L1/N14/")
        wait_ready(page)
        # And a light page's own (the theme's) search box works the same.
        page.locator("label.md-search__icon, .md-search__input").first.click()
        assert search(page, "applause")[0].startswith("Neuron 1.4")
        page.locator(".gs-search-item a").first.click()
        page.wait_for_url("**/neurons/L1/N4/")
        wait_ready(page)
        page.screenshot(path=str(output_dir / "search-from-neuron-page.png"))
    assert not errors, errors


def test_layer_page_sorts_filters_by_whole_words_and_pages(light_site, browser, output_dir):
    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 1200})
    page.on("pageerror", lambda e: errors.append(str(e)))
    with serve_folder(light_site) as base:
        page.goto(base + "neurons/L0/")
        page.wait_for_selector('.gs-layer[data-ready="2"]')
        body = page.locator(".gs-layer-table tbody tr")
        status = page.locator(".gs-page-status")
        assert body.count() == 100 and status.inner_text() == "neurons 1–100 of 150 · page 1 of 2"
        page.locator(".gs-next").click()
        assert body.count() == 50 and body.first.locator("td").first.inner_text() == "0.100"
        # Whole words: "arms" finds the neuron on " arms", not the one on " Darmstadt".
        def kept(word: str) -> tuple[list[str], list[list[str]]]:
            page.locator(".gs-filter-word").fill(word)
            ids = body.locator("td:first-child").all_inner_texts()
            tops = [row.locator("code.gs-top").all_inner_texts() for row in body.all()]
            return ids, tops

        ids, tops = kept("arms")
        assert "0.5" in ids and "0.4" not in ids and all("arms" in [w.strip().lower() for w in t] for t in tops)
        ids, tops = kept("darm*")
        assert "0.4" in ids and "0.5" not in ids and all(any(w.lower().startswith("darm") for w in t) for t in tops)
        ids, tops = kept("CAFÉ")  # typed composed and upper case; the corpus has it decomposed
        assert "0.2" in ids and all(any(w.strip().lower() in ("café", "cafe\u0301") for w in t) for t in tops)
        page.locator(".gs-filter-word").fill("")
        # Filter by a case's share: gate-_in- from 30%.
        page.select_option(".gs-filter-case", "3")
        page.locator(".gs-filter-min").fill("30")
        shares = page.locator(".gs-layer-table tbody td:nth-child(5)").all_inner_texts()
        assert shares and all(float(x) >= 30 for x in shares)
        assert "filtered from 150" in status.inner_text() and "page 1 of" in status.inner_text()
        page.locator(".gs-filter-min").fill("")
        page.locator(".gs-layer-table th").nth(1).click()
        if page.locator(".gs-layer-table th").nth(1).get_attribute("data-dir") == "asc":
            page.locator(".gs-layer-table th").nth(1).click()
        shares = [float(x) for x in page.locator(".gs-layer-table tbody td:nth-child(2)").all_inner_texts()]
        assert shares == sorted(shares, reverse=True) and len(shares) == 100
        assert page.locator(".gs-layer-table .gs-peak").count() > 100  # top words with their peak piece
        page.screenshot(path=str(output_dir / "layer-page.png"), full_page=True)
    assert not errors, errors


# -- Explanations (issue 19) ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def explained_site(tmp_path_factory):
    """A full-layout site whose neuron 1.2 explains its gate-_in- case with a label no example holds."""
    import numpy as np

    from mkdocs_gluscope.explain_run import explain_file
    from mkdocs_gluscope.explanations import read_arrays, write_explanations
    from mkdocs_gluscope.store import ActivationsFile

    root = tmp_path_factory.mktemp("explained-site")
    vocab = ["<s>"] + [f" w{i}" for i in range(1, 60)] + [" marmalade", " once", " again"]
    docs = [[0] + [(7 * d + 3 * t) % 59 + 1 for t in range(30)] for d in range(16)]
    path = write_synthetic(root / "data" / "act.h5", layers=2, d_mlp=6, k=4, before=5, after=2, vocab=vocab, docs=docs,
                           titles=[f"{1790 + 4 * d} · President {d}" for d in range(16)], seed=3)
    explain_file(path, "all", workers=1, progress=False, log=lambda m: None)
    with ActivationsFile(path) as f:
        arrays = read_arrays(f, "", 1)
    arrays["label"][2, 3] = "` marmalade` after ` once`"
    arrays["score"][2] = [0.41, 0.12, np.nan, 0.87]
    arrays["precision"][2, 3], arrays["recall"][2, 3], arrays["scored_positions"][2, 3] = 0.75, 0.6, 120
    arrays["listed"] = np.arange(6) == 2
    write_explanations(path, {("", 1): arrays}, {"score_model": "synthetic"})
    return build_site(root, {"activations": "data/act.h5", "neurons": ["1.2", "0.4", "1.5"]})


def test_labels_show_on_full_pages_and_search_finds_them(explained_site, browser, output_dir):
    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.on("pageerror", lambda e: errors.append(str(e)))
    with serve_folder(explained_site) as base:
        page.goto(base + "neurons/L1/N2/")
        section = page.locator("#explanations + ul")
        text = section.inner_text()
        assert "gate-_in-:  marmalade after  once" in text.replace("\u00a0", " ") or "marmalade" in text, text
        assert "score 0.87" in text and "precision 0.75, recall 0.6" in text and "120 positions" in text
        assert "not scored" in text  # gate-_in+ has a label but no score
        assert section.locator("code").first.is_visible()
        # The case's block in the examples opens with its label and score.
        summary = page.locator(".gs-examples > .gs-case-block > summary").nth(3).inner_text()
        assert "marmalade" in summary and "score 0.87" in summary, summary
        page.screenshot(path=str(output_dir / "explanations.png"))
        # The layer table lists each case's label and score.
        page.goto(base + "neurons/L1/")
        cell = page.locator("table.gs-index tbody tr", has_text="1.2").locator("td.gs-labels")
        assert "marmalade" in cell.inner_text() and "score 0.87" in cell.inner_text()
        page.screenshot(path=str(output_dir / "layer-labels.png"), full_page=True)
        # Search by a word of the label finds the neuron.
        page.goto(base)
        page.wait_for_load_state("networkidle")
        page.locator("label.md-search__icon, .md-search__input").first.click()
        page.locator(".md-search__input").press_sequentially("marmalade", delay=30)
        results = page.locator(".md-search-result__item")
        results.first.wait_for(state="visible", timeout=15000)
        assert "Neuron 1.2" in page.locator(".md-search-result").inner_text()
        page.screenshot(path=str(output_dir / "search-label.png"))
    assert not errors, errors


def test_light_layout_shows_labels_and_finds_neurons_by_a_label_word(tmp_path, browser, output_dir):
    """The light layout with explanations: a neuron page says each case's label and score, the layer
    table has a label column its word filter searches, and the search box finds a neuron by a word of
    its label."""
    from test_light import demo_like, label_one

    label_one(demo_like(tmp_path / "data" / "act.h5"), 1, 2, 3, "` marmalade` after ` once`", 0.87)
    site = build_site(tmp_path, {"activations": "data/act.h5", "neurons": "all", "layout": "light"})
    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.on("pageerror", lambda e: errors.append(str(e)))
    with serve_folder(site) as base:
        page.goto(base + "neurons/L1/N2/")
        wait_ready(page)
        labels = page.locator(".gs-labels")
        assert "gate-_in-  marmalade after  once score 0.87" in " ".join(labels.inner_text().split(" ")) or (
            "marmalade" in labels.inner_text() and "score 0.87" in labels.inner_text()), labels.inner_text()
        assert labels.locator("code").first.is_visible()
        page.screenshot(path=str(output_dir / "light-labels.png"))
        page.goto(base + "neurons/L1/")
        page.wait_for_selector('.gs-layer[data-ready="2"]')
        row = page.locator(".gs-layer-table tbody tr", has_text="1.2")  # the neuron's row, and its labels' below
        assert "marmalade" in row.locator("xpath=following-sibling::tr[1]").locator("td.gs-labels").inner_text()
        page.locator(".gs-filter-word").fill("marmalade")  # a word of a label, in no example
        assert page.locator(".gs-layer-table tbody tr:not(.gs-label-row) td:first-child").all_inner_texts() == ["1.2"]
        page.screenshot(path=str(output_dir / "light-layer-labels.png"), full_page=True)
        page.locator("label.md-search__icon, .md-search__input").first.click()
        found = search(page, "marmalade")
        assert found[0].startswith("Neuron 1.2") and "gate-_in-" in found[0] and "label says" in found[0], found
        page.screenshot(path=str(output_dir / "light-search-label.png"))
    assert not errors, errors


def test_mkdocs_serve_after_an_edit_rewrites_no_neuron_page(tmp_path, browser):
    """A real `mkdocs serve`: edit one line of docs/index.md, and the rebuild links the cached neuron
    pages again (symbolic links into the cache) rather than writing them; the pages still work."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from sites import write_project
    from test_light import demo_like

    demo_like(tmp_path / "data" / "act.h5")
    config = write_project(tmp_path, {"activations": "data/act.h5", "neurons": "all", "layout": "light"})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mkdocs", "serve", "-f", str(config), "-a", f"127.0.0.1:{port}"],
                              stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}/"

    def get(path: str) -> str:
        return urllib.request.urlopen(base + path, timeout=5).read().decode("utf-8")

    try:
        for _ in range(240):
            try:
                if "Neuron 1.4" in get("neurons/L1/N4/"):
                    break
            except OSError:
                time.sleep(0.5)
        cached = sorted((tmp_path / ".cache/plugin/gluscope/neurons").glob("pages-*/neurons/L1/N4/index.html"))
        assert len(cached) == 1
        stamp = cached[0].stat().st_mtime_ns
        (tmp_path / "docs" / "index.md").write_text("# Home\n\nA test site, edited once.\n", encoding="utf-8")
        for _ in range(240):
            if "edited once" in get(""):
                break
            time.sleep(0.5)
        assert "edited once" in get("")
        assert cached[0].stat().st_mtime_ns == stamp and "Neuron 1.4" in get("neurons/L1/N4/")
        text = (tmp_path / "serve.log").read_text()
        assert "reused the neuron pages" in text and text.count("wrote 12 neuron pages") == 1
        page = browser.new_page()
        page.goto(base + "neurons/L1/N4/")
        wait_ready(page)  # a server without range requests sends whole files: pages read them too
        assert page.locator(".gs-examples .gs-ex").count() > 0
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_expert_neurons_are_found_by_id_and_word_and_drawn(tmp_path, browser, output_dir):
    from test_light import moe_file

    moe_file(tmp_path / "data" / "act.h5")
    site = build_site(tmp_path, {"activations": "data/act.h5", "neurons": "all", "layout": "light"})
    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("pageerror", lambda e: errors.append(str(e)))
    with serve_folder(site) as base:
        page.goto(base)
        page.wait_for_load_state("networkidle")
        page.locator("label.md-search__icon, .md-search__input").first.click()
        assert search(page, "1.e2.4") == ["Neuron 1.e2.4"]
        assert search(page, "1.s.")[:3] == ["Neuron 1.s.0", "Neuron 1.s.1", "Neuron 1.s.2"]
        assert search(page, "applause")[0].startswith("Neuron 1.e2.4")
        page.locator(".gs-search-item a").first.click()
        page.wait_for_url("**/neurons/L1/E2/N4/")
        wait_ready(page)
        assert "routed to its expert" in page.locator(".gs-routing").inner_text()
        assert page.locator(".gs-examples.gs-top details.gs-list[open] .gs-ex").count() > 0
        page.goto(base + "neurons/L1/E2/")
        page.wait_for_selector('.gs-layer[data-ready="2"]')
        assert page.locator(".gs-layer-table tbody tr").count() == 6
        assert page.locator(".gs-layer-table tbody td a").first.inner_text() == "1.e2.0"
        page.screenshot(path=str(output_dir / "expert-table.png"), full_page=True)


#: A document with a right-to-left override (U+202E) and two Hebrew words among left-to-right tokens.
BIDI_VOCAB = ["<s>", " A", "\u202e", " B", " C", "שלום", "עולם", " D", " E", " F"]
_LEFT_TO_RIGHT = """els => els.map(e => { const r = e.getBoundingClientRect(); return [r.left, r.top, e.textContent]; })"""


def assert_left_to_right(spans) -> int:
    """Token spans on one line are laid out in their order, left to right; returns how many were compared."""
    boxes = spans.evaluate_all(_LEFT_TO_RIGHT)
    compared = 0
    for (x0, y0, t0), (x1, y1, t1) in zip(boxes, boxes[1:]):
        if abs(y1 - y0) < 2:  # the same line
            assert x1 > x0, f"{t1!r} is drawn left of {t0!r}: {boxes}"
            compared += 1
    return compared


def test_a_right_to_left_override_in_a_token_does_not_reverse_its_neighbours(tmp_path, browser, output_dir):
    """Python's spans (full layout, a light page's inline example) and gluscope.js' (a light page's
    lists loaded on demand, the document view) keep the window's order: U+202E shows as ⟨U+202E⟩,
    and each token is a bidirectional island, so the Hebrew pair keeps its token order too."""
    import h5py

    docs = [list(range(10)) for _ in range(8)]
    path = write_synthetic(tmp_path / "data" / "act.h5", layers=1, d_mlp=2, k=2, before=3, after=3,
                           vocab=BIDI_VOCAB, docs=docs, seed=1)
    with h5py.File(path, "a") as f:  # every example at " C": windows " A" .. " D"
        pos = f["top/pos"][...]
        pos[f["top/doc"][...] >= 0] = 4
        f["top/pos"][...] = pos
    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("pageerror", lambda e: errors.append(str(e)))
    for layout in ("full", "light"):
        site = build_site(tmp_path / layout, {"activations": str(path), "neurons": "all", "layout": layout})
        with serve_folder(site) as base:
            page.goto(base + "neurons/L0/N0/")
            if layout == "light":
                wait_ready(page)  # drawn from its data file
            blocks = page.locator(".gs-case-block")
            for i in range(blocks.count()):  # open every case (a light page loads their lists)
                if not blocks.nth(i).evaluate("e => e.open"):
                    blocks.nth(i).locator("> summary").click()
            lists = page.locator(".gs-examples:not(.gs-samples):not(.gs-bands) .gs-list")
            page.wait_for_function("() => document.querySelectorAll('.gs-examples .gs-list').length >= 16")
            for i in range(lists.count()):
                if not lists.nth(i).evaluate("e => e.open"):
                    lists.nth(i).locator("> summary").click()
            page.wait_for_function("() => document.querySelectorAll('.gs-examples .gs-list .gs-ex').length >= 32")
            rows = page.locator(".gs-examples:not(.gs-samples):not(.gs-bands) .gs-ex")
            compared = 0
            for i in range(rows.count()):
                spans = rows.nth(i).locator(".gs-toks > span")
                assert "⟨U+202E⟩" in spans.all_inner_texts(), spans.all_inner_texts()
                compared += assert_left_to_right(spans)
            assert rows.count() >= 32 and compared >= 3 * rows.count()  # a window may wrap onto two lines
            rows.first.locator(".gs-doc-btn").click()  # the whole document, built by gluscope.js
            page.locator(".gs-doc > span").nth(9).wait_for()
            assert_left_to_right(page.locator(".gs-doc > span"))
            page.screenshot(path=str(output_dir / f"bidi-{layout}.png"), full_page=True)
    assert not errors, errors
