"""Merging the files of a sharded or layer-split collection into the file one run would have written.

Two kinds of split combine, also together:

* **shards** (``gluscope collect --shard I/N``): every shard tokenizes the same corpus and processes
  a disjoint share of its documents (every N-th batch of one batch plan), so statistics combine
  exactly: counts and sums add, extremes take the extreme, and top-k lists merge under the same
  order (larger ``|value|`` first, then lower document index). Only sums can differ from a single
  run, in their last bits (another order of additions).
* **layer groups** (``--layers``, and for mixture-of-experts layers ``--experts``): runs over the same
  corpus with disjoint sets of neurons (e.g. to fit a large model's statistics on a small card: whole
  layers, or ranges of experts of the same layers) are stacked along the layer axis, and their
  expert rows in (layer, expert) order, as one run writes them.

Files with distributions (``stats/hist``, ``stats/density``, ``samples/``, ``bands/``) merge exactly
too: histograms add, and every ``samples/`` and ``bands/`` list keeps the positions of lowest
sampling priority (:func:`~mkdocs_gluscope.distributions.position_priority`) among the shards'
entries, which is the list one run over all documents keeps. ``vocab/`` comes from the weights, so
every shard holds the same: it is copied, and checked equal.

:func:`check_inputs` accepts only inputs that together cover every (layer, document) exactly once.
The merge streams :data:`~mkdocs_gluscope.store.NEURON_BLOCK` neurons of one layer at a time, so its
memory does not grow with the model: ``bench/merge_memory.py`` measured a peak of 186 MiB for 4
shards (k = 16, W = 19, float16 windows) at 2,048 and at 4,096 neurons per layer alike, about 46 MiB
per input file; a 70B-shaped file (80 layers x 28,672 neurons) merges in the same memory. With
distributions (8 samples per case, 2 per band, ``--samples 8``) the peak is 293 MiB at 2,048 and
at 8,192 neurons per layer alike.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from mkdocs_gluscope.distributions import EMPTY_PRIORITY, document_pieces, position_priority
from mkdocs_gluscope.errors import GluscopeError
from mkdocs_gluscope.explanations import has_explanations
from mkdocs_gluscope.schema import check_places
from mkdocs_gluscope.store import (
    EXAMPLE_PARTS,
    EXPERT_GROUPS,
    NEURON_BLOCK,
    STAT_NAMES,
    WEIGHT_NAMES,
    ActivationsFile,
    ActivationsWriter,
    FormatError,
    SHARED,
)

#: Attributes that must agree between shards: the same model, corpus and options, and the same
#: batch plan (``batch_tokens`` decides which documents each shard takes). The rest is provenance.
MUST_MATCH = ("model", "dataset", "text_column", "split", "k", "context_before", "context_after",
              "include_bos", "bos", "has_bos", "skip_positions", "refactor_glu", "act_fn", "dtype", "max_tokens",
              "max_doc_tokens", "long_docs", "seed", "n_docs", "window_dtype", "batch_tokens", "corpus_sha256",
              "samples", "band_samples")
#: Example lists that keep the positions of lowest sampling priority: ``samples/`` and ``bands/``.
EXAMPLE_GROUPS = ("samples", "bands")


def merge_top(values: np.ndarray, docs: np.ndarray, k: int) -> np.ndarray:
    """Indices along the last axis of the ``k`` best entries: ``|value|`` descending, then document
    ascending; unfilled entries (document -1) last."""
    magnitude = np.where(docs >= 0, np.abs(np.nan_to_num(values, nan=0.0)), -1.0)
    order = np.lexsort((docs, -magnitude), axis=-1)
    return order[..., :k]


class Priority:
    """Sampling priority of a file's examples: :func:`position_priority` of (the file's ``seed``, the
    document's source row and piece, the position), from ``corpus/source_index`` (each document its
    own row where a file has none)."""

    def __init__(self, f: ActivationsFile) -> None:
        corpus = f.file["corpus"]
        self.seed = int(f.attrs.get("seed", 0))
        self.source = (f.read("corpus/source_index").astype(np.int64) if "source_index" in corpus
                       else np.arange(f.n_docs))
        self.piece = document_pieces(self.source)

    def __call__(self, doc: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """int64 priorities, shaped like ``doc``; :data:`EMPTY_PRIORITY` (after every real one) where doc = -1."""
        real = doc >= 0
        d = np.where(real, doc, 0)
        priority = position_priority(self.seed, self.source[d], self.piece[d], np.asarray(pos, dtype=np.int64))
        return np.where(real, priority, EMPTY_PRIORITY)


def merge_examples(parts: Sequence[dict[str, np.ndarray]], size: int, priority: Priority) -> dict[str, np.ndarray]:
    """``samples/`` or ``bands/`` lists of one block of neurons from every shard, merged: each list
    keeps the ``size`` entries of lowest priority (ties: lower document, then lower position), in
    ascending priority, empty slots last. ``parts`` hold :data:`EXAMPLE_PARTS` as the datasets do
    (``doc``/``pos`` ``[n, C, *E, S]``, ``value`` ``[n, C, H, *E, S]``, windows ``[n, C, *E, S, W]``)."""
    doc = np.concatenate([p["doc"] for p in parts], axis=-1)
    pos = np.concatenate([p["pos"] for p in parts], axis=-1)
    pick = np.lexsort((pos, doc, priority(doc, pos)), axis=-1)[..., :size]
    merged = {"doc": np.take_along_axis(doc, pick, -1), "pos": np.take_along_axis(pos, pick, -1)}
    # value has the hook axis after the case axis: the same pick for every hook.
    merged["value"] = np.take_along_axis(np.concatenate([p["value"] for p in parts], axis=-1),
                                         np.expand_dims(pick, 2), -1)
    for name in ("gate", "in"):
        merged[name] = np.take_along_axis(np.concatenate([p[name] for p in parts], axis=-2), pick[..., None], -2)
    return merged


def shard_of(f: ActivationsFile) -> tuple[int, int]:
    """``(I, N)`` of a file written by ``collect --shard I/N``; a GluscopeError for any other file."""
    text = str(f.attrs.get("shard", ""))
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise GluscopeError(
            f"{str(f.path)!r} is not a shard (its shard attribute is {text!r}); merge takes the files of "
            "one sharded run, each written by gluscope collect --shard I/N")
    return int(index), int(count)


def check_same_run(files: Sequence[ActivationsFile]) -> None:
    """The same model, corpus (token for token) and options in every file; only ``layers`` and
    ``shard`` may differ."""
    first = files[0]
    for f in files:
        if not f.has_nonfinite:
            raise GluscopeError(f"{str(f.path)!r} was written by an older gluscope (no stats/nonfinite); "
                                "collect it again")
        if f.has_distributions != first.has_distributions:
            with_, without = (f, first) if f.has_distributions else (first, f)
            raise GluscopeError(f"{str(with_.path)!r} has distributions (stats/hist, samples/, bands/) but "
                                f"{str(without.path)!r} has none; only files of one run can be merged")
        if f.has_effects != first.has_effects:
            with_, without = (f, first) if f.has_effects else (first, f)
            raise GluscopeError(f"{str(with_.path)!r} has effects (corpus/final_scale, top/next_score) but "
                                f"{str(without.path)!r} has none (collected with --no-effects?); only files of one "
                                "run can be merged")
        for key in MUST_MATCH:
            if first.attrs.get(key) != f.attrs.get(key):
                raise GluscopeError(
                    f"{str(f.path)!r} has {key}={f.attrs.get(key)!r} but {str(first.path)!r} has "
                    f"{first.attrs.get(key)!r}; only files of one run can be merged")
        if not np.array_equal(first.doc_offsets, f.doc_offsets) or not np.array_equal(first.tokens, f.tokens):
            raise GluscopeError(f"{str(f.path)!r} holds another corpus than {str(first.path)!r}")
        for group in ("",) + EXPERT_GROUPS:
            if not (_has_rows(f, group) and _has_rows(first, group)):
                continue  # layer groups may differ in which rows they have
            if _has_vocab(f, group) != _has_vocab(first, group):
                with_, without = (f, first) if _has_vocab(f, group) else (first, f)
                raise GluscopeError(f"{str(with_.path)!r} has {group + '/' if group else ''}vocab/ but "
                                    f"{str(without.path)!r} has none; only files of one run can be merged")


def _has_rows(f: ActivationsFile, group: str) -> bool:
    return f.n_layers > 0 if not group else group in f.file and f.file[group]["layer"].shape[0] > 0


def _has_vocab(f: ActivationsFile, group: str) -> bool:
    return (group + "/vocab" if group else "vocab") in f.file


def check_shard_set(files: Sequence[ActivationsFile]) -> None:
    """A complete, disjoint set of shards: one shard count N, and each index 0..N-1 once (or a
    single file of the whole corpus). Anything else would count documents twice or leave some
    out, so the error names what is wrong."""
    if len(files) == 1 and not files[0].attrs.get("shard"):
        return
    first = files[0]
    seen: dict[int, ActivationsFile] = {}
    _, count = shard_of(first)
    for f in files:
        index, n = shard_of(f)
        if n != count:
            raise GluscopeError(f"{str(f.path)!r} is shard {index}/{n} but {str(first.path)!r} is one of {count} "
                                "shards; only shards of one run can be merged")
        if index in seen:
            raise GluscopeError(f"{str(seen[index].path)!r} and {str(f.path)!r} are both shard {index}/{count}; "
                                "each shard must be given once")
        seen[index] = f
    missing = [f"{i}/{count}" for i in range(count) if i not in seen]
    if missing:
        raise GluscopeError(f"shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} missing: merge needs "
                            f"all {count} shards of the run (layers {first.describe_layers()})")


def _units(f: ActivationsFile) -> tuple:
    """What a file holds: its dense layers, and its experts by (layer, expert)."""
    return tuple([(layer, -1) for layer in f.layers]
                 + sorted((layer, -2 if e == SHARED else int(e)) for layer, e in f.expert_rows))


def _unit_name(unit: tuple[int, int]) -> str:
    layer, expert = unit
    return f"layer {layer}" if expert == -1 else f"layer {layer}'s expert {'s' if expert == -2 else expert}"


def check_inputs(files: Sequence[ActivationsFile]) -> list[list[ActivationsFile]]:
    """The inputs as groups of files of the same neurons (shards of one ``--layers``/``--experts``
    run), in layer order: accepted when every (neuron, document) is covered exactly once, else a
    GluscopeError naming the problem."""
    paths: dict[Path, ActivationsFile] = {}
    for f in files:
        if f.path.resolve() in paths:
            raise GluscopeError(f"{str(f.path)!r} is given twice")
        paths[f.path.resolve()] = f
        if has_explanations(f):
            # Explanations are written from a whole file's examples and scored per neuron: nothing to merge.
            raise GluscopeError(f"{str(f.path)!r} holds explanations (gluscope explain); merge the collection's files "
                                "first, then explain the merged file")
    check_same_run(files)
    groups: dict[tuple, list[ActivationsFile]] = {}
    for f in files:
        # A group is one run's neurons: its dense layers and its experts (shards hold the same).
        groups.setdefault(_units(f), []).append(f)
    owner: dict[tuple[int, int], ActivationsFile] = {}
    for units, group in groups.items():
        for unit in units:
            if unit in owner:
                raise GluscopeError(
                    f"{str(owner[unit].path)!r} (layers {owner[unit].describe_layers()}) and {str(group[0].path)!r} "
                    f"(layers {group[0].describe_layers()}) both hold {_unit_name(unit)}; files of one run merge "
                    "when they are shards of the same layers and experts or hold disjoint ones")
            owner[unit] = group[0]
        check_shard_set(group)
    ordered = sorted(groups.values(), key=lambda g: min(_units(g[0])))
    tokens = {sum(f.n_tokens for f in group) for group in ordered}
    if len(tokens) > 1:
        raise GluscopeError(f"the layer groups counted different numbers of tokens ({sorted(tokens)}); "
                            "they are not runs over the same corpus")
    return ordered


def merge_files(inputs: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Merge the files of one run (shards, layer groups, or both) into ``out``."""
    if len(inputs) < 2:
        raise GluscopeError(f"merge needs at least two files; got {len(inputs)}")
    files = []
    try:
        for path in inputs:
            try:
                files.append(ActivationsFile(path))
            except (FileNotFoundError, FormatError) as e:
                raise GluscopeError(str(e)) from None
        return _write_merged(check_inputs(files), Path(out))
    finally:
        for f in files:
            f.close()


