"""``gluscope export``: an activations file as a Hugging Face dataset, one row per neuron.

The columns follow the paper's released activation dataset (``layer``, ``neuron``, ``{case}_freq``,
``{case}_{hook}_mean``, ``{case}_{hook}_max_values`` and ``{case}_{hook}_max_indices``, the top-k values
and the rows of the source dataset they come from), plus what our file adds. The dataset is written
with ``datasets`` as Parquet shards (one per layer) and a dataset card, the layout of a Hub dataset
repository, so ``datasets.load_dataset(FOLDER)`` reads it and ``huggingface-cli upload`` publishes it.

``datasets`` comes with the ``[collect]`` extra; the light package builds sites without it, so it is
imported here, when the command runs.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from mkdocs_gluscope.context import example_posts
from mkdocs_gluscope.effects import direct_effect
from mkdocs_gluscope.errors import GluscopeError
from mkdocs_gluscope.related import ACTIVATION_PART, FEEDS_READS, RELATED_DIRECTIONS, WEIGHTS_PART
from mkdocs_gluscope.render import display_name, hook_windows, json_text, md_text
from mkdocs_gluscope.schema import check_places
from mkdocs_gluscope.store import (CASES, HOOKS, VOCAB_DIRECTIONS, VOCAB_WEIGHTS, WEIGHT_NAMES, ActivationsFile,
                                   FormatError, neuron_id)

SPLIT = "train"


def _datasets():
    try:
        import datasets
    except ImportError:
        raise GluscopeError("gluscope export needs the [collect] extra (the datasets package is missing): "
                            "pip install 'gluscope[collect]'") from None
    return datasets


#: Per case, the explanation columns (files with ``explanations/``): name suffix -> (dataset, type).
EXPLANATION_COLUMNS = {"explanation": ("label", "string"), "explanation_method": ("method", "string"),
                       "explanation_score": ("score", "float32"), "explanation_precision": ("precision", "float32"),
                       "explanation_recall": ("recall", "float32"),
                       "explanation_scored_positions": ("scored_positions", "int64")}


def features(k: int, has_nonfinite: bool, bins: int | None = None, vocab_k: int | None = None,
             explanations: bool = False, effects: bool = False, related: tuple[str, ...] = ()) -> Any:
    """The dataset's column types, in column order (``bins``: the histograms' bins, in files with
    distributions; ``vocab_k``: tokens per vocabulary list, in files with ``vocab/``; ``explanations``:
    files with ``explanations/``; ``effects``: the examples' effects on the output; ``related``: the
    parts of ``related/`` the file has)."""
    datasets = _datasets()
    v = datasets.Value
    seq = datasets.Sequence
    cols: dict[str, Any] = {"layer": v("int32"), "neuron": v("int32")}
    for case in CASES:
        cols[f"{case}_freq"] = v("float64")
        cols[f"{case}_count"] = v("int64")
        for hook in HOOKS:
            cols[f"{case}_{hook}_mean"] = v("float64")
            cols[f"{case}_{hook}_min"] = v("float32")
            cols[f"{case}_{hook}_max"] = v("float32")
            cols[f"{case}_{hook}_max_values"] = seq(v("float32"), length=k)
            cols[f"{case}_{hook}_max_indices"] = seq(v("int64"), length=k)
            cols[f"{case}_{hook}_max_docs"] = seq(v("int32"), length=k)
            cols[f"{case}_{hook}_max_positions"] = seq(v("int32"), length=k)
    cols["flipped"] = v("bool")
    for name in WEIGHT_NAMES[1:]:
        cols[name] = v("float32")
    if has_nonfinite:
        cols["nonfinite"] = seq(v("int64"), length=len(CASES) + 1)
    if bins is not None:
        for case in CASES:
            for hook in HOOKS:
                cols[f"{case}_{hook}_hist"] = seq(v("int64"), length=bins)
    if vocab_k is not None:
        for weight in VOCAB_WEIGHTS:
            for direction in VOCAB_DIRECTIONS:
                cols[f"vocab_{weight}_{direction}_tokens"] = seq(v("int32"), length=vocab_k)
                cols[f"vocab_{weight}_{direction}_scores"] = seq(v("float32"), length=vocab_k)
    if explanations:
        for case in CASES:
            for suffix, (_, kind) in EXPLANATION_COLUMNS.items():
                cols[f"{case}_{suffix}"] = v(kind)
    if effects:
        for case in CASES:
            for hook in HOOKS:
                cols[f"{case}_{hook}_max_effects"] = seq(v("float32"), length=k)
                cols[f"{case}_{hook}_max_next_tokens"] = seq(v("int32"), length=k)
    if "feeds" in related:
        for read in FEEDS_READS:
            for direction in RELATED_DIRECTIONS:
                cols[f"related_feeds_{read}_{direction}"] = seq(v("string"))
                cols[f"related_feeds_{read}_{direction}_scores"] = seq(v("float32"))
    if "alike" in related:
        for direction in RELATED_DIRECTIONS:
            cols[f"related_alike_{direction}"] = seq(v("string"))
            cols[f"related_alike_{direction}_scores"] = seq(v("float32"))
    if "shared" in related:
        for case in CASES:
            cols[f"{case}_related_shared"] = seq(v("string"))
            cols[f"{case}_related_shared_cases"] = seq(v("string"))
            cols[f"{case}_related_shared_positions"] = seq(v("int32"))
            cols[f"{case}_related_shared_docs"] = seq(v("int32"))
    return datasets.Features(cols)


def related_parts(f: ActivationsFile) -> tuple[str, ...]:
    """Which parts of ``related/`` the file has: ``feeds``, ``alike``, ``shared``."""
    if "related" not in f.file:
        return ()
    group = f.file["related"]
    return tuple(part for part, names in (("feeds", WEIGHTS_PART[:3]), ("alike", WEIGHTS_PART[3:]),
                                          ("shared", ACTIVATION_PART)) if all(name in group for name in names))


def _ids(layer: np.ndarray, neuron: np.ndarray) -> list[list[str]]:
    """``LAYER.NEURON`` strings of each row's filled entries (layer -1: none)."""
    return [[neuron_id(int(a), int(b)) for a, b in zip(ls, ns) if a >= 0] for ls, ns in zip(layer, neuron)]


