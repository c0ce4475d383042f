"""The explainer that needs nothing but the file: what characterises each case of a neuron.

Every example window in the file (the top-k lists of all four hooks, the random samples and the
band samples, with the tokens before and after each) holds ``gate`` and ``in`` at each of its
positions, so it tells the case and the activation of every case there. Those positions (each
once, from :data:`~mkdocs_gluscope.store.early_end` on: the first positions of a document hold
attention-sink outliers that no token explains) are the explainer's evidence. For each case
``c`` the true activation at a position is ``y = post`` if the position is in ``c``, else 0.

Features are the token at the position, the token before it, the token after it, and the kind of
token (:data:`~mkdocs_gluscope.explanations.KINDS`: digits inside numbers, pieces inside a word,
...). The explainer picks them greedily, one at a time, by how much of the case's activation they
account for **over the whole corpus the file holds**, not just over the examples: a feature seen
``m`` times in the windows, with residual activations summing to ``s`` there, occurs ``n`` times in
the corpus (``corpus/tokens`` gives these base rates), and the ``n - m`` occurrences the windows do
not show are taken to be ordinary (residual 0). Its gain is ``s^2 / (n + PRIOR_COUNT)`` (the squared
activation it explains over the corpus, with :data:`PRIOR_COUNT` occurrences of prior belief that a
feature does nothing), and its weight ``s / (n + PRIOR_COUNT)``. So a token that fills the top-k list
but occurs thousands of times elsewhere (`` the``) gets a small weight, a rare token on which the
neuron always fires (`` again``) a large one, and a token seen once at one peak little (on the demo's
held-out text the prior raised the median score of every case, most for the gate- cases). Only
features that push the activation the case's own way are taken; each pick takes its evidence off
the residuals of the positions it covers (its mean ``s / n``, in full, so the next picks explain
something else) before the next. The picks become the explanation's structured content (what
:class:`~mkdocs_gluscope.explanations.Simulator` reads) and, phrased, its label.

Deterministic (no randomness, ties by lower token id) and fast: numpy over each neuron's few
thousand window positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mkdocs_gluscope.activations import act_values
from mkdocs_gluscope.explanations import (ARRAYS, KIND_PHRASES, KINDS, METHOD_TOKENS, N_CONTEXT, N_TOKENS, SCORES,
                                          empty_arrays, position_kinds, token_classes)
from mkdocs_gluscope.render import token_label
from mkdocs_gluscope.store import CASES, HOOK_SIGNS, ActivationsFile, early_end

#: Version of the rule below, recorded with every explanation it writes (``explainer`` attribute).
EXPLAINER = "gluscope tokens explainer 1"
#: Greedy picks per case: at most this many features, and of each type at most its slots.
MAX_PICKS = 12
MAX_KINDS = 2
#: A pick must explain at least this share of the first pick's gain.
MIN_GAIN_SHARE = 0.03
#: Occurrences added to every feature's corpus count: a feature seen once in the examples (a rare token at
#: one peak) is weak evidence of what the neuron does elsewhere, so its weight shrinks towards 0.
PRIOR_COUNT = 100.0
#: A position is "strong" for a case where |post| reaches this share of the median |post| of the
#: case's top-k hook_post examples after the start of the document.
STRONG_SHARE = 0.5
#: Tokens and context tokens a label names, and the longest token shown in it.
LABEL_TOKENS, LABEL_CONTEXT, LABEL_TOKEN_CHARS = 3, 2, 24
#: A context feature enters the label when its gain reaches this share of the label's first feature.
LABEL_CONTEXT_SHARE = 0.25

FEATURE_TYPES = ("token", "previous", "next", "kind")
_SLOTS = {"token": N_TOKENS, "previous": N_CONTEXT, "next": N_CONTEXT, "kind": MAX_KINDS}


@dataclass
class BaseRates:
    """How often each feature occurs at the corpus's counted positions from ``early_end`` on (the
    positions the explainer reads): as the token there, as the token before one, as the token after
    one, and each kind."""

    token: np.ndarray  # [V] int64
    previous: np.ndarray  # [V]
    next: np.ndarray  # [V]
    kind: np.ndarray  # [K]
    positions: int
    start: np.ndarray  # token classes (explanations.token_classes)
    end: np.ndarray

    def of(self, kind: str) -> np.ndarray:
        return getattr(self, kind)


@dataclass
class Corpus:
    """The file's corpus as the explainer reads it: tokens, where documents start, their lengths."""

    tokens: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    early: int
    vocab: list[str]