def merge_block(blocks: Sequence[dict[str, np.ndarray]], k: int, priority: Priority | None = None,
                sizes: tuple[int, int] = (0, 0)) -> dict[str, np.ndarray]:
    """The statistics of one block of neurons from every shard, combined: each input holds the
    datasets' values for the same neurons, keyed as :meth:`ActivationsWriter.write_layer` takes them.
    Blocks with distributions need the corpus's ``priority`` and ``sizes`` = (samples, band_samples)."""
    pick = merge_top(np.concatenate([b["top_value"] for b in blocks], axis=-1),
                     np.concatenate([b["top_doc"] for b in blocks], axis=-1), k)
    merged = {
        "count": sum(b["count"] for b in blocks),
        "nonfinite": sum(b["nonfinite"] for b in blocks),
        "sum": sum(b["sum"] for b in blocks),
        # fmin/fmax skip the NaN of a case that is empty in one shard.
        "min": np.fmin.reduce([b["min"] for b in blocks]),
        "max": np.fmax.reduce([b["max"] for b in blocks]),
    }
    for name in ("top_value", "top_doc", "top_pos") + (("top_next_score",) if "top_next_score" in blocks[0] else ()):
        merged[name] = np.take_along_axis(np.concatenate([b[name] for b in blocks], axis=-1), pick, axis=-1)
    for name in ("top_gate", "top_in"):
        windows = np.concatenate([b[name] for b in blocks], axis=-2)
        merged[name] = np.take_along_axis(windows, pick[..., None], axis=-2)
    if "hist" in blocks[0]:
        merged["hist"] = sum(b["hist"] for b in blocks)
        merged["density"] = sum(b["density"] for b in blocks)
        for group, size in zip(EXAMPLE_GROUPS, sizes):
            parts = [{name: b[f"{group}_{name}"] for name in EXAMPLE_PARTS} for b in blocks]
            merged.update({f"{group}_{name}": value
                           for name, value in merge_examples(parts, size, priority).items()})
    return merged


