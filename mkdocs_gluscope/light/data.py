"""A light site's data files: every neuron's page data and the corpus as Parquet, read by HTTP range requests.

Layout (documented for other readers in ``site_src/data-format.md``, "The site's data files"); ``D`` is
the data folder, beside the site (``{url_prefix}/data/``) or at the ``data_url`` a site names:

* ``D/neurons/L{layer}/{part}.parquet`` (an expert's: ``L{layer}/E{expert}/`` or ``L{layer}/S/``): the
  listed neurons ``NEURONS_PER_FILE * part`` up to the next part, **one row group per neuron**, so a
  page reads the file's footer and then one contiguous range. Columns: :data:`NEURON_SCHEMA`.
* ``D/corpus/{part}.parquet``: documents ``DOCS_PER_FILE * part`` up to the next part, one row group
  per document (row ``doc % DOCS_PER_FILE``): ``doc``, ``title``, ``tokens`` (display strings).

Why these shapes (bench/site_scale.py, ``--olmo``): a page of a 7B model's neuron must show within a
second while reading little. A Parquet reader reads a file's footer first; with one row group per
neuron the footer grows by about 60 bytes per column and neuron, so a file holds few neurons and
the columns are few. Example windows are 7-bit codes (:func:`encode_windows`), ZSTD-compressed:
the gate and in values of every token of every example are the bulk of a neuron's data, and 8-bit
codes or float16 made a 7B model's data files 12% or 80% larger. The distributions' counts are codes
too (:func:`encode_counts`), within 4.4%.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from mkdocs_gluscope.activations import act_values
from mkdocs_gluscope.store import CASES, HOOKS, NONFINITE_COLUMNS, NeuronData, first_counted_position

#: Neurons per data file: each one a row group (the footer a page reads grows with it).
NEURONS_PER_FILE = 16
#: Documents per corpus file: each one a row group.
DOCS_PER_FILE = 8
#: Window codes: a sign and CODE_STEPS logarithmic steps over CODE_OCTAVES octaves below the largest
#: |value| of the example's case (gate and in apart): steps of 12.2%, so a value is within 6.1%, a color
#: at most one level of ten off. (63 steps, within 4.6%, made a 7B model's data 4% larger and over budget.)
CODE_STEPS = 48
CODE_OCTAVES = 8
NAN_CODE = -64
#: ZSTD level of the data files (pyarrow's default; level 9 was under 2% smaller and slower to write).
ZSTD_LEVEL = 3
#: ``summary`` column: name and length of each part, in order.
SUMMARY_PARTS: tuple[tuple[str, int], ...] = (
    ("count", 4), ("sum", 16), ("min", 16), ("max", 16), ("nonfinite", len(NONFINITE_COLUMNS)),
    ("cos", 3), ("flipped", 1), ("telling", 1), ("routed", 1))
SUMMARY_LENGTH = sum(n for _, n in SUMMARY_PARTS)


def neuron_schema():
    """The neuron files' columns (pyarrow is imported here: only a light site needs it)."""
    import pyarrow as pa

    return pa.schema([
        ("neuron", pa.int32()),  # the neuron's index in its layer (or expert)
        ("summary", pa.list_(pa.float64())),  # SUMMARY_PARTS, flattened [case, hook] where 2-D
        ("dist", pa.binary()),  # uint8 count codes (encode_counts) of stats/hist [C, H, B], then stats/density [G, G]
        ("lists", pa.list_(pa.int16())),  # example of every list slot: top [C,H,k], samples [C,S], bands [C,R,S2]
        # each slot's value (top: the list's hook; samples and bands: post), then [C, 2]: the largest |gate|
        # and |in| over each case's windows, the scale of its window codes
        ("values", pa.list_(pa.float32())),
        ("place", pa.list_(pa.int32())),  # each distinct example's document (ascending), then its position
        ("window", pa.binary()),  # int8 codes [2 (gate, in), examples, W]: encode_windows
        # effects (files that have them; else empty): each distinct example's final-norm scale s, then the out
        # score of the token after it (its effect on that token's logit is post * s * score)
        ("effect", pa.list_(pa.float32())),
        ("context", pa.string()),  # related neurons and the out lists as JSON (context.light_context); "" where none
    ])


def corpus_schema():
    import pyarrow as pa

    return pa.schema([("doc", pa.int32()), ("title", pa.string()), ("tokens", pa.list_(pa.string()))])