def read_corpus(f: ActivationsFile) -> Corpus:
    offsets = f.doc_offsets
    return Corpus(tokens=f.tokens, offsets=offsets, lengths=np.diff(offsets), early=early_end(f.attrs), vocab=f.vocab)


def base_rates(corpus: Corpus) -> BaseRates:
    """:class:`BaseRates` of a corpus (one pass of ``bincount``)."""
    tokens, lengths = corpus.tokens.astype(np.int64), corpus.lengths
    V = len(corpus.vocab)
    start, end = token_classes(corpus.vocab)
    pos = np.arange(len(tokens)) - np.repeat(corpus.offsets[:-1], lengths)
    counted = pos >= corpus.early
    previous = np.concatenate([[-1], tokens[:-1]])
    previous[pos == 0] = -1
    following = np.concatenate([tokens[1:], [-1]])
    following[pos == np.repeat(lengths, lengths) - 1] = -1
    kinds = position_kinds(tokens, previous, start, end)
    return BaseRates(token=np.bincount(tokens[counted], minlength=V),
                     previous=np.bincount(previous[counted & (previous >= 0)], minlength=V),
                     next=np.bincount(following[counted & (following >= 0)], minlength=V),
                     kind=np.bincount(kinds[counted], minlength=len(KINDS)),
                     positions=int(counted.sum()), start=start, end=end)


# -- one block of neurons' evidence -------------------------------------------------------------------

def read_block(f: ActivationsFile, group: str, row: int, neurons: slice) -> dict[str, np.ndarray]:
    """The datasets the explainer reads, for neurons ``neurons`` of one row of ``group`` (``""``: the
    dense layers): chunks read once for the whole block."""
    root = f.file[group] if group else f.file
    out = {"count": root["stats/count"][row, neurons], "sum": root["stats/sum"][row, neurons, :, 0],
           "top_value": root["top/value"][row, neurons, :, 0]}
    for name in ("doc", "pos", "gate", "in"):
        out["top_" + name] = root["top/" + name][row, neurons]
    if "samples" in root:
        for part in ("samples", "bands"):
            for name in ("doc", "pos", "gate", "in"):
                out[f"{part}_{name}"] = root[f"{part}/{name}"][row, neurons]
    return out


