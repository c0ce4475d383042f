"""A light site's word index: which neurons a word is about, ranked by how much of their strong
activations it accounts for.

A neuron's strong activations are the examples of its four ``hook_post`` top-k lists (each case's
strongest). Each example is found by the terms of the word it peaks on (:func:`words.index_terms`:
the word up to the peak piece, what the model had read). For each case, a term's **share** is the sum
of ``|post|`` over the case's examples on it divided by the sum over all four lists: how much of the
neuron's strong activations the word accounts for, in that case. Its **score**, what search ranks by,
is the share times ``min(1, peak / scale)``, ``peak`` the strongest ``|post|`` on the term and ``scale``
the case's scale in the layer (``pick.case_scales``: the 99th percentile of the case's extremes over
the layer's neurons), so a word that fills a neuron's lists only at a fraction of the strength the
layer's neurons reach counts for that fraction. On the demo, the neuron whose rare case is made of
bracketed transcript notes (28.473: ``[Applause]``, ``[Laughter]``) ranks first for both words, before
neurons that fire on "App" of "Applause" (found by "app") and neurons whose weak cases hold the word.

In a file with explanations (``gluscope explain``), each word of a case's label is a term too
(:func:`label_postings`): its share is -1 (the mark of a label's word), its score the explanation's
score, so a query finds neurons by what their labels say.

The index is written as shards of about :data:`SHARD_BYTES`, each a range of terms in code-point
order (``search/{n}.json``: ``{term: [[id, case, score, share, peak], ...]}``), and
``search/firsts.json``, each shard's first term (:func:`words.shard_of`). A term keeps its
:data:`POSTINGS` best neurons.
"""

from __future__ import annotations

import heapq
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from mkdocs_gluscope.light.data import dumps
from mkdocs_gluscope.render import label_parts
from mkdocs_gluscope.store import CASES, NeuronData
from mkdocs_gluscope.words import CONTEXT, WORD_LIMIT, index_terms, query_terms, unspaced, word_around

#: Neurons kept per term (the best by share): a word thousands of neurons peak on (" the") stays small.
POSTINGS = 100
#: Bytes per shard file (before the last term that crosses it): a query fetches one or two.
SHARD_BYTES = 64 * 1024

Posting = tuple[str, float, float, float, str, int]  # term, -score, -share, -|peak|, neuron id, case (sort order)


