"""A light site's word index: which neurons a word is about, ranked by how much of their strong
activations it accounts for.

For each neuron and case, the examples of the case's ``hook_post`` top-k list (its strongest
activations in the case) are found by the terms of the word each peaks on (:func:`words.index_terms`).
A term's **share** of the case is the sum of ``|post|`` over the examples that peak on it divided by the
sum over the whole list: 1.0 when every strong activation of the case is on the word. Search ranks
neurons by share, then by the strongest ``|post|`` on the term; so a neuron whose rare case is made of
transcript notes (``[Applause]``, ``[Laughter]``) comes before one that fires harder on many words.

The index is written as shards of about :data:`SHARD_BYTES`, each a range of terms in code-point
order (``search/{n}.json``), and ``search/firsts.json``, each shard's first term
(:func:`words.shard_of`). A term keeps its :data:`POSTINGS` best neurons.
"""

from __future__ import annotations

import heapq
import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from mkdocs_gluscope.light.data import dumps
from mkdocs_gluscope.store import CASES, NeuronData
from mkdocs_gluscope.words import index_terms

#: Neurons kept per term (the best by share): a word thousands of neurons peak on (" the") stays small.
POSTINGS = 100
#: Bytes per shard file (before the last term that crosses it): a query fetches one or two.
SHARD_BYTES = 64 * 1024

Posting = tuple[str, float, float, str, int]  # term, -share, -|value|, neuron id, case (sort order)


def postings(data: NeuronData, vocab_text: Callable[[int], str]) -> list[Posting]:
    """Each (term, case) of one neuron with the term's share of the case's top hook_post list."""
    out: list[Posting] = []
    nid = data.id
    for c in range(len(CASES)):
        weight = np.nan_to_num(np.abs(data.top_value[c, 0].astype(np.float64)), nan=0.0)
        filled = data.top_doc[c, 0] >= 0
        total = float(weight[filled].sum())
        if not filled.any():
            continue
        found: dict[str, list[float]] = {}
        for j in np.flatnonzero(filled):
            ids = data.window_tokens[c, 0, j]
            if ids[data.context_before] < 0:
                continue
            tokens = [vocab_text(int(t)) if t >= 0 else None for t in ids]
            for term in index_terms(tokens, data.context_before):
                entry = found.setdefault(term, [0.0, 0.0])
                entry[0] += weight[j]
                entry[1] = max(entry[1], float(weight[j]))
        for term, (mass, peak) in found.items():
            share = mass / total if total > 0 else 1.0 / filled.sum()
            out.append((term, -round(share, 3), -float(f"{peak:.4g}"), nid, c))
    return out


def write_sorted(items: list[Posting], path: Path) -> Path:
    """Postings sorted (by term, then rank) as JSON lines, for :func:`write_shards` to merge."""
    items.sort()
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(dumps(item) + "\n")
    return path


def _read(path: Path) -> Iterator[Posting]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield tuple(json.loads(line))  # type: ignore[misc]


def write_shards(runs: Iterable[Path], folder: Path) -> dict[str, int]:
    """Merge sorted posting runs into the shards and ``firsts.json`` under ``folder``; returns counts.
    Memory holds one term's postings and one shard at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    firsts: list[str] = []
    shard: dict[str, list] = {}
    size = 0
    terms = kept = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            (folder / f"{len(firsts) - 1}.json").write_text(dumps(shard), encoding="utf-8")
        shard, size = {}, 0

    current: str | None = None
    best: list = []

    def finish() -> None:
        nonlocal terms, kept
        if current is None:
            return
        entry = [[nid, c, -share, -peak] for _, share, peak, nid, c in best]
        cost = len(dumps(current)) + len(dumps(entry)) + 2
        if not firsts or (size + cost > SHARD_BYTES and shard):
            flush()
            firsts.append(current if firsts else "")
        shard[current] = entry
        add(cost)
        terms += 1
        kept += len(entry)

    def add(n: int) -> None:
        nonlocal size
        size += n

    for item in heapq.merge(*(_read(p) for p in runs)):
        if item[0] != current:
            finish()
            current, best = item[0], []
        if len(best) < POSTINGS:
            best.append(item)
    finish()
    flush()
    (folder / "firsts.json").write_text(dumps(firsts or [""]), encoding="utf-8")
    return {"terms": terms, "postings": kept, "shards": len(firsts)}
