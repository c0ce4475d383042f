"""The ``explanations/`` group of an activations file: one explanation per neuron and case.

An explanation is a short label (``"` again` after `once`"``), the method that wrote it, the
structured content a rule-based simulator reads (tokens at the peak, the token before, the token
after, and kinds of token, each with a weight in units of ``hook_post``), and the scores measured by
simulation against the model on held-out text. The layout is a contract (``site_src/data-format.md``,
*Explanations*); this module holds its names, the simulator's rule (:class:`Simulator`: what the
stored weights mean), the token kinds, reading a neuron's explanations, and writing the group into
a file safely.

**Writing into an existing file.** HDF5 has no journal: a process killed while it changes a file's
metadata can leave the whole file unreadable, statistics included, and a collection may have taken
days. So explanations never go into the file in place: :func:`write_explanations` copies the file
next to itself (``FILE.explain.tmp``), writes the group into the copy, flushes it to disk and
renames it over the original (``os.replace``, atomic on POSIX). A crash at any moment leaves either
the old file or the new one, never a half-written one; the price is room for one copy of the file
while it runs, and a few seconds of copying (measured in ``bench/explain_scores.py``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np

from mkdocs_gluscope.schema import EXPLANATIONS, STRING, check_vocab_ids
from mkdocs_gluscope.store import CASES, EXPERT_GROUPS, SHARED, ActivationsFile, _compressed, _to_attr

GROUP = "explanations"
#: Token features per explanation: tokens at the peak, tokens before it, tokens after it.
N_TOKENS = 8
N_CONTEXT = 4
#: Kinds of token position, in the order of ``explanations/kind_weight``'s last axis; the phrases
#: labels use for them. A position's kind depends on its token and the token before it (see
#: :func:`token_classes`).
KINDS: tuple[str, ...] = ("digit inside a number", "number start", "word piece inside a word", "capitalized word",
                          "lowercase word", "punctuation", "line break", "other")
KIND_PHRASES: tuple[str, ...] = ("digits inside numbers", "the first digit of a number", "pieces inside a word",
                                 "capitalized words", "lowercase words", "punctuation", "line breaks", "other tokens")
#: The explainer that needs nothing but the file (:mod:`mkdocs_gluscope.explain`), as ``method`` names it.
METHOD_TOKENS = "tokens"
#: Per-neuron datasets of the group: name -> (dtype, trailing shape after ``[L, N, 4]``), from the
#: format's list (:data:`mkdocs_gluscope.schema.EXPLANATIONS`) with this writer's slot counts.
_SLOTS = {"Et": N_TOKENS, "Ec": N_CONTEXT, "Ek": len(KINDS)}
ARRAYS: dict[str, tuple[str, tuple[int, ...]]] = {
    path.split("/", 1)[1]: (dtype[0], tuple(_SLOTS[s] for s in shape[3:]))
    for path, dtype, shape in EXPLANATIONS if dtype is not STRING}
STRINGS = tuple(path.split("/", 1)[1] for path, dtype, _ in EXPLANATIONS if dtype is STRING)
SCORES = ("score", "precision", "recall", "scored_positions", "strong_positions")


def empty_arrays(n: int) -> dict[str, np.ndarray]:
    """Arrays for ``n`` neurons with nothing explained: label and method "", token ids -1, weights 0,
    scores NaN, counts -1."""
    out: dict[str, np.ndarray] = {name: np.full((n, len(CASES)), "", dtype=object) for name in STRINGS}
    for name, (dtype, tail) in ARRAYS.items():
        fill: Any = -1 if dtype.startswith("int") else (np.nan if name in SCORES or name == "threshold" else 0.0)
        out[name] = np.full((n, len(CASES)) + tail, fill, dtype=dtype)
    return out


# -- token kinds ------------------------------------------------------------------------------------

# What a token's display string starts with, and what it ends with.
_START = ("space lower", "space upper", "space digit", "lower", "upper", "digit", "punctuation", "newline", "other")
_END = ("letter", "digit", "other", "none")
#: KIND_OF[end class of the previous token, start class of this token] -> index into KINDS.
KIND_OF = np.array([
    # sp-lower sp-upper sp-digit lower upper digit punct newline other
    [4, 3, 1, 2, 2, 1, 5, 6, 7],  # previous ends with a letter
    [4, 3, 1, 4, 3, 0, 5, 6, 7],  # previous ends with a digit
    [4, 3, 1, 4, 3, 1, 5, 6, 7],  # previous ends otherwise
    [4, 3, 1, 4, 3, 1, 5, 6, 7],  # no previous token
], dtype=np.int8)
NO_PREVIOUS = _END.index("none")


def token_classes(vocab: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Start and end class of every token id's display string (int8 ``[V]`` each), as
    :data:`KIND_OF` takes them. A token starts with a lowercase letter, an uppercase letter or a digit,
    with or without one leading space; or is punctuation (every character neither a letter, a digit
    nor whitespace); or holds a line break; or is something else (spaces, special tokens, mixed).
    It ends with a letter, a digit or something else."""
    start = np.full(len(vocab), _START.index("other"), dtype=np.int8)
    end = np.full(len(vocab), _END.index("other"), dtype=np.int8)
    for i, s in enumerate(vocab):
        if not s:
            continue
        if "\n" in s:
            start[i] = _START.index("newline")
        else:
            body, space = (s[1:], "space ") if s[0] == " " and len(s) > 1 else (s, "")
            first = body[0]
            if first.isdigit():
                start[i] = _START.index(space + "digit")
            elif first.isalpha() and first.isupper():
                start[i] = _START.index(space + "upper")
            elif first.isalpha():
                start[i] = _START.index(space + "lower")
            elif not space and all(not (ch.isalnum() or ch.isspace()) for ch in s):
                start[i] = _START.index("punctuation")
        last = s[-1]
        end[i] = _END.index("digit") if last.isdigit() else _END.index("letter") if last.isalpha() else end[i]
    return start, end