def _windows(block: dict[str, np.ndarray], i: int, W: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every window of neuron ``i`` of a block, flattened: doc and example position per window, and
    the gate and in values ``[n, W]``."""
    docs, poss, gates, ins = [], [], [], []
    for part in ("top", "samples", "bands"):
        if part + "_doc" not in block:
            continue
        doc, pos = block[part + "_doc"][i].reshape(-1), block[part + "_pos"][i].reshape(-1)
        docs.append(doc)
        poss.append(pos)
        gates.append(block[part + "_gate"][i].reshape(-1, W))
        ins.append(block[part + "_in"][i].reshape(-1, W))
    return np.concatenate(docs), np.concatenate(poss), np.concatenate(gates), np.concatenate(ins)


@dataclass
class Evidence:
    """The distinct window positions of one neuron (from ``early_end`` on) and what the explainer
    knows at each: its features and every case's true activation ``y`` ``[P, 4]``."""

    features: dict[str, np.ndarray]  # type -> [P] feature id (token id, or kind), -1 where none
    y: np.ndarray  # [P, 4] float64


def evidence(corpus: Corpus, rates: BaseRates, doc: np.ndarray, pos: np.ndarray, gate: np.ndarray, in_: np.ndarray,
             before: int, act_fn: str) -> Evidence:
    """:class:`Evidence` from windows: ``doc``/``pos`` per window (the example's position), values
    ``[n, W]`` with the example at index ``before``."""
    W = gate.shape[-1]
    where = pos[:, None] + np.arange(-before, W - before)[None, :]
    docs = np.broadcast_to(doc[:, None], where.shape)
    safe = np.clip(docs, 0, len(corpus.lengths) - 1)
    ok = ((docs >= 0) & (where >= corpus.early) & (where < corpus.lengths[safe]) & np.isfinite(gate)
          & np.isfinite(in_))
    docs, where = docs[ok].astype(np.int64), where[ok].astype(np.int64)
    gate, in_ = gate[ok].astype(np.float64), in_[ok].astype(np.float64)
    key = docs * (int(corpus.lengths.max()) + 1) + where
    _, first = np.unique(key, return_index=True)  # each position once (windows overlap)
    docs, where, gate, in_ = docs[first], where[first], gate[first], in_[first]
    at = corpus.offsets[docs] + where
    token = corpus.tokens[at].astype(np.int64)
    previous = corpus.tokens[at - 1].astype(np.int64)  # where >= early >= 1: there is one
    has_next = where + 1 < corpus.lengths[docs]
    following = np.where(has_next, corpus.tokens[np.minimum(at + 1, len(corpus.tokens) - 1)], -1).astype(np.int64)
    post = act_values(gate, act_fn) * in_
    y = np.zeros((len(token), len(CASES)))
    for c in range(len(CASES)):
        g_sign, i_sign = HOOK_SIGNS[c][2], HOOK_SIGNS[c][1]
        inside = (np.sign(gate) == g_sign) & (np.sign(in_) == i_sign)
        y[:, c] = np.where(inside, post, 0.0)
    kinds = position_kinds(token, previous, rates.start, rates.end).astype(np.int64)
    return Evidence(features={"token": token, "previous": previous, "next": following, "kind": kinds}, y=y)


# -- the greedy picks ----------------------------------------------------------------------------------

@dataclass
class Pick:
    kind: str  # one of FEATURE_TYPES
    id: int  # token id, or index into KINDS
    weight: float  # mean residual activation over the corpus (hook_post units, the case's sign)
    gain: float


def pick_features(ev: Evidence, rates: BaseRates, means: Sequence[float], cases: Sequence[int]) -> dict[int, list[Pick]]:
    """The greedy picks (module docstring) of each case in ``cases``, all cases in step; ``means[c]`` is
    case ``c``'s mean activation over all positions (``stats/sum`` of hook_post / counted positions),
    the residual of a position the windows do not show."""
    signs = np.array([HOOK_SIGNS[c][0] for c in range(len(CASES))], dtype=np.float64)
    r = ev.y - np.asarray(means, dtype=np.float64)[None, :]  # [P, 4] residuals
    prepared = {}
    for kind in FEATURE_TYPES:
        ids = ev.features[kind]
        rows = np.flatnonzero(ids >= 0)
        order = np.argsort(ids[rows], kind="stable")
        rows, sorted_ids = rows[order], ids[rows][order]
        starts = np.flatnonzero(np.concatenate([[True], sorted_ids[1:] != sorted_ids[:-1]])) if len(rows) else rows
        distinct = sorted_ids[starts]
        seen = np.diff(np.append(starts, len(rows)))
        n = np.maximum(rates.of(kind)[distinct], seen).astype(np.float64)  # never fewer than the windows show
        inverse = np.full(len(r), -1, dtype=np.int64)  # each position's feature of this type, as an index
        inverse[rows] = np.repeat(np.arange(len(distinct)), seen)
        sums = np.add.reduceat(r[rows], starts, axis=0) if len(rows) else np.zeros((0, len(CASES)))
        prepared[kind] = (rows, starts, distinct, n, np.zeros((len(distinct), len(CASES)), dtype=bool), inverse, sums)
    picks: dict[int, list[Pick]] = {c: [] for c in cases}
    used = {kind: np.zeros(len(CASES), dtype=np.int64) for kind in FEATURE_TYPES}
    first_gain = np.zeros(len(CASES))
    active = np.zeros(len(CASES), dtype=bool)
    active[list(cases)] = True
    for _ in range(MAX_PICKS):
        if not active.any():
            break
        best = np.zeros(len(CASES))
        choice: list[tuple[str, int] | None] = [None] * len(CASES)
        for kind in FEATURE_TYPES:
            rows, starts, distinct, n, taken, inverse, sums = prepared[kind]
            if not len(distinct):
                continue
            open_ = active & (used[kind] < _SLOTS[kind])
            gain = np.where((sums * signs > 0) & ~taken & open_, sums * sums / (n + PRIOR_COUNT)[:, None], 0.0)
            j = gain.argmax(axis=0)  # ties: the lower id
            g = gain[j, np.arange(len(CASES))]
            for c in np.flatnonzero(g > best):
                best[c], choice[c] = g[c], (kind, int(j[c]))
        for c in np.flatnonzero(active):
            if choice[c] is None or best[c] <= MIN_GAIN_SHARE * first_gain[c]:
                active[c] = False
                continue
            kind, j = choice[c]
            rows, starts, distinct, n, taken = prepared[kind][:5]
            stop = starts[j + 1] if j + 1 < len(starts) else len(rows)
            covered = rows[starts[j]:stop]
            # Its evidence comes off the residuals in full (its mean over the corpus), so later picks explain
            # something else; the weight it keeps is shrunk by the prior count.
            total = float(prepared[kind][6][j, c])
            removed, weight = total / n[j], total / (n[j] + PRIOR_COUNT)
            r[covered, c] -= removed
            for other in FEATURE_TYPES:  # the sums of every feature at the covered positions drop with them
                index = prepared[other][5][covered]
                other_sums = prepared[other][6]
                other_sums[:, c] -= removed * np.bincount(index[index >= 0], minlength=len(other_sums))
            taken[j, c] = True
            used[kind][c] += 1
            first_gain[c] = first_gain[c] or best[c]
            picks[c].append(Pick(kind, int(distinct[j]), weight, float(best[c])))
    return picks


def strong_threshold(value: np.ndarray, pos: np.ndarray, doc: np.ndarray, early: int) -> float:
    """:data:`STRONG_SHARE` of the median ``|post|`` of a case's top-k hook_post examples after the
    start of the document (all of them where none is); NaN for an empty list."""
    filled = doc >= 0
    later = filled & (pos >= early)
    chosen = np.abs(value[later if later.any() else filled])
    return float(STRONG_SHARE * np.median(chosen)) if len(chosen) else float("nan")


# -- labels ---------------------------------------------------------------------------------------------

def quote(token: str) -> str:
    """A token inside a label: its visible form (:func:`~mkdocs_gluscope.render.token_label`) in
    backticks, long ones cut with an ellipsis; a backtick inside becomes ˋ so the quotes stay paired."""
    text = token_label(token).replace("`", "ˋ")
    if len(text) > LABEL_TOKEN_CHARS:
        text = text[:LABEL_TOKEN_CHARS - 1] + "…"
    return f"`{text}`"


def _either(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def phrase(picks: list[Pick], vocab: Sequence[str]) -> str:
    """A short label from the picks: the first pick's kind of feature leads (tokens at the peak, a
    kind of token, or what comes before or after), then the context that matters (``after ...``,
    ``before ...``)."""
    if not picks:
        return ""
    lead = picks[0]
    tokens = [p for p in picks if p.kind == "token"][:LABEL_TOKENS]
    strong = lead.gain * LABEL_CONTEXT_SHARE
    kinds = [p for p in picks if p.kind == "kind" and p.gain >= strong]
    if lead.kind == "kind":
        text = KIND_PHRASES[lead.id]
        if tokens:
            text += ", " + _either([quote(vocab[p.id]) for p in tokens[:2]])
    elif lead.kind == "token" or tokens and tokens[0].gain >= strong:
        text = _either([quote(vocab[p.id]) for p in tokens])
        if kinds and lead.kind != "kind":
            text += ", " + KIND_PHRASES[kinds[0].id]
    else:
        text = "tokens"
    clauses = []
    for kind, word in (("previous", "after"), ("next", "before")):
        context = [p for p in picks if p.kind == kind and (p.gain >= strong or p is lead)][:LABEL_CONTEXT]
        if context:
            clauses.append(f"{word} " + _either([quote(vocab[p.id]) for p in context]))
    return " ".join([text, ", ".join(clauses)]) if clauses else text


def explanation_arrays(picks: list[Pick]) -> dict[str, np.ndarray]:
    """One case's structured content (the ``explanations/`` arrays without the case axis)."""
    out = {name: arr[0, 0] for name, arr in empty_arrays(1).items() if name in ARRAYS}
    slots = {"token": 0, "previous": 0, "next": 0}
    for p in picks:
        if p.kind == "kind":
            out["kind_weight"][p.id] = p.weight
        else:
            out[p.kind][slots[p.kind]] = p.id
            out[p.kind + "_weight"][slots[p.kind]] = p.weight
            slots[p.kind] += 1
    return out


def explain_block(block: dict[str, np.ndarray], corpus: Corpus, rates: BaseRates, *, n_tokens: int, before: int,
                  act_fn: str, which: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Explanations of every case of the neurons ``which`` (default: all) of a block (:func:`read_block`):
    the ``explanations/`` arrays ``[n, 4, ...]``, scores left empty."""
    n = len(block["count"])
    W = block["top_gate"].shape[-1]
    out = empty_arrays(n)
    for i in (range(n) if which is None else which):
        doc, pos, gate, in_ = _windows(block, i, W)
        ev = evidence(corpus, rates, doc, pos, gate, in_, before, act_fn)
        cases = [c for c in range(len(CASES)) if block["count"][i, c] > 0]
        by_case = pick_features(ev, rates, block["sum"][i] / max(n_tokens, 1), cases)
        for c in cases:
            picks = by_case[c]
            for name, value in explanation_arrays(picks).items():
                out[name][i, c] = value
            out["threshold"][i, c] = strong_threshold(block["top_value"][i, c], block["top_pos"][i, c, 0],
                                                      block["top_doc"][i, c, 0], corpus.early)
            out["label"][i, c] = phrase(picks, corpus.vocab)
            out["method"][i, c] = METHOD_TOKENS if picks else ""
    return out


# -- baselines (bench/explain_scores.py) -------------------------------------------------------------

def top_token_arrays(block: dict[str, np.ndarray], corpus: Corpus) -> dict[str, np.ndarray]:
    """The single-top-token baseline: each case explained by the token of its strongest hook_post
    example after the start of the document (weight: that example's value), nothing else."""
    n = len(block["count"])
    out = empty_arrays(n)
    for i in range(n):
        for c in range(len(CASES)):
            doc, pos, value = block["top_doc"][i, c, 0], block["top_pos"][i, c, 0], block["top_value"][i, c]
            later = np.flatnonzero((doc >= 0) & (pos >= corpus.early))
            if not len(later):
                continue
            j = later[0]
            token = int(corpus.tokens[corpus.offsets[doc[j]] + pos[j]])
            out["token"][i, c, 0] = token
            out["token_weight"][i, c, 0] = value[j]
            out["label"][i, c] = quote(corpus.vocab[token])
            out["method"][i, c] = "top token"
    return out


def shuffled_arrays(arrays: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """The shuffled baseline: each neuron's case explained by another neuron's explanation of the
    same case (a random derangement of the neurons, fixed by ``seed``); the thresholds stay."""
    n = len(arrays["token"])
    order = np.random.default_rng(seed).permutation(n)
    shifted = np.roll(order, 1)
    other = np.empty(n, dtype=np.int64)
    other[order] = shifted  # neuron order[i] gets order[i - 1]'s: nobody gets its own (n > 1)
    out = {name: value[other].copy() for name, value in arrays.items()}
    out["threshold"] = arrays["threshold"].copy()
    for name in SCORES:
        out[name] = empty_arrays(n)[name]
    return out
