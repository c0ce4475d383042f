"""Your own text, shown: the terminal view and the HTML row of ``gluscope probe`` (no model here).

:class:`Probed` holds what :class:`collect.probe.Prober` computed for a text. Colors follow the pages'
rule exactly (:func:`render.hook_windows`, :func:`render.color_scales`, :func:`render.color_levels`:
post from act(gate) rounded to float16 times in, each neuron's scale the 98th percentile of its |post|
over the text's counted tokens), and :func:`probe_row_html` is the pages' own example row
(:func:`render.example_row`), so the text box of a served site and ``--html`` show what a page shows.
In the terminal each token is colored by post (red positive, blue negative) and followed by its case
as two signs, gate's then in's: ``⁺⁺`` is gate+_in+.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from typing import IO

import numpy as np

from mkdocs_gluscope.render import (COLOR_PERCENTILE, HOOK_LABELS, LEVELS, PageContext, color_levels, color_scales,
                                    example_row, fmt, hook_windows, token_html, token_label)
from mkdocs_gluscope.store import CASES, HOOKS, neuron_id

#: Each case's mark in the terminal: the signs of gate and in.
CASE_MARKS = ("⁺⁺", "⁺⁻", "⁻⁺", "⁻⁻")
#: The pages' colors (gluscope.css): positive post, negative post, and each case's.
POSITIVE, NEGATIVE = (214, 39, 40), (31, 119, 180)
CASE_COLORS = ((0x2E, 0x7D, 0x32), (0xEF, 0x6C, 0x00), (0x6A, 0x1B, 0x9A), (0xC6, 0x28, 0x28))


@dataclass
class Probed:
    """Values of some neurons at every token of one text, ``[neuron, T]`` float32 each."""

    tokens: np.ndarray  # [T] token ids (the BOS first where the model uses one)
    strings: list[str]  # [T] display strings
    neurons: list[tuple[int, int]]
    gate: np.ndarray
    in_: np.ndarray
    post: np.ndarray
    swish: np.ndarray
    first_counted: int  # positions before it (the BOS) are not counted, as in a collection
    act_fn: str

    def cases(self, i: int) -> np.ndarray:
        """Each token's case index for neuron ``i`` (-1 where gate or in is exactly 0)."""
        g, x = self.gate[i], self.in_[i]
        case = np.where(g > 0, np.where(x > 0, 0, 1), np.where(x > 0, 2, 3))
        return np.where((g == 0) | (x == 0), -1, case)

    def levels(self, i: int) -> tuple[np.ndarray, float, np.ndarray]:
        """The pages' color levels of post ``[T]`` (0 for uncounted tokens), the scale, and the counted mask."""
        windows = hook_windows(self.gate[i][None, None], self.in_[i][None, None], self.act_fn)
        counted = (np.arange(len(self.tokens)) >= self.first_counted)[None, None]
        scale = color_scales(windows["hook_post"][None], counted[None], 1)[0, 0]
        return color_levels(windows["hook_post"], np.asarray(scale), counted)[0, 0], float(scale), counted[0, 0]

    def peak(self, i: int) -> int:
        """The counted token of largest |post| (the first on ties); the first token if none is counted."""
        magnitude = np.where(np.arange(len(self.tokens)) >= self.first_counted, np.abs(self.post[i]), -1.0)
        return int(np.argmax(magnitude))


def _blend(rgb: tuple[int, int, int], alpha: float) -> tuple[int, int, int]:
    """``rgba(rgb, alpha)`` over white, as the page's background shows it."""
    return tuple(round(255 + (c - 255) * alpha) for c in rgb)  # type: ignore[return-value]


def _segments(probed: Probed, i: int) -> list[tuple[str, tuple | None, tuple | None, bool]]:
    """(text, background, foreground, bold) pieces of one neuron's colored text: each token on its
    post color, then its case mark in the case's color."""
    levels, _, counted = probed.levels(i)
    cases = probed.cases(i)
    peak = probed.peak(i)
    out = []
    for t, label in enumerate(probed.strings):
        level = int(levels[t])
        background = _blend(POSITIVE if level > 0 else NEGATIVE, abs(level) / LEVELS) if level else None
        foreground = (255, 255, 255) if abs(level) >= 7 else (0, 0, 0) if level else None
        out.append((token_label(label), background, foreground, t == peak))
        if counted[t]:
            c = int(cases[t])
            out.append((CASE_MARKS[c] if c >= 0 else "⁰", None, CASE_COLORS[c] if c >= 0 else None, False))
    return out


def _ansi(segments: list[tuple[str, tuple | None, tuple | None, bool]], color: bool) -> str:
    if not color:
        return "".join(text for text, *_ in segments)
    parts = []
    for text, background, foreground, bold in segments:
        codes = (["1"] if bold else []) + ([f"48;2;{background[0]};{background[1]};{background[2]}"] if background else [])
        codes += [f"38;2;{foreground[0]};{foreground[1]};{foreground[2]}"] if foreground else []
        parts.append(f"\x1b[{';'.join(codes)}m{text}\x1b[0m" if codes else text)
    return "".join(parts)


