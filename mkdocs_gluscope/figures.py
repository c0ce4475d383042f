"""Inline SVG figures of one neuron's distributions: per-case histograms and the gate × in density.

Pure functions of a neuron's arrays that return HTML (no MkDocs objects, no JavaScript needed): a
full page shows them as written; a light page draws the same SVG in the browser with
``assets/figures.js``, which mirrors these functions line for line (``tests/test_rules_js.py`` checks
that both give the same text for the same arrays). Every bar and cell carries a ``<title>`` (its
range and count) that a browser shows on hover and a screen reader reads. Geometry is in whole
pixels (user units = CSS pixels) so both languages compute it alike. No string here comes from the corpus.

* :func:`histograms_html`: for each hook one panel of four histograms (one per case, in the case's
  color) of ``|value|`` on the octave bins of ``stats/hist``, a log-|value| x axis shared by the four
  cases of a hook, labelled where labels fit, and a count axis. The panels are tabs made of radio
  buttons (no JavaScript needed); ``gluscope.js`` also follows the page's "Color tokens by" control.
* :func:`density_html`: the joint (gate, in) histogram as a heatmap, ``in`` across, ``gate`` up, each
  quadrant (a case) tinted in its case's color, darker for more tokens (steps of a power of two).
"""

from __future__ import annotations

import html

import numpy as np

from mkdocs_gluscope.store import CASES, HOOK_SIGNS, HOOKS

#: The sign of ``gate`` and ``in`` in each case, and so of every hook (post = act(gate)·in has the
#: sign of gate × in, act(gate) the sign of gate).
GATE_SIGN = tuple(HOOK_SIGNS[c][HOOKS.index("hook_pre")] for c in range(len(CASES)))
IN_SIGN = tuple(HOOK_SIGNS[c][HOOKS.index("hook_pre_linear")] for c in range(len(CASES)))
HOOK_SHORT = {"hook_post": "post", "hook_pre_linear": "in", "hook_pre": "gate", "swish": "act(gate)"}
_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def hook_sign(case: int, hook: str) -> int:
    return HOOK_SIGNS[case][HOOKS.index(hook)]


def pow2(edge: float) -> str:
    """An octave edge as a power of two: ``2⁻⁴``, ``1``, ``2¹⁰``; ``0`` and ``∞`` as such."""
    if edge == 0:
        return "0"
    if not np.isfinite(edge):
        return "−∞" if edge < 0 else "∞"
    e = int(round(np.log2(abs(edge))))
    return ("−" if edge < 0 else "") + ("1" if e == 0 else "2" + str(e).translate(_SUPERSCRIPT))


def _tokens(n: int) -> str:
    return f"{n:,} token" + ("" if n == 1 else "s")


def _decimal(x: float) -> str:
    return f"{abs(float(x)):.3g}"


def compact(n: int) -> str:
    """A count in at most four characters and a suffix: ``512``, ``34.5k``, ``1.2M``."""
    for size, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return str(n)


def bin_range(edges: np.ndarray, b: int, name: str) -> str:
    """The range of histogram bin ``b`` of ``|name|`` in words, e.g. ``2⁻⁴ ≤ |post| < 2⁻³ (0.0625–0.125)``."""
    lo, hi = float(edges[b]), float(edges[b + 1])
    if lo == 0:
        return f"|{name}| < {pow2(hi)} ({_decimal(hi)}), zeros included"
    if not np.isfinite(hi):
        return f"|{name}| ≥ {pow2(lo)} ({_decimal(lo)})"
    return f"{pow2(lo)} ≤ |{name}| < {pow2(hi)} ({_decimal(lo)}–{_decimal(hi)})"


# Histogram geometry in pixels: size, the plot's left (count labels), right, top and bottom (|value| labels)
# margins, and the room a tick label needs.
HW, HH, HL, HR, HT, HB, LABEL = 300, 150, 42, 10, 10, 34, 34


