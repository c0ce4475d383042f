"""The browser's halves of the page rules, run under node against the Python functions they mirror:
figures, the summary table, example rows and list summaries give the same HTML for the same arrays."""

from __future__ import annotations

import numpy as np

from jsrules import js_numbers, needs_node, run_js
from mkdocs_gluscope import figures
from mkdocs_gluscope.distributions import DENSITY_EDGES, HIST_EDGES
from mkdocs_gluscope.store import ActivationsFile
from synthetic import write_synthetic


def edges_js(edges: np.ndarray) -> list:
    return js_numbers(np.asarray(edges, dtype=np.float64))


@needs_node
def test_figures_are_the_same_svg_in_python_and_js(tmp_path):
    path = write_synthetic(tmp_path / "act.h5", layers=1, d_mlp=6, k=4, seed=11)
    calls, expected = [], []
    with ActivationsFile(path) as f:
        for n in range(6):
            data = f.neuron(0, n, windows=False)
            hist = data.hist.copy()
            if n == 1:
                hist[2] = 0  # a case with no tokens
            if n == 2:
                hist[:, :, :] = 0  # nothing at all
                hist[0, :, 21] = 7  # but the overflow bin
            calls.append(("histogramsHtml", [hist.tolist(), edges_js(HIST_EDGES), data.count.tolist(),
                                             ["hook_post", "swish", "hook_pre"][n % 3]]))
            expected.append(figures.histograms_html(hist, HIST_EDGES, data.count, ["hook_post", "swish", "hook_pre"][n % 3]))
            calls.append(("densityHtml", [data.density.tolist(), edges_js(DENSITY_EDGES)]))
            expected.append(figures.density_html(data.density, DENSITY_EDGES))
    counts = [0, 1, 999, 1000, 12345, 999999, 1_000_000, 21_345_678, 3_000_000_000]
    calls += [("compact", [n]) for n in counts] + [("bits", [n]) for n in counts]
    expected += [figures.compact(n) for n in counts] + [figures.bits(n) for n in counts]
    calls += [("binRange", [edges_js(HIST_EDGES), b, "post"]) for b in range(len(HIST_EDGES) - 1)]
    expected += [figures.bin_range(HIST_EDGES, b, "post") for b in range(len(HIST_EDGES) - 1)]
    got = run_js(tmp_path / "js", calls, module="figures.js")
    wrong = [(call[0], want, have) for call, want, have in zip(calls, expected, got) if want != have]
    assert not wrong, wrong[:3]


def js_array(a: np.ndarray) -> list:
    return js_numbers(np.asarray(a, dtype=np.float64))


@needs_node
def test_summary_rows_and_list_summaries_are_the_same_html(tmp_path):
    from mkdocs_gluscope import render
    from mkdocs_gluscope.store import early_end

    vocab = ["<s>"] + [f" w{i}" for i in range(1, 30)] + ["<b>x</b>", "\n", "  ", "{{ 7*7 }}", "Appl", "ause"]
    path = write_synthetic(tmp_path / "act.h5", layers=1, d_mlp=4, k=5, before=4, after=2, vocab=vocab, seed=3,
                           titles=[f"<i>doc</i> {d} & co" for d in range(15)])
    calls, expected = [], []
    with ActivationsFile(path) as f:
        for n in range(4):
            data = f.neuron(0, n)
            calls.append(("summaryTable", [data.count.tolist(), data.n_tokens, js_array(data.sum), js_array(data.min),
                                           js_array(data.max)]))
            expected.append(render.summary_table(data))
            early = early_end(data.attrs) if n % 2 else 3  # some lists start at the document's start
            for c in range(4):
                for h in range(4):
                    calls.append(("extremeText", [js_array(data.top_value[c, h]), data.top_doc[c, h].tolist(),
                                                  data.top_pos[c, h].tolist(), early]))
                    expected.append(render._extreme(data, c, h, early))
            counted, windows, scales = render.list_scales(data, 3)
            levels = render.color_levels(windows["hook_post"], scales["hook_post"], counted)
            ctx = render.PageContext(vocab_html=lambda t: render.token_html(vocab[t]), vocab_text=vocab.__getitem__,
                                     doc_title=f.doc_title, site_root="")
            for c, h, j in ((0, 0, 0), (1, 2, 1), (3, 3, 2)):
                calls.append(("colorScale", [js_array(windows["hook_post"][c, h]), counted[c, h].tolist(), 3]))
                expected.append(float(scales["hook_post"][c, h]))
                calls.append(("colorLevels", [js_array(windows["hook_post"][c, h, j]), float(scales["hook_post"][c, h]),
                                              counted[c, h, j].tolist()]))
                expected.append(levels[c, h, j].tolist())
                doc, pos = int(data.top_doc[c, h, j]), int(data.top_pos[c, h, j])
                tokens = [vocab[t] if t >= 0 else None for t in data.window_tokens[c, h, j]]
                calls.append(("exampleRow", [{
                    "doc": doc, "pos": pos, "gate": js_array(data.top_gate[c, h, j].astype(float)),
                    "in_": js_array(data.top_in[c, h, j].astype(float)), "swish": js_array(windows["swish"][c, h, j]),
                    "value": float(data.top_value[c, h, j]), "tokens": tokens, "levels": levels[c, h, j].tolist(),
                    "counted": counted[c, h, j].tolist(), "centre": data.context_before, "early": early, "rank": j + 1,
                    "title": f.doc_title(doc), "earlyTitle": render.EARLY_TITLE.replace("{pos}", "{pos}"),
                    "earlyPositions": render.EARLY_POSITIONS}]))
                expected.append(render.example_row(
                    ctx, doc=doc, pos=pos, gate=data.top_gate[c, h, j], in_=data.top_in[c, h, j],
                    swish=windows["swish"][c, h, j], value=data.top_value[c, h, j], tokens=data.window_tokens[c, h, j].tolist(),
                    levels=levels[c, h, j].tolist(), counted=counted[c, h, j].tolist(), centre=data.context_before,
                    early=early, rank=j + 1))
    got = run_js(tmp_path / "js", calls)
    wrong = [(call[0], want, have) for call, want, have in zip(calls, expected, got) if want != have]
    assert not wrong, wrong[:3]


@needs_node
def test_light_codes_decode_the_same_in_python_and_js(tmp_path):
    from mkdocs_gluscope.light import data as ldata

    codes = list(range(-64, 49))
    largest = [1.0, 0.37, 41.65, 3e-5]
    counts = list(range(256))
    calls = ([("windowValue", [c, big, ldata.CODE_STEPS, ldata.CODE_OCTAVES, ldata.NAN_CODE]) for big in largest for c in codes]
             + [("countOf", [c, ldata.COUNT_STEPS]) for c in counts])
    decoded = [float(ldata.decode_windows(np.array([c]), big)[0]) for big in largest for c in codes]
    expected = ([None if np.isnan(x) else x for x in decoded]  # NaN comes back from JSON as null
                + [int(x) for x in ldata.decode_counts(np.array(counts))])
    got = run_js(tmp_path, calls)
    wrong = [(call, want, have) for call, want, have in zip(calls, expected, got)
             if not (want == have or (isinstance(want, float) and isinstance(have, float) and abs(want - have) <= 1e-12 * abs(want)))]
    assert not wrong, wrong[:5]