class WordFinder:
    """:func:`words.word_around` and :func:`words.index_terms` for windows of token ids, fast: the
    vocabulary's per-token facts are arrays computed once, a window's word is found for all examples at
    once, and each word's terms are computed once (``tests/test_light.py`` checks it against the rules)."""

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = vocab

        def facts(pick) -> np.ndarray:
            return np.array([bool(s) and pick(s) for s in vocab] + [False])  # id -1 (outside): no word

        self.first_alnum = facts(lambda s: s[0].isalnum())
        self.last_alnum = facts(lambda s: s[-1].isalnum())
        self.first_unspaced = facts(lambda s: unspaced(s[0]))
        self.last_unspaced = facts(lambda s: unspaced(s[-1]))
        self._terms: dict[bytes, list[str]] = {}
        self._words: dict[bytes, tuple[str, str, str]] = {}

    def extents(self, ids: np.ndarray, centre: int) -> tuple[np.ndarray, np.ndarray]:
        """First and last window position of the whole word around ``centre`` of each window ``ids[..., W]``."""
        a, b = ids[..., :-1], ids[..., 1:]
        joins = (self.last_alnum[a] & self.first_alnum[b] & ~(self.last_unspaced[a] & self.first_unspaced[b])
                 & (a >= 0) & (b >= 0))
        left = np.cumprod(joins[..., :centre][..., ::-1], axis=-1).sum(axis=-1) if centre else np.zeros(ids.shape[:-1], int)
        right = np.cumprod(joins[..., centre:], axis=-1).sum(axis=-1)
        return centre - np.minimum(left, WORD_LIMIT), centre + np.minimum(right, WORD_LIMIT)

    def _key(self, ids: np.ndarray, centre: int, start: int, stop: int) -> tuple[int, int, bytes]:
        """The word's tokens, with the tokens on each side that the rules look at (where the word stops at
        its peak next to text without spaces: up to CONTEXT characters, so as many tokens): the slice
        and the bytes of its ids, the key of the word's terms."""
        lo = max(0, start - CONTEXT) if start == centre and centre > 0 and self.last_unspaced[ids[centre - 1]] else start
        hi = (min(len(ids), stop + 1 + CONTEXT) if stop == centre and centre + 1 < len(ids)
              and self.first_unspaced[ids[centre + 1]] else stop + 1)
        return lo, hi, ids[lo:hi].tobytes() + bytes([centre - lo])

    def terms_of(self, ids: np.ndarray, centre: int, starts: np.ndarray, stops: np.ndarray,
                 which: np.ndarray) -> list[list[str]]:
        """:meth:`terms` of the windows ``ids[..., W]`` where ``which``, in order: the bounds of
        :meth:`_key` computed for all of them at once and each key sliced from one byte string."""
        W = ids.shape[-1]
        lo = starts
        if centre > 0:
            lo = np.where((starts == centre) & self.last_unspaced[ids[..., centre - 1]],
                          np.maximum(0, starts - CONTEXT), starts)
        hi = stops + 1
        if centre + 1 < W:
            hi = np.where((stops == centre) & self.first_unspaced[ids[..., centre + 1]],
                          np.minimum(W, stops + 1 + CONTEXT), hi)
        flat = np.ascontiguousarray(ids).reshape(-1, W)
        raw, size = flat.tobytes(), flat.itemsize
        picked = np.flatnonzero(which.ravel())
        out = []
        cache = self._terms
        for r, a, b in zip(picked.tolist(), lo.ravel()[picked].tolist(), hi.ravel()[picked].tolist()):
            key = raw[(r * W + a) * size:(r * W + b) * size] + bytes([centre - a])
            found = cache.get(key)
            if found is None:
                found = cache[key] = index_terms(self._tokens(flat[r, a:b]), centre - a)
            out.append(found)
        return out

    def _tokens(self, ids: np.ndarray) -> list[str | None]:
        return [self.vocab[t] if t >= 0 else None for t in ids]

    def terms(self, ids: np.ndarray, centre: int, start: int, stop: int) -> list[str]:
        lo, hi, key = self._key(ids, centre, start, stop)
        found = self._terms.get(key)
        if found is None:
            found = self._terms[key] = index_terms(self._tokens(ids[lo:hi]), centre - lo)
        return found

    def word(self, ids: np.ndarray, centre: int, start: int, stop: int) -> tuple[str, str, str]:
        lo, hi, key = self._key(ids, centre, start, stop)
        found = self._words.get(key)
        if found is None:
            found = self._words[key] = word_around(self._tokens(ids[lo:hi]), centre - lo)
        return found


def postings(data: NeuronData, words: WordFinder, ids: np.ndarray | None = None,
             scales: Sequence[float] | None = None) -> list[Posting]:
    """Each (term, case) of one neuron with its score and share (see the module). ``ids``: the token
    ids of the hook_post lists' windows ``[C, k, W]`` (default: from ``data.window_tokens``);
    ``scales``: each case's scale in the layer (default: 1, no discount)."""
    out: list[Posting] = []
    nid = data.id
    centre = data.context_before
    if ids is None:
        ids = data.window_tokens[:, 0]
    starts, stops = words.extents(ids, centre)
    filled = data.top_doc[:, 0] >= 0  # [C, k]
    weights = np.abs(data.top_value[:, 0].astype(np.float64))
    weights[~np.isfinite(weights) | ~filled] = 0.0
    total = float(weights.sum())
    peaks = filled & (ids[:, :, centre] >= 0)
    each = iter(words.terms_of(ids, centre, starts, stops, peaks))  # in (case, slot) order
    listed = weights.tolist()
    for c in range(len(CASES)):
        found: dict[str, list[float]] = {}
        for j in np.flatnonzero(peaks[c]).tolist():
            w = listed[c][j]
            for term in next(each):
                entry = found.get(term)
                if entry is None:
                    found[term] = [w, w]
                else:
                    entry[0] += w
                    entry[1] = max(entry[1], w)
        scale = float(scales[c]) if scales is not None and scales[c] > 0 else 0.0
        for term, (mass, peak) in found.items():
            share = mass / total if total > 0 else 0.0
            score = share * min(1.0, peak / scale) if scale else share
            out.append((term, -_round(score), -_round(share), -float(f"{peak:.4g}"), nid, c))
    return out


