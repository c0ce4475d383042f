"""Merging the files of a sharded collection into the file one run would have written.

Every shard (``gluscope collect --shard I/N``) tokenizes the same corpus and processes a disjoint
share of its documents, so statistics combine exactly: counts and sums add, extremes take the
extreme, and top-k lists merge under the same order (larger ``|value|`` first, then lower document
index). Only sums can differ from a single run, in their last bits (another order of additions).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from mkdocs_gluscope.errors import GluscopeError
from mkdocs_gluscope.store import WEIGHT_NAMES, ActivationsFile, ActivationsWriter, FormatError

#: Attributes that must agree between shards (the rest is provenance that may differ).
MUST_MATCH = ("model", "dataset", "k", "context_before", "context_after", "layers", "include_bos", "refactor_glu",
              "dtype", "max_tokens", "max_doc_tokens", "long_docs", "seed", "n_docs", "window_dtype")


def merge_top(values: np.ndarray, docs: np.ndarray, k: int) -> np.ndarray:
    """Indices along the last axis of the ``k`` best entries: ``|value|`` descending, then document
    ascending; unfilled entries (document -1) last."""
    magnitude = np.where(docs >= 0, np.abs(np.nan_to_num(values, nan=0.0)), -1.0)
    order = np.lexsort((docs, -magnitude), axis=-1)
    return order[..., :k]


def merge_files(inputs: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Merge shard files (same corpus, disjoint documents) into ``out``."""
    if len(inputs) < 2:
        raise GluscopeError(f"merge needs at least two files; got {len(inputs)}")
    files = []
    try:
        for path in inputs:
            try:
                files.append(ActivationsFile(path))
            except (FileNotFoundError, FormatError) as e:
                raise GluscopeError(str(e)) from None
        first = files[0]
        for other in files[1:]:
            for key in MUST_MATCH:
                if first.attrs.get(key) != other.attrs.get(key):
                    raise GluscopeError(
                        f"{str(other.path)!r} has {key}={other.attrs.get(key)!r} but {str(first.path)!r} has "
                        f"{first.attrs.get(key)!r}; only shards of one run can be merged")
            if not np.array_equal(first.doc_offsets, other.doc_offsets) or not np.array_equal(
                    first.tokens, other.tokens):
                raise GluscopeError(f"{str(other.path)!r} holds another corpus than {str(first.path)!r}")
        return _write_merged(files, Path(out))
    finally:
        for f in files:
            f.close()


def _write_merged(files: list[ActivationsFile], out: Path) -> Path:
    first = files[0]
    k = first.k
    attrs = {key: value for key, value in first.attrs.items() if key not in ("n_tokens", "shard")}
    attrs["merged_from"] = [str(f.path) for f in files]
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
            stats = [{name: f.file["stats"][name][row] for name in ("count", "sum", "min", "max")} for f in files]
            top = [{name: f.file["top"][name][row] for name in ("value", "doc", "pos", "gate", "in")} for f in files]
            values = np.concatenate([t["value"] for t in top], axis=-1)
            docs = np.concatenate([t["doc"] for t in top], axis=-1)
            pick = merge_top(values, docs, k)
            merged = {
                "count": sum(s["count"] for s in stats),
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