def _filled(values: np.ndarray, layer: np.ndarray) -> list[list]:
    return [[x for x, a in zip(vs, ls) if a >= 0] for vs, ls in zip(values.tolist(), layer)]


def effect_columns(f: ActivationsFile, row: int) -> dict[str, np.ndarray]:
    """``[N, C, H, k]`` effects and next tokens of one layer's top-k examples (NaN, -1 where unknown)."""
    g = lambda name: f.read(name, row, f"layer {f.layers[row]}")  # noqa: E731
    value, doc, pos = g("top/value"), g("top/doc"), g("top/pos")
    windows = hook_windows(g("top/gate"), g("top/in"), str(f.attrs.get("act_fn", "silu")))
    post = example_posts(value, windows["hook_post"], f.context_before)
    effects = direct_effect(post, f.final_scale_at(doc, pos), g("top/next_score"))
    safe = np.clip(doc, 0, f.n_docs - 1)
    at = f.doc_offsets[safe] + pos + 1
    has_next = (doc >= 0) & (at < f.doc_offsets[safe + 1])
    return {"effects": effects.effect.astype(np.float32),
            "next_tokens": np.where(has_next, f.tokens[np.where(has_next, at, 0)], -1).astype(np.int32)}


def layer_columns(f: ActivationsFile, layer: int) -> dict[str, Any]:
    """One layer's rows as columns (numpy arrays, neurons in order)."""
    row = f.row(layer)
    N = f.d_mlp
    label = f"layer {layer}"
    g = lambda name: f.read(name, row, label)  # noqa: E731
    count = g("stats/count")  # [N, C]
    total = g("stats/sum")
    low, high = g("stats/min"), g("stats/max")
    value, doc, pos = g("top/value"), g("top/doc"), g("top/pos")  # [N, C, H, k]
    check_places(f.where, "top", doc, pos, f.doc_lengths, label)
    source = f.read("corpus/source_index") if "source_index" in f.file["corpus"] else None
    # The paper's indices are rows of the source dataset; without a recorded source, this file's documents.
    index = np.where(doc >= 0, (source[np.clip(doc, 0, None)] if source is not None else doc), -1).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count[..., None]
    cols: dict[str, Any] = {"layer": np.full(N, layer, np.int32), "neuron": np.arange(N, dtype=np.int32)}
    for c, case in enumerate(CASES):
        cols[f"{case}_freq"] = count[:, c] / max(f.n_tokens, 1)
        cols[f"{case}_count"] = count[:, c]
        for h, hook in enumerate(HOOKS):
            cols[f"{case}_{hook}_mean"] = mean[:, c, h]
            cols[f"{case}_{hook}_min"] = low[:, c, h]
            cols[f"{case}_{hook}_max"] = high[:, c, h]
            cols[f"{case}_{hook}_max_values"] = value[:, c, h]
            cols[f"{case}_{hook}_max_indices"] = index[:, c, h]
            cols[f"{case}_{hook}_max_docs"] = doc[:, c, h]
            cols[f"{case}_{hook}_max_positions"] = pos[:, c, h]
    for name in WEIGHT_NAMES:
        cols[name] = f.weights(name)[row]
    if f.has_nonfinite:
        cols["nonfinite"] = g("stats/nonfinite")
    if f.has_distributions:
        hist = g("stats/hist")  # [N, C, H, B]
        for c, case in enumerate(CASES):
            for h, hook in enumerate(HOOKS):
                cols[f"{case}_{hook}_hist"] = hist[:, c, h]
    if "vocab" in f.file:
        token, score = g("vocab/token"), g("vocab/score")  # [N, 3, 2, K]
        for w, weight in enumerate(VOCAB_WEIGHTS):
            for d, direction in enumerate(VOCAB_DIRECTIONS):
                cols[f"vocab_{weight}_{direction}_tokens"] = token[:, w, d]
                cols[f"vocab_{weight}_{direction}_scores"] = score[:, w, d]
    if "explanations" in f.file:
        strings = ("label", "method")
        e = {name: (f.file[f"explanations/{name}"].asstr()[row] if name in strings else g(f"explanations/{name}"))
             for name, _ in EXPLANATION_COLUMNS.values()}  # [N, C]
        for c, case in enumerate(CASES):
            for suffix, (name, _) in EXPLANATION_COLUMNS.items():
                cols[f"{case}_{suffix}"] = list(e[name][:, c]) if name in strings else e[name][:, c]
    if f.has_effects:
        effects = effect_columns(f, row)
        for c, case in enumerate(CASES):
            for h, hook in enumerate(HOOKS):
                cols[f"{case}_{hook}_max_effects"] = effects["effects"][:, c, h]
                cols[f"{case}_{hook}_max_next_tokens"] = effects["next_tokens"][:, c, h]
    parts = related_parts(f)
    related = {name: g("related/" + name) for name in f.file["related"]} if parts else {}
    if "feeds" in parts:
        for r, read in enumerate(FEEDS_READS):
            for d, direction in enumerate(RELATED_DIRECTIONS):
                layer = related["feeds_layer"][:, r, d]
                cols[f"related_feeds_{read}_{direction}"] = _ids(layer, related["feeds_neuron"][:, r, d])
                cols[f"related_feeds_{read}_{direction}_scores"] = _filled(related["feeds_score"][:, r, d], layer)
    if "alike" in parts:
        for d, direction in enumerate(RELATED_DIRECTIONS):
            neuron = related["alike_neuron"][:, d]
            same = np.where(neuron >= 0, f.layers[row], -1)  # the same layer
            cols[f"related_alike_{direction}"] = _ids(same, neuron)
            cols[f"related_alike_{direction}_scores"] = _filled(related["alike_score"][:, d], same)
    if "shared" in parts:
        for c, case in enumerate(CASES):
            layer = related["shared_layer"][:, c]
            cols[f"{case}_related_shared"] = _ids(layer, related["shared_neuron"][:, c])
            cols[f"{case}_related_shared_cases"] = [[CASES[x] for x in xs] for xs in
                                                    _filled(related["shared_case"][:, c], layer)]
            cols[f"{case}_related_shared_positions"] = _filled(related["shared_positions"][:, c], layer)
            cols[f"{case}_related_shared_docs"] = _filled(related["shared_docs"][:, c], layer)
    return cols