def _read_block(f: ActivationsFile, row: int, neurons: slice, group: str = "") -> dict[str, np.ndarray]:
    """One block of neurons of one row (of ``group``), keyed as :meth:`ActivationsWriter.write_layer`
    takes them; every example checked to be inside its document (a damaged file is one error line)."""
    prefix = group + "/" if group else ""
    label = f"{prefix or 'layer '}row {row}, neurons {neurons.start}..{neurons.stop - 1}"
    read = lambda name: f.read(prefix + name, (row, neurons), label)  # noqa: E731
    block = {name: read("stats/" + name) for name in STAT_NAMES + ("nonfinite",)}
    block.update({"top_" + name: read("top/" + name) for name in ("value", "doc", "pos", "gate", "in")})
    if "next_score" in f.file[prefix + "top"]:  # each example's effect (dense rows): travels with its example
        block["top_next_score"] = read("top/next_score")
    lists = ["top"]
    if "hist" in f.file[prefix + "stats"]:
        block.update({name: read("stats/" + name) for name in ("hist", "density")})
        block.update({f"{kind}_{name}": read(f"{kind}/{name}") for kind in EXAMPLE_GROUPS for name in EXAMPLE_PARTS})
        lists += EXAMPLE_GROUPS
    for kind in lists:
        check_places(f.where, prefix + kind, block[f"{kind}_doc"], block[f"{kind}_pos"], f.doc_lengths, label)
    return block


