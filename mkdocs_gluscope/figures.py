"""Small inline SVG figures of one neuron's distributions: per-case histograms and the gate × in density.

Pure functions of a neuron's arrays that return HTML (no MkDocs objects, no JavaScript needed): the
page shows them as written, and every bar and cell carries a ``<title>`` (its range and count) that
a browser shows on hover and a screen reader reads. No string here comes from the corpus.

* :func:`histograms_html`: for each hook one panel of four histograms (one per case, in the case's
  color) of ``|value|`` on the octave bins of ``stats/hist``; a log-|value| x axis shared by the
  four cases of a hook, bar heights relative to the case's fullest bin. The panels are tabs made
  of radio buttons, so switching works without JavaScript; ``gluscope.js`` also follows the page's
  "Color tokens by" control.
* :func:`density_html`: the joint (gate, in) histogram as a heatmap, ``in`` across, ``gate`` up,
  each quadrant (a case) tinted in its case's color, intensity by log count.
"""

from __future__ import annotations

import html
import math
from functools import lru_cache

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
        return "∞"
    e = int(round(np.log2(abs(edge))))
    return ("−" if edge < 0 else "") + ("1" if e == 0 else "2" + str(e).translate(_SUPERSCRIPT))


def _tokens(n: int) -> str:
    return f"{n:,} token" + ("" if n == 1 else "s")


def _decimal(x: float) -> str:
    return f"{abs(float(x)):.3g}"


def bin_range(edges: np.ndarray, b: int, name: str) -> str:
    """The range of histogram bin ``b`` of ``|name|`` in words, e.g. ``2⁻⁴ ≤ |post| < 2⁻³ (0.0625–0.125)``."""
    lo, hi = float(edges[b]), float(edges[b + 1])
    if lo == 0:
        return f"|{name}| < {pow2(hi)} ({_decimal(hi)}), zeros included"
    if not np.isfinite(hi):
        return f"|{name}| ≥ {pow2(lo)} ({_decimal(lo)})"
    return f"{pow2(lo)} ≤ |{name}| < {pow2(hi)} ({_decimal(lo)}–{_decimal(hi)})"


@lru_cache(maxsize=16)
def _bin_titles(edges: bytes, name: str) -> tuple[str, ...]:
    """:func:`bin_range` of every bin, HTML-escaped (the bins are the same on every page: computed once)."""
    e = np.frombuffer(edges, dtype=np.float64)
    return tuple(html.escape(bin_range(e, b, name)) for b in range(len(e) - 1))


@lru_cache(maxsize=16)
def _edge_labels(edges: bytes) -> tuple[str, ...]:
    return tuple(pow2(float(x)) for x in np.frombuffer(edges, dtype=np.float64))


def _key(edges: np.ndarray) -> bytes:
    return np.asarray(edges, dtype=np.float64).tobytes()


# Histogram geometry (SVG user units = CSS pixels at natural size).
_HW, _HH, _HL, _HB, _HT = 240, 92, 14, 26, 4  # width, height, left pad, bottom (axis) pad, top pad


