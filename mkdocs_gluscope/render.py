"""Neuron pages as Markdown plus HTML, from one neuron's data alone (no MkDocs objects).

:func:`neuron_markdown` gives the page's Markdown: title, provenance, summary table, weight facts
and a plain-text line of top tokens per case (what search indexes). The bulky colored-token
examples come from :func:`examples_html` and replace :data:`EXAMPLES_PLACEHOLDER` after Markdown
has run: Python-Markdown is slow on thousands of spans, and search should not index them.

Every string from the corpus is untrusted. Text placed in Markdown goes through :func:`md_text`
(HTML-escaped, and every character Markdown or a template engine would act on written as a
numeric character reference); text placed in HTML goes through :func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from mkdocs_gluscope.store import CASES, HOOKS, NeuronData

EXAMPLES_PLACEHOLDER = "<!-- gluscope:examples -->"
LEVELS = 10  # color steps on each side of zero
HOOK_LABELS = {
    "hook_post": "hook_post = act(gate)·in",
    "hook_pre_linear": "hook_pre_linear = in",
    "hook_pre": "hook_pre = gate",
    "swish": "swish = act(gate)",
}
_MD_SPECIAL = set("\\`*_{}[]()<>#+-.!|~$&\"'=:^%@")
_WHITESPACE = {"\n": "↵", "\t": "⇥", "\r": "␍"}


def md_text(text: str) -> str:
    """``text`` as literal characters in Markdown: nothing in it becomes markup, a link, an
    element, a table cell or a template expression."""
    out = []
    for ch in text:
        if ch in _MD_SPECIAL or ord(ch) < 32 or ch in "\u2028\u2029":
            out.append(f"&#{ord(ch)};")
        else:
            out.append(ch)
    return "".join(out)


def _html_in_md(fragment: str) -> str:
    """Escaped HTML placed in Markdown: characters Markdown or a template engine would still act
    on (emphasis, code, links, template braces) become numeric character references."""
    return "".join(f"&#{ord(ch)};" if ch in "\\`*_{}[]|~$" else ch for ch in fragment)


def token_label(token: str) -> str:
    """A token's visible form: newlines and tabs as symbols, other control characters escaped,
    and a token of spaces only shown as middle dots."""
    out = []
    for ch in token:
        if ch in _WHITESPACE:
            out.append(_WHITESPACE[ch])
        elif ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    label = "".join(out)
    if label and not label.strip(" "):
        label = "·" * len(label)
    return label


def token_html(token: str) -> str:
    return html.escape(token_label(token), quote=True)


def fmt(x: float) -> str:
    """A statistic for a table: 4 significant digits, an en dash where there is no value."""
    if x is None or (isinstance(x, float) and math.isnan(x)) or (isinstance(x, np.floating) and np.isnan(x)):
        return "–"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    return f"{float(x):.4g}"


def act_values(gate: np.ndarray, act_fn: str) -> np.ndarray:
    """act(gate) for the model's activation: SiLU, or GELU (tanh approximation) for GEGLU models."""
    gate = gate.astype(np.float64)
    if act_fn.startswith("gelu"):
        return 0.5 * gate * (1 + np.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)))
    return gate / (1 + np.exp(-gate))


def hook_windows(data: NeuronData, hook: str) -> np.ndarray:
    """Values of ``hook`` over every example window, ``[C, H, k, W]`` (NaN outside documents)."""
    if hook == "hook_pre":
        return data.top_gate
    if hook == "hook_pre_linear":
        return data.top_in
    act = act_values(data.top_gate, str(data.attrs.get("act_fn", "silu")))
    return act if hook == "swish" else act * data.top_in


def color_levels(values: np.ndarray) -> np.ndarray:
    """Integer color levels in ``-LEVELS..LEVELS``, scaled per list (last two axes) so that the
    list's largest ``|value|`` gets the strongest color; zero and NaN get 0 (white)."""
    scale = np.nan_to_num(np.abs(values), nan=0.0, posinf=0.0).max(axis=(-2, -1), keepdims=True)
    scale = np.where(scale > 0, scale, 1.0)  # an empty list: nothing to color
    levels = np.rint(values / scale * LEVELS)
    return np.nan_to_num(levels, nan=0.0).astype(np.int8)