def label_postings(data: NeuronData) -> list[Posting]:
    """Each word of each case's explanation label (``gluscope explain``), as a posting marked by a
    share of -1: the label's text (its quotes' tokens and its words) cut into terms as a query is
    (:func:`words.query_terms`), ranked by the explanation's score (below 0, or not scored: 0)."""
    out: list[Posting] = []
    for c, expl in enumerate(data.explanations or ()):
        if not expl.label:
            continue
        score = _round(max(expl.score, 0.0)) if expl.scored else 0.0
        for term in query_terms(" ".join(label_parts(expl.label))):
            out.append((term, -score, 1.0, -0.0, data.id, c))
    return out


def _round(x: float) -> float:
    return int(x * 1000 + 0.5) / 1000


def write_sorted(items: list[Posting], path: Path) -> Path:
    """Postings sorted (by term, then rank) as lines for :func:`write_shards` to merge, one a posting.

    A line sorts as its posting does, as a string, so the merge compares lines and reads only the
    postings a term keeps: the term (:func:`_order_term`), the three ranks as order-keeping hex
    (:func:`_order_key`), the neuron id and the case, separated by ``\\x01`` (below every character
    of a term, so a term sorts before the terms it begins), then the ranks as written (``repr``)."""
    lines = [f"{_order_term(t)}{_SEP}{_order_key(r)}{_SEP}{_order_key(s)}{_SEP}{_order_key(p)}{_SEP}{n}{_SEP}{c}"
             f"{_SEP}{r!r}{_SEP}{s!r}{_SEP}{p!r}\n" for t, r, s, p, n, c in items]
    lines.sort()
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)
    return path


_SEP = "\x01"
_SEP_BYTES = _SEP.encode()
#: Control characters (below U+0020, the separator and line end among them) become U+001F and the
#: character 0x20 higher: still below every other character, and in their own order.
_TERM_ESCAPES = str.maketrans({c: "\x1f" + chr(c + 0x20) for c in range(0x20)})


def _order_term(term: str) -> str:
    return term.translate(_TERM_ESCAPES)


def _term(ordered: str) -> str:
    """The term of :func:`_order_term`'s string."""
    if "\x1f" not in ordered:
        return ordered
    head, *rest = ordered.split("\x1f")
    return head + "".join(chr(ord(part[0]) - 0x20) + part[1:] for part in rest)


def _ranks(line: bytes) -> tuple[float, float, float, str, int]:
    """A line's ranks (as the posting has them), neuron id and case."""
    fields = line[:-1].decode("utf-8").split(_SEP)
    return float(fields[6]), float(fields[7]), float(fields[8]), fields[4], int(fields[5])


def _order_key(x: float) -> str:
    """16 hex digits that sort as ``x`` does (-0.0 as 0.0): the float's bits, the sign bit flipped
    for a positive number and every bit for a negative one."""
    bits = struct.unpack("<Q", struct.pack("<d", x + 0.0))[0]
    return f"{bits ^ 0xFFFFFFFFFFFFFFFF if bits >> 63 else bits | 0x8000000000000000:016x}"