def _histogram_svg(hist: np.ndarray, edges: np.ndarray, lo: int, hi: int, case: int, hook: str) -> str:
    """One case's histogram of one hook over bins ``lo..hi``: a bar per non-empty bin."""
    name = HOOK_SHORT[hook]
    total = int(hist.sum())
    top = int(hist.max()) if total else 1
    n_bins = hi - lo + 1
    step = (_HW - 2 * _HL) / n_bins
    plot_h = _HH - _HB - _HT
    sign = hook_sign(case, hook)
    titles = _bin_titles(_key(edges), name)
    labels = _edge_labels(_key(edges * sign))
    out = [f'<svg class="gs-hist" viewBox="0 0 {_HW} {_HH}" width="{_HW}" height="{_HH}" role="img" '
           f'aria-label="histogram of |{name}| in {CASES[case]}">',
           f"<title>{html.escape(CASES[case])}: |{name}| of its {total:,} tokens, octave bins "
           f"(values are {'positive' if sign > 0 else 'negative'})</title>",
           f'<line class="gs-axis" x1="{_HL}" y1="{_HH - _HB}" x2="{_HW - _HL}" y2="{_HH - _HB}"/>']
    hist_list = hist.tolist()
    for b in range(lo, hi + 1):
        n = hist_list[b]
        if not n:
            continue
        h = max(1.0, plot_h * n / top)
        x = _HL + (b - lo) * step
        out.append(f'<rect class="gs-bar-{case}" x="{x + 0.5:.1f}" y="{_HH - _HB - h:.1f}" width="{max(step - 1, 1):.1f}" '
                   f'height="{h:.1f}"><title>{titles[b]}: {_tokens(n)} '
                   f'({100 * n / total:.3g}% of {html.escape(CASES[case])})</title></rect>')
    # Ticks: at most 6 labelled edges, on whole octaves shared by all cases of the hook.
    every = max(1, -(-(n_bins + 1) // 6))
    for b in range(lo, hi + 2):
        if (b - lo) % every and b != hi + 1:
            continue
        x = _HL + (b - lo) * step
        out.append(f'<line class="gs-tick" x1="{x:.1f}" y1="{_HH - _HB}" x2="{x:.1f}" y2="{_HH - _HB + 3}"/>'
                   f'<text x="{x:.1f}" y="{_HH - _HB + 13}" text-anchor="middle">{labels[b]}</text>')
    if not total:
        out.append(f'<text x="{_HW / 2:.0f}" y="{(_HH - _HB) / 2:.0f}" text-anchor="middle" class="gs-none">'
                   "no tokens</text>")
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
    for h, hook in enumerate(HOOKS):
        filled = np.flatnonzero(hist[:, h].sum(axis=0))
        lo, hi = (int(filled[0]), int(filled[-1])) if filled.size else (0, len(edges) - 2)
        cells = []
        for c, case in enumerate(CASES):
            share = f"{int(count[c]):,} tokens · {HOOK_SHORT[hook]} {'>' if hook_sign(c, hook) > 0 else '<'} 0"
            cells.append(f'<figure class="gs-hist-fig gs-case{c}"><figcaption><span class="gs-chip gs-case{c}"></span>'
                         f"<b>{html.escape(case)}</b> · {share}</figcaption>"
                         f"{_histogram_svg(hist[c, h], edges, lo, hi, c, hook)}</figure>")
        parts.append(f'<div class="gs-tab-panel" data-hook="{hook}">{"".join(cells)}</div>')
    parts.append("</div>")
    return "".join(parts)


_DC, _DL, _DB, _DT, _DR = 11, 40, 34, 16, 10  # cell size, left (gate labels), bottom (in labels), top, right pads


@lru_cache(maxsize=4)
def _cell_titles(edges: bytes) -> tuple[str, ...]:
    e = np.frombuffer(edges, dtype=np.float64)
    return tuple(html.escape(_signed_range(e, j)) for j in range(len(e) - 1))


def _signed_range(edges: np.ndarray, j: int) -> str:
    lo, hi = float(edges[j]), float(edges[j + 1])
    if hi <= 0:  # a negative cell: lo < v <= hi
        return f"{pow2(lo)} < v ≤ {pow2(hi)}" if np.isfinite(lo) else f"v ≤ {pow2(hi)}"
    return f"{pow2(lo)} ≤ v < {pow2(hi)}" if np.isfinite(hi) else f"v ≥ {pow2(lo)}"


def density_html(density: np.ndarray, edges: np.ndarray) -> str:
    """The (gate, in) heatmap: axis 0 of ``density`` is the gate cell, axis 1 the in cell."""
    G = density.shape[0]
    half = G // 2
    total = int(density.sum())
    rows_used = np.flatnonzero(density.sum(axis=1))
    cols_used = np.flatnonzero(density.sum(axis=0))
    # Crop to the cells in use, always keeping the cells on both sides of zero (the quadrant cross).
    g_lo = int(min(rows_used.min(), half - 1)) if rows_used.size else half - 1
    g_hi = int(max(rows_used.max(), half)) if rows_used.size else half
    i_lo = int(min(cols_used.min(), half - 1)) if cols_used.size else half - 1
    i_hi = int(max(cols_used.max(), half)) if cols_used.size else half
    nx, ny = i_hi - i_lo + 1, g_hi - g_lo + 1
    width, height = _DL + nx * _DC + _DR, _DT + ny * _DC + _DB
    top = math.log1p(int(density.max())) or 1.0
    ranges, labels = _cell_titles(_key(edges)), _edge_labels(_key(edges))
    cells = density.tolist()

    def x(j: int) -> float:  # left edge of in cell j
        return _DL + (j - i_lo) * _DC

    def y(j: int) -> float:  # top edge of gate cell j (positive gate up)
        return _DT + (g_hi - j) * _DC

    out = [f'<svg class="gs-density" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
           'aria-label="joint histogram of gate and in">',
           f"<title>gate × in: {total:,} tokens; each quadrant is a case, darker cells hold more tokens (log scale)</title>"]
    # Quadrant tints and names.
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
            alpha = 0.15 + 0.85 * math.log1p(n) / top
            out.append(f'<rect style="fill:var(--gs-case{c})" fill-opacity="{alpha:.2f}" x="{x(i)}" y="{y(g)}" width="{_DC}" '
                       f'height="{_DC}"><title>gate {ranges[g]}, in {ranges[i]}: {_tokens(n)} '
                       f"({100 * n / total:.3g}%) · {CASES[c]}</title></rect>")
    # Zero lines and edge labels (every other edge, and 0).
    out.append(f'<line class="gs-zero" x1="{x(half)}" y1="{_DT}" x2="{x(half)}" y2="{_DT + ny * _DC}"/>'
               f'<line class="gs-zero" x1="{_DL}" y1="{y(half - 1)}" x2="{_DL + nx * _DC}" y2="{y(half - 1)}"/>')
    for j in range(i_lo, i_hi + 2):
        if (j - half) % 2 or not np.isfinite(edges[j]):
            continue
        out.append(f'<text class="gs-xlab" transform="translate({x(j)},{_DT + ny * _DC + 4}) rotate(-60)" '
                   f'text-anchor="end">{labels[j]}</text>')
    for j in range(g_lo, g_hi + 2):
        if (j - half) % 2 or not np.isfinite(edges[j]):
            continue
        out.append(f'<text x="{_DL - 3}" y="{y(j - 1) + 3:.0f}" text-anchor="end">{labels[j]}</text>')
    out.append(f'<text class="gs-axname" x="{_DL + nx * _DC}" y="{height - 2}" text-anchor="end">in →</text>'
               f'<text class="gs-axname" x="2" y="10">gate ↑</text></svg>')
    return "".join(out)