def _rich(segments: list[tuple[str, tuple | None, tuple | None, bool]]) -> object:
    from rich.text import Text

    text = Text()
    for piece, background, foreground, bold in segments:
        style = " ".join((["bold"] if bold else []) + ([f"on rgb({','.join(map(str, background))})"] if background else [])
                         + ([f"rgb({','.join(map(str, foreground))})"] if foreground else []))
        text.append(piece, style=style or None)
    return text


def header(probed: Probed, i: int) -> str:
    layer, n = probed.neurons[i]
    _, scale, _ = probed.levels(i)
    peak = probed.peak(i)
    case = probed.cases(i)[peak]
    return (f"neuron {neuron_id(layer, n)}: strongest post {fmt(probed.post[i, peak])} at {probed.strings[peak]!r} "
            f"(token {peak}, {CASES[case] if case >= 0 else 'no case'}); colors scaled to {fmt(scale)} "
            f"(the {COLOR_PERCENTILE}th percentile of |post|)")


LEGEND = "marks: " + ", ".join(f"{mark} {case}" for mark, case in zip(CASE_MARKS, CASES))


def print_probed(probed: Probed, out: IO[str], *, color: bool, values: bool = False, use_rich: bool | None = None) -> None:
    """Each neuron's header and colored text (rich where installed and ``use_rich`` allows it, else
    ANSI; no color codes without ``color``), then with ``values`` a tab-separated table per token."""
    if use_rich is None:
        use_rich = color and _has_rich()
    console = None
    if use_rich:
        from rich.console import Console

        console = Console(file=out, force_terminal=True, color_system="truecolor", highlight=False, soft_wrap=True)
    print(LEGEND, file=out)
    for i in range(len(probed.neurons)):
        print("", file=out)
        print(header(probed, i), file=out)
        segments = _segments(probed, i)
        if console is not None:
            console.print(_rich(segments))
        else:
            print(_ansi(segments, color), file=out)
        if values:
            print("position\ttoken\tcase\t" + "\t".join(HOOKS), file=out)
            cases = probed.cases(i)
            for t, label in enumerate(probed.strings):
                c = int(cases[t])
                row = (probed.post[i, t], probed.in_[i, t], probed.gate[i, t], probed.swish[i, t])
                print(f"{t}\t{label!r}\t{CASES[c] if c >= 0 else '-'}\t" + "\t".join(f"{float(v):.6g}" for v in row),
                      file=out)
    out.flush()


def _has_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def wants_color(stream: IO[str], forced: bool | None) -> bool:
    """Color where ``--color``/``--no-color`` says, else where the stream is a terminal (and NO_COLOR unset)."""
    if forced is not None:
        return forced
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")


def probe_block_html(probed: Probed, i: int, *, controls: bool = False) -> str:
    """Neuron ``i``'s row as pages show examples (:func:`render.example_row`), in its own examples
    block: the whole text as the window, colored by post on its own scale (the scales of every hook in
    the list, for the page's recolor control), the strongest token framed; ``controls`` adds the
    hook select (a standalone page has no other)."""
    levels, _, counted = probed.levels(i)
    windows = hook_windows(probed.gate[i][None, None], probed.in_[i][None, None], probed.act_fn)
    counted_b = (np.arange(len(probed.tokens)) >= probed.first_counted)[None, None]
    scales = [float(color_scales(windows[h][None], counted_b[None], 1)[0, 0]) for h in HOOKS]
    peak = probed.peak(i)
    ctx = PageContext(vocab_html=lambda t: token_html(probed.strings[t]), vocab_text=lambda t: probed.strings[t],
                      doc_title=lambda d: None, site_root="")
    row = example_row(ctx, doc=-1, pos=peak, gate=probed.gate[i], in_=probed.in_[i], swish=windows["swish"][0, 0],
                      value=float(probed.post[i, peak]), tokens=list(range(len(probed.tokens))), levels=levels.tolist(),
                      counted=counted.tolist(), centre=peak, early=0, rank=1)
    scale = html.escape(json.dumps(scales, separators=(",", ":")))
    select = ""
    if controls:
        options = "".join(f'<option value="{h}"{" selected" if h == "hook_post" else ""}>'
                          f"{html.escape(HOOK_LABELS[h])}</option>" for h in HOOKS)
        select = f'<div class="gs-controls"><label>Color tokens by <select class="gs-hook-select">{options}</select></label></div>'
    return (f'<div class="gs-examples gs-probe-out" data-root="" data-centre="{peak}" data-levels="{LEVELS}" '
            f'data-counted-from="{probed.first_counted}">{select}<p class="gs-probe-head">{html.escape(header(probed, i))}'
            f'</p><div class="gs-list" data-scale="{scale}"><div class="gs-rows">{row}</div></div></div>')


def probe_page_html(probed: Probed, css: str, js: str) -> str:
    """A standalone HTML page of every neuron's block, with the pages' stylesheet and script inlined
    (hover a token for its values; the select recolors by another hook)."""
    blocks = "".join(f"<h2>Neuron {neuron_id(*probed.neurons[i])}</h2>" + probe_block_html(probed, i, controls=i == 0)
                     for i in range(len(probed.neurons)))
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>gluscope probe</title>"
            f"<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}{css}</style></head><body>"
            f"{blocks}<script>{js}</script></body></html>")
