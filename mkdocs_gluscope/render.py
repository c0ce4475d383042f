"""Neuron pages as Markdown plus HTML, from one neuron's data alone (no MkDocs objects).

:func:`neuron_markdown` gives the page's Markdown: title, provenance, summary table, weight facts
and a line of top words per case (whole words around each peak token: what search indexes). The bulky colored-token
examples come from :func:`examples_html` and replace :data:`EXAMPLES_PLACEHOLDER` after Markdown
has run: Python-Markdown is slow on thousands of spans, and search should not index them.

Every string from the corpus, the vocabulary or the file's provenance is untrusted, and all of it
goes through one function, :func:`md_text`, whether it lands in Markdown or in HTML: it writes every
character that HTML, Markdown or a template engine (Jinja in mkdocs-macros, Liquid in Jekyll) would
act on as a numeric character reference. The examples HTML ends up in Markdown too (``gluscope
pages`` inlines it), so it gets the same treatment.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from mkdocs_gluscope.activations import act_values
from mkdocs_gluscope.context import effects_context, related_context
from mkdocs_gluscope.effects import raised_and_lowered
from mkdocs_gluscope.figures import bin_range, density_html, histograms_html
from mkdocs_gluscope.words import word_around, word_key
from mkdocs_gluscope.store import (
    CASES,
    VOCAB_WEIGHTS,
    Examples,
    EARLY_POSITIONS,
    HOOKS,
    NONFINITE_COLUMNS,
    NeuronData,
    early_end,
    first_counted_position,
)

EXAMPLES_PLACEHOLDER = "<!-- gluscope:examples -->"
DISTRIBUTIONS_PLACEHOLDER = "<!-- gluscope:distributions -->"
SAMPLES_PLACEHOLDER = "<!-- gluscope:samples -->"
BANDS_PLACEHOLDER = "<!-- gluscope:bands -->"
#: A case counts as rare (and so as the most telling when its output is the largest) below this share
#: of tokens: ``gluscope pick``'s default.
RARE_SHARE = 0.10
LEVELS = 10  # color steps on each side of zero
#: Each list's color scale is this percentile of |value| over its counted window values; stronger
#: values get the strongest color. A maximum would let one attention-sink token wash out a list.
COLOR_PERCENTILE = 98
HOOK_LABELS = {
    "hook_post": "hook_post = act(gate)·in",
    "hook_pre_linear": "hook_pre_linear = in",
    "hook_pre": "hook_pre = gate",
    "swish": "swish = act(gate)",
}
_MD_SPECIAL = set("\\`*_{}[]()<>#+-.!|~$&\"'=:^%@")
#: Bidirectional controls (embeddings, overrides, isolates, marks): inside a token they would reorder
#: the tokens around it, so a token shows them by name instead.
BIDI_CONTROLS = (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
#: How a token shows the characters a reader could not see or that would act on the page: whitespace
#: as symbols, other control characters as ``\xNN``, bidirectional controls as ``⟨U+202E⟩``. The one
#: table of this rule: ``gluscope.js`` receives it from here (:func:`mkdocs_gluscope.pages.asset_text`).
VISIBLE: dict[str, str] = {
    **{chr(c): f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))},
    "\n": "↵", "\t": "⇥", "\r": "␍",
    **{chr(c): f"⟨U+{c:04X}⟩" for c in BIDI_CONTROLS},
}


def md_text(text: str) -> str:
    """``text`` as literal characters in Markdown or HTML (text or a quoted attribute): nothing in
    it becomes markup, a link, an element, a table cell or a template expression."""
    out = []
    for ch in text:
        if ch in _MD_SPECIAL or ord(ch) < 32 or ch in "\u2028\u2029":
            out.append(f"&#{ord(ch)};")
        else:
            out.append(ch)
    return "".join(out)


def json_text(value: Any, *, ascii: bool = False) -> str:
    """``value`` as compact JSON, the one way the site writes JSON: never NaN or infinity (JSON has
    neither, and a browser's ``JSON.parse`` refuses the whole file over one), so a value that cannot be
    written is a ValueError saying so; ``ascii`` escapes every non-ASCII character too."""
    try:
        return json.dumps(value, ensure_ascii=ascii, separators=(",", ":"), allow_nan=False)
    except ValueError as e:
        raise ValueError(f"a value JSON cannot hold ({e}); NaN and infinity have no JSON form") from None


# A path on the collector's machine: absolute, in a home folder, explicitly relative, or Windows.
_LOCAL_PATH = re.compile(r"^(/|~|\.{1,2}[/\\]|[A-Za-z]:[/\\]|\\\\|file:)")


def display_name(value: str) -> str:
    """How a page names a model or dataset: hub ids and descriptions as recorded, a local path by
    its last component only (the file keeps the full path; pages are published). A dataset
    recorded as several sources joined by ", " is named source by source."""
    def one(source: str) -> str:
        if not _LOCAL_PATH.match(source.strip()):
            return source
        return re.split(r"[/\\]", source.strip().rstrip("/\\"))[-1] or source
    return ", ".join(one(part) for part in str(value).split(", "))


def token_label(token: str) -> str:
    """A token's visible form: every character of :data:`VISIBLE` by its visible form, and a token
    of spaces only shown as middle dots."""
    label = "".join(VISIBLE.get(ch, ch) for ch in token)
    if label and not label.strip(" "):
        label = "·" * len(label)
    return label


def token_html(token: str) -> str:
    return md_text(token_label(token))


def fmt(x: float) -> str:
    """A statistic for a table: 4 significant digits, an en dash where there is no value."""
    if x is None or (isinstance(x, float) and math.isnan(x)) or (isinstance(x, np.floating) and np.isnan(x)):
        return "–"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    return f"{float(x):.4g}"


def act_fn(data: NeuronData) -> str:
    """The model's activation as recorded (files from before ``act_fn`` was recorded: SiLU)."""
    return str(data.attrs.get("act_fn", "silu"))


def page_windows(data: NeuronData) -> dict[str, np.ndarray]:
    """Each hook's values over every example window, ``[C, H, k, W]`` float64 (NaN outside documents),
    exactly as the page carries them to ``gluscope.js``: gate and in as stored, act(gate) from the one
    activation table rounded to float16 (``data-s``), and post = act(gate) * in from those. Colors
    computed here and recolors in the browser then start from the same numbers."""
    return hook_windows(data.top_gate, data.top_in, act_fn(data))


def hook_windows(gate: np.ndarray, in_: np.ndarray, act: str) -> dict[str, np.ndarray]:
    """:func:`page_windows`' rule for any windows of gate and in (top-k lists, samples, bands)."""
    gate = gate.astype(np.float64)
    in_ = in_.astype(np.float64)
    swish = act_values(gate, act).astype(np.float16).astype(np.float64)
    return {"hook_post": swish * in_, "hook_pre_linear": in_, "hook_pre": gate, "swish": swish}


def counted_windows(data: NeuronData, pos: np.ndarray | None = None) -> np.ndarray:
    """``[C, H, k, W]``: whether each window token is a position the statistics count (not the BOS,
    not a skipped position), relative to each example's own position (``pos``: other examples')."""
    offsets = np.arange(-data.context_before, data.context_after + 1)
    return (data.top_pos if pos is None else pos)[..., None] + offsets >= first_counted_position(data.attrs)


def color_scales(values: np.ndarray, counted: np.ndarray, shown: int) -> np.ndarray:
    """Per list (``[C, H]``): :data:`COLOR_PERCENTILE` of ``|value|`` over the counted, finite window
    values of the first ``shown`` examples (numpy's "lower" percentile: a real value of the list, never
    one interpolated towards a sink); 1 where a list has none."""
    magnitude = np.where(counted & np.isfinite(values), np.abs(values), np.nan)[..., :shown, :]
    flat = np.sort(magnitude.reshape(magnitude.shape[:-2] + (-1,)), axis=-1)  # NaN last
    n = np.isfinite(flat).sum(axis=-1)
    # np.percentile(finite, q, method="lower") of each list at once: index floor((n - 1) * q / 100).
    index = np.floor((np.maximum(n, 1) - 1) * (COLOR_PERCENTILE / 100)).astype(np.intp)
    scales = np.take_along_axis(flat, index[..., None], axis=-1)[..., 0] if flat.shape[-1] else np.zeros(n.shape)
    return np.where((n > 0) & (scales > 0), scales, 1.0)


def color_levels(values: np.ndarray, scales: np.ndarray, counted: np.ndarray) -> np.ndarray:
    """Integer color levels in ``-LEVELS..LEVELS``: ``value / scale`` of its list, clipped, so values
    beyond the scale get the strongest color; NaN and positions not counted get 0 (white).
    ``gluscope.js`` applies the same rule to the scales written in the page."""
    # floor(x + 0.5) is JavaScript's Math.round, so the browser's recolor gives the same levels.
    with np.errstate(invalid="ignore"):
        levels = np.clip(np.floor(values / scales[..., None, None] * LEVELS + 0.5), -LEVELS, LEVELS)
    return np.where(counted & np.isfinite(levels), levels, 0).astype(np.int8)


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
    #: Light pages: the strongest color-hook example of this many of the neuron's rarest cases (with
    #: examples) is written into the page; every other example comes from ``data_url`` when a reader
    #: opens its list (``gluscope.js``). None: every example inline.
    inline_cases: int | None = None
    data_url: str = ""  # the neuron's example data file, relative to the page (with ``inline_cases``)
    top_words: int = 8  # whole words listed per case under "Top words"
    expert_link: str | None = None  # an expert neuron's page links its expert's index
    #: The layer's scale of each case (``pick.layer_case_scales``): the page opens the case pick
    #: would flag, each case against its own scale. None: cases compared as they are.
    case_scales: tuple[float, ...] | None = None
    #: The Markdown link target of another neuron's page (``LAYER.NEURON``), None where the site has none:
    #: related neurons link to their pages.
    neuron_link: Callable[[str], str | None] | None = None
    #: A probe server's URL (``mkdocs serve`` with ``probe_model``): the page offers a text box. None: no box.
    probe_url: str | None = None


def provenance_rows(attrs: dict) -> list[tuple[str, str]]:
    rows = [
        ("model", display_name(attrs["model"]) if attrs.get("model") else None),
        ("dataset", display_name(attrs["dataset"]) if attrs.get("dataset") else None),
        ("tokens", fmt(int(attrs.get("n_tokens", 0))) + " counted"),
        ("documents", fmt(int(attrs["n_docs"])) if "n_docs" in attrs else None),
        ("dtype", attrs.get("dtype")), ("k", attrs.get("k")),
        ("refactor_glu", attrs.get("refactor_glu")),
        ("BOS", "included" if attrs.get("include_bos") else "excluded" if attrs.get("has_bos", True) else "none"),
        ("activation", attrs.get("act_fn")), ("note", attrs.get("note")),
    ]
    return [(k, str(v)) for k, v in rows if v not in (None, "")]


def example_word(data: NeuronData, vocab_text: Callable[[int], str], case: int, hook: int, j: int) -> tuple[str, str, str]:
    """:func:`word_around` the extreme token of example ``j`` of one list."""
    ids = data.window_tokens[case, hook, j]
    return word_around([vocab_text(int(t)) if t >= 0 else None for t in ids], data.context_before)


def word_labels(word: tuple[str, str, str]) -> tuple[str, str, str]:
    """A whole word's pieces as shown: the word's outer whitespace trimmed, then :func:`token_label`
    (a word of whitespace only keeps it, shown as its visible symbols)."""
    before, peak, after = word
    if "".join(word).strip():
        if not before:
            peak = peak.lstrip()
        if not after:
            peak = peak.rstrip()
        before, after = before.lstrip(), after.rstrip()
    return token_label(before), token_label(peak), token_label(after)


def word_html(word: tuple[str, str, str]) -> str:
    """A whole word with its peak piece marked (``gs-peak``); where it stands alone (a list of top
    words) wrap it in ``<bdi>``, which isolates its bidirectional text from its neighbours'."""
    before, peak, after = word_labels(word)
    return f'{md_text(before)}<span class="gs-peak">{md_text(peak)}</span>{md_text(after)}'


_QUOTED = re.compile(r"`([^`]*)`")


def label_parts(label: str) -> list[str]:
    """An explanation's label cut at its backtick quotes: plain text at even indices, the quoted
    tokens at odd ones (what ``gluscope.js`` shows in a light site's tables, as text)."""
    return _QUOTED.split(label)


def label_html(label: str) -> str:
    """An explanation's label as HTML: the tokens it quotes in backticks as ``<code>``, everything
    through :func:`md_text` (labels hold corpus strings)."""
    return parts_html(label_parts(label))


def parts_html(parts: Sequence[str]) -> str:
    """:func:`label_parts` as HTML (see :func:`label_html`)."""
    return "".join(f"<code>{md_text(part)}</code>" if i % 2 else md_text(part) for i, part in enumerate(parts))


def score_text(score: float | None) -> str:
    """``score 0.62``, or ``not scored`` (NaN or None)."""
    return "not scored" if score is None or not math.isfinite(score) else f"score {score:.2f}"


def explanation_html(expl) -> str:
    """One case's label and score, as the case's summary line and the layer tables show them."""
    if not expl.label:
        return ""
    return (f'<span class="gs-label" title="{md_text(expl.method)}">{label_html(expl.label)}</span>'
            f' <span class="gs-score">{score_text(expl.score)}</span>')


def explanations_section(data: NeuronData) -> list[str]:
    """``## Explanations``: each case's label (page text, so search finds the neuron by its words),
    method and scores; nothing for files without explanations."""
    if not data.explanations or not any(e.label for e in data.explanations):
        return []
    lines = ["## Explanations", ""]
    for c, expl in enumerate(data.explanations):
        chip = f'<span class="gs-chip gs-case{c}"></span>'
        if not expl.label:
            what = "no token of the corpus fell in this case" if data.count[c] == 0 else "no explanation"
            lines.append(f"- {chip}**{md_text(expl.case)}**: {what}")
            continue
        detail = []
        if expl.scored:
            if np.isfinite(expl.precision) or np.isfinite(expl.recall):
                detail.append(f"strong positions: precision {fmt(expl.precision)}, recall {fmt(expl.recall)}")
            if expl.scored_positions >= 0:
                detail.append(f"{expl.scored_positions:,} positions of the case scored")
        detail.append(f"method {md_text(expl.method)}")
        score = f"<b>score {expl.score:.2f}</b>" if expl.scored else "not scored"
        lines.append(f'- {chip}**{md_text(expl.case)}**: <span class="gs-label">{label_html(expl.label)}</span> '
                     f'<span class="gs-score">{score} ({"; ".join(detail)})</span>')
    lines += ["", '<p class="gs-note">Each label was written from the file\'s examples alone. Its score is the '
              "correlation between the activation a simulator predicts from the label's content and the model's true "
              "activation (post where the token is in the case, else 0) on held-out text: 1 is perfect, 0 no better "
              "than chance. Precision and recall: of the positions where the case is strong.</p>", ""]
    return lines


def top_words(data: NeuronData, ctx: PageContext, case: int, hook: int = 0, limit: int = 8) -> list[tuple[str, str, str]]:
    """Distinct whole words (by :func:`word_key`) around the extreme tokens of one list, best first."""
    seen: dict[str, tuple[str, str, str]] = {}
    for j in range(data.top_doc.shape[-1]):
        if data.top_doc[case, hook, j] < 0:
            break
        if data.window_tokens[case, hook, j, data.context_before] >= 0:
            word = example_word(data, ctx.vocab_text, case, hook, j)
            seen.setdefault(word_key("".join(word)), word)
        if len(seen) >= limit:
            break
    return list(seen.values())


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
    # data-search-exclude: search would index the numbers as one run of digits ("5.14807.6513.5").
    return ('<div class="gs-summary md-typeset__scrollwrap" data-search-exclude><table class="gs-table">'
            f"<thead><tr><th></th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


def routing_note(data: NeuronData) -> list[str]:
    """For an expert's neuron: how many tokens its expert saw, which every frequency on the page is a
    share of."""
    if data.routed is None:
        return []
    share = data.routing_frequency or 0.0
    if data.expert == "s":
        what = f"a shared expert: it sees every token ({data.routed:,})"
    else:
        what = (f"routed expert {int(data.expert)}: {data.routed:,} of {data.n_tokens:,} counted tokens were routed "
                f"to it (routing frequency {100 * share:.3g}%)")
    return [f'<p class="gs-routing">This neuron belongs to layer {data.layer}\'s {md_text(what)}. Its statistics '
            "are over those tokens, and each case's frequency is a share of them; in the examples, tokens "
            "not routed to the expert have no value.</p>", ""]


def definition_note(data: NeuronData) -> list[str]:
    """How this neuron's gate, in and post are defined where its family's MLP is not the plain
    ``act(x·w_gate) * (x·w_in)``: the file says it (``hook_definition`` for a dense layer's neurons,
    ``expert_hook_definition`` for a routed expert's; a shared expert is a plain gated MLP), and every
    page of such a neuron repeats it."""
    if data.expert == "s":
        return []
    text = data.attrs.get("hook_definition" if data.expert is None else "expert_hook_definition")
    if not text:
        return []
    return [f'<p class="gs-definition"><b>Hooks of this family.</b> {md_text(str(text))}.</p>', ""]


def nonfinite_note(data: NeuronData) -> list[str]:
    """A warning under the summary when some of the neuron's positions had NaN or infinite values."""
    if data.nonfinite is None or not int(np.sum(data.nonfinite)):
        return []
    counts = [int(n) for n in data.nonfinite]
    parts = [f"{n:,} in {md_text(name)}" for n, name in zip(counts, NONFINITE_COLUMNS[:-1]) if n]
    if counts[-1]:
        parts.append(f"{counts[-1]:,} with no case (gate or in was NaN, so it has no sign)")
    return [
        '<div class="admonition warning gs-nonfinite"><p class="admonition-title">Non-finite values</p>'
        f"<p>{sum(counts):,} positions of this neuron had a NaN or infinite value: {', '.join(parts)}. "
        "They are excluded from every statistic on this page (counts, frequencies, min, max, mean and "
        "examples).</p></div>", ""]


def neuron_markdown(data: NeuronData, ctx: PageContext) -> str:
    """The page's Markdown, with :data:`EXAMPLES_PLACEHOLDER` where the examples go."""
    lines = [f"# Neuron {data.id}", ""]
    nav = [f"[All neurons]({ctx.index_link}) · [Layer {data.layer}]({ctx.layer_link})"]
    if data.expert is not None and ctx.expert_link:
        nav.append(f"[Expert {md_text(data.id.rsplit('.', 1)[0])}]({ctx.expert_link})")
    if ctx.prev_link:
        nav.append(f"[← {md_text(ctx.prev_link[0])}]({ctx.prev_link[1]})")
    if ctx.next_link:
        nav.append(f"[{md_text(ctx.next_link[0])} →]({ctx.next_link[1]})")
    lines += [" · ".join(nav), ""]
    prov = " · ".join(f"<b>{md_text(k)}</b> {md_text(v)}"
                      for k, v in provenance_rows({**data.attrs, "n_tokens": data.n_tokens}))
    lines += [f'<p class="gs-provenance">{prov}</p>', "", *routing_note(data), *definition_note(data)]
    # First, where the file has them: what each case is about. Full pages only: the light layout
    # (mkdocs_gluscope.light) shows explanations its own way.
    if ctx.inline_cases is None:
        lines += explanations_section(data)
    lines += ["## Summary", "", summary_table(data), "", *nonfinite_note(data)]
    # Light pages (a whole model) leave the figures and projections out: their SVG is about 60 KB a
    # page, 2.8 GB for SmolLM2's 46,080 neurons, which would not fit a GitHub Pages site.
    if data.hist is not None and ctx.inline_cases is None:
        lines += ["## Distributions", "",
                  "How each case's tokens spread over |value| (octave bins; hover a bar for its range and count) "
                  "and over the (gate, in) plane:", "", DISTRIBUTIONS_PLACEHOLDER, ""]
    if ctx.inline_cases is None:
        lines += vocab_section(data, ctx)
    lines += [
        "## Weights", "",
        f"- cos(w_gate, w_in) = {data.cos_gate_in:.3f} · cos(w_gate, w_out) = {data.cos_gate_out:.3f} · "
        f"cos(w_in, w_out) = {data.cos_in_out:.3f}",
        "- refactor_glu: " + ("**flipped** (w_gate · w_in was negative, so w_in and w_out were negated; "
                              "in and post carry the opposite sign of the original model's)"
                              if data.flipped else "not flipped"),
        "",
    ]
    if ctx.inline_cases is None:  # light pages: the related lists are the layout's to show (context.py)
        lines += related_section(data, ctx)
    # One line of HTML (each word a <bdi>: isolated from its neighbours' bidirectional text), which
    # Markdown passes through: inline HTML in a Markdown list cost a third of a light page's conversion.
    items = []
    for c, case in enumerate(CASES):
        shown = ", ".join(f"<bdi>{word_html(w)}</bdi>" for w in top_words(data, ctx, c, limit=ctx.top_words)) or "none"
        items.append(f"<li><strong>{md_text(case)}</strong> ({100 * data.frequency[c]:.3g}%): {shown}</li>")
    lines += ["## Top words", "", f'<ul class="gs-top-words">{"".join(items)}</ul>']
    if ctx.probe_url and ctx.inline_cases is None:
        lines += ["", "## Your own text", "", probe_box(data, ctx.probe_url)]
    lines += ["", "## Examples", "", EXAMPLES_PLACEHOLDER, ""]
    if data.samples is not None and ctx.inline_cases is None:
        lines += ["## Random samples", "",
                  "Tokens drawn uniformly at random from each case: what the case looks like on an ordinary "
                  "token, not at its extremes (value: post).", "", SAMPLES_PLACEHOLDER, "",
                  "## Samples by strength", "",
                  "Random tokens of each case from each band of |post|, weak to strong: where along that range "
                  "the neuron starts to mean something.", "", BANDS_PLACEHOLDER, ""]
    return "\n".join(lines)


EARLY_TITLE = (
    "Position {pos} is among the first {n} counted positions of its document. Many models put very large "
    "activations there whatever the text says (attention sinks: the first tokens absorb attention that has "
    "nowhere else to go), so such an example may say little about what the neuron responds to. "
    "gluscope pick leaves these examples out of its scores.")


def shown_examples(data: NeuronData, examples: int | None) -> int:
    """Examples shown per list: the ``examples`` option, at most the file's k."""
    return data.top_doc.shape[-1] if examples is None else min(examples, data.top_doc.shape[-1])


def list_scales(data: NeuronData, k: int) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``counted_windows``, ``page_windows`` and each hook's :func:`color_scales` ([C, H] per hook):
    what the page and its example data file both carry, computed once."""
    counted = counted_windows(data)
    windows = page_windows(data)
    return counted, windows, {hook: color_scales(values, counted, k) for hook, values in windows.items()}


def examples_html(data: NeuronData, ctx: PageContext,
                  computed: tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]] | None = None) -> str:
    """Collapsible lists (case, then hook) of colored-token examples, with a recolor control.

    The page carries what ``gluscope.js`` needs to recolor and explain tokens without a rule of its
    own: each example's gate, in and act(gate) windows, each list's color scale per hook, the
    number of color levels and the first counted position. With ``ctx.inline_cases`` the page holds
    the strongest color-hook example of its rarest cases only (the paper's point: a neuron's rare cases
    are often the telling ones), and names the data file of the rest."""
    k = shown_examples(data, ctx.examples)
    color_hook = ctx.color_hook if ctx.color_hook in HOOKS else "hook_post"
    counted, windows, scales = computed or list_scales(data, k)
    # Light pages build most rows in the browser: their effects are the layout's to show (context.py).
    effects = effects_context(data, windows["hook_post"]) if ctx.inline_cases is None else None
    levels = color_levels(windows[color_hook], scales[color_hook], counted).tolist()  # plain ints per token
    counted_list = counted.tolist()
    window_tokens = data.window_tokens.tolist()
    centre = data.context_before
    early = early_end(data.attrs)
    options = "".join(
        f'<option value="{h}"{" selected" if h == color_hook else ""}>{html.escape(HOOK_LABELS[h])}</option>'
        for h in HOOKS)
    light = ""
    h_color = HOOKS.index(color_hook)
    if ctx.inline_cases is not None:
        light = f' data-src="{md_text(ctx.data_url)}" data-shown="{k}" data-early="{early}"'
        with_examples = [c for c in range(len(CASES)) if data.top_doc[c, h_color, 0] >= 0]
        rare = set(sorted(with_examples, key=lambda c: (data.count[c], c))[:ctx.inline_cases])
    parts = [
        f'<div class="gs-examples" data-root="{md_text(ctx.site_root)}" data-centre="{centre}" '
        f'data-levels="{LEVELS}" data-counted-from="{first_counted_position(data.attrs)}"{light}>',
        '<div class="gs-controls"><label>Color tokens by <select class="gs-hook-select">'
        f'{options}</select></label> <span class="gs-legend"><span class="gs-legend-bar"></span>'
        '<span>− most negative</span><span>0</span><span>most positive +</span></span>'
        f'<span class="gs-hint">scaled per list (its {COLOR_PERCENTILE}th percentile of |value|; stronger values '
        'get the strongest color) · hover a token for its values'
        + (" · effect: the neuron's direct effect on the next token's logit (hover it for the tokens the example "
           "raises and lowers most)" if effects else "") + '</span></div>',
    ]
    opened = ""
    telling = telling_case(data, ctx.case_scales)
    for c, case in enumerate(CASES):
        n_filled = int((data.top_doc[c, 0] >= 0).sum())
        # A light page opens the cases whose example it holds: seen at once, with or without JavaScript;
        # a full page opens its most telling case (telling_case) and, in it, the color hook's list.
        if ctx.inline_cases is not None:
            opened = " open" if c in rare else ""
        else:
            opened = " open" if c == telling else ""
        label = ""
        if ctx.inline_cases is None and data.explanations and data.explanations[c].label:
            label = " · " + explanation_html(data.explanations[c])
        parts.append(
            f'<details class="gs-case-block"{opened}><summary><span class="gs-chip gs-case{c}"></span>'
            f'<b>{html.escape(case)}</b> · {100 * data.frequency[c]:.3g}% of tokens · '
            f'{n_filled} documents{label}</summary>')
        for h, hook in enumerate(HOOKS):
            docs = data.top_doc[c, h]
            inline = k if ctx.inline_cases is None else 1 if h == h_color and c in rare else 0
            if ctx.inline_cases is not None and not inline:
                continue  # a light page: gluscope.js builds this list from the data file
            # Exact (JS reads these), one per hook in HOOKS order, compact: md_text writes each [ , . as 5 characters.
            scale = json_text([float(scales[name][c, h]) for name in HOOKS])
            attrs = f' data-scale="{md_text(scale)}"' if inline else ""
            if ctx.inline_cases is not None:
                attrs += f' data-hook="{h}"'
            filled = int((docs[:k] >= 0).sum())
            shown = min(inline, filled)
            list_open = opened if ctx.inline_cases is not None or h == h_color else ""
            parts.append(
                f'<details class="gs-list"{attrs}{list_open}><summary>{html.escape(HOOK_LABELS[hook])}: '
                f'most extreme {_extreme(data, c, h, early)}</summary><div class="gs-rows">')
            for j in range(shown):
                parts.append(example_row(
                    ctx, doc=int(data.top_doc[c, h, j]), pos=int(data.top_pos[c, h, j]), gate=data.top_gate[c, h, j],
                    in_=data.top_in[c, h, j], swish=windows["swish"][c, h, j], value=data.top_value[c, h, j],
                    tokens=window_tokens[c][h][j], levels=levels[c][h][j], counted=counted_list[c][h][j],
                    centre=centre, early=early, rank=j + 1, effect=effect_cell(data, ctx, effects, c, h, j)))
            if not filled:
                parts.append('<p class="gs-empty">No token of the corpus fell in this case.</p>')
            parts.append("</div></details>")
        if ctx.inline_cases is not None:
            # The case's other lists (and the rest of this one) come from the data file when the case opens;
            # the stylesheet tells a reader without JavaScript how many examples that is.
            rest = int((data.top_doc[c, :, :k] >= 0).sum()) - (1 if c in rare else 0)
            parts.append(f'<div class="gs-lazy" data-more="{rest}"></div>' if rest else "")
        parts.append("</details>")
    parts.append("</div>")
    return "".join(parts)


def _extreme(data: NeuronData, c: int, h: int, early: int) -> str:
    """A list's most extreme value; when that example is at the start of its document, also the most
    extreme one after it (the value ``gluscope pick`` scores)."""
    text = fmt(data.top_value[c, h, 0])
    if data.top_doc[c, h, 0] >= 0 and data.top_pos[c, h, 0] < early:
        later = np.flatnonzero((data.top_doc[c, h] >= 0) & (data.top_pos[c, h] >= early))
        text += (" (start of document; " + (f"first later example {fmt(data.top_value[c, h, later[0]])})"
                                            if later.size else "no later example in the list)"))
    return text


_SPAN_OPEN = {level: f'<span class="c{level}">' for level in range(-LEVELS, LEVELS + 1)}
_PEAK_OPEN = {level: f'<span class="c{level} gs-x">' for level in range(-LEVELS, LEVELS + 1)}
_NOT_COUNTED_OPEN = '<span class="c0 gs-nc">'


def example_row(ctx: PageContext, *, doc: int, pos: int, gate: np.ndarray, in_: np.ndarray, swish: np.ndarray,
                value: float, tokens: list[int], levels: list[int], counted: list[bool], centre: int, early: int,
                rank: int, effect: str | None = None) -> str:
    """One colored-token example (a top-k list's, a random sample's or a band's): rank, value, the
    tokens of its window colored by ``levels`` with the peak framed, and its document button (none for
    ``doc`` -1: a text of the reader's own); with ``effect`` (:func:`effect_cell`'s HTML), a column of
    its effect on the output after the value."""
    vocab_html = ctx.vocab_html
    spans = [(_PEAK_OPEN[levels[w]] if w == centre else _SPAN_OPEN[levels[w]] if counted[w] else _NOT_COUNTED_OPEN)
             + vocab_html(t) + "</span>" for w, t in enumerate(tokens) if t >= 0]
    first = next((w for w, t in enumerate(tokens) if t >= 0), centre)
    title = ctx.doc_title(doc)
    where = f"doc {doc}" + (f" · {md_text(title)}" if title else "") + f" · pos {pos}"
    badge = (f'<span class="gs-early" title="{md_text(EARLY_TITLE.format(pos=pos, n=EARLY_POSITIONS))}">'
             "start of document</span>" if pos < early else "")
    return (
        f'<div class="gs-ex{"" if effect is None else " gs-ex-eff"}" data-doc="{doc}" data-pos="{pos}" '
        f'data-first="{first}" data-g="{_b64_float16(gate)}" data-i="{_b64_float16(in_)}" '
        f'data-s="{_b64_float16(swish)}">'
        f'<span class="gs-rank">{rank}</span><span class="gs-val">{fmt(value)}{badge}</span>{effect or ""}'
        f'<span class="gs-toks">{"".join(spans)}</span>'
        + (f'<button class="gs-doc-btn" type="button" title="show the whole document">{where}</button>' if doc >= 0
           else "") + "</div>")


def probe_box(data: NeuronData, url: str) -> str:
    """A text box whose text ``gluscope.js`` posts to the probe server at ``url`` (the model, on this
    machine); the answer is an example row of the text, as :mod:`mkdocs_gluscope.probe` renders it."""
    return (f'<div class="gs-probe" data-url="{md_text(url)}" data-neuron="{md_text(data.id)}" data-search-exclude>'
            '<textarea class="gs-probe-text" rows="3" placeholder="Type a text; Run (or Ctrl+Enter) colors each '
            f'token by this neuron\'s post."></textarea><button class="gs-probe-run md-button" type="button">Run</button>'
            '<span class="gs-probe-status"></span><div class="gs-probe-result"></div></div>')


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def signed(x: float | None) -> str:
    """A change with its sign (``+0.42``, ``−1.3``), 3 significant digits; an en dash for none."""
    if x is None or not math.isfinite(x):
        return "–"
    text = f"{x:+.3g}"
    return text.replace("-", "−")


def effect_cell(data: NeuronData, ctx: PageContext, effects: dict | None, c: int, h: int, j: int) -> str | None:
    """The effect column of one top-k example: the change of the next token's logit, its tooltip naming
    that token and the tokens the example raises and lowers most (:func:`effects.raised_and_lowered`).
    None where the file has no effects."""
    if effects is None:
        return None
    effect, factor, nxt = effects["effect"][c][h][j], effects["factor"][c][h][j], effects["next"][c][h][j]
    if effect is None:
        reason = "no next token in the document" if data.top_doc[c, h, j] >= 0 else ""
        return f'<span class="gs-eff" title="{md_text(reason)}">–</span>'
    raised, lowered = raised_and_lowered(data, factor if factor is not None else float("nan"))
    tip = (f"direct effect on the logit of the next token {ctx.vocab_text(nxt)!r}: {signed(effect)}"
           if nxt >= 0 else f"direct effect on the logit of the next token: {signed(effect)}")
    for label, tokens in (("raises most", raised), ("lowers most", lowered)):
        if tokens:
            tip += f"\n{label}: " + ", ".join(f"{ctx.vocab_text(t)!r} {signed(v)}" for t, v in tokens)
    return f'<span class="gs-eff" title="{md_text(tip)}">{signed(effect)}</span>'


def related_section(data: NeuronData, ctx: PageContext) -> list[str]:
    """``## Related neurons``: what this neuron feeds in later layers (per sign of post, so per case),
    the same layer's neurons that write alike and opposite, and the cases whose strongest examples are
    the same tokens; each neuron a link where the site has its page. Nothing without ``related/``."""
    related = related_context(data)
    if not related:
        return []
    k = data.top_doc.shape[-1]

    def link(neuron: str) -> str:
        target = ctx.neuron_link(neuron) if ctx.neuron_link else None
        return f"[{md_text(neuron)}]({target})" if target else md_text(neuron)

    lines = ["## Related neurons", ""]
    if "feeds" in related and not any(row["sides"][side] for row in related["feeds"] for side in row["sides"]):
        lines += ["**Feeds** (by weights): no later layer in this file reads what this neuron writes.", ""]
    elif "feeds" in related:
        lines += ["**Feeds** (by weights, the direct path): the later neurons whose gate or in reads most strongly "
                  "what this neuron writes, w · (g ⊙ w_out) with g the later layer's pre-MLP norm scale. In a case "
                  "where post > 0 the neuron pushes them towards the side named; where post < 0, the other way.", "",
                  "| this neuron's cases | gate+ of | gate− of | in+ of | in− of |", "|---|---|---|---|---|"]
        for row in related["feeds"]:
            cells = [" · ".join(f"{link(e['id'])}&nbsp;<small>{fmt(e['score'])}</small>" for e in row["sides"][side][:5])
                     or "–" for side in ("gate+", "gate-", "in+", "in-")]
            cases = ", ".join(md_text(case) for case in row["cases"])
            lines.append(f"| {cases} (post {'>' if row['post'] > 0 else '<'} 0) | " + " | ".join(cells) + " |")
        lines.append("")
    if "alike" in related:
        for name, label in (("alike", "Writes alike"), ("opposite", "Writes opposite")):
            entries = " · ".join(f"{link(e['id'])}&nbsp;<small>{fmt(e['cos'])}</small>" for e in related[name][:8])
            lines.append(f"- **{label}** (same layer, cos of w_out): {entries or 'none'}")
        lines.append("")
    if "shared" in related:
        lines += [f"**Fires with** (by activation): the cases whose {k} strongest hook_post examples include the "
                  "same tokens as this case's (shared tokens, then shared documents, of "
                  f"{k}; tokens at the start of a document left out).", ""]
        for case, entries in related["shared"].items():
            shown = " · ".join(f"{link(e['id'])} {md_text(e['case'])} <small>{plural(e['positions'], 'token')}, "
                               f"{plural(e['docs'], 'doc')}</small>" for e in entries[:6])
            lines.append(f"- **{md_text(case)}**: {shown or 'no other case shares a strong token'}")
        lines.append("")
    return lines


def index_rows(entries: Sequence[tuple[NeuronData, str]], vocab_text: Callable[[int], str]) -> str:
    """A sortable HTML table: one row per (neuron, relative url)."""
    labelled = any(data.explanations and any(e.label for e in data.explanations) for data, _ in entries)
    head = ("<th>neuron</th>" + "".join(
        f'<th class="gs-case gs-case{c}">{html.escape(case)}&nbsp;%</th>' for c, case in enumerate(CASES))
        + "<th>top word of each case (peak token marked)</th>"
        + ("<th>label of each case (score)</th>" if labelled else ""))
    rows = []
    for data, url in entries:
        freq = "".join(f'<td data-sort="{f:.6f}">{100 * f:.3g}</td>' for f in data.frequency)
        tops = []
        for c in range(len(CASES)):
            filled = data.top_doc[c, 0, 0] >= 0 and data.window_tokens[c, 0, 0, data.context_before] >= 0
            label = word_html(example_word(data, vocab_text, c, 0, 0)) if filled else "–"
            tops.append(f'<code class="gs-top gs-case{c}" title="{html.escape(CASES[c])}">{label}</code>')
        labels = ""
        if labelled:
            cells = [f'<div class="gs-case-label"><span class="gs-chip gs-case{c}" title="{html.escape(CASES[c])}"></span>'
                     f"{explanation_html(e)}</div>" for c, e in enumerate(data.explanations or []) if e.label]
            labels = f'<td class="gs-labels">{"".join(cells) or "–"}</td>'
        rows.append(
            f'<tr><td data-sort="{data.layer:04d}.{data.neuron:06d}"><a href="{html.escape(url)}">{data.id}</a></td>'
            f"{freq}<td class=\"gs-tops\">{''.join(tops)}</td>{labels}</tr>")
    # data-search-exclude: a search snippet would run the cells together ("1.043.418.422.1").
    return (f'<div class="md-typeset__scrollwrap" data-search-exclude><table class="gs-table gs-sortable gs-index"><thead><tr>{head}</tr>'
            f"</thead><tbody>{''.join(rows)}</tbody></table></div>")


# -- distributions, vocabulary projections, samples and bands -----------------------------------------

def telling_case(data: NeuronData, scales: Sequence[float] | None = None) -> int | None:
    """The case a full page opens: the one whose strongest hook_post example after the start of its
    document is the most extreme against its case's ``scales`` (the layer's, as ``gluscope pick``
    scores), among the rare cases (under :data:`RARE_SHARE` of tokens, with at least k examples)
    when one of them has any such example, else among all. Start-of-document examples count only
    when a case has nothing else. None: no case has examples."""
    doc, pos, value = data.top_doc[:, 0], data.top_pos[:, 0], data.top_value[:, 0]  # [C, k]
    filled = doc >= 0
    if not filled.any():
        return None
    magnitude = np.where(filled, np.nan_to_num(np.abs(value), nan=0.0), -1.0)
    later = np.where(pos >= early_end(data.attrs), magnitude, -1.0).max(axis=-1)
    best = np.where(later > 0, later, magnitude.max(axis=-1))  # [C]
    if scales is not None:
        best = best / np.asarray(scales, dtype=np.float64)
    rare = (data.frequency < RARE_SHARE) & (filled.sum(axis=-1) >= data.top_doc.shape[-1]) & (later > 0)
    pool = np.where(rare if rare.any() else filled.any(axis=-1), best, -np.inf)
    return int(np.argmax(pool))


def distributions_html(data: NeuronData, ctx: PageContext) -> str:
    """The histograms (tabs per hook, the page's color hook first shown) and the (gate, in) density."""
    if data.hist is None:
        return ""
    hook = ctx.color_hook if ctx.color_hook in HOOKS else "hook_post"
    return ('<div class="gs-dists">' + histograms_html(data.hist, data.hist_edges, data.count, hook)
            + '<figure class="gs-density-fig" data-search-exclude><figcaption>gate × in, all cases '
            "(log count)</figcaption>" + density_html(data.density, data.density_edges) + "</figure></div>")


VOCAB_TEXT = {
    "out": ("output (w_out)", "promotes", "suppresses",
            "Tokens whose logit the neuron's output raises most (left) and lowers most (right) per unit of post; "
            "where post < 0 the roles swap."),
    "gate": ("gate (w_gate)", "gate+", "gate−",
             "Input tokens (embeddings) that give the largest gate (into the gate+ cases) and the most negative "
             "(into the gate− cases)."),
    "in": ("in (w_in)", "in+", "in−",
           "Input tokens (embeddings) that give the largest in (into the in+ cases) and the most negative "
           "(into the in− cases)."),
}


def vocab_section(data: NeuronData, ctx: PageContext) -> list[str]:
    """``## Vocabulary``: the projections of w_out, w_gate and w_in as token tables (every token
    through :func:`md_text`); nothing for files without them."""
    if data.vocab_token is None or data.vocab_score is None:
        return []
    tables = []
    for w, weight in enumerate(VOCAB_WEIGHTS):
        title, top, bottom, note = VOCAB_TEXT.get(weight, (weight, "top", "bottom", ""))
        tokens, scores = data.vocab_token[w], data.vocab_score[w]
        rows = []
        for j in range(tokens.shape[-1]):
            cells = []
            for d in range(2):
                t = int(tokens[d, j])
                cells.append(f'<td><code>{ctx.vocab_html(t)}</code></td><td class="gs-num">{fmt(scores[d, j])}</td>'
                             if t >= 0 else "<td></td><td></td>")
            rows.append(f"<tr>{''.join(cells)}</tr>")
        tables.append(
            f'<div class="gs-vocab-block"><p class="gs-vocab-title"><b>{html.escape(title)}</b> · {html.escape(note)}</p>'
            f'<table class="gs-table gs-vocab"><thead><tr><th colspan="2">{html.escape(top)}</th>'
            f'<th colspan="2">{html.escape(bottom)}</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>')
    return ["## Vocabulary", "", '<div class="gs-vocab-row" data-search-exclude>' + "".join(tables) + "</div>", ""]


def _container_open(data: NeuronData, ctx: PageContext, kind: str) -> str:
    return (f'<div class="gs-examples gs-{kind}" data-root="{md_text(ctx.site_root)}" data-centre="{data.context_before}" '
            f'data-levels="{LEVELS}" data-counted-from="{first_counted_position(data.attrs)}">')


def _first(ex: Examples, n: int | None) -> Examples:
    """The first ``n`` examples of each list of ``ex`` (all for None): the ``examples`` option limits every list."""
    if n is None:
        return ex
    return Examples(doc=ex.doc[..., :n], pos=ex.pos[..., :n], value=ex.value[..., :n], gate=ex.gate[..., :n, :],
                    in_=ex.in_[..., :n, :], tokens=ex.tokens[..., :n, :])


def _example_lists(data: NeuronData, ex: Examples, hook: str) -> dict:
    """What the rows of every list of ``ex`` need, computed for all lists at once (a list is
    ``[C, *E]`` down to its last axis): windows per hook, counted positions, each list's scale per hook
    and the color levels of ``hook``."""
    counted = counted_windows(data, ex.pos)
    windows = hook_windows(ex.gate, ex.in_, act_fn(data))
    scales = {name: color_scales(values, counted, values.shape[-2]) for name, values in windows.items()}
    levels = color_levels(windows[hook], scales[hook], counted)
    return {"counted": counted.tolist(), "swish": windows["swish"], "scales": scales, "levels": levels.tolist(),
            "tokens": ex.tokens.tolist(), "early": early_end(data.attrs)}


def _sample_rows(data: NeuronData, ctx: PageContext, ex: Examples, lists: dict, index: tuple) -> tuple[str, str, int]:
    """The rows of one list of ``ex`` (``index`` selects ``[C, *E]`` down to the list's examples),
    colored on the list's own scale: the list's data-scale attribute, the rows' HTML and their number."""
    doc, pos = ex.doc[index], ex.pos[index]
    post = ex.value[(index[0], 0) + index[1:]]  # [C, H, *E]: hook_post of the list
    counted, levels, tokens = lists["counted"], lists["levels"], lists["tokens"]
    for i in index:
        counted, levels, tokens = counted[i], levels[i], tokens[i]
    gate, in_, swish = ex.gate[index], ex.in_[index], lists["swish"][index]
    rows = []
    for j in np.flatnonzero(doc >= 0):
        rows.append(example_row(ctx, doc=int(doc[j]), pos=int(pos[j]), gate=gate[j], in_=in_[j], swish=swish[j],
                                value=post[j], tokens=tokens[j], levels=levels[j], counted=counted[j],
                                centre=data.context_before, early=lists["early"], rank=len(rows) + 1))
    scale = json_text([float(lists["scales"][name][index]) for name in HOOKS])
    return f' data-scale="{md_text(scale)}"', "".join(rows), len(rows)


_NO_TOKEN = '<p class="gs-empty">No token of the corpus fell in this case.</p>'


def _case_block(c: int, opened: bool, summary: str, body: str) -> str:
    """One case's collapsible block of example lists, headed by its color chip and name."""
    return (f'<details class="gs-case-block"{" open" if opened else ""}><summary><span class="gs-chip gs-case{c}">'
            f'</span><b>{html.escape(CASES[c])}</b> · {summary}</summary>{body}</details>')


def samples_html(data: NeuronData, ctx: PageContext) -> str:
    """The random samples of each case as colored-token lists (one per case, all open)."""
    if data.samples is None or data.samples.gate is None:
        return ""
    hook = ctx.color_hook if ctx.color_hook in HOOKS else "hook_post"
    parts = [_container_open(data, ctx, "samples")]
    samples = _first(data.samples, ctx.examples)
    lists = _example_lists(data, samples, hook)
    for c in range(len(CASES)):
        attr, rows, n = _sample_rows(data, ctx, samples, lists, (c,))
        body = f'<div class="gs-list"{attr}><div class="gs-rows">{rows}{"" if n else _NO_TOKEN}</div></div>'
        parts.append(_case_block(c, True, f"{n} random tokens of {int(data.count[c]):,}", body))
    parts.append("</div>")
    return "".join(parts)


def bands_html(data: NeuronData, ctx: PageContext) -> str:
    """Per case, random tokens from each band of |post| (weak to strong), each band its own list;
    the case :func:`telling_case` names is open."""
    if data.bands is None or data.bands.gate is None or data.band_edges is None:
        return ""
    hook = ctx.color_hook if ctx.color_hook in HOOKS else "hook_post"
    telling = telling_case(data, ctx.case_scales)
    parts = [_container_open(data, ctx, "bands")]
    bands = _first(data.bands, ctx.examples)
    computed = _example_lists(data, bands, hook)
    for c in range(len(CASES)):
        lists = []
        for r in range(bands.doc.shape[1]):
            attr, rows, n = _sample_rows(data, ctx, bands, computed, (c, r))
            if n:
                label = html.escape(bin_range(data.band_edges, r, "post"), quote=False)
                lists.append(f'<div class="gs-list gs-band"{attr}><p class="gs-band-label">{label}'
                             "</p><div class=\"gs-rows\">" + rows + "</div></div>")
        parts.append(_case_block(c, c == telling, f"{len(lists)} bands with tokens",
                                 "".join(lists) + ("" if lists else _NO_TOKEN)))
    parts.append("</div>")
    return "".join(parts)


def fill_page(page: str, data: NeuronData, ctx: PageContext,
              computed: tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]] | None = None) -> str:
    """``page`` (the page's Markdown, or the HTML made from it) with every placeholder replaced by its HTML."""
    page = page.replace(EXAMPLES_PLACEHOLDER, examples_html(data, ctx, computed), 1)
    for placeholder, make in ((DISTRIBUTIONS_PLACEHOLDER, distributions_html), (SAMPLES_PLACEHOLDER, samples_html),
                              (BANDS_PLACEHOLDER, bands_html)):
        if placeholder in page:
            page = page.replace(placeholder, make(data, ctx), 1)
    return page