def encode_windows(values: np.ndarray, largest: np.ndarray | float) -> np.ndarray:
    """``values`` as int8 codes relative to ``largest`` (broadcast against them): 0 for 0 and anything below
    the smallest step, :data:`NAN_CODE` for NaN, else ``sign * clip(round(CODE_STEPS + log2(|v| / largest)
    * CODE_STEPS / CODE_OCTAVES), 1, CODE_STEPS)`` (values beyond ``largest`` clip to it)."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        steps = np.rint(CODE_STEPS + np.log2(np.abs(values) / largest) * CODE_STEPS / CODE_OCTAVES)
        # NaN and infinite steps (NaN, 0 or infinite values) and steps below 1 are code 0; the sign is the value's
        magnitude = np.where((steps >= 1) & (steps < np.inf), np.minimum(steps, CODE_STEPS), 0)
    codes = np.copysign(magnitude, values).astype(np.int8)
    codes[np.isnan(values)] = NAN_CODE
    return codes


#: Count codes of the distributions: steps of an eighth of an octave (counts within 4.4%).
COUNT_STEPS = 8


def encode_counts(counts: np.ndarray) -> np.ndarray:
    """Counts as uint8 codes: 0 for 0, else ``1 + round(COUNT_STEPS * log2(n))`` (at most 255: counts
    above 3.6e9 clip). A light page's figures need their shape, not every token: a few hundred bytes a
    neuron where exact counts took 1.7 KB (the activations file keeps them exact)."""
    counts = np.asarray(counts, dtype=np.float64)
    with np.errstate(divide="ignore"):
        codes = np.where(counts > 0, 1 + np.rint(COUNT_STEPS * np.log2(np.maximum(counts, 1))), 0)
    return np.minimum(codes, 255).astype(np.uint8)


def decode_counts(codes: np.ndarray) -> np.ndarray:
    """The counts codes stand for, to three significant digits (what ``light.js`` shows)."""
    codes = np.asarray(codes, dtype=np.float64)
    n = np.where(codes > 0, np.exp2((codes - 1) / COUNT_STEPS), 0.0)
    unit = 10.0 ** (np.floor(np.log10(np.maximum(n, 1))) - 2)
    # floor(x + 0.5): JavaScript's Math.round, which rules.js's countOf uses
    return np.where(n < 1000, np.floor(n + 0.5), np.floor(n / unit + 0.5) * unit).astype(np.int64)


def decode_windows(codes: np.ndarray, largest: np.ndarray | float) -> np.ndarray:
    """The values codes stand for (``gluscope.js`` computes the same)."""
    codes = np.asarray(codes, dtype=np.float64)
    values = np.sign(codes) * largest * np.exp2((np.abs(codes) - CODE_STEPS) * CODE_OCTAVES / CODE_STEPS)
    return np.where(codes == NAN_CODE, np.nan, np.where(codes == 0, 0.0, values))


@dataclass(frozen=True)
class Shown:
    """Examples a light page shows per list: top-k lists, random samples and band samples (the
    ``examples`` option limits each, as on full pages)."""

    top: int
    samples: int
    bands: int

    @classmethod
    def of(cls, data: NeuronData, examples: int | None) -> "Shown":
        def limit(n: int) -> int:
            return n if examples is None else min(n, examples)

        return cls(limit(data.top_doc.shape[-1]), limit(data.samples.doc.shape[-1]) if data.samples is not None else 0,
                   limit(data.bands.doc.shape[-1]) if data.bands is not None else 0)


def _slots(data: NeuronData, shown: Shown) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                          np.ndarray, np.ndarray]]:
    """Each kind of list (top, samples, bands) as flat arrays over its slots: doc, pos, case, value,
    and each slot's gate and in windows ``[slots, W]``."""
    C = len(CASES)
    W = data.context_before + 1 + data.context_after
    out = []
    k = shown.top
    case = np.broadcast_to(np.arange(C)[:, None, None], (C, len(HOOKS), k))
    out.append((data.top_doc[..., :k].ravel(), data.top_pos[..., :k].ravel(), case.ravel(),
                data.top_value[..., :k].ravel(), data.top_gate[..., :k, :].reshape(-1, W),
                data.top_in[..., :k, :].reshape(-1, W)))
    for examples, n in ((data.samples, shown.samples), (data.bands, shown.bands)):
        if examples is None or examples.gate is None:
            continue
        doc, pos = examples.doc[..., :n], examples.pos[..., :n]
        case = np.broadcast_to(np.arange(C).reshape((C,) + (1,) * (doc.ndim - 1)), doc.shape)
        post = examples.value[:, 0][..., :n]  # hook_post of each example
        out.append((doc.ravel(), pos.ravel(), case.ravel(), post.ravel(), examples.gate[..., :n, :].reshape(-1, W),
                    examples.in_[..., :n, :].reshape(-1, W)))
    return out