def json_value(value: Any) -> Any:
    """An attribute as JSON can hold it: a NaN or infinite number as null (JSON has neither), lists
    item by item, anything that is not a number, string or bool by its text."""
    if isinstance(value, list):
        return [json_value(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value if value is None or isinstance(value, (bool, int, str)) else str(value)


def dataset_card(f: ActivationsFile, shards: str) -> str:
    """README.md of the dataset: the YAML header ``load_dataset`` reads, then what the columns mean.
    Provenance strings come from the file, so they go through :func:`render.md_text` like on a page."""
    a = f.attrs
    facts = {"model": display_name(a.get("model", "")), "dataset": display_name(a.get("dataset", "")),
             "counted tokens": f"{f.n_tokens:,}", "documents": f"{f.n_docs:,}", "k": str(f.k),
             "window": f"{f.context_before} before + 1 + {f.context_after} after",
             "layers": f.describe_layers(), "neurons per layer": f"{f.d_mlp:,}", "dtype": str(a.get("dtype", "")),
             "activation": str(a.get("act_fn", "silu")), "refactor_glu": str(a.get("refactor_glu", "")),
             "BOS": "included" if a.get("include_bos") else "excluded"}
    return "\n".join([
        "---", "configs:", "- config_name: default", "  data_files:", f"  - split: {SPLIT}", f"    path: {shards}",
        "license: mit", "tags:", "- interpretability", "- gluscope", "---", "",
        "# Neuron activations (GLUScope)", "",
        "One row per MLP neuron: for each sign case of (gate, in) its frequency, and for each hook within the case the "
        "mean, min, max and the top-k values with the rows of the source dataset they come from. Written by "
        "`gluscope export` from a `gluscope collect` activations file; the example windows stay in that file.", "",
        "| | |", "|---|---|", *[f"| {md_text(k)} | {md_text(v)} |" for k, v in facts.items() if v], "",
        f"Cases: {', '.join(f'`{c}`' for c in CASES)}. Hooks: {', '.join(f'`{h}`' for h in HOOKS)}. "
        "Columns `{case}_freq`, `{case}_{hook}_mean`, `{case}_{hook}_max_values` and `{case}_{hook}_max_indices` "
        "are those of the paper's released data; `{case}_count`, `{case}_{hook}_min`, `{case}_{hook}_max`, "
        "`{case}_{hook}_max_docs` (documents of the activations file), `{case}_{hook}_max_positions` (token "
        "positions, BOS = 0), `flipped`, `cos_gate_in`, `cos_gate_out`, `cos_in_out` and `nonfinite` are GLUScope's. "
        "Empty top-k slots have index, doc and position -1 and value NaN. Where the file has them, "
        "`{case}_{hook}_hist` counts the case's tokens per octave of |value| (edges 0, 2^-10, 2^-9, ..., 2^10, inf), "
        "and `vocab_{out,gate,in}_{top,bottom}_tokens` / `_scores` are the neuron's vocabulary projections "
        "(token ids of the model's tokenizer). Where the file has explanations, `{case}_explanation` is the case's "
        "label, `{case}_explanation_method` what wrote it, and `{case}_explanation_score` / `_precision` / `_recall` / "
        "`_scored_positions` how it scored by simulation against the model on held-out text (NaN, -1: not scored).",
        ""])


def export_dataset(activations: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write ``out/data/train-LLLLL-of-NNNNN.parquet`` (one per layer) and ``out/README.md``."""
    datasets = _datasets()
    out = Path(out)
    try:
        f = ActivationsFile(activations)
    except (FileNotFoundError, FormatError) as e:
        raise GluscopeError(str(e)) from None
    if out.exists() and any(out.iterdir()):
        f.close()
        raise GluscopeError(f"{str(out)!r} exists and is not empty; choose a new folder for the dataset")
    with f:
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "data").mkdir(parents=True)
        kinds = features(f.k, f.has_nonfinite, len(f.hist_edges) - 1 if f.has_distributions else None,
                         int(f.file["vocab/token"].shape[-1]) if "vocab" in f.file else None,
                         "explanations" in f.file, effects=f.has_effects, related=related_parts(f))
        n = len(f.layers)
        for i, layer in enumerate(f.layers):
            table = datasets.Dataset.from_dict(layer_columns(f, layer), features=kinds)
            table.to_parquet(str(tmp / "data" / f"{SPLIT}-{i:05d}-of-{n:05d}.parquet"))
        (tmp / "README.md").write_text(dataset_card(f, f"data/{SPLIT}-*.parquet"), encoding="utf-8")
        (tmp / "gluscope.json").write_text(json_text(
            # Local paths of the collector's machine are named by their last part, as on the site.
            {"cases": list(CASES), "hooks": list(HOOKS), "attrs": {
                k: display_name(v) if k in ("model", "dataset") and isinstance(v, str) else json_value(v)
                for k, v in f.attrs.items()}}), encoding="utf-8")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    return out