def _b64_float16(values: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f2").tobytes()).decode("ascii")


@dataclass
class PageContext:
    """What a page needs besides the neuron's own data."""

    vocab_html: Callable[[int], str]  # escaped display string of a token id
    vocab_text: Callable[[int], str]  # display string of a token id
    doc_title: Callable[[int], str | None]
    site_root: str  # relative URL from the page to the site root, e.g. "../../../"
    examples: int | None = None  # examples shown per list (None: all k)
    color_hook: str = "hook_post"
    prev_link: tuple[str, str] | None = None  # (label, relative url)
    next_link: tuple[str, str] | None = None
    index_link: str = "../../"
    layer_link: str = "../"


def provenance_rows(attrs: dict) -> list[tuple[str, str]]:
    rows = [
        ("model", attrs.get("model")), ("dataset", attrs.get("dataset")),
        ("tokens", fmt(int(attrs.get("n_tokens", 0))) + " counted"),
        ("documents", fmt(int(attrs["n_docs"])) if "n_docs" in attrs else None),
        ("dtype", attrs.get("dtype")), ("k", attrs.get("k")),
        ("refactor_glu", attrs.get("refactor_glu")),
        ("BOS", "included" if attrs.get("include_bos") else "excluded" if attrs.get("has_bos", True) else "none"),
        ("activation", attrs.get("act_fn")), ("note", attrs.get("note")),
    ]
    return [(k, str(v)) for k, v in rows if v not in (None, "")]


def top_tokens(data: NeuronData, ctx: PageContext, case: int, hook: int = 0, limit: int = 8) -> list[str]:
    """Distinct display strings of the extreme tokens of one list, best first."""
    centre = data.context_before
    seen: dict[str, None] = {}
    for j in range(data.top_doc.shape[-1]):
        if data.top_doc[case, hook, j] < 0:
            break
        token = int(data.window_tokens[case, hook, j, centre])
        if token >= 0:
            seen.setdefault(ctx.vocab_text(token), None)
        if len(seen) >= limit:
            break
    return list(seen)


def summary_table(data: NeuronData) -> str:
    freq = data.frequency
    mean = data.mean
    head = "".join(f'<th class="gs-case gs-case{c}">{html.escape(name)}</th>' for c, name in enumerate(CASES))
    rows = [
        '<tr><th>frequency</th>' + "".join(
            f'<td><span class="gs-freq"><span class="gs-bar gs-case{c}" style="width:{100 * f:.1f}%"></span></span>'
            f'{100 * f:.3g}%</td>' for c, f in enumerate(freq)) + "</tr>",
        "<tr><th>count</th>" + "".join(f"<td>{fmt(int(n))}</td>" for n in data.count) + "</tr>",
    ]
    for h, hook in enumerate(HOOKS):
        rows.append(f'<tr class="gs-hook-row"><th colspan="5">{html.escape(HOOK_LABELS[hook])}</th></tr>')
        for name, values in (("max", data.max[:, h]), ("min", data.min[:, h]), ("mean", mean[:, h])):
            rows.append(f"<tr><th>{name}</th>" + "".join(f"<td>{fmt(v)}</td>" for v in values) + "</tr>")
    return ('<div class="gs-summary md-typeset__scrollwrap"><table class="gs-table">'
            f"<thead><tr><th></th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


def neuron_markdown(data: NeuronData, ctx: PageContext) -> str:
    """The page's Markdown, with :data:`EXAMPLES_PLACEHOLDER` where the examples go."""
    lines = [f"# Neuron {data.id}", ""]
    nav = [f"[All neurons]({ctx.index_link}) · [Layer {data.layer}]({ctx.layer_link})"]
    if ctx.prev_link:
        nav.append(f"[← {md_text(ctx.prev_link[0])}]({ctx.prev_link[1]})")
    if ctx.next_link:
        nav.append(f"[{md_text(ctx.next_link[0])} →]({ctx.next_link[1]})")
    lines += [" · ".join(nav), ""]
    prov = " · ".join(f"<b>{html.escape(k)}</b> {html.escape(v)}"
                      for k, v in provenance_rows({**data.attrs, "n_tokens": data.n_tokens}))
    lines += [f'<p class="gs-provenance">{_html_in_md(prov)}</p>', "",
              "## Summary", "", summary_table(data), ""]
    lines += [
        "## Weights", "",
        f"- cos(w_gate, w_in) = {data.cos_gate_in:.3f} · cos(w_gate, w_out) = {data.cos_gate_out:.3f} · "
        f"cos(w_in, w_out) = {data.cos_in_out:.3f}",
        "- refactor_glu: " + ("**flipped** (w_gate · w_in was negative, so w_in and w_out were negated; "
                              "in and post carry the opposite sign of the original model's)"
                              if data.flipped else "not flipped"),
        "",
        "## Top tokens", "",
    ]
    for c, case in enumerate(CASES):
        tokens = top_tokens(data, ctx, c)
        shown = ", ".join(md_text(repr(t)[1:-1] if t.strip() == "" else t.strip()) for t in tokens) or "none"
        lines.append(f"- **{md_text(case)}** ({100 * data.frequency[c]:.3g}%): {shown}")
    lines += ["", "## Examples", "", EXAMPLES_PLACEHOLDER, ""]
    return "\n".join(lines)


def examples_html(data: NeuronData, ctx: PageContext) -> str:
    """Collapsible lists (case, then hook) of colored-token examples, with a recolor control."""
    k = data.top_doc.shape[-1] if ctx.examples is None else min(ctx.examples, data.top_doc.shape[-1])
    color_hook = ctx.color_hook if ctx.color_hook in HOOKS else "hook_post"
    levels = color_levels(hook_windows(data, color_hook)).tolist()  # plain ints: no numpy per token
    window_tokens = data.window_tokens.tolist()
    centre = data.context_before
    options = "".join(
        f'<option value="{h}"{" selected" if h == color_hook else ""}>{html.escape(HOOK_LABELS[h])}</option>'
        for h in HOOKS)
    parts = [
        f'<div class="gs-examples" data-act="{html.escape(str(data.attrs.get("act_fn", "silu")))}" '
        f'data-root="{html.escape(ctx.site_root)}" data-centre="{centre}">',
        '<div class="gs-controls"><label>Color tokens by <select class="gs-hook-select">'
        f'{options}</select></label> <span class="gs-legend"><span class="gs-legend-bar"></span>'
        '<span>− most negative</span><span>0</span><span>most positive +</span></span>'
        '<span class="gs-hint">scaled per list · hover a token for its values</span></div>',
    ]
    for c, case in enumerate(CASES):
        n_filled = int((data.top_doc[c, 0] >= 0).sum())
        parts.append(
            f'<details class="gs-case-block"><summary><span class="gs-chip gs-case{c}"></span>'
            f'<b>{html.escape(case)}</b> · {100 * data.frequency[c]:.3g}% of tokens · '
            f'{n_filled} documents</summary>')
        for h, hook in enumerate(HOOKS):
            docs = data.top_doc[c, h]
            best = data.top_value[c, h, 0]
            parts.append(
                f'<details class="gs-list"><summary>{html.escape(HOOK_LABELS[hook])}: most extreme '
                f'{fmt(best)}</summary><div class="gs-rows">')
            shown = 0
            for j in range(k):
                doc = int(docs[j])
                if doc < 0:
                    break
                shown += 1
                parts.append(_example_row(data, ctx, c, h, j, levels[c][h][j], window_tokens[c][h][j], centre))
            if not shown:
                parts.append('<p class="gs-empty">No token of the corpus fell in this case.</p>')
            parts.append("</div></details>")
        parts.append("</details>")
    parts.append("</div>")
    return "".join(parts)


_SPAN_OPEN = {level: f'<span class="c{level}">' for level in range(-LEVELS, LEVELS + 1)}
_PEAK_OPEN = {level: f'<span class="c{level} gs-x">' for level in range(-LEVELS, LEVELS + 1)}


def _example_row(data: NeuronData, ctx: PageContext, c: int, h: int, j: int, levels: list[int],
                 tokens: list[int], centre: int) -> str:
    doc = int(data.top_doc[c, h, j])
    pos = int(data.top_pos[c, h, j])
    vocab_html = ctx.vocab_html
    spans = [(_PEAK_OPEN if w == centre else _SPAN_OPEN)[levels[w]] + vocab_html(t) + "</span>"
             for w, t in enumerate(tokens) if t >= 0]
    first = next((w for w, t in enumerate(tokens) if t >= 0), centre)
    title = ctx.doc_title(doc)
    where = f"doc {doc}" + (f" · {html.escape(title)}" if title else "") + f" · pos {pos}"
    return (
        f'<div class="gs-ex" data-doc="{doc}" data-pos="{pos}" data-first="{first}" '
        f'data-g="{_b64_float16(data.top_gate[c, h, j])}" data-i="{_b64_float16(data.top_in[c, h, j])}">'
        f'<span class="gs-rank">{j + 1}</span><span class="gs-val">{fmt(data.top_value[c, h, j])}</span>'
        f'<span class="gs-toks">{"".join(spans)}</span>'
        f'<button class="gs-doc-btn" type="button" title="show the whole document">{where}</button></div>')


def index_rows(entries: Sequence[tuple[NeuronData, str]], vocab_text: Callable[[int], str]) -> str:
    """A sortable HTML table: one row per (neuron, relative url)."""
    head = ("<th>neuron</th>" + "".join(
        f'<th class="gs-case gs-case{c}">{html.escape(case)}&nbsp;%</th>' for c, case in enumerate(CASES))
        + "<th>top token of each case</th>")
    rows = []
    for data, url in entries:
        freq = "".join(f'<td data-sort="{f:.6f}">{100 * f:.3g}</td>' for f in data.frequency)
        tops = []
        for c in range(len(CASES)):
            doc = data.top_doc[c, 0, 0]
            token = int(data.window_tokens[c, 0, 0, data.context_before]) if doc >= 0 else -1
            label = token_html(vocab_text(token)) if token >= 0 else "–"
            tops.append(f'<code class="gs-top gs-case{c}" title="{html.escape(CASES[c])}">{label}</code>')
        rows.append(
            f'<tr><td data-sort="{data.layer:04d}.{data.neuron:06d}"><a href="{html.escape(url)}">{data.id}</a></td>'
            f"{freq}<td class=\"gs-tops\">{''.join(tops)}</td></tr>")
    return (f'<div class="md-typeset__scrollwrap"><table class="gs-table gs-sortable gs-index"><thead><tr>{head}</tr>'
            f"</thead><tbody>{''.join(rows)}</tbody></table></div>")