def neuron_row(data: NeuronData, shown: Shown, telling: int | None, context: str = "") -> dict:
    """One neuron's row of its data file (see :func:`neuron_schema`). ``data`` has its windows;
    ``telling`` is the case its page opens (``render.telling_case``); ``context`` the JSON of
    :func:`context.light_context` ("" where the file has neither related neurons nor effects)."""
    kinds = _slots(data, shown)
    doc = np.concatenate([k[0] for k in kinds]).astype(np.int64)
    pos = np.concatenate([k[1] for k in kinds]).astype(np.int64)
    case = np.concatenate([k[2] for k in kinds])
    gate = np.concatenate([k[4] for k in kinds])
    in_ = np.concatenate([k[5] for k in kinds])
    valid = np.flatnonzero(doc >= 0)
    # Distinct examples in (doc, pos) order: a position shared by lists of its case (within a gate+ case the
    # gate and act(gate) lists are the same examples) is stored once, and ascending documents delta-encode.
    # (A position is in one case; the case in the key keeps files that break that rule apart too.)
    unique, first, inverse = np.unique(((doc[valid] << 32 | pos[valid]) << 2) | case[valid], return_index=True,
                                       return_inverse=True)
    example = np.full(doc.shape, -1, dtype=np.int16)
    example[valid] = inverse.ravel()
    source = valid[first]
    C = len(CASES)
    windows = np.stack([gate[source], in_[source]], axis=1).astype(np.float64)  # [U, 2, W]
    # The codes' scale comes from the positions the statistics count: a BOS's attention-sink values
    # (ten times the rest) would leave every other value a few codes (they clip to the scale instead).
    counted = (pos[source, None] + np.arange(-data.context_before, data.context_after + 1)
               >= first_counted_position(data.attrs))
    with np.errstate(invalid="ignore"):
        reach = np.fmax.reduce(np.where(counted[:, None], np.abs(windows), np.nan), axis=-1)  # [U, 2]
    largest = np.zeros((C, 2))
    np.fmax.at(largest, case[source], np.nan_to_num(reach, nan=0.0, posinf=0.0))
    largest[~(largest > 0)] = 1.0
    codes = encode_windows(windows, largest[case[source]][..., None]).transpose(1, 0, 2)  # [2, U, W]
    values = np.concatenate([k[3] for k in kinds]).astype(np.float32)
    values[doc < 0] = np.nan
    nonfinite = data.nonfinite if data.nonfinite is not None else np.zeros(len(NONFINITE_COLUMNS))
    summary = np.concatenate([
        data.count, data.sum.ravel(), data.min.ravel(), data.max.ravel(), nonfinite,
        [data.cos_gate_in, data.cos_gate_out, data.cos_in_out], [float(data.flipped)],
        [-1 if telling is None else telling], [-1 if data.routed is None else data.routed]]).astype(np.float64)
    dist = (encode_counts(np.concatenate([data.hist.ravel(), data.density.ravel()])) if data.hist is not None
            else np.zeros(0, np.uint8)).tobytes()
    effect = np.zeros(0, np.float32)
    if data.top_next_score is not None and data.top_final_scale is not None:  # the top slots come first
        top = example[:data.top_doc[..., :shown.top].size]
        filled = top >= 0
        effect = np.full((2, len(unique)), np.nan, np.float32)
        for row, per_slot in enumerate((data.top_final_scale, data.top_next_score)):
            effect[row, top[filled]] = per_slot[..., :shown.top].ravel()[filled]
        effect = effect.ravel()
    return {"neuron": data.neuron, "summary": summary, "dist": dist, "lists": example, "effect": effect,
            "values": np.concatenate([values, largest.astype(np.float32).ravel()]),
            "place": np.concatenate([unique >> 34, (unique >> 2) & 0xFFFFFFFF]).astype(np.int32),
            "window": codes.astype(np.int8).tobytes(), "context": context}


