"""A neuron in context, as plain data: its related neurons and its examples' effects on the output.

:func:`neuron_context` turns what :meth:`ActivationsFile.neuron` read into JSON-ready lists and numbers,
one rule for every page that shows them: full pages render them (:mod:`mkdocs_gluscope.render`), a
light page's data file can carry them as they are. Neuron ids are ``LAYER.NEURON`` strings.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from mkdocs_gluscope.effects import RAISED, example_effects
from mkdocs_gluscope.related import FEEDS_READS, post_sign
from mkdocs_gluscope.store import CASES, HOOKS, VOCAB_WEIGHTS, ActivationsFile, NeuronData, neuron_id

#: The later neuron's case side each (read, direction) of ``feeds_*`` pushes towards when post > 0:
#: a high gate score raises its gate (towards gate+), a low one lowers it; likewise for in.
SIDES = {("gate", 0): "gate+", ("gate", 1): "gate-", ("in", 0): "in+", ("in", 1): "in-"}


def _number(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def related_context(data: NeuronData) -> dict[str, Any]:
    """``feeds``: one entry per sign of post (``post`` +1 or -1, the ``cases`` with that sign), mapping
    each later case side (``gate+``, ``gate-``, ``in+``, ``in-``) to the neurons this one pushes towards
    it, strongest first, as ``{"id", "score"}`` (the score of the read: its sign times post's sign is
    positive); ``alike`` / ``opposite``: same-layer neurons by ``w_out`` cosine, ``{"id", "cos"}``;
    ``shared``: per case name, ``{"id", "case", "positions", "docs"}`` of the cases whose strongest
    examples are the same tokens. A part the file lacks is absent."""
    related = data.related
    out: dict[str, Any] = {}
    if related is None:
        return out
    if related.feeds is not None:
        lists: dict[str, list[dict[str, Any]]] = {}
        for r, read in enumerate(FEEDS_READS):
            for direction in range(2):
                layer, neuron = related.feeds["layer"][r, direction], related.feeds["neuron"][r, direction]
                lists[SIDES[read, direction]] = [
                    {"id": neuron_id(int(a), int(b)), "score": _number(s)}
                    for a, b, s in zip(layer, neuron, related.feeds["score"][r, direction]) if a >= 0]
        flip = {"gate+": "gate-", "gate-": "gate+", "in+": "in-", "in-": "in+"}
        out["feeds"] = [
            {"post": sign, "cases": [case for c, case in enumerate(CASES) if post_sign(c) == sign],
             "sides": {side: lists[side if sign > 0 else flip[side]] for side in SIDES.values()}}
            for sign in (1, -1)]
    if related.alike is not None:
        for direction, name in enumerate(("alike", "opposite")):
            out[name] = [{"id": neuron_id(data.layer, int(n)), "cos": _number(s)}
                         for n, s in zip(related.alike["neuron"][direction], related.alike["score"][direction])
                         if n >= 0]
    if related.shared is not None:
        s = related.shared
        out["shared"] = {case: [{"id": neuron_id(int(s["layer"][c, j]), int(s["neuron"][c, j])),
                                 "case": CASES[int(s["case"][c, j])], "positions": int(s["positions"][c, j]),
                                 "docs": int(s["docs"][c, j])}
                                for j in range(s["layer"].shape[-1]) if s["layer"][c, j] >= 0]
                         for c, case in enumerate(CASES)}
    return out


def example_posts(top_value: np.ndarray, window_post: np.ndarray | None, centre: int) -> np.ndarray:
    """Each top-k example's hook_post ``[..., C, H, k]``: the recorded value in the hook_post lists,
    and in the others act(gate)·in at the window's centre (``window_post``: the page's post windows
    ``[..., C, H, k, W]``, :func:`render.hook_windows`; None: NaN there)."""
    post = np.full(top_value.shape, np.nan)
    if window_post is not None:
        post[:] = window_post[..., centre]
    h = HOOKS.index("hook_post")
    post[..., h, :] = top_value[..., h, :]
    return post


def effects_context(data: NeuronData, window_post: np.ndarray | None) -> dict[str, Any] | None:
    """Each top-k example's direct effect on the output: ``effect`` and ``factor`` ``[C][H][k]`` (None
    where unknown; every token t's logit changes by ``factor * out score(t)``, the next token's by
    ``effect``), ``next`` the next token's id (-1 where none), and the neuron's ``out`` lists ``raises``
    / ``lowers`` for ``factor > 0`` as ``[token id, score]`` (swapped where ``factor < 0``). None where
    the file has no effects."""
    effects = example_effects(data, example_posts(data.top_value, window_post, data.context_before))
    if effects is None:
        return None
    t = data.window_tokens[..., data.context_before + 1] if data.context_after > 0 else None
    nxt = t if t is not None else np.full(data.top_doc.shape, -1)
    nxt = np.where(np.isfinite(data.top_next_score), nxt, -1)
    clean = lambda a: [[[_number(x) for x in row] for row in hook] for hook in a]  # noqa: E731
    out: dict[str, Any] = {"effect": clean(effects.effect), "factor": clean(effects.factor), "next": nxt.tolist()}
    if data.vocab_token is not None and data.vocab_score is not None:
        w = VOCAB_WEIGHTS.index("out")
        out["raises"], out["lowers"] = ([[int(a), _number(b)] for a, b in zip(data.vocab_token[w, d], data.vocab_score[w, d])
                                         if a >= 0] for d in (0, 1))
    return out


def neuron_context(data: NeuronData, window_post: np.ndarray | None = None) -> dict[str, Any]:
    """Everything above for one neuron: ``related`` and (where the file has them) ``effects``."""
    out: dict[str, Any] = {"related": related_context(data)}
    effects = effects_context(data, window_post)
    if effects is not None:
        out["effects"] = effects
    return out


def file_context(f: ActivationsFile, layer: int, neuron: int) -> dict[str, Any]:
    """:func:`neuron_context` of one neuron of an open activations file (what a light page's data file
    can carry as it is: a few KB of JSON a neuron)."""
    from mkdocs_gluscope.render import page_windows

    data = f.neuron(layer, neuron, windows=f.has_effects)
    return neuron_context(data, page_windows(data)["hook_post"] if data.top_gate is not None else None)


def light_context(data: NeuronData, vocab: Callable[[int], str]) -> dict[str, Any] | None:
    """What a light page's data file carries of :func:`neuron_context` as JSON (``light/data.py``: the
    ``context`` column; each example's scale and next-token score are numbers of its ``effect`` column):
    ``related`` as :func:`related_context`, and with effects the neuron's ``out`` lists ``raises`` /
    ``lowers`` (for a positive post · s) as ``[display string, score]``, :data:`RAISED` each (the browser
    has no vocabulary). None where the file has neither."""
    out: dict[str, Any] = {}
    related = related_context(data)
    if related:
        out["related"] = related
    if data.top_next_score is not None and data.vocab_token is not None and data.vocab_score is not None:
        w = VOCAB_WEIGHTS.index("out")
        out["raises"], out["lowers"] = ([[vocab(int(a)), _number(b)] for a, b in
                                         zip(data.vocab_token[w, d][:RAISED], data.vocab_score[w, d][:RAISED]) if a >= 0]
                                        for d in (0, 1))
    return out or None