def position_kinds(tokens: np.ndarray, previous: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Kind (index into :data:`KINDS`) of each position from its token and the token before it
    (-1: none, at a document's first position)."""
    prev_end = np.where(previous >= 0, end[np.maximum(previous, 0)], NO_PREVIOUS)
    return KIND_OF[prev_end, start[tokens]]


# -- the simulator -----------------------------------------------------------------------------------

class Simulator:
    """The rule-based simulator: what an explanation's structured content predicts at each token.

    For explanation ``m`` and position ``t`` of a document with tokens ``x``::

        pred[t, m] = sum_i token_weight[m, i]    * (x[t]   == token[m, i])
                   + sum_j previous_weight[m, j] * (x[t-1] == previous[m, j])
                   + sum_j next_weight[m, j]     * (x[t+1] == next[m, j])
                   + kind_weight[m, kind(x[t-1], x[t])]

    where a token id of -1 matches nothing, ``x[t-1]`` does not exist at a document's first position
    and ``x[t+1]`` not at its last. Weights are in units of ``hook_post`` (signed like the case's
    post), so ``pred`` predicts the case's activation, 0 where nothing in the explanation applies.
    Built once for many explanations (``[M, ...]`` arrays), it predicts all of them at once.

    Positions are given as ``(current, previous, following)`` token ids (:meth:`positions`), with
    the vocabulary size ``V`` standing for "no token" (before a document, after it, padding)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], vocab_size: int, start: np.ndarray, end: np.ndarray) -> None:
        M = len(arrays["token"])
        self.M, self.V = M, vocab_size
        # The classes of "no token" too (index V): no previous token; a padding position's kind is never read.
        self.start = np.append(start, np.int8(len(_START) - 1))
        self.end = np.append(end, np.int8(NO_PREVIOUS))
        self.kind_weight = np.asarray(arrays["kind_weight"], dtype=np.float32).reshape(M, -1).T.copy()  # [K, M]
        # Per feature type, the weights as sorted keys ``token * M + m`` (an id listed twice in one
        # explanation: its weights add): grouped by token, so a token's entries are one slice.
        self.tables = []
        for ids_name, weight_name in (("token", "token_weight"), ("previous", "previous_weight"),
                                      ("next", "next_weight")):
            ids = np.asarray(arrays[ids_name]).reshape(M, -1).astype(np.int64)
            weights = np.asarray(arrays[weight_name], dtype=np.float32).reshape(M, -1)
            used = (ids >= 0) & (ids < vocab_size) & (weights != 0)
            m = np.broadcast_to(np.arange(M)[:, None], ids.shape)[used]
            keys, inverse = np.unique(ids[used] * M + m, return_inverse=True)
            values = np.bincount(inverse, weights=weights[used], minlength=len(keys)).astype(np.float32)
            bounds = np.searchsorted(keys, np.arange(vocab_size + 2, dtype=np.int64) * M)  # token v: bounds[v]..bounds[v+1]
            self.tables.append((keys, values, bounds))

        weights = np.concatenate([np.asarray(arrays[name], dtype=np.float32).reshape(M, -1) for name in
                                  ("token_weight", "previous_weight", "next_weight", "kind_weight")], axis=1)
        self._weights = weights

    def strong_level(self, sign: np.ndarray) -> np.ndarray:
        """``[M]``: where an explanation calls a position strong: its prediction (times the case's
        ``sign``) reaches half its largest weight; inf for one with no weight in the case's sign."""
        largest = (self._weights * np.asarray(sign, dtype=np.float32)[:, None]).max(axis=1, initial=0.0)
        return np.where(largest > 0, largest / 2, np.inf).astype(np.float32)

    def positions(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return document_positions(tokens, lengths, self.V)

    def _kinds(self, current: np.ndarray, previous: np.ndarray) -> np.ndarray:
        return KIND_OF[self.end[previous], self.start[current]].astype(np.int64)

    def predict(self, current: np.ndarray, previous: np.ndarray, following: np.ndarray) -> np.ndarray:
        """``pred`` ``[..., M]``: every explanation at every position (arrays of any shape ``[...]``)."""
        shape = current.shape
        pred = self.kind_weight[self._kinds(current, previous)].reshape(-1, self.M)
        for (keys, values, bounds), ids in zip(self.tables, (current, previous, following)):
            ids = ids.reshape(-1)
            first, count = bounds[ids], bounds[ids + 1] - bounds[ids]
            total = int(count.sum())
            if not total:
                continue
            at = np.repeat(np.arange(len(ids)), count)  # one entry per (position, explanation naming its token)
            entry = first[at] + np.arange(total) - np.repeat(np.cumsum(count) - count, count)
            pred[at, keys[entry] % self.M] += values[entry]  # each (position, explanation) once per type
        pred = pred.reshape(shape + (self.M,))
        pred[current == self.V] = 0.0
        return pred

    def predict_own(self, current: np.ndarray, previous: np.ndarray, following: np.ndarray) -> np.ndarray:
        """``pred`` ``[M, ...]``: explanation ``m`` at its own positions ``current[m]`` (arrays ``[M, ...]``)."""
        m = np.arange(self.M).reshape((self.M,) + (1,) * (current.ndim - 1))
        pred = self.kind_weight[self._kinds(current, previous), m]
        for (keys, values, _), ids in zip(self.tables, (current, previous, following)):
            if not len(keys):
                continue
            wanted = ids.astype(np.int64) * self.M + m
            found = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
            pred += np.where(keys[found] == wanted, values[found], 0.0)
        pred[current == self.V] = 0.0
        return pred

    def __call__(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """``pred`` ``[B, T, M]`` float32 for documents ``tokens`` ``[B, T]`` (padding predicted 0)."""
        return self.predict(*self.positions(tokens, lengths))


def document_positions(tokens: np.ndarray, lengths: np.ndarray, vocab_size: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(current, previous, following)`` token ids ``[B, T]`` for documents ``tokens`` ``[B, T]`` whose
    first ``lengths`` entries are real, ``vocab_size`` standing for "no token" (before and after a
    document, and in its padding)."""
    B, T = tokens.shape
    t = np.arange(T)[None, :]
    current = np.where(t < np.asarray(lengths)[:, None], tokens, vocab_size).astype(np.int64)
    none = np.full((B, 1), vocab_size, dtype=np.int64)
    return current, np.concatenate([none, current[:, :-1]], axis=1), np.concatenate([current[:, 1:], none], axis=1)


# -- reading -------------------------------------------------------------------------------------------

@dataclass
class CaseExplanation:
    """One case's explanation as pages, ``pick`` and the export show it."""

    case: str
    label: str
    method: str
    score: float  # correlation of simulated and true activations; NaN: not scored
    precision: float
    recall: float
    scored_positions: int  # positions in the case within the scored sequences (-1: not scored)

    @property
    def scored(self) -> bool:
        return bool(np.isfinite(self.score))


def has_explanations(f: ActivationsFile) -> bool:
    """Whether any group of the file holds explanations."""
    return GROUP in f.file or any(g in f.file and GROUP in f.file[g] for g in EXPERT_GROUPS)


def _group_of(f: ActivationsFile, layer: int, neuron: int,
              expert: int | str | None) -> tuple[h5py.Group, str, int] | None:
    """The explanations group of a neuron's layer or expert, its path prefix and the neuron's row; None
    where that group has none."""
    if expert is None:
        prefix, row = "", f.row(layer)
    else:
        group, row = f.check_expert_neuron(layer, expert, neuron)
        prefix = group + "/"
    return (f.file[prefix + GROUP], prefix, row) if prefix + GROUP in f.file else None


def neuron_explanations(f: ActivationsFile, layer: int, neuron: int,
                        expert: int | str | None = None) -> list[CaseExplanation] | None:
    """The four cases' explanations of one neuron (in :data:`CASES` order), or None where the file
    (or the neuron's group) has none. A case nobody explained has label and method ""."""
    found = block_explanations(f, layer, neuron, neuron + 1, expert)
    return None if found is None else found[0]


def block_explanations(f: ActivationsFile, layer: int, start: int, stop: int,
                       expert: int | str | None = None) -> list[list[CaseExplanation]] | None:
    """:func:`neuron_explanations` of neurons ``start .. stop-1``, each dataset read once."""
    found = _group_of(f, layer, start, expert)
    if found is None:
        return None
    g, prefix, row = found
    part = (row, slice(start, stop))
    label, method = g["label"].asstr()[part], g["method"].asstr()[part]
    values = {name: f.read(f"{prefix}{GROUP}/{name}", part, f"layer {layer}")
              for name in ("score", "precision", "recall", "scored_positions")}
    return [[CaseExplanation(case=CASES[c], label=str(label[i, c]), method=str(method[i, c]),
                             score=float(values["score"][i, c]), precision=float(values["precision"][i, c]),
                             recall=float(values["recall"][i, c]),
                             scored_positions=int(values["scored_positions"][i, c]))
             for c in range(len(CASES))] for i in range(stop - start)]


def read_arrays(f: ActivationsFile, group: str, row: int) -> dict[str, np.ndarray] | None:
    """Every dataset of one row of ``group``'s explanations (``""`` the dense layers), ``[N, 4, ...]``;
    None where there are none."""
    prefix = group + "/" if group else ""
    if prefix + GROUP not in f.file:
        return None
    g = f.file[prefix + GROUP]
    out = {name: g[name][row] for name in ARRAYS}
    for name in ("token", "previous", "next"):  # the simulator looks them up
        check_vocab_ids(f.where, f"{prefix}{GROUP}/{name}", out[name], f.n_vocab, f"row {row}")
    for name in STRINGS:
        out[name] = g[name].asstr()[row]
    return out


def group_attrs(f: ActivationsFile, group: str = "") -> dict[str, Any]:
    prefix = group + "/" if group else ""
    if prefix + GROUP not in f.file:
        return {}
    from mkdocs_gluscope.store import _attr

    return {k: _attr(v) for k, v in f.file[prefix + GROUP].attrs.items()}


# -- writing ----------------------------------------------------------------------------------------------

def _write_group(parent: h5py.Group, rows: int, n: int, updates: Mapping[int, Mapping[str, np.ndarray]],
                 attrs: Mapping[str, Any]) -> None:
    """Create (or update) ``parent/explanations`` for ``rows`` rows of ``n`` neurons; ``updates``
    maps a row to its arrays ``[n, 4, ...]`` plus ``listed`` [n] bool (the neurons to overwrite)."""
    strings = h5py.string_dtype("utf-8")
    if GROUP in parent:
        g = parent[GROUP]
    else:
        g = parent.create_group(GROUP)
        cn = max(1, min(n, 256))
        for name in STRINGS:  # unwritten entries read as ""
            g.create_dataset(name, (rows, n, len(CASES)), dtype=strings, chunks=(1, cn, len(CASES)))
        for name, (dtype, tail) in ARRAYS.items():
            shape = (rows, n, len(CASES)) + tail
            fill = empty_arrays(1)[name].reshape(-1)[0]
            g.create_dataset(name, shape, dtype, fillvalue=fill, **_compressed((1, cn, len(CASES)) + tail))
    for row, arrays in sorted(updates.items()):
        listed = np.asarray(arrays["listed"], dtype=bool)
        if not listed.any():
            continue
        for name in STRINGS + tuple(ARRAYS):
            current = g[name].asstr()[row] if name in STRINGS else g[name][row]
            current[listed] = np.asarray(arrays[name])[listed]
            g[name][row] = current
    for key, value in attrs.items():
        g.attrs[key] = _to_attr(value)
    g.attrs["kinds"] = _to_attr(list(KINDS))


def write_explanations(path: str | os.PathLike, updates: Mapping[tuple[str, int], Mapping[str, np.ndarray]],
                       attrs: Mapping[str, Any]) -> Path:
    """Write ``updates`` (``(group, row)`` -> arrays, see :func:`_write_group`; group ``""`` for the
    dense layers, else ``experts`` or ``shared_experts``) into the file at ``path``, through a copy that
    replaces the file only once complete (module docstring). Neurons not listed keep what they had."""
    path = Path(path)
    tmp = path.with_name(path.name + ".explain.tmp")
    tmp.unlink(missing_ok=True)
    try:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a") as h:
            for group in ("",) + EXPERT_GROUPS:
                rows = {row: arrays for (g, row), arrays in updates.items() if g == group}
                if not rows:
                    continue
                parent = h[group] if group else h
                n_rows, n = parent["stats/count"].shape[:2]
                _write_group(parent, n_rows, n, rows, attrs)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def describe_attrs(attrs: Mapping[str, Any]) -> str:
    """The group's scoring settings in one line (for messages)."""
    keys = [k for k in sorted(attrs) if k.startswith("score_")]
    return json.dumps({k: attrs[k] for k in keys}, default=str)


def expert_of(group: str, f: ActivationsFile, row: int) -> tuple[int, int | str | None]:
    """The (model layer, expert or None) of a row of ``group``."""
    if not group:
        return f.layers[row], None
    for (layer, expert), (g, r) in f.expert_rows.items():
        if g == group and r == row:
            return layer, expert
    raise IndexError(f"row {row} of {group}")


__all__ = ["ARRAYS", "CaseExplanation", "GROUP", "KINDS", "KIND_PHRASES", "METHOD_TOKENS", "N_CONTEXT", "N_TOKENS",
           "SHARED", "Simulator", "empty_arrays", "has_explanations", "neuron_explanations", "position_kinds",
           "read_arrays", "token_classes", "write_explanations"]