class _Merger:
    """What every block's merge needs: k, the sampling priority and list sizes of the run."""

    def __init__(self, first: ActivationsFile) -> None:
        self.k = first.k
        self.distributions = first.has_distributions
        self.priority = Priority(first) if self.distributions else None
        self.sizes = (int(first.attrs["samples"]), int(first.attrs["band_samples"])) if self.distributions else (0, 0)

    def __call__(self, blocks: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return blocks[0] if len(blocks) == 1 else merge_block(blocks, self.k, self.priority, self.sizes)


def _copy_vocab(writer: ActivationsWriter, rows: list[tuple[list[ActivationsFile], int]], group: str = "") -> None:
    """``vocab/`` of the output's rows, in order: ``rows`` gives each one's shards and row in them.
    Streamed by blocks of neurons; every shard must hold the same projections (they come from the
    weights), else the shards are not of one run."""
    name = group + "/vocab" if group else "vocab"
    if not rows or name not in rows[0][0][0].file:
        return
    out = writer.file.require_group(name)
    for part in ("token", "score"):
        source = rows[0][0][0].file[name][part]
        out.create_dataset(part, (len(rows),) + source.shape[1:], source.dtype, chunks=source.chunks,
                           compression=source.compression, compression_opts=source.compression_opts,
                           shuffle=source.shuffle)
    n = out["token"].shape[1]
    for out_row, (files, row) in enumerate(rows):
        for start in range(0, n, NEURON_BLOCK):
            neurons = slice(start, min(start + NEURON_BLOCK, n))
            for part in ("token", "score"):
                values = [f.read(f"{name}/{part}", (row, neurons)) for f in files]
                for f, value in zip(files[1:], values[1:]):
                    if not np.array_equal(values[0], value, equal_nan=value.dtype.kind == "f"):
                        raise GluscopeError(
                            f"{str(f.path)!r} and {str(files[0].path)!r} hold different {name}/{part} (row {row}); "
                            "vocab/ comes from the weights, so the files are not shards of one run")
                out[part][out_row, neurons] = values[0]


def _write_merged_experts(writer: ActivationsWriter, groups: list[list[ActivationsFile]], merger: _Merger) -> None:
    """The expert groups: rows of every layer group in layer order; within a layer group the shards'
    statistics merge as the dense layers' do, and their routed counts add."""
    for name in EXPERT_GROUPS:
        parts = [group for group in groups if name in group[0].file]
        if not parts:
            continue
        # One run writes the rows by layer, then expert: groups of experts interleave into that order.
        rows = sorted(((group, row) for group in parts for row in range(group[0].file[name]["layer"].shape[0])),
                      key=lambda gr: (int(gr[0][0].file[name]["layer"][gr[1]]), int(gr[0][0].file[name]["expert"][gr[1]])))
        d = parts[0][0].file[name]["stats/count"].shape[1]
        writer.add_experts(name, [int(g[0].file[name]["layer"][r]) for g, r in rows],
                           [int(g[0].file[name]["expert"][r]) for g, r in rows],
                           [sum(int(f.file[name]["routed"][r]) for f in g) for g, r in rows], d)
        for out_row, (group, row) in enumerate(rows):
            for start in range(0, d, NEURON_BLOCK):
                neurons = slice(start, min(start + NEURON_BLOCK, d))
                blocks = [_read_block(f, row, neurons, name) for f in group]
                writer.write_neurons(out_row, start, merger(blocks), group=name)
        writer.write_weights({w: np.stack([g[0].file[name]["weights"][w][r] for g, r in rows]) for w in WEIGHT_NAMES},
                             group=name)
        _copy_vocab(writer, rows, name)


def _write_merged(groups: list[list[ActivationsFile]], out: Path) -> Path:
    files = [f for group in groups for f in group]
    first = files[0]
    # Dense rows in layer order, each with the group that holds it.
    dense_rows = sorted(((layer, group, row) for group in groups for row, layer in enumerate(group[0].layers)),
                        key=lambda x: x[0])
    layers = [layer for layer, _, _ in dense_rows]
    d_mlp = dense_rows[0][1][0].d_mlp if dense_rows else 0
    attrs = {key: value for key, value in first.attrs.items() if key not in ("n_tokens", "shard")}
    attrs.update(layers=layers, merged_from=[str(f.path) for f in files], merged_shards=len(files))
    expert_layers = sorted({layer for group in groups for layer in group[0].expert_layers})
    if expert_layers:
        attrs["expert_layers"] = expert_layers
        # Per expert layer, as each layer group recorded it (files before n_experts_per_layer have none).
        counts: dict[int, int] = {}
        for group in groups:
            a = group[0].attrs
            counts.update(zip(a.get("expert_layers", []), a.get("n_experts_per_layer", [])))
        attrs.pop("n_experts_per_layer", None)
        if all(layer in counts for layer in expert_layers):
            attrs["n_experts_per_layer"] = [counts[layer] for layer in expert_layers]
        distinct = sorted({n for group in groups for n in group[0].attrs.get("n_experts", [])})
        if distinct:
            attrs["n_experts"] = distinct  # the older attribute: the distinct counts, of every group
    window_dtype = str(first.file["top/gate"].dtype)
    merger = _Merger(first)
    with ActivationsWriter(out, n_layers=len(layers), d_mlp=d_mlp, k=first.k,
                           context_before=first.context_before, context_after=first.context_after,
                           window_dtype=window_dtype, attrs=attrs, samples=merger.sizes[0],
                           band_samples=merger.sizes[1]) as writer:
        corpus = first.file["corpus"]
        writer.write_corpus(first.tokens, first.doc_offsets, first.vocab,
                            source_index=first.read("corpus/source_index") if "source_index" in corpus else None,
                            doc_title=[first.doc_title(d) or "" for d in range(first.n_docs)]
                            if "doc_title" in corpus else None)
        if first.has_effects:  # shards cover disjoint documents (NaN elsewhere); layer groups the same ones
            writer.add_effects(np.fmax.reduce([f.read("corpus/final_scale") for f in files]),
                               str(first.attrs.get("effect_norm", "")))
        for out_row, (_, group, row) in enumerate(dense_rows):
            for start in range(0, d_mlp, NEURON_BLOCK):
                neurons = slice(start, min(start + NEURON_BLOCK, d_mlp))
                blocks = [_read_block(f, row, neurons) for f in group]
                writer.write_neurons(out_row, start, merger(blocks))
        if dense_rows:
            writer.write_weights({name: np.stack([group[0].weights(name)[row] for _, group, row in dense_rows])
                                  for name in WEIGHT_NAMES})
            _copy_vocab(writer, [(group, row) for _, group, row in dense_rows])
        _write_merged_experts(writer, groups, merger)
        return writer.close(n_tokens=sum(f.n_tokens for f in groups[0]))