def _histogram_svg(hist: list[int], edges: np.ndarray, lo: int, hi: int, case: int, hook: str) -> str:
    """One case's histogram of one hook over bins ``lo..hi``: a bar per non-empty bin."""
    name = HOOK_SHORT[hook]
    total = sum(hist)
    top = max(hist) if total else 1
    n = hi - lo + 1
    pw, ph = HW - HL - HR, HH - HT - HB
    base = HT + ph
    sign = hook_sign(case, hook)
    out = [f'<svg class="gs-hist" viewBox="0 0 {HW} {HH}" width="{HW}" height="{HH}" role="img" '
           f'aria-label="histogram of |{name}| in {CASES[case]}">',
           f"<title>{html.escape(CASES[case])}: |{name}| of its {total:,} tokens, octave bins "
           f"(values are {'positive' if sign > 0 else 'negative'})</title>",
           f'<line class="gs-axis" x1="{HL}" y1="{base}" x2="{HW - HR}" y2="{base}"/>',
           f'<line class="gs-axis" x1="{HL}" y1="{HT}" x2="{HL}" y2="{base}"/>',
           f'<line class="gs-grid" x1="{HL}" y1="{HT}" x2="{HW - HR}" y2="{HT}"/>',
           f'<text x="{HL - 4}" y="{HT + 4}" text-anchor="end">{compact(top) if total else 0}</text>',
           f'<text x="{HL - 4}" y="{base + 4}" text-anchor="end">0</text>']
    for b in range(lo, hi + 1):
        count = hist[b]
        if not count:
            continue
        x0, x1 = HL + (b - lo) * pw // n, HL + (b - lo + 1) * pw // n
        h = max(1, (2 * ph * count + top) // (2 * top))
        out.append(f'<rect class="gs-bar-{case}" x="{x0 + 1}" y="{base - h}" width="{max(x1 - x0 - 1, 1)}" height="{h}">'
                   f"<title>{html.escape(bin_range(edges, b, name))}: {_tokens(count)} "
                   f"({100 * count / total:.3g}% of {html.escape(CASES[case])})</title></rect>")
    # Labelled ticks as far apart as a label is wide: never two labels on top of each other.
    every = max(1, -(-LABEL * n // pw))
    for e in range(lo, hi + 2):
        x = HL + (e - lo) * pw // n
        labelled = (e - lo) % every == 0
        out.append(f'<line class="gs-tick" x1="{x}" y1="{base}" x2="{x}" y2="{base + (4 if labelled else 2)}"/>')
        if labelled:
            out.append(f'<text x="{x}" y="{base + 16}" text-anchor="middle">{pow2(float(edges[e]))}</text>')
    out.append(f'<text class="gs-axname" x="{HW - HR}" y="{HH - 3}" text-anchor="end">|{name}|</text>')
    if not total:
        out.append(f'<text x="{HL + pw // 2}" y="{HT + ph // 2}" text-anchor="middle" class="gs-none">no tokens</text>')
    out.append("</svg>")
    return "".join(out)


def histograms_html(hist: np.ndarray, edges: np.ndarray, count: np.ndarray, color_hook: str = "hook_post") -> str:
    """Tabs (one per hook, ``color_hook`` selected) of four per-case histograms each."""
    selected = HOOKS.index(color_hook) if color_hook in HOOKS else 0
    parts = ['<div class="gs-dist" data-search-exclude>']
    for h, hook in enumerate(HOOKS):
        checked = " checked" if h == selected else ""
        parts.append(f'<input type="radio" class="gs-tab-in" name="gs-hist-hook" id="gs-hist-{h}" value="{hook}"{checked}>'
                     f'<label class="gs-tab" for="gs-hist-{h}">{HOOK_SHORT[hook]}</label>')
    counts = [[[int(x) for x in hist[c, h]] for h in range(len(HOOKS))] for c in range(len(CASES))]
    for h, hook in enumerate(HOOKS):
        filled = [b for b in range(len(edges) - 1) if any(counts[c][h][b] for c in range(len(CASES)))]
        lo, hi = (filled[0], filled[-1]) if filled else (0, len(edges) - 2)
        cells = []
        for c, case in enumerate(CASES):
            share = f"{int(count[c]):,} tokens · {HOOK_SHORT[hook]} {'>' if hook_sign(c, hook) > 0 else '<'} 0"
            cells.append(f'<figure class="gs-hist-fig gs-case{c}"><figcaption><span class="gs-chip gs-case{c}"></span>'
                         f"<b>{html.escape(case)}</b> · {share}</figcaption>"
                         f"{_histogram_svg(counts[c][h], edges, lo, hi, c, hook)}</figure>")
        parts.append(f'<div class="gs-tab-panel" data-hook="{hook}">{"".join(cells)}</div>')
    parts.append("</div>")
    return "".join(parts)


# Density geometry: cell size, margins left (gate labels), bottom (in labels), top, right.
DC, DL, DB, DT, DR = 16, 52, 52, 20, 12


def _signed_range(edges: np.ndarray, j: int) -> str:
    lo, hi = float(edges[j]), float(edges[j + 1])
    if hi <= 0:  # a negative cell: lo < v <= hi
        return f"{pow2(lo)} < v ≤ {pow2(hi)}" if np.isfinite(lo) else f"v ≤ {pow2(hi)}"
    return f"{pow2(lo)} ≤ v < {pow2(hi)}" if np.isfinite(hi) else f"v ≥ {pow2(lo)}"


def bits(n: int) -> int:
    """Binary digits of ``n`` (0 for 0): the darkness step of a density cell."""
    return int(n).bit_length()


def density_html(density: np.ndarray, edges: np.ndarray) -> str:
    """The (gate, in) heatmap: axis 0 of ``density`` is the gate cell, axis 1 the in cell."""
    G = density.shape[0]
    half = G // 2
    cells = [[int(x) for x in row] for row in density]
    total = sum(map(sum, cells))
    rows_used = [g for g in range(G) if any(cells[g])]
    cols_used = [i for i in range(G) if any(cells[g][i] for g in range(G))]
    # Crop to the cells in use, always keeping the cells on both sides of zero (the quadrant cross).
    g_lo = min(rows_used[0], half - 1) if rows_used else half - 1
    g_hi = max(rows_used[-1], half) if rows_used else half
    i_lo = min(cols_used[0], half - 1) if cols_used else half - 1
    i_hi = max(cols_used[-1], half) if cols_used else half
    nx, ny = i_hi - i_lo + 1, g_hi - g_lo + 1
    width, height = DL + nx * DC + DR, DT + ny * DC + DB
    top = bits(max(max(row) for row in cells)) or 1
    ranges = [html.escape(_signed_range(edges, j)) for j in range(G)]

    def x(j: int) -> int:  # left edge of in cell j
        return DL + (j - i_lo) * DC

    def y(j: int) -> int:  # top edge of gate cell j (positive gate up)
        return DT + (g_hi - j) * DC

    out = [f'<svg class="gs-density" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
           'aria-label="joint histogram of gate and in">',
           f"<title>gate × in: {total:,} tokens; each quadrant is a case, darker cells hold more tokens "
           "(each step twice as many)</title>"]
    for c, case in enumerate(CASES):
        gx = (x(half), x(i_hi + 1)) if IN_SIGN[c] > 0 else (x(i_lo), x(half))
        gy = (y(g_hi), y(half - 1)) if GATE_SIGN[c] > 0 else (y(half - 1), y(g_lo - 1))
        out.append(f'<rect class="gs-quad" style="fill:var(--gs-case{c})" x="{gx[0]}" y="{gy[0]}" width="{gx[1] - gx[0]}" '
                   f'height="{gy[1] - gy[0]}"><title>{html.escape(case)}</title></rect>')
    for g in range(g_lo, g_hi + 1):
        for i in range(i_lo, i_hi + 1):
            n = cells[g][i]
            if not n:
                continue
            c = (0 if g >= half else 2) + (0 if i >= half else 1)
            alpha = 0.15 + 0.85 * bits(n) / top
            out.append(f'<rect style="fill:var(--gs-case{c})" fill-opacity="{alpha:.2f}" x="{x(i)}" y="{y(g)}" width="{DC}" '
                       f'height="{DC}"><title>gate {ranges[g]}, in {ranges[i]}: {_tokens(n)} '
                       f"({100 * n / total:.3g}%) · {CASES[c]}</title></rect>")
    out.append(f'<line class="gs-zero" x1="{x(half)}" y1="{DT}" x2="{x(half)}" y2="{DT + ny * DC}"/>'
               f'<line class="gs-zero" x1="{DL}" y1="{y(half - 1)}" x2="{DL + nx * DC}" y2="{y(half - 1)}"/>')
    # Edge labels: every other edge (pairs of octaves), and 0.
    for j in range(i_lo, i_hi + 2):
        if (j - half) % 2 or not np.isfinite(edges[j]):
            continue
        out.append(f'<text class="gs-xlab" transform="translate({x(j)},{DT + ny * DC + 6}) rotate(-60)" '
                   f'text-anchor="end">{pow2(float(edges[j]))}</text>')
    for j in range(g_lo, g_hi + 2):
        if (j - half) % 2 or not np.isfinite(edges[j]):
            continue
        out.append(f'<text x="{DL - 5}" y="{y(j - 1) + 4}" text-anchor="end">{pow2(float(edges[j]))}</text>')
    out.append(f'<text class="gs-axname" x="{DL + nx * DC}" y="{height - 3}" text-anchor="end">in →</text>'
               f'<text class="gs-axname" x="3" y="13">gate ↑</text></svg>')
    return "".join(out)
