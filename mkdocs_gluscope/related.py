"""Related neurons: stored by addition in an activations file's ``related/`` group, one list per case.

Two parts, computed once per file by ``gluscope related FILE`` (``--model M`` adds the second):

* **by activation** (:func:`shared_examples`, from the file alone): for each neuron and case, the
  (neuron, case) pairs whose strongest examples are the same tokens. A case's strongest examples are
  its hook_post top-k list: k documents, each with its most extreme position. Two lists *share a
  position* when both hold the same (document, position); positions before :func:`store.early_end`
  (the start of a document, where attention sinks make many neurons fire at once) are left out. The
  list ranks the other (neuron, case) pairs by shared positions, then by shared documents (documents
  in both lists, at any position), then by layer, neuron and case; only pairs with a shared position
  are listed. A position shared by chance is rare (k of the corpus's positions each), so even one says
  something; the numbers are out of k. The random samples are not used: every neuron draws them in
  one order of positions, so a shared sample says that two cases co-occur, not that the neurons are
  strong together, and the pairs of a sketch cover most of the model.
* **by weights** (:mod:`collect.related`, needs the model): the later neurons whose gate or in reads
  most strongly what the neuron writes (``feeds_*``), and the neurons of the same layer whose ``w_out``
  is most alike (``alike_*``).

Datasets (``L`` rows as the root's layer axis, ``N`` neurons, ``K`` = :data:`RELATED_K`; -1 and NaN
where a list has fewer entries):

=====================  ===============================  ==============================================
``shared_layer``       int32 ``[L, N, C, K]``           model layer of each related neuron, by case
``shared_neuron``      int32 ``[L, N, C, K]``           its neuron
``shared_case``        int8 ``[L, N, C, K]``            its case (index into ``cases``)
``shared_positions``   int32 ``[L, N, C, K]``           positions both hook_post lists hold
``shared_docs``        int32 ``[L, N, C, K]``           documents both lists hold
``feeds_layer``        int32 ``[L, N, 2, 2, K]``        axis 2 the later neuron's ``gate``, ``in``;
``feeds_neuron``       int32 ``[L, N, 2, 2, K]``        axis 3 ``top`` (highest score first),
``feeds_score``        float32 ``[L, N, 2, 2, K]``      ``bottom`` (lowest first)
``alike_neuron``       int32 ``[L, N, 2, K]``           same layer; axis 2 ``top`` (highest cosine of
``alike_score``        float32 ``[L, N, 2, K]``         ``w_out`` first), ``bottom`` (lowest first)
=====================  ===============================  ==============================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import h5py
import numpy as np

from mkdocs_gluscope.schema import check_related
from mkdocs_gluscope.store import HOOK_SIGNS, ActivationsFile, _compressed, early_end

#: Entries per list (related neurons per case, per gate/in and direction, per direction).
RELATED_K = 10
#: Axis 2 of ``feeds_*``: which weight of the later neuron reads what this one writes.
FEEDS_READS: tuple[str, ...] = ("gate", "in")
#: Axis 3 of ``feeds_*`` and axis 2 of ``alike_*``.
RELATED_DIRECTIONS: tuple[str, ...] = ("top", "bottom")
ACTIVATION_PART = ("shared_layer", "shared_neuron", "shared_case", "shared_positions", "shared_docs")
WEIGHTS_PART = ("feeds_layer", "feeds_neuron", "feeds_score", "alike_neuron", "alike_score")
#: Source-target pairs expanded at once by :func:`shared_examples` (memory: about 40 bytes each).
PAIR_BUDGET = 1 << 22


def shared_examples(top_doc: np.ndarray, top_pos: np.ndarray, doc_offsets: np.ndarray, early: int, layers: list[int],
                    *, k: int = RELATED_K, pair_budget: int = PAIR_BUDGET) -> dict[str, np.ndarray]:
    """The activation part of ``related/`` from the hook_post top-k lists ``top_doc``/``top_pos``
    ``[L, N, C, k_file]`` (model layer of each row in ``layers``), as the module docstring defines it."""
    L, N, C, kf = top_doc.shape
    U = L * N * C
    doc = top_doc.reshape(U, kf).astype(np.int64)
    pos = top_pos.reshape(U, kf).astype(np.int64)
    used = (doc >= 0) & (pos >= early)
    unit = np.broadcast_to(np.arange(U)[:, None], (U, kf))[used]  # entries in unit order
    key = (doc_offsets[np.clip(doc, 0, len(doc_offsets) - 2)] + pos)[used]
    by_key = np.argsort(key, kind="stable")
    key_sorted, unit_by_key = key[by_key], unit[by_key]
    starts = np.flatnonzero(np.r_[True, key_sorted[1:] != key_sorted[:-1]])
    sizes = np.diff(np.r_[starts, len(key_sorted)])
    group_of_entry = np.empty(len(key), np.int64)
    group_of_entry[by_key] = np.repeat(np.arange(len(starts)), sizes)
    entry_start = np.searchsorted(unit, np.arange(U + 1))  # entries of unit u: entry_start[u]:entry_start[u + 1]
    doc_sets = _DocSets(np.where(used, doc, -1), len(doc_offsets) - 1)

    out = {name: np.full((U, k), -1, np.int64) for name in ("unit", "positions", "docs")}
    u0 = 0
    for u1, block in _blocks(entry_start, group_of_entry, sizes, pair_budget):
        # Every (source entry, other entry of the same position) pair, as one code per (source, target).
        entries = np.arange(entry_start[u0], entry_start[u1])
        groups = group_of_entry[entries]
        width = sizes[groups]
        shift = np.repeat(starts[groups] - (np.cumsum(width) - width), width)
        dst = unit_by_key[np.arange(len(shift)) + shift]
        code = np.repeat((unit[entries] - u0) * U, width) + dst
        pairs, shared = np.unique(code, return_counts=True)
        a, b = np.divmod(pairs, U)
        a += u0
        other = a != b  # a list shares every position with itself
        a, b, shared = a[other], b[other], shared[other]
        # Shared documents, only for pairs that may reach a list: at least the k-th best count of their source.
        kth = _kth_largest(a - u0, shared, k, u1 - u0, kf)
        near = shared >= kth[a - u0]
        a, b, shared = a[near], b[near], shared[near]
        docs = doc_sets.shared(a, b)
        order = np.lexsort((b, -docs, -shared, a))
        a, b, shared, docs = a[order], b[order], shared[order], docs[order]
        first = np.searchsorted(a, np.arange(u0, u1))
        rank = np.arange(len(a)) - first[a - u0]
        take = rank < k
        out["unit"][a[take], rank[take]] = b[take]
        out["positions"][a[take], rank[take]] = shared[take]
        out["docs"][a[take], rank[take]] = docs[take]
        u0 = u1
    target = out["unit"]
    found = target >= 0
    t_row, rest = np.divmod(np.clip(target, 0, None), N * C)
    t_neuron, t_case = np.divmod(rest, C)
    shape = (L, N, C, k)
    return {
        "shared_layer": np.where(found, np.asarray(layers)[t_row], -1).reshape(shape).astype(np.int32),
        "shared_neuron": np.where(found, t_neuron, -1).reshape(shape).astype(np.int32),
        "shared_case": np.where(found, t_case, -1).reshape(shape).astype(np.int8),
        "shared_positions": np.where(found, out["positions"], -1).reshape(shape).astype(np.int32),
        "shared_docs": np.where(found, out["docs"], -1).reshape(shape).astype(np.int32),
    }


def _blocks(entry_start: np.ndarray, group_of_entry: np.ndarray, sizes: np.ndarray, budget: int
            ) -> Iterator[tuple[int, None]]:
    """Ends of consecutive source-unit blocks whose expanded pairs stay near ``budget`` (a block has
    at least one unit, however many pairs it makes)."""
    per_entry = sizes[group_of_entry]
    cumulative = np.r_[0, np.cumsum(per_entry)]
    per_unit = cumulative[entry_start]  # pairs before each unit's first entry
    U = len(entry_start) - 1
    u0 = 0
    while u0 < U:
        u1 = int(np.searchsorted(per_unit, per_unit[u0] + budget, side="right")) - 1
        u1 = min(max(u1, u0 + 1), U)
        yield u1, None
        u0 = u1


def _kth_largest(a: np.ndarray, shared: np.ndarray, k: int, n: int, most: int) -> np.ndarray:
    """Per source ``0..n-1`` (``a``, any order): the k-th largest of its ``shared`` counts (each 1 to
    ``most``), 1 where it has fewer than k pairs; from a histogram of counts per source (no sort)."""
    step = most + 1
    hist = np.bincount(a * step + shared, minlength=n * step).reshape(n, step)
    at_least = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # [source, s]: pairs sharing s or more
    return np.maximum((at_least >= k).sum(axis=1) - 1, 1)


#: Above this many bytes of document bitsets, :class:`_DocSets` compares the lists instead.
BITSET_BYTES = 1 << 28


class _DocSets:
    """Each source's documents (``[U, k]``, -1 for none), to count the documents two lists share. As
    bitsets of the corpus's documents where they fit in :data:`BITSET_BYTES` (a popcount of a few words
    per pair: 13x faster than comparing the two lists element by element, measured on 1M pairs of the
    demo's 392 documents); else by comparing the lists (k x k per pair). Both give the same counts."""

    def __init__(self, docs: np.ndarray, n_docs: int) -> None:
        words = max(1, -(-n_docs // 64))
        self.bits = None
        if docs.shape[0] * words * 8 <= BITSET_BYTES and hasattr(np, "bitwise_count"):  # numpy 2
            self.bits = np.zeros((docs.shape[0], words), np.uint64)
            row, col = np.nonzero(docs >= 0)
            d = docs[row, col]
            np.bitwise_or.at(self.bits, (row, d // 64), np.left_shift(np.uint64(1), (d % 64).astype(np.uint64)))
        self.docs = docs
        self.other = np.where(docs >= 0, docs, -2)  # -1 and -2: an empty slot matches nothing

    def shared(self, a: np.ndarray, b: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
        out = np.empty(len(a), np.int64)
        for s in range(0, len(a), chunk):
            x, y = a[s:s + chunk], b[s:s + chunk]
            if self.bits is not None:
                out[s:s + chunk] = np.bitwise_count(self.bits[x] & self.bits[y]).sum(axis=1)
            else:
                out[s:s + chunk] = np.count_nonzero(self.docs[x][:, :, None] == self.other[y][:, None, :], axis=(1, 2))
        return out


def activation_part(f: ActivationsFile, *, k: int = RELATED_K) -> dict[str, np.ndarray]:
    """:func:`shared_examples` of a file's dense layers."""
    top_doc = f.file["top/doc"][:, :, :, 0]  # hook_post lists: [L, N, C, k]
    top_pos = f.file["top/pos"][:, :, :, 0]
    return shared_examples(top_doc, top_pos, f.doc_offsets, early_end(f.attrs), f.layers, k=k)


def store_related(path: str | os.PathLike, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    """Add ``arrays`` to the file's ``related/`` group (replacing datasets of the same names) and
    ``attrs`` to its root. Each dataset is written under a ``.tmp`` name first and renamed once all
    are written, so an interrupted run leaves the previous datasets (and stray ``.tmp`` ones, which
    readers ignore and the next run removes)."""
    with h5py.File(path, "r+") as h5:
        group = h5.require_group("related")
        for name in list(group):
            if name.endswith(".tmp"):
                del group[name]
        for name, values in arrays.items():
            chunks = (1, max(1, min(values.shape[1], 1024))) + values.shape[2:] if values.ndim > 1 else None
            group.create_dataset(name + ".tmp", data=values, **(_compressed(chunks) if chunks and values.size else {}))
        for name in arrays:
            if name in group:
                del group[name]
            group.move(name + ".tmp", name)
        for key, value in attrs.items():
            h5.attrs[key] = value


WeightsPart = Callable[[ActivationsFile], "tuple[dict[str, np.ndarray], dict[str, Any]]"]


def add_related(path: str | os.PathLike, weights: WeightsPart | None = None) -> None:
    """``gluscope related``: compute the part by activation (and, with ``weights``, e.g.
    :func:`collect.related.weights_part` bound to a model, the part by weights) and add them to the
    file; one clear error for a file without dense layers or one another process holds open."""
    from mkdocs_gluscope.errors import GluscopeError
    from mkdocs_gluscope.store import FormatError

    try:
        f = ActivationsFile(path)
    except (FileNotFoundError, FormatError) as e:
        raise GluscopeError(str(e)) from None
    with f:
        if not (f.n_layers and f.d_mlp):
            raise GluscopeError(f"{str(path)!r} has no dense layers; related neurons cover dense layers only")
        arrays = activation_part(f)
        attrs: dict[str, Any] = {"related_k": RELATED_K}
        if weights is not None:
            more, more_attrs = weights(f)
            arrays.update(more)
            attrs.update(more_attrs)
    try:
        store_related(path, arrays, attrs)
    except OSError as e:  # HDF5 locks a file another process has open (e.g. mkdocs serve)
        raise GluscopeError(f"cannot add related/ to {str(path)!r}: {e}; close what has it open (mkdocs serve?) "
                            "and run again") from None


@dataclass
class Related:
    """One neuron's related lists, as read by :meth:`ActivationsFile.neuron` (``None`` parts are not in
    the file). Arrays as the datasets without ``[L, N]``."""

    shared: dict[str, np.ndarray] | None  # shared_* [C, K]
    feeds: dict[str, np.ndarray] | None  # feeds_* [2, 2, K]
    alike: dict[str, np.ndarray] | None  # alike_* [2, K]


def read_related(f: ActivationsFile, row: int, part: slice, label: Callable[[int], str]) -> list[Related | None] | None:
    """The parts of ``related/`` present, for the neurons ``part`` of a dense row (None: the file has none;
    ``label(i)`` names neuron ``part.start + i`` in errors); every entry checked to name a neuron of the
    file (:func:`schema.check_related`)."""
    if "related" not in f.file:
        return None
    group = f.file["related"]

    def read(names: tuple[str, ...]) -> dict[str, np.ndarray] | None:
        if not all(name in group for name in names):
            return None
        lists = {name: f._read_block("related/" + name, row, part, label) for name in names}
        f._check_block(lambda *arrays: check_related(f.where, dict(zip(names, arrays[:-1])), f.layers, f.d_mlp,
                                                     arrays[-1]), label, *lists.values())
        return lists

    parts = [(read(ACTIVATION_PART), "shared_"), (read(WEIGHTS_PART[:3]), "feeds_"), (read(WEIGHTS_PART[3:]), "alike_")]
    if all(lists is None for lists, _ in parts):
        return None
    pick = lambda lists, prefix, i: None if lists is None else {  # noqa: E731
        name[len(prefix):]: values[i] for name, values in lists.items()}
    return [Related(*(pick(lists, prefix, i) for lists, prefix in parts)) for i in range(part.stop - part.start)]


def post_sign(case: int) -> int:
    """The sign of post in a case: where it is negative, a neuron feeds the other side of what it reads."""
    return HOOK_SIGNS[case][0]

