"""Merging the files of a sharded collection into the file one run would have written.

Every shard (``gluscope collect --shard I/N``) tokenizes the same corpus and processes a disjoint
share of its documents (every N-th batch of one batch plan); :func:`check_shard_set` accepts only
a complete set of shards of one run, so statistics combine exactly: counts and sums add, extremes take the
extreme, and top-k lists merge under the same order (larger ``|value|`` first, then lower document
index). Only sums can differ from a single run, in their last bits (another order of additions).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from mkdocs_gluscope.errors import GluscopeError
from mkdocs_gluscope.store import STAT_NAMES, WEIGHT_NAMES, ActivationsFile, ActivationsWriter, FormatError

#: Attributes that must agree between shards: the same model, corpus and options, and the same
#: batch plan (``batch_tokens`` decides which documents each shard takes). The rest is provenance.
MUST_MATCH = ("model", "dataset", "text_column", "split", "k", "context_before", "context_after", "layers",
              "include_bos", "bos", "has_bos", "skip_positions", "refactor_glu", "act_fn", "dtype", "max_tokens",
              "max_doc_tokens", "long_docs", "seed", "n_docs", "window_dtype", "batch_tokens", "corpus_sha256")


def merge_top(values: np.ndarray, docs: np.ndarray, k: int) -> np.ndarray:
    """Indices along the last axis of the ``k`` best entries: ``|value|`` descending, then document
    ascending; unfilled entries (document -1) last."""
    magnitude = np.where(docs >= 0, np.abs(np.nan_to_num(values, nan=0.0)), -1.0)
    order = np.lexsort((docs, -magnitude), axis=-1)
    return order[..., :k]


def shard_of(f: ActivationsFile) -> tuple[int, int]:
    """``(I, N)`` of a file written by ``collect --shard I/N``; a GluscopeError for any other file."""
    text = str(f.attrs.get("shard", ""))
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise GluscopeError(
            f"{str(f.path)!r} is not a shard (its shard attribute is {text!r}); merge takes the files of "
            "one sharded run, each written by gluscope collect --shard I/N")
    return int(index), int(count)


def check_shard_set(files: Sequence[ActivationsFile]) -> None:
    """Accept exactly a complete, disjoint set of shards of one run: the same model, corpus and
    options, one shard count N, and each index 0..N-1 once. Anything else would count documents
    twice or leave some out, so the error names what is wrong."""
    first = files[0]
    seen: dict[int, ActivationsFile] = {}
    _, count = shard_of(first)
    for f in files:
        if not f.has_nonfinite:
            raise GluscopeError(f"{str(f.path)!r} was written by an older gluscope (no stats/nonfinite); "
                                "collect its shards again")
        index, n = shard_of(f)
        if n != count:
            raise GluscopeError(f"{str(f.path)!r} is shard {index}/{n} but {str(first.path)!r} is one of {count} "
                                "shards; only shards of one run can be merged")
        if index in seen:
            same = seen[index].path.resolve() == f.path.resolve()
            raise GluscopeError(
                f"{str(f.path)!r} is given twice" if same else
                f"{str(seen[index].path)!r} and {str(f.path)!r} are both shard {index}/{count}; each shard "
                "must be given once")
        seen[index] = f
        for key in MUST_MATCH:
            if first.attrs.get(key) != f.attrs.get(key):
                raise GluscopeError(
                    f"{str(f.path)!r} has {key}={f.attrs.get(key)!r} but {str(first.path)!r} has "
                    f"{first.attrs.get(key)!r}; only shards of one run can be merged")
        if not np.array_equal(first.doc_offsets, f.doc_offsets) or not np.array_equal(first.tokens, f.tokens):
            raise GluscopeError(f"{str(f.path)!r} holds another corpus than {str(first.path)!r}")
    missing = [f"{i}/{count}" for i in range(count) if i not in seen]
    if missing:
        raise GluscopeError(f"shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} missing: merge needs "
                            f"all {count} shards of the run")


def merge_files(inputs: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Merge the shard files of one run (same corpus, disjoint documents) into ``out``."""
    if len(inputs) < 2:
        raise GluscopeError(f"merge needs at least two files; got {len(inputs)}")
    files = []
    try:
        for path in inputs:
            try:
                files.append(ActivationsFile(path))
            except (FileNotFoundError, FormatError) as e:
                raise GluscopeError(str(e)) from None
        check_shard_set(files)
        return _write_merged(files, Path(out))
    finally:
        for f in files:
            f.close()


def _write_merged(files: list[ActivationsFile], out: Path) -> Path:
    first = files[0]
    k = first.k
    attrs = {key: value for key, value in first.attrs.items() if key not in ("n_tokens", "shard")}
    attrs["merged_from"] = [str(f.path) for f in files]
    attrs["merged_shards"] = len(files)
    window_dtype = str(first.file["top/gate"].dtype)
    with ActivationsWriter(out, n_layers=first.n_layers, d_mlp=first.d_mlp, k=k,
                           context_before=first.context_before, context_after=first.context_after,
                           window_dtype=window_dtype, attrs=attrs) as writer:
        corpus = first.file["corpus"]
        writer.write_corpus(first.tokens, first.doc_offsets, first.vocab,
                            source_index=corpus["source_index"][...] if "source_index" in corpus else None,
                            doc_title=[first.doc_title(d) or "" for d in range(first.n_docs)]
                            if "doc_title" in corpus else None)
        for row in range(first.n_layers):
            stats = [{name: f.file["stats"][name][row] for name in STAT_NAMES + ("nonfinite",)} for f in files]
            top = [{name: f.file["top"][name][row] for name in ("value", "doc", "pos", "gate", "in")} for f in files]
            values = np.concatenate([t["value"] for t in top], axis=-1)
            docs = np.concatenate([t["doc"] for t in top], axis=-1)
            pick = merge_top(values, docs, k)
            merged = {
                "count": sum(s["count"] for s in stats),
                "nonfinite": sum(s["nonfinite"] for s in stats),
                "sum": sum(s["sum"] for s in stats),
                # fmin/fmax skip the NaN of a case that is empty in one shard.
                "min": np.fmin.reduce([s["min"] for s in stats]),
                "max": np.fmax.reduce([s["max"] for s in stats]),
            }
            for name in ("value", "doc", "pos"):
                merged["top_" + name] = np.take_along_axis(
                    np.concatenate([t[name] for t in top], axis=-1), pick, axis=-1)
            for name in ("gate", "in"):
                windows = np.concatenate([t[name] for t in top], axis=-2)
                merged["top_" + name] = np.take_along_axis(windows, pick[..., None], axis=-2)
            writer.write_layer(row, merged)
        writer.write_weights({name: first.weights(name) for name in WEIGHT_NAMES})
        return writer.close(n_tokens=sum(f.n_tokens for f in files))