def _table(rows: Sequence[dict], schema):
    """Rows as an Arrow table, each list column from one flat array and its offsets (fast)."""
    import pyarrow as pa

    columns = []
    for field in schema:
        values = [row[field.name] for row in rows]
        if pa.types.is_list(field.type):
            offsets = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int32)
            inner = field.type.value_type
            data = (pa.array([x for v in values for x in v], inner) if pa.types.is_string(inner) else
                    pa.array(np.concatenate([np.asarray(v) for v in values] or [np.zeros(0)]).astype(inner.to_pandas_dtype()),
                             inner))
            columns.append(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), data))
        else:
            columns.append(pa.array(values, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _write(table, path: Path, encodings: dict[str, str]) -> tuple[int, int]:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=1, compression="zstd", compression_level=ZSTD_LEVEL,
                   use_dictionary=False, write_statistics=False, store_schema=False, column_encoding=encodings)
    with open(path, "rb") as f:
        f.seek(-8, 2)
        tail = 8 + int.from_bytes(f.read(4), "little")  # the footer and its length and magic
    return path.stat().st_size, tail


#: Encodings: floats by byte planes, example indices and places as deltas (documents ascend).
NEURON_ENCODINGS = {"summary.list.element": "BYTE_STREAM_SPLIT",
                    "lists.list.element": "DELTA_BINARY_PACKED", "values.list.element": "BYTE_STREAM_SPLIT",
                    "place.list.element": "DELTA_BINARY_PACKED"}


def write_neuron_file(rows: Sequence[dict], path: Path) -> tuple[int, int]:
    """One data file of neuron rows (one row group each); returns its size and its footer's (with the
    8 bytes after it: what a reader fetches first)."""
    return _write(_table(rows, neuron_schema()), path, NEURON_ENCODINGS)


def vocab_array(vocab: Sequence[str]):
    """The display strings of the token ids as one Arrow array, for :func:`write_corpus_file`."""
    import pyarrow as pa

    return pa.array(vocab, pa.string())


def write_corpus_file(docs: Sequence[int], titles: Sequence[str | None], tokens: Sequence[np.ndarray], vocab,
                      path: Path) -> tuple[int, int]:
    """One corpus file: each document's id, title and tokens (its token ids, shown as their strings in
    ``vocab``, a :func:`vocab_array`), one row group each. The strings are gathered by Arrow
    (``take``), not one Python string at a time: the corpus was a third of a 7B model's build."""
    import pyarrow as pa

    ids = np.concatenate(list(tokens)) if len(tokens) else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in tokens], dtype=np.int64)]).astype(np.int32)
    table = pa.Table.from_arrays([pa.array(docs, pa.int32()), pa.array(titles, pa.string()),
                                  pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), vocab.take(pa.array(ids)))],
                                 schema=corpus_schema())
    return _write(table, path, {})


def neuron_file(layer: int, neuron: int, expert: int | str | None = None) -> tuple[str, int]:
    """The data file (relative to the data folder) and row group of a neuron, when every neuron of its
    layer (or expert) is listed; :func:`build.write_data` records the rows of partial lists."""
    folder = f"neurons/L{layer}" + ("" if expert is None else "/S" if expert == "s" else f"/E{int(expert)}")
    return f"{folder}/{neuron // NEURONS_PER_FILE}.parquet", neuron % NEURONS_PER_FILE


def corpus_file(doc: int) -> str:
    return f"corpus/{doc // DOCS_PER_FILE}.parquet"


def act_table(act_fn: str) -> bytes:
    """act(x) rounded to float16 for every float16 bit pattern x (in order of the patterns), stored as
    the differences of consecutive results' bit patterns (int16, wrapping; the first from 0),
    gzip-compressed: 2 KB for SiLU where the plain table is 88 KB. The browser computes act(gate) from
    this table, the one activation rule (:mod:`mkdocs_gluscope.activations`)."""
    x = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view("<f2").astype(np.float64)
    with np.errstate(all="ignore"):
        bits = act_values(x, act_fn).astype("<f2").view(np.uint16).astype(np.int64)
    deltas = np.diff(np.concatenate([[0], bits])).astype(np.int64) % (1 << 16)
    return gzip.compress(deltas.astype("<u2").tobytes(), compresslevel=9, mtime=0)


def dumps(content: object) -> str:
    """JSON as the site writes it: compact, UTF-8, and no NaN or infinity (which JSON does not have)."""
    return json.dumps(content, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