def write_shards(runs: Iterable[Path], folder: Path, pool: Any = None, parts: int = 1) -> dict[str, int]:
    """Merge sorted posting runs into the shards and ``firsts.json`` under ``folder``; returns counts.

    With ``parts`` > 1 the terms are cut into that many ranges of about equal size (by terms sampled
    from the runs), each merged by one task of ``pool`` (a ``multiprocessing`` pool; none: one after
    the other); a shard then also ends where a range does. Memory holds one term's postings and one
    shard at a time per task."""
    runs = [str(p) for p in runs]
    bounds = _range_bounds(runs, parts) if parts > 1 else []
    tasks = [(runs, str(folder / f"range-{i}"), lo, hi) for i, (lo, hi) in enumerate(zip([b""] + bounds, bounds + [None]))]
    done = pool.map(_merge_range, tasks) if pool is not None else list(map(_merge_range, tasks))
    firsts: list[str] = []
    terms = kept = 0
    folder.mkdir(parents=True, exist_ok=True)
    for (_, part, _, _), (part_firsts, part_terms, part_kept) in zip(tasks, done):
        for j, first in enumerate(part_firsts):  # the ranges' shards numbered on, in term order
            Path(part, f"{j}.json").rename(folder / f"{len(firsts)}.json")
            firsts.append(first if firsts else "")  # the first shard's first is "": every term finds a shard
        terms, kept = terms + part_terms, kept + part_kept
        Path(part).rmdir()
    (folder / "firsts.json").write_text(dumps(firsts or [""]), encoding="utf-8")
    return {"terms": terms, "postings": kept, "shards": len(firsts)}


def _range_bounds(runs: list[str], parts: int) -> list[bytes]:
    """``parts - 1`` increasing terms (as the lines spell them) that cut the runs' lines into about
    equal ranges: quantiles of the terms of lines sampled at 16 places of each run."""
    sample: list[bytes] = []
    for path in runs:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            for q in range(16):
                f.seek(size * q // 16)
                f.readline()  # to the next line's start
                line = f.readline()
                if line:
                    sample.append(line[:line.index(_SEP_BYTES)])
    sample.sort()
    bounds = sorted({sample[len(sample) * i // parts] for i in range(1, parts)} if sample else set())
    return [b for b in bounds if b]


def _seek_term(f: Any, size: int, term: bytes) -> None:
    """Put the sorted run ``f`` (binary) at its first line whose term is ``term`` or after it."""
    lo, hi = 0, size
    while lo < hi:  # the smallest position whose next line (starting there or after) is at or after term
        mid = (lo + hi) // 2
        f.seek(max(mid - 1, 0))
        if mid:
            f.readline()
        line = f.readline()
        if not line or line[:line.index(_SEP_BYTES)] >= term:
            hi = mid
        else:
            lo = mid + 1
    f.seek(max(lo - 1, 0))
    if lo:
        f.readline()


def _merge_range(task: tuple) -> tuple[list[str], int, int]:
    """One range of terms (``lo`` <= term < ``hi``; ``hi`` None: to the end) of the runs merged into
    shards ``0.json``, ... in ``out``; returns each shard's first term, the terms and the postings kept."""
    runs, out, lo, hi = task
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    firsts: list[str] = []
    shard: dict[str, list] = {}
    size = terms = kept = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            (folder / f"{len(firsts) - 1}.json").write_text(dumps(shard), encoding="utf-8")
        shard, size = {}, 0

    def finish(term: str, lines: list[bytes]) -> None:
        nonlocal size, terms, kept
        entry = [[nid, c, -score, -share, -peak] for score, share, peak, nid, c in map(_ranks, lines)]
        cost = len(dumps(term)) + len(dumps(entry)) + 2
        if not firsts or (size + cost > SHARD_BYTES and shard):
            flush()
            firsts.append(term)
        shard[term] = entry
        size += cost
        terms += 1
        kept += len(entry)

    def lines_of(path: str) -> Iterator[bytes]:
        with open(path, "rb") as f:
            if lo:
                _seek_term(f, os.path.getsize(path), lo)
            for line in f:
                if hi is not None and line[:line.index(_SEP_BYTES)] >= hi:
                    return
                yield line

    ordered: bytes | None = None  # the current term, as the lines spell it
    best: list[bytes] = []
    for line in heapq.merge(*map(lines_of, runs)):  # lines sort as their postings: compared, parsed only if kept
        term = line[:line.index(_SEP_BYTES)]
        if term != ordered:
            if ordered is not None:
                finish(_term(ordered.decode("utf-8")), best)
            ordered, best = term, []
        if len(best) < POSTINGS:
            best.append(line)
    if ordered is not None:
        finish(_term(ordered.decode("utf-8")), best)
    flush()
    return firsts, terms, kept
